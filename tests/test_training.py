"""train.py and the trainer: config errors, shipped configs, exact resume, non-finite steps, signals, run folders."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import lvdm.training.objectives as objectives_module
import lvdm.training.setup as training_setup
from lvdm.config import load_config
from lvdm.errors import CheckpointError, ConfigError, LvdmError
from lvdm.training.checkpoint import list_checkpoints, load_checkpoint
from lvdm.training.logs import read_log
from lvdm.training.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]


def run_script(
    *args: str, cwd: Path = REPO, timeout: int = 300, tmpdir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python ARGS``; ``tmpdir``: its TMPDIR (torchrun leaves a ``torchelastic_*`` folder there)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)} | ({"TMPDIR": str(tmpdir)} if tmpdir else {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_a_typo_exits_2_with_did_you_mean_before_anything_loads(tmp_path):
    started = time.perf_counter()
    result = run_script(str(REPO / "train.py"), "train.lrr=1e-4", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "did you mean 'train.lr'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was created or loaded
    assert time.perf_counter() - started < 30


def test_a_missing_base_is_one_line_and_exit_1(tmp_path, command):
    result = command(
        str(REPO / "train.py"), "--config", str(REPO / "configs/demo.yaml"),
        f"model.base={tmp_path / 'nope'}", f"output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unwritable_output_dir_fails_before_the_model_loads(tiny_assets, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    loaded = []
    monkeypatch.setattr("lvdm.models.load_base", lambda *a, **k: loaded.append(1))
    with pytest.raises(CheckpointError, match="not writable"):
        Trainer(load_config([], tiny_overrides(tiny_assets, blocker / "run")))
    assert not loaded


def test_a_run_that_fails_before_writing_leaves_no_folder_it_made(tiny_assets, tmp_path, monkeypatch):
    """A run refused by its data (the holdout takes every clip) left its marker and lock in the new output_dir it
    made, and the parents it made for it. The control: the same failure in a folder that already existed leaves
    that folder."""
    for existed in (False, True):  # the run makes new/runs/run, or finds it there
        out = tmp_path / f"existed-{existed}" / "new" / "runs" / "run"
        out.mkdir(parents=True) if existed else (tmp_path / f"existed-{existed}").mkdir()
        with pytest.raises(LvdmError, match="leaves nothing to train on"):
            train(load_config([], tiny_overrides(tiny_assets, out, **{"data.holdout": 6})), progress=False)
        assert out.exists() == existed, sorted(p.name for p in (tmp_path / f"existed-{existed}").rglob("*"))
        assert existed or not list((tmp_path / f"existed-{existed}").iterdir())  # its parents made for it too
    # a folder the run made, where a file was written meanwhile (a user's, here), is kept with it
    out = tmp_path / "written" / "run"
    real = training_setup.build_data

    def user_writes_then_fails(cfg, *args, **kwargs):
        (out / "notes.txt").write_text("mine")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(training_setup, "build_data", user_writes_then_fails)
    with pytest.raises(LvdmError, match="leaves nothing to train on"):
        train(load_config([], tiny_overrides(tiny_assets, out, **{"data.holdout": 6})), progress=False)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_builds(config, tiny_assets, tmp_path):
    """Each YAML, with the tiny model and clips swapped in, builds its model, data and optimizer."""
    from lvdm.training.setup import build_data, build_model, build_optimizer

    text = (REPO / "configs" / config).read_text()
    assert text.startswith("#") and "python train.py" in text.split("\n\n")[0]  # it says how to run it
    assets = tiny_assets | ({"base": tiny_assets["base_sd2"]} if "sd21" in config else {})
    assets |= {"base": tiny_assets["upscaler"]} if "upscale" in config else {}
    overrides = [o for o in tiny_overrides(assets, tmp_path) if not o.startswith("train.")] + ["data.manifest=null"]
    if "context" in config or "interpolate" in config:
        overrides += ["train.interpolate_every=2"]  # keyframes 0, 2 of the 4 frames
    overrides += ["data.frame_stride=2"] if "interpolate" in config else []  # the 12-frame clips; fine stride 1
    overrides += ["train.upscale_patch=16"] if "upscale" in config else []  # the 16 px clips whole
    overrides += [f"model.image_encoder={tiny_assets['image_encoder']}"] if "i2v" in config else []
    if "distill" in config:  # the teacher: a module trained on the tiny base (its layers at zero do as well)
        from lvdm.models import VideoUNet, load_base

        VideoUNet.from_unet2d(load_base(tiny_assets["base"]).unet).save_temporal(tmp_path / "teacher.safetensors")
        overrides += [f"model.temporal_init={tmp_path / 'teacher.safetensors'}"]
    if "animatediff" in config:  # the motion module to fine-tune: a tiny MotionAdapter folder
        from lvdm.testing.animatediff import tiny_motion_adapter

        tiny_motion_adapter().save_pretrained(tmp_path / "adapter")
        overrides += [f"model.temporal_init={tmp_path / 'adapter'}"]
    cfg = load_config(
        [REPO / "configs" / config], [*overrides, "data.holdout=1", "model.gradient_checkpointing=false"]
    )
    video, frozen, trainable = build_model(cfg, torch.device("cpu"), "no")
    data = build_data(cfg, frozen, rank=0, world=1)
    optimizer, _ = build_optimizer(cfg, list(trainable.values()), torch.device("cpu"))
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in trainable.values()}  # the temporal layers, and a spatial LoRA if configured
    assert {id(p) for p in video.temporal_parameters()} <= optimized
    assert next(iter(data.loader))["video"].shape == (cfg.train.batch_size, 4, 3, 16, 16)
    expected = "v_prediction" if "sd21" in config or "upscale" in config else "epsilon"
    assert frozen.noise_scheduler.config.prediction_type == expected


def _run(tiny_assets, output_dir, **extra) -> Trainer:
    trainer = Trainer(load_config([], tiny_overrides(tiny_assets, output_dir, **extra)), progress=False)
    trainer.run()
    return trainer


def _state(trainer: Trainer) -> dict[str, object]:
    return {
        "weights": {k: v.clone() for k, v in trainer.video.temporal_state_dict().items()},
        "optimizer": trainer.optimizer.state_dict(),
        "ema": {k: v.clone() for k, v in trainer.ema.state_dict().items()} if trainer.ema else None,
        "lr": trainer.lr_schedule.get_last_lr(),
        "step": trainer.step,
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_resume_continues_bit_identically(tiny_assets, tmp_path):
    """4 steps straight == 2 steps, stop (checkpoint), resume for 2 more: same weights, optimizer, EMA, LR, losses."""
    extra = {"train.ema_decay": 0.9, "train.warmup_steps": 2, "train.lr_schedule": "cosine"}
    straight = _run(tiny_assets, tmp_path / "straight", **extra)
    interrupted = Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "split", **extra)), progress=False)
    for _ in range(2):
        assert interrupted._optimizer_step()[2]
    interrupted.save()
    del interrupted
    resumed = _run(tiny_assets, tmp_path / "split", **extra, **{"train.resume": "auto"})
    assert straight.step == resumed.step == 4
    _assert_same(_state(straight), _state(resumed))
    losses = {r["step"]: r["loss"] for r in read_log(tmp_path / "straight" / "log.jsonl") if "grad_norm" in r}
    resumed_losses = {r["step"]: r["loss"] for r in read_log(tmp_path / "split" / "log.jsonl") if "grad_norm" in r}
    assert resumed_losses == {step: losses[step] for step in (3, 4)}


def test_held_out_figures_are_those_of_the_exported_ema_weights(tiny_assets, tmp_path):
    """With EMA on, the figures logged at validation describe the EMA weights (what temporal.safetensors holds),
    not the raw ones, and the raw weights are back in place afterwards."""
    extra = {"train.ema_decay": 0.5, "train.lr": 1e-2}  # a large step, so raw and averaged weights differ
    trainer = Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra)), progress=False)
    for _ in range(2):
        assert trainer._optimizer_step()[2]
    model = trainer.acc.unwrap_model(trainer.model)
    before = _state(trainer)["weights"]
    raw = trainer.objective.evaluate(model, trainer.data.validation)
    with trainer._ema_weights():
        averaged = trainer.objective.evaluate(model, trainer.data.validation)
    figures, _ = trainer.validate()
    assert raw and set(raw) <= set(figures)
    assert {key: figures[key] for key in averaged} == averaged
    assert any(raw[key] != averaged[key] for key in raw)  # the control: the two sets of weights tell apart
    _assert_same(before, _state(trainer)["weights"])


def test_a_finished_run_is_extended_by_raising_max_steps(tiny_assets, tmp_path):
    _run(tiny_assets, tmp_path / "run", **{"train.max_steps": 2})
    extended = _run(tiny_assets, tmp_path / "run", **{"train.max_steps": 3, "train.resume": "latest"})
    assert extended.step == 3
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "checkpoint-00000003"


def test_the_report_of_a_resumed_run_names_the_step_of_its_first_loss(tiny_assets, tmp_path):
    """A resumed run's first loss is that of the step after its checkpoint, not the run's first step (log.jsonl's
    step 1): the report said "at the first step" beside a loss the log has at step 3."""
    from lvdm.training.report import format_report

    fresh = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **{"train.max_steps": 2})),
                  progress=False)  # fmt: skip
    extra = {"train.max_steps": 3, "train.resume": "auto"}
    resumed = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra)), progress=False)
    losses = {r["step"]: r["loss"] for r in read_log(tmp_path / "run" / "log.jsonl") if "grad_norm" in r}
    assert (fresh.first_loss, resumed.first_loss) == (losses[1], losses[3]) and losses[1] != losses[3]
    assert f"{losses[1]:.4f} at the first step ->" in format_report(fresh)  # the control: a fresh run's first step
    assert f"{losses[3]:.4f} at step 3, the first after resuming ->" in format_report(resumed)
    assert not resumed.held_out and "of a batch of training clips" in format_report(resumed)  # data.holdout=0


def test_the_report_says_when_its_held_out_figures_are_of_training_clips(tmp_path):
    """With data.holdout=0 validation measures a batch of training clips; the report called them held-out."""
    from lvdm.training.report import format_report
    from lvdm.training.trainer import TrainResult

    names = ("motion_gain", "loss_shuffled", "loss_in_order", "motion_gain_each_frame", "loss_each_frame",
             "layers_off_ratio", "loss_layers_off")  # fmt: skip
    gain = dict.fromkeys(names, 1.0)
    reports = {held: format_report(TrainResult(tmp_path, 4, tmp_path / "t", gain=gain, held_out=held))
               for held in (True, False)}  # fmt: skip
    assert "motion gain:" in reports[True] and "training clips" not in reports[True]  # the control
    assert "data.holdout=0: the 'held-out' figures above are of a batch of training clips" in reports[False]


def test_a_resume_with_a_changed_lr_or_weight_decay_trains_with_them(tiny_assets, tmp_path):
    """The note "resuming with train.lr changed" was all that changed: the restored optimizer and schedule kept the
    checkpoint's rate and weight decay. Unchanged, the restored rates are exact (the resume tests above)."""
    extra = {"train.warmup_steps": 4, "train.lr_schedule": "cosine", "train.max_steps": 6}
    _run(tiny_assets, tmp_path / "run", **(extra | {"train.max_steps": 2}))
    changed = {"train.lr": 1e-3, "train.weight_decay": 0.5, "train.resume": "latest"}
    trainer = Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra, **changed)),
                      progress=False)  # fmt: skip
    assert trainer.step == 2
    group = trainer.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.5
    assert group["lr"] == pytest.approx(1e-3 * 2 / 4)  # the warmup's third step, of the new peak rate
    assert trainer.lr_schedule.get_last_lr() == [group["lr"]]
    assert trainer._optimizer_step()[2]
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)


