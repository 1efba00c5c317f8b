"""Small frictions a new user hit (issue 19, item 4): each one-line error, message and default, checked."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lvdm.data.cache import LatentCache
from lvdm.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def test_a_missing_latent_cache_names_the_command_that_builds_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        LatentCache(tmp_path / "no-cache")
    assert "python -m lvdm.cache" in str(caught.value) and "lvdm.data.cache" not in str(caught.value)


# ------------------------------------------------------------------------------------------------ train.py
@pytest.fixture
def train_script(monkeypatch, tmp_path):
    """train.py's ``main`` with the demo assets and the training itself stubbed out: what it decides, recorded."""
    import train as script
    from lvdm.training import demo, trainer
    from lvdm.training.trainer import TrainResult

    calls = {"demo": [], "train": []}
    monkeypatch.setattr(demo, "prepare_demo", lambda cfg, *a, **k: calls["demo"].append(cfg) or ["the assets"])
    result = TrainResult(tmp_path, 5, tmp_path / "temporal.safetensors", 1.0, 0.5)
    monkeypatch.setattr(trainer, "train", lambda cfg, **k: calls["train"].append(cfg) or result)
    monkeypatch.delenv("RANK", raising=False)
    return script, calls


@pytest.mark.parametrize(
    ("args", "makes_assets"),
    [
        ([], True),
        (["--config", "{repo}/configs/demo.yaml", "train.max_steps=5"], True),
        (["--config", "{copy}", "train.max_steps=5"], True),
        (["--config", "{repo}/configs/demo.yaml", "model.base={tmp}/mine"], False),
        (["--config", "{repo}/configs/t2v_sd15.yaml", "model.base={tmp}/sd15", "data.root={tmp}/clips"], False),
    ],
)
def test_the_demo_config_makes_its_assets_whatever_the_arguments(train_script, tmp_path, command, args, makes_assets):
    script, calls = train_script
    copy = tmp_path / "my_demo.yaml"
    copy.write_text(script.DEMO_CONFIG.read_text())
    args = [a.format(copy=copy, tmp=tmp_path, repo=script.DEMO_CONFIG.parents[1]) for a in args]
    done = command(script.__file__, "--quiet", *args)
    assert done.returncode == 0, done.stderr
    assert bool(calls["demo"]) == makes_assets and len(calls["train"]) == 1
    assert ("demo: made the assets" in done.stdout) == makes_assets


@pytest.mark.parametrize("option", ["--config", "--conf"])
def test_a_config_file_in_a_folder_named_with_an_equals_sign_is_a_file_not_an_override(
    train_script, tmp_path, command, option
):
    """``--config runs/lr=1e-4/config.yaml`` (a run folder named by its setting) was taken for an override, and
    --config then had no value: "argument --config: expected one argument"."""
    script, calls = train_script
    folder = tmp_path / "lr=1e-4"
    folder.mkdir()
    (folder / "config.yaml").write_text(script.DEMO_CONFIG.read_text() + "\n# mine\n")
    done = command(script.__file__, "--quiet", option, folder / "config.yaml", "train.max_steps=7")
    assert done.returncode == 0, done.stderr
    assert calls["train"][0].train.max_steps == 7  # the control: an override after it is still one


def test_the_value_of_any_option_is_never_an_override():
    from lvdm.cli import Parser, split_overrides

    parser = Parser(prog="x")
    parser.add_argument("--report")
    parser.add_argument("--quiet", action="store_true")
    args = ["--report", "a=b.jsonl", "--quiet", "train.lr=1", "--report=c=d", "data.root=x"]
    assert split_overrides(args, parser) == (["train.lr=1", "data.root=x"], ["--report", "a=b.jsonl", "--quiet",
                                                                            "--report=c=d"])  # fmt: skip


@pytest.mark.parametrize(("rank", "prints"), [("0", True), ("1", False)])
def test_only_rank_0_prints_the_summary(train_script, command, rank, prints):
    script, _ = train_script
    done = command(script.__file__, "--quiet", "train.max_steps=5", env={"RANK": rank})
    assert done.returncode == 0 and ("finished at step 5" in done.stdout) == prints, done.stderr


# ------------------------------------------------------------------------------------------------ sampling fps
@pytest.mark.parametrize(
    ("training_config", "fps"),
    [
        ({"data": {"frame_stride": 2, "target_fps": None}, "clip_fps": 12.0}, 12.0),  # 24 fps clips at stride 2
        ({"data": {"target_fps": 10.0}, "clip_fps": 12.0}, 10.0),  # a target rate is what the clips were resampled to
        ({"data": {"frame_stride": 2}}, None),  # a module from before clip_fps was recorded: the sampler's 8
    ],
)
def test_the_sampling_fps_default_is_the_modules_training_rate(tmp_path, training_config, fps):
    from lvdm import testing
    from lvdm.models import VideoUNet
    from lvdm.sampling_settings import temporal_defaults

    path = tmp_path / "module.safetensors"
    VideoUNet.from_unet2d(testing.tiny_unet("sd1")).save_temporal(path, training_config=training_config)
    assert temporal_defaults(path)["fps"] == fps