def test_a_corrupted_checkpoint_is_refused_by_name(tiny_assets, tmp_path):
    _run(tiny_assets, tmp_path / "run", **{"train.max_steps": 2})
    latest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    target = latest / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **{"train.resume": "latest"})))


def test_changed_shapes_on_resume_are_an_error(tiny_assets, tmp_path):
    _run(tiny_assets, tmp_path / "run", **{"train.max_steps": 2})
    overrides = tiny_overrides(tiny_assets, tmp_path / "run", **{"train.resume": "auto", "data.num_frames": 6})
    with pytest.raises(ConfigError, match="data.num_frames: 4 in the checkpoint, 6 now"):
        Trainer(load_config([], overrides))


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("model.context", "true", "model.context: False in the checkpoint, True now"),
        ("model.fps_conditioning", "true", "model.fps_conditioning: False in the checkpoint, True now"),
        ("train.ema_decay", "0.9", "train.ema_decay: None in the checkpoint, 0.9 now"),
    ],
)
def test_a_resume_that_adds_trained_layers_is_refused_naming_the_key(tiny_assets, tmp_path, key, value, said):
    """These add trained layers (or an EMA of them): the change was a note, then, once the model had loaded,
    "its trained weights do not match this model's trainable layers" (or "lacks ema"), naming no setting."""
    _run(tiny_assets, tmp_path / "run", **{"train.max_steps": 2})
    overrides = tiny_overrides(tiny_assets, tmp_path / "run", **{"train.resume": "auto", key: value})
    with pytest.raises(ConfigError, match=re.escape(said)):
        Trainer(load_config([], overrides))


def test_a_fresh_run_into_a_used_folder_needs_resume_or_overwrite(tiny_assets, tmp_path):
    _run(tiny_assets, tmp_path / "run", **{"train.max_steps": 1})
    with pytest.raises(LvdmError, match="train.resume=auto"):
        Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "run")))
    (tmp_path / "run" / "my_notes.txt").write_text("keep me")
    with pytest.raises(LvdmError, match="my_notes.txt.*whatever train.overwrite says"):  # not lvdm's: refused
        Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **{"train.overwrite": "true"})))
    assert (tmp_path / "run" / "my_notes.txt").read_text() == "keep me"
    assert list_checkpoints(tmp_path / "run" / "checkpoints")  # nothing was deleted
    (tmp_path / "run" / "my_notes.txt").unlink()
    _run(tiny_assets, tmp_path / "run", **{"train.max_steps": 1, "train.overwrite": "true"})


def test_a_nonfinite_step_changes_nothing_and_a_run_of_them_stops(tiny_assets, tmp_path, monkeypatch):
    trainer = Trainer(
        load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **{"train.ema_decay": 0.9,
                                                                          "train.max_nonfinite_steps": 3})),
        progress=False,
    )  # fmt: skip
    assert trainer._optimizer_step()[2]  # one good step, so the optimizer has moments
    before = _state(trainer)
    real = objectives_module.training_loss

    def nan_loss(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms.loss = terms.loss * float("nan")
        return terms

    monkeypatch.setattr(objectives_module, "training_loss", nan_loss)
    assert not trainer._optimizer_step()[2]
    _assert_same(before, _state(trainer))
    assert trainer.skipped_total == 1
    assert not trainer._optimizer_step()[2]
    with pytest.raises(LvdmError, match="3 steps in a row"):
        trainer._optimizer_step()
    assert read_log(tmp_path / "run" / "log.jsonl")[-1]["skipped_nonfinite"] == 3


def test_a_skipped_fp16_step_leaves_the_loss_scaler_ready_for_the_next():
    """Under fp16 (GPU only, so a real scaler on the CPU here, driven as the trainer drives accelerate's): the
    skipped step's gradients were already unscaled by ``clip_grad_norm_``; the scaler must see its ``update()`` or
    the next step's unscale fails ("unscale_() has already been called")."""
    from lvdm.training.trainer import discard_gradients

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    def backward_and_clip(factor: float) -> None:  # acc.backward, then acc.clip_grad_norm_
        scaler.scale(model(torch.ones(1, 3)).sum() * factor).backward()
        scaler.unscale_(optimizer)

    before = model.weight.detach().clone()
    backward_and_clip(float("nan"))
    discard_gradients(optimizer, scaler)
    assert scaler.get_scale() == 128.0 and model.weight.grad is None  # lowered, as for an overflow
    backward_and_clip(1.0)  # the next step unscales again
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(model.weight, before)


def test_sigterm_finishes_the_step_saves_and_stops(tiny_assets, tmp_path, monkeypatch):
    real = objectives_module.training_loss
    calls = []

    def signalling_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives_module, "training_loss", signalling_loss)
    result = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **{"train.max_steps": 50})),
                   progress=False)  # fmt: skip
    assert result.stopped_by_signal and result.step == 2
    latest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert latest.name == "checkpoint-00000002"
    parts, metadata = load_checkpoint(latest)
    assert parts["trainer"]["step"] == 2 and metadata["config"]["train"]["max_steps"] == 50
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back