# ------------------------------------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def strided_run(tiny_assets, tmp_path_factory):
    """6 steps on 24 fps clips at stride 2 (12 fps), logged every 3 steps, one validation sample; each step's loss."""
    from conftest import tiny_overrides

    from lvdm.config import load_config
    from lvdm.training.trainer import Trainer, train

    real, losses = Trainer._optimizer_step, []

    def recording(self):
        loss, grad_norm, stepped = real(self)
        losses.extend([loss] if stepped else [])
        return loss, grad_norm, stepped

    out = tmp_path_factory.mktemp("strided") / "run"
    extra = {"data.frame_stride": 2, "train.max_steps": 6, "train.log_every": 3, "train.checkpoint_every": 6,
             "train.validation_prompts": "[a kite]", "train.validation_steps": 1}  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_optimizer_step", recording)
        result = train(load_config([], tiny_overrides(tiny_assets, out, **extra)), progress=False)
    return result, losses


def test_the_logged_and_summarised_loss_is_the_mean_over_the_log_window(strided_run):
    from lvdm.training.logs import read_log
    from lvdm.training.report import format_report

    result, losses = strided_run
    logged = {r["step"]: r["loss"] for r in read_log(result.output_dir / "log.jsonl") if "grad_norm" in r}
    assert len(losses) == 6 and len(set(losses)) == 6
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert logged == pytest.approx({1: losses[0], 3: mean(losses[1:3]), 6: mean(losses[3:6])})
    assert result.first_loss == losses[0] and result.last_loss == pytest.approx(mean(losses[3:6]))
    assert "the mean of the last 3 steps" in format_report(result)


def test_sampling_and_validation_default_to_the_clips_training_rate(strided_run):
    import av

    from lvdm.sampling_settings import temporal_defaults
    from lvdm.training.checkpoint import list_checkpoints, load_checkpoint

    result, _ = strided_run
    assert temporal_defaults(result.temporal_path)["fps"] == 12.0  # 24 fps clips at stride 2, no data.target_fps
    videos = [p for p in result.samples if p.suffix == ".mp4"]
    for video in videos:
        with av.open(str(video)) as container:
            assert container.streams.video[0].average_rate == 12, video
    assert videos
    _, metadata = load_checkpoint(list_checkpoints(result.output_dir / "checkpoints")[-1])
    assert metadata["clip_fps"] == 12.0  # so that python -m lvdm.export writes it too


def interrupting(monkeypatch, at_micro_batch: int, times: int, seen: list[str], capfd) -> None:
    """Ctrl-C ``times`` in a row while micro-batch ``at_micro_batch`` is drawn; what stderr said at once is kept."""
    import signal

    from lvdm.training.trainer import Trainer

    real = Trainer._next_batch

    def next_batch(self):
        if self.micro_batches + 1 == at_micro_batch:
            capfd.readouterr()  # what came before
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)
                seen.append(capfd.readouterr().err)
        return real(self)

    monkeypatch.setattr(Trainer, "_next_batch", next_batch)


def test_ctrl_c_says_at_once_it_stops_after_this_step(tiny_assets, tmp_path, monkeypatch, capfd):
    from conftest import tiny_overrides

    from lvdm.config import load_config
    from lvdm.training.trainer import train

    seen: list[str] = []
    interrupting(monkeypatch, 2, 1, seen, capfd)
    result = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **{"train.max_steps": 50})),
                   progress=False)  # fmt: skip
    assert seen == ["\nstopping after this step (Ctrl-C again to quit)\n"]
    assert result.stopped_by_signal and result.step == 2


def test_a_second_ctrl_c_quits_at_once(tiny_assets, tmp_path, monkeypatch, capfd, command):
    from conftest import tiny_overrides

    seen: list[str] = []
    interrupting(monkeypatch, 2, 2, seen, capfd)
    done = command(
        REPO / "train.py", "--quiet", *tiny_overrides(tiny_assets, tmp_path / "run", **{"train.max_steps": 50})
    )
    assert done.returncode == 130 and done.stderr.splitlines() == ["interrupted"], done.stderr
    assert len(seen) == 1 and "stopping after this step" in seen[0]  # the second one raised before it returned
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_resumed_run_logs_the_same_window_means(tiny_assets, tmp_path):
    from conftest import tiny_overrides

    from lvdm.config import load_config
    from lvdm.training.logs import read_log
    from lvdm.training.trainer import train

    def run(out, **extra):
        values = {"train.log_every": 3, "train.checkpoint_every": 100, **extra}
        return train(load_config([], tiny_overrides(tiny_assets, out, **values)), progress=False)

    run(tmp_path / "straight")
    run(tmp_path / "split", **{"train.max_steps": 2})  # stops after step 2, inside the window of step 3
    run(tmp_path / "split", **{"train.resume": "auto"})
    straight, split = ({r["step"]: r["loss"] for r in read_log(tmp_path / name / "log.jsonl") if "grad_norm" in r}
                       for name in ("straight", "split"))  # fmt: skip
    assert split == straight and sorted(straight) == [1, 3]