def test_a_run_killed_while_validating_validates_that_step_again_when_resumed(tiny_assets, tmp_path, monkeypatch):
    """The checkpoint of a step was taken before its validation, so a run killed while validating resumed after it,
    and that step's samples and figures were never made (the test fails so when validation is moved back after the
    checkpoint). A validation that fails by itself still saves its step: otherwise every resume would fail there."""
    extra = {"data.holdout": 1, "train.validation_prompts": "[a red disc]", "train.validation_steps": 1,
             "train.checkpoint_every": 1, "train.validate_every": 2, "train.max_steps": 3}  # fmt: skip
    real = objectives_module.DenoisingObjective.render

    def killed(self, model, out, **kwargs):
        real(self, model, out, **kwargs)  # what rendered is on disk; the figures are not yet logged
        raise KeyboardInterrupt

    monkeypatch.setattr(objectives_module.DenoisingObjective, "render", killed)
    with pytest.raises(KeyboardInterrupt):
        train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra)), progress=False)
    monkeypatch.setattr(objectives_module.DenoisingObjective, "render", real)
    train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra, **{"train.resume": "auto"})),
          progress=False)  # fmt: skip
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "samples_frame_change" in r]
    assert [r["step"] for r in records] == [2, 3]  # step 2's validation, once, then the final one
    before = read_log(tmp_path / "run" / "log.jsonl")
    train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra, **{"train.resume": "auto"})),
          progress=False)  # fmt: skip
    # resumed at its last step it validates that step again: its figures once in the log (they were twice)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / "run" / "log.jsonl")] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in before]  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "run" / "samples" / "step-00000002").iterdir()) == [
        "00.gif", "00.mp4", "image_mode_00.gif", "image_mode_00.mp4"]  # fmt: skip

    def fails(self, model, out, **kwargs):  # out of memory, a full disk: the same at every try
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(objectives_module.DenoisingObjective, "render", fails)
    extra |= {"train.checkpoint_every": 2}  # a validation that always fails must not cost its step's checkpoint
    with pytest.raises(OSError, match="No space"):
        train(load_config([], tiny_overrides(tiny_assets, tmp_path / "full", **extra)), progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "full" / "checkpoints")] == ["checkpoint-00000002"]


def test_a_run_resumed_at_its_last_step_shows_that_step_once_in_tensorboard(tiny_assets, tmp_path):
    """Resumed at its last step, a run validates that step again; log.jsonl dropped the first validation's records,
    but TensorBoard kept its figures and videos and showed each twice. Now it forgets the step and is given back the
    step's training record (the loss, which is not logged again)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = {"data.holdout": 1, "train.validation_prompts": "[a red disc]", "train.validation_steps": 1,
             "train.max_steps": 1}  # fmt: skip
    train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra)), progress=False)
    train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra, **{"train.resume": "auto"})),
          progress=False)  # fmt: skip
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("motion_gain")] == [1]
    assert [e.step for e in events.Images("samples/samples")] == [1]
    logged = [r["loss"] for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged) and len(logged) == 1


def test_a_validation_that_fails_off_the_checkpoint_schedule_still_saves_its_step(tiny_assets, tmp_path, monkeypatch):
    """README: a validation that fails by itself still saves the step. With validate_every not a multiple of
    checkpoint_every, nothing was saved: the steps were lost and every resume failed at that validation again."""

    def fails(self, model, out, **kwargs):  # out of memory, NaN samples: the same at every try
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(objectives_module.DenoisingObjective, "render", fails)
    extra = {"data.holdout": 1, "train.validate_every": 2, "train.checkpoint_every": 3, "train.max_steps": 4}
    with pytest.raises(OSError, match="No space"):
        train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **extra)), progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-00000002"]


def test_the_run_writes_what_it_promises(tiny_assets, tmp_path):
    out = tmp_path / "run"
    extra = {"data.holdout": 1, "train.validation_prompts": "[a red disc]", "train.validation_steps": 2}
    result = train(load_config([], tiny_overrides(tiny_assets, out, **extra)), progress=False)
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "checkpoints", "temporal.safetensors", "log.jsonl",
                                               "tensorboard", "samples"}  # fmt: skip
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-00000002", "checkpoint-00000004"]
    names = ["00.gif", "00.mp4", "image_mode_00.gif", "image_mode_00.mp4"]  # the video, and the base frame by frame
    assert sorted(p.name for p in result.samples) == names
    figures = {"motion_gain", "motion_gain_each_frame", "layers_off_ratio", "clips_frame_change",
               "samples_frame_change", "image_mode_frame_correlation"}  # fmt: skip
    assert result.gain and figures <= result.gain.keys()
    from lvdm.models.temporal_file import read_temporal_file

    module = read_temporal_file(out / "temporal.safetensors")
    assert module.training_config["data"]["num_frames"] == 4
    records = read_log(out / "log.jsonl")
    assert {"loss", "lr", "grad_norm"} <= records[0].keys()
    logged = {key for record in records if record["step"] == result.step for key in record}
    assert figures <= logged
    json.dumps(records)


def test_two_processes_train_one_consistent_checkpoint(tiny_assets, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(REPO / "train.py"),
            "--quiet", *tiny_overrides(tiny_assets, out, **{"train.max_steps": 2})]  # fmt: skip
    result = run_script(*args, timeout=600, tmpdir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished at step 2") == 1, result.stdout  # one summary: rank 0's
    checkpoints = list_checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints] == ["checkpoint-00000002"]
    parts, metadata = load_checkpoint(checkpoints[0])
    assert metadata["world_size"] == 2
    assert parts["trainer"]["micro_batches"] == 2  # each rank drew its own 2 micro-batches


def _worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank`` (a child of the launcher)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def test_a_signal_to_one_rank_stops_both_at_one_step_with_one_checkpoint(tiny_assets, tmp_path):
    """A SIGTERM that reaches one rank only (a scheduler's, here rank 1's): the ranks agree before every step, so both
    leave the loop together, save one checkpoint and skip the final samples. Unagreed, the other rank went into the
    next step's collectives alone and waited there."""
    out = tmp_path / "run"
    extra = {"train.max_steps": 100000, "train.checkpoint_every": 100000, "train.validation_prompts": "[a disc]"}
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518", str(REPO / "train.py"),
            "--quiet", *tiny_overrides(tiny_assets, out, **extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)}  # torchrun's folder
    launcher = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=REPO)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "log.jsonl").exists():  # training has begun
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.5)
        os.kill(_worker_of_rank(launcher.pid, 1), signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=180)
    finally:
        launcher.kill()
    ours = stderr.split("stopped by a signal")  # then torchrun's own report: a rank exited 75, not 0
    assert len(ours) == 2 and "Traceback" not in ours[0], stderr
    [checkpoint] = list_checkpoints(out / "checkpoints")
    parts, metadata = load_checkpoint(checkpoint)
    assert metadata["world_size"] == 2 and f"at step {metadata['step']} " in stderr
    assert not (out / "samples").exists()