# ------------------------------------------------------------------------------------------------ the machine
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a CUDA machine")
needs_no_xformers = pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is here")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param("train.mixed_precision=fp16", "fp16 needs a CUDA GPU", marks=needs_cpu_only),
        pytest.param("model.attention_backend=xformers", "xformers is not installed", marks=needs_no_xformers),
    ],
)
def test_what_this_machine_cannot_run_is_one_line_before_anything(train_script, tmp_path, command, override, message):
    script, calls = train_script
    done = command(script.__file__, "--quiet", override, f"output_dir={tmp_path / 'run'}")
    code, err = done.returncode, done.stderr
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not calls["demo"] and not calls["train"] and not (tmp_path / "run").exists()


@needs_cpu_only
def test_the_trainer_refuses_fp16_without_a_gpu_before_making_the_run_folder(tiny_assets, tmp_path, monkeypatch):
    from conftest import tiny_overrides

    from lvdm.config import load_config
    from lvdm.errors import ConfigError
    from lvdm.training.trainer import Trainer

    loaded = []
    monkeypatch.setattr("lvdm.models.load_base", lambda *a, **k: loaded.append(1))
    cfg = load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **{"train.mixed_precision": "fp16"}))
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        Trainer(cfg)
    assert not loaded and not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["lvdm.export", "lvdm.convert", "lvdm.cache", "lvdm.data.check", "lvdm.upscale"])
def test_every_command_says_a_usage_error_in_one_line(module, command):
    """export, convert, cache and data.check used argparse's own error: a usage block and a second line."""
    done = command("-m", module, "--no-such-option")
    err = done.stderr
    assert done.returncode == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert err.rstrip().endswith(f"(python -m {module} --help lists the options)"), err


def test_negative_numbers_in_exponent_or_infinite_form_are_values_not_options():
    """``--guidance -1e3`` and ``--guidance -inf`` were "expected one argument": argparse took them for options."""
    from lvdm.cli import Parser

    parser = Parser(prog="sample.py")
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--seed", type=int)
    for text, value in (("-1e3", -1000.0), ("-inf", float("-inf")), ("-2.5E-1", -0.25), ("-.5", -0.5), ("-3", -3)):
        assert parser.parse_args(["--guidance", text]).guidance == value, text
    with pytest.raises(ConfigError, match="expected one argument"):  # the control: an option is still an option
        parser.parse_args(["--guidance", "--seed", "1"])
    with pytest.raises(ConfigError, match="expected one argument"):
        parser.parse_args(["--guidance", "-x"])


def test_loading_a_pipeline_through_lvdm_prints_no_torchvision_notice() -> None:
    """transformers 5.x says, on every import of diffusers' pipelines without torchvision, that CLIP's image processor
    falls back to PIL; `import lvdm` drops that notice (and only it). The control: without lvdm it is printed (where
    this transformers prints it at all, and torchvision is absent; else nothing to test)."""
    import os
    import subprocess
    import sys

    def stderr(first: str) -> str:
        code = f"{first}\nfrom diffusers import StableDiffusionPipeline\nimport transformers.utils.logging as t\n" \
            "t.get_logger('transformers.utils.import_utils').warning('another notice')"  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # a user's setting would hide it
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        return done.stderr

    if "requires torchvision" not in stderr("pass"):
        pytest.skip("this transformers prints no torchvision notice here")
    quiet = stderr("import lvdm")
    assert "requires torchvision" not in quiet and "another notice" in quiet, quiet


def test_help_shows_set_defaults_once_and_keeps_the_examples_lines() -> None:
    """`python -m lvdm.upscale --help` said "(default: refuse) (default: False)" and "(default: None)" for required
    options, and dropped a default of 0 (taken for unset: 0 == False); sample.py's IP-Adapter example ran its two
    lines together (a backslash-newline inside the docstring)."""
    import sample
    from lvdm.upscale import build_parser

    upscale = build_parser().format_help()
    assert "(default: None)" not in upscale and "(default: False)" not in upscale and "(default: )" not in upscale
    assert "seed of the noise (default: 0)" in " ".join(upscale.split())  # the control: a set default is shown
    assert "(default: a quarter)" in " ".join(upscale.split()) and upscale.count("(default:") >= 5
    assert "--image-encoder image_encoder \\\n" in sample.build_parser().format_help()