def test_joint_image_video_training_runs_images_in_image_mode(tiny_assets, tmp_path, monkeypatch):
    real = objectives_module.training_loss
    seen = []

    def recording_loss(model_fn, batch, *args, **kwargs):
        seen.append((batch["is_image"].tolist(), tuple(batch["video"].shape)))
        return real(model_fn, batch, *args, **kwargs)

    monkeypatch.setattr(objectives_module, "training_loss", recording_loss)
    sources = f"[{{kind: folder, path: '{tiny_assets['clips']}'}}, {{kind: images, path: '{tiny_assets['images']}'}}]"
    overrides = [o for o in tiny_overrides(tiny_assets, tmp_path / "run") if not o.startswith("data.root")]
    cfg = load_config(
        [],
        [
            *overrides,
            f"data.sources={sources}",
            "train.image_batch_ratio=0.5",
            "train.max_steps=12",
            "model.spatial_lora_rank=2",
        ],
    )
    train(cfg, progress=False)
    image_batches = [shape for flags, shape in seen if all(flags)]
    video_batches = [shape for flags, shape in seen if not any(flags)]
    assert len(image_batches) + len(video_batches) == len(seen)  # a batch never mixes the two
    assert image_batches and video_batches
    assert {shape[1] for shape in image_batches} == {1} and {shape[1] for shape in video_batches} == {4}


@pytest.mark.parametrize("alpha", [None, 8.0])  # alpha 8 at rank 2 (scale 4) exported without it loaded at 1/4
def test_spatial_lora_and_unfrozen_blocks_train_and_export_onto_a_plain_base(alpha, tiny_assets, tmp_path):
    from lvdm.models import VideoUNet, load_base

    out = tmp_path / "run"
    extra = {"model.spatial_lora_rank": 2, "model.unfreeze": "[up_blocks.1.resnets.0]", "train.lr": "1e-2"}
    extra |= {"model.spatial_lora_alpha": alpha} if alpha else {}
    trainer = Trainer(load_config([], tiny_overrides(tiny_assets, out, **extra)), progress=False)
    base_before = {
        n: p.detach().clone() for n, p in trainer.video.unet.named_parameters() if n not in trainer.trainable
    }
    names = list(trainer.trainable)
    assert any("lora_A" in n for n in names) and any(".temporal." in n for n in names)
    assert any(n.startswith("up_blocks.1.resnets.0.spatial.") for n in names)
    assert not any("lora" in n for n in names if ".temporal." in n)  # the temporal attention gets no LoRA
    trainer.run()
    for name, param in trainer.video.unet.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name  # everything else stayed frozen

    base = load_base(tiny_assets["base"], loras=[out / "spatial_lora.safetensors"],
                     spatial_weights=out / "spatial_weights.safetensors")  # fmt: skip
    moved = VideoUNet.from_temporal_file(base.unet, out / "temporal.safetensors")
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        expected = trainer.video(sample, torch.tensor([300]), text, image_only_indicator=torch.ones(1))
        got = moved(sample, torch.tensor([300]), text, image_only_indicator=torch.ones(1))
        untrained = VideoUNet.from_unet2d(load_base(tiny_assets["base"]).unet)(
            sample, torch.tensor([300]), text, image_only_indicator=torch.ones(1)
        )
    assert (got - expected).abs().max() < 1e-4
    assert (untrained - expected).abs().max() > 1e-3  # the LoRA and the unfrozen block did learn something


def test_a_held_out_clip_that_cannot_be_read_is_logged_and_left_out_of_validation(tiny_assets, tmp_path):
    """An unreadable held-out clip was replaced by another held-out clip, silently: validation read one clip twice
    and skipped.jsonl never named it. Now it is logged, said once, and left out; none readable is an error."""
    import shutil

    from lvdm.errors import DataError

    clips = shutil.copytree(tiny_assets["clips"], tmp_path / "clips")
    listed = sorted(clips.rglob("*.mp4"))  # as the folder source lists them
    first, other = listed[0], listed[3]  # data.holdout=2 of 6 holds out entries 0 and 3
    first.write_bytes(b"not a video")
    out = tmp_path / "run"
    extra = {"data.root": clips, "data.holdout": 2, "train.max_steps": 2}
    with pytest.warns(UserWarning, match=r"1 held-out clip\(s\) cannot be used .*" + first.name):
        trainer = Trainer(load_config([], tiny_overrides(tiny_assets, out, **extra)), progress=False)
    assert [source for batch in trainer.data.validation for source in batch["source"]] == [str(other)]  # once
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(first)]
    import warnings

    from lvdm.training.setup import build_data

    with warnings.catch_warnings(record=True) as said:  # another rank logs it to its own file and says nothing
        warnings.simplefilter("always")
        build_data(trainer.cfg, trainer.frozen, rank=1, world=2)
    assert not [w for w in said if "cannot be used" in str(w.message)], [str(w.message) for w in said]
    logged = [json.loads(line)["path"] for line in (out / "skipped.rank1.jsonl").read_text().splitlines()]
    assert logged == [str(first)]
    other.write_bytes(b"")  # both held-out clips unreadable
    with pytest.raises(DataError, match="bad samples in a row"):
        Trainer(load_config([], tiny_overrides(tiny_assets, tmp_path / "run2", **extra)), progress=False)
