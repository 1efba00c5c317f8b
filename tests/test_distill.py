"""Progressive distillation (train.target: distill): the guidance part starts as nothing, the rounds resume exactly in
the middle, the student samples with one forward per step on a second base with its LoRA found beside it, and the
distillation gain can fail (an untrained student, which ignores the guidance weight, is worse than the teacher)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_overrides, write_sampling_files

from lvdm.config import load_config
from lvdm.errors import ConfigError, TemporalModuleError
from lvdm.models import VideoUNet, load_base
from lvdm.models.parts import build_part
from lvdm.pipeline import VideoPipeline
from lvdm.testing import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def teacher_module(tiny_assets, path):
    video = VideoUNet.from_unet2d(load_base(tiny_assets["base"]).unet)
    randomize(video.temporal_parameters(), seed=1, std=0.05)
    video.save_temporal(path)
    return path


def distill_overrides(tiny_assets, root, out, **extra):
    return tiny_overrides(tiny_assets, root / out, **{
        "train.target": "distill", "model.temporal_init": teacher_module(tiny_assets, root / "teacher.safetensors"),
        "model.spatial_lora_rank": 2, "train.distill_from": 4, "train.distill_to": 1, "train.max_steps": 6,
        "train.distill_round_steps": 2, "train.checkpoint_every": 3, "train.distill_pool": 8, "train.lr": 1e-3,
        "train.distill_eval_noises": 2, **extra,
    })  # fmt: skip


@pytest.fixture(scope="module")
def student(tiny_assets, tmp_path_factory):
    """A student distilled in the three rounds (guidance, 4 -> 2, 2 -> 1), 2 steps each, whole and stopped in the
    middle of the second round (step 3) then resumed."""
    from lvdm.training.trainer import train

    root = tmp_path_factory.mktemp("distill")
    whole = train(load_config([], distill_overrides(tiny_assets, root, "whole")), progress=False)
    train(load_config([], distill_overrides(tiny_assets, root, "split", **{"train.max_steps": 3})), progress=False)
    shutil.copy(root / "split" / "temporal.safetensors", root / "stopped_in_round_two.safetensors")
    train(load_config([], distill_overrides(tiny_assets, root, "split", **{"train.resume": "auto"})), progress=False)
    return {"result": whole, "root": root}


def test_the_guidance_part_changes_nothing_until_it_trains():
    video = VideoUNet.from_unet2d(tiny_unet())
    randomize(video.temporal_parameters(), seed=1, std=0.05)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 3, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        before = video(x, t, text)
        build_part(video, "guidance", "guidance", {})
        assert torch.equal(video(x, t, text, guidance_scale=torch.tensor([2.0, 6.0])), before)
        randomize(video.parts.parameters(), seed=2, std=0.1)
        low, high = (video(x, t, text, guidance_scale=w) for w in (2.0, 6.0))
        assert (low - high).abs().max() > 1e-3  # trained, the weight is an input
        assert torch.equal(video(x, t, text), before)  # no weight given: the model as it was


def test_a_run_stopped_before_its_last_round_says_the_steps_its_student_reached(student):
    """Its module said distill_to (1 step) and sample.py sampled a student never halved that far; it now says the
    steps of the round it stopped in (round 2 of 3: 4 -> 2), and a finished run says distill_to."""
    from lvdm.sampling_settings import temporal_defaults

    assert temporal_defaults(student["root"] / "stopped_in_round_two.safetensors")["num_inference_steps"] == 2
    assert temporal_defaults(student["result"].temporal_path)["num_inference_steps"] == 1
    # python -m lvdm.export of the run's checkpoints says the same (it recorded distill_to for the step 3 one)
    from lvdm.export import export_checkpoint

    checkpoints = student["root"] / "whole" / "checkpoints"
    for step, steps in ((3, 2), (6, 1)):
        out = student["root"] / f"exported_{step}.safetensors"
        export_checkpoint(checkpoints / f"checkpoint-{step:08d}", out)
        assert temporal_defaults(out)["num_inference_steps"] == steps, step


def test_a_student_is_refused_as_the_module_a_run_starts_from(student, tiny_assets, tmp_path):
    """Distilling from a student dropped its LoRA without a word (the same losses with it beside or not): the
    teacher was another model than the one sampled. The control: its teacher is taken."""
    overrides = distill_overrides(tiny_assets, tmp_path, "again")
    taken = next(o for o in overrides if o.startswith("model.temporal_init="))
    again = [o for o in overrides if o != taken] + [f"model.temporal_init={student['result'].temporal_path}"]
    with pytest.raises(ConfigError, match="is a distilled student, which goes with its spatial LoRA"):
        load_config([], again)
    t2v = tiny_overrides(tiny_assets, tmp_path / "t2v", **{"model.temporal_init": student["result"].temporal_path})
    with pytest.raises(ConfigError, match="start from the module it was distilled from$"):
        load_config([], t2v)
    load_config([], overrides)


def test_rounds_resume_exactly_in_the_middle_of_round_two(student):
    from safetensors.torch import load_file

    root, result = student["root"], student["result"]
    assert result.step == 6
    for name in ("temporal.safetensors", "spatial_lora.safetensors"):
        whole, split = load_file(root / "whole" / name), load_file(root / "split" / name)
        assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole), name
    lines = [json.loads(line) for line in (root / "whole" / "log.jsonl").read_text().splitlines()]
    assert [line["distill_round"] for line in lines if "distill_round" in line] == [1, 1, 2, 2, 3, 3]
    assert "distill_gain_1" in result.gain


def test_the_pool_keeps_several_teacher_samples_of_a_caption(student, tiny_assets):
    """Pool slots are drawn per clip, so a caption is sampled by the teacher more than once (one sample per clip let
    the demo's student drift); each entry keeps the caption it was made with, one of the data's."""
    from lvdm.training.checkpoint import load_checkpoint

    last = sorted((student["root"] / "whole" / "checkpoints").iterdir())[-1]
    state = load_checkpoint(last)[0]["objective"]
    pool, captions = state["pool"], state["pool_captions"]
    assert pool.keys() == captions.keys() and all(0 <= int(key) < 8 for key in pool)
    distinct = {tuple(latents.flatten()[:4].tolist()) for latents in pool.values()}
    assert len(distinct) == len(pool)  # every slot its own noise, its own sample
    clips = len(list(Path(tiny_assets["clips"]).rglob("*.mp4")))
    assert set(captions.values()) <= {path.read_text().strip() for path in Path(tiny_assets["clips"]).rglob("*.txt")}
    assert len(pool) > clips, (len(pool), clips)  # keyed by clip, as before, it could hold one entry per clip


def test_the_student_samples_in_one_forward_per_step_on_another_base(student, tmp_path):
    files = write_sampling_files(tmp_path / "bases")
    module = student["root"] / "whole" / "temporal.safetensors"
    pipe = VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=[f"{files['lora']}:0.7"],
                                         temporal=module)  # fmt: skip
    assert pipe.distilled
    calls = []
    pipe.video.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    out = pipe("a red disc", num_frames=4, height=16, width=16, guidance_scale=4.0, seed=0, progress=False)
    settings, model = out.metadata[0]["settings"], out.metadata[0]["model"]
    assert (settings["num_inference_steps"], settings["scheduler"]) == (1, "ddim_trailing")  # the student's own
    assert calls == [1]  # one forward of batch 1 per step: no unconditional pass
    assert any(lora.endswith("spatial_lora.safetensors:1") for lora in model["loras"])  # found beside it
    # a replay of the sidecar (sample.py --from-json gives its model.loras): the student's LoRA was fused twice
    again = VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=model["loras"], temporal=module)
    replay = again("a red disc", num_frames=4, height=16, width=16, guidance_scale=4.0, seed=0, progress=False)
    assert replay.metadata[0]["model"]["loras"] == model["loras"] and np.array_equal(replay.frames, out.frames)
    with pytest.raises(ConfigError, match="constant over the steps"):
        pipe("a red disc", num_frames=4, height=16, width=16, guidance_schedule="oscillating", progress=False)
    # the weight is an input, trained on train.distill_guidance only ([2, 8] by default): its middle unless given,
    # and a weight outside it is refused, not extrapolated; the edges pass (the control)
    small = {"num_frames": 4, "height": 16, "width": 16, "progress": False}
    assert pipe("a red disc", **small).metadata[0]["settings"]["guidance_scale"] == 5.0
    for weight in (2.0, 8.0):
        assert pipe("a red disc", guidance_scale=weight, **small).metadata[0]["settings"]["guidance_scale"] == weight
    for weight in (1.0, 9.0):
        with pytest.raises(ConfigError, match=f"guidance_scale={weight:g}: .* in 2 .. 8, the range it was distilled"):
            pipe("a red disc", guidance_scale=weight, **small)
    # image mode samples the base with two passes: the module's range does not bind it, and a guidance schedule has
    # a second pass to act on
    assert pipe("a red disc", guidance_scale=1.0, image_mode=True, **small).metadata[0]["settings"]["image_mode"]
    image = pipe("a red disc", guidance_schedule="oscillating", image_mode=True, **small).metadata[0]["settings"]
    assert image["guidance_schedule"] == "oscillating"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(module, alone / "student.safetensors")
    with pytest.raises(TemporalModuleError, match="its LoRA is not beside it"):
        VideoPipeline.from_pretrained(files["a"], temporal=alone / "student.safetensors")


def test_an_untrained_student_has_a_gain_below_one(tiny_assets, tmp_path):
    """The control: before any step the student ignores the guidance weight (its embedding is zero), so its samples
    are the unguided model's and the guided teacher's own few-step samples are closer to its many-step ones, in the
    mean and sample by sample."""
    from lvdm.training.objectives import make_objective
    from lvdm.training.setup import build_data, build_model

    cfg = load_config(
        [],
        distill_overrides(tiny_assets, tmp_path, "run", **{
            "data.holdout": 1, "train.distill_guidance": "[6.0, 6.0]", "train.distill_eval_noises": 8,
        }),
    )  # fmt: skip
    video, frozen, _ = build_model(cfg, torch.device("cpu"), "no")
    objective = make_objective(cfg, video, frozen, torch.device("cpu"))
    data = build_data(cfg, frozen, rank=0, world=1)
    figures = objective.distillation_gain(data.validation, 2)
    assert figures["distill_gain_2"] < 1.0, figures
    assert figures["distill_gain_median_2"] < 1.0, figures
    assert figures["distill_closer_2"] < 0.5, figures


def test_the_gain_is_measured_over_several_noises_per_clip(tiny_assets, tmp_path):
    """Each held-out clip is sampled from ``train.distill_eval_noises`` initial noises (one was too few to rank
    recipes on the demo); the errors are their mean, so one noise's figure differs from the mean of three."""
    from lvdm.training.objectives import make_objective
    from lvdm.training.setup import build_data, build_model

    figures, batches = {}, {}
    for k in (1, 3):
        overrides = {"data.holdout": 1, "train.distill_eval_noises": k}
        cfg = load_config([], distill_overrides(tiny_assets, tmp_path, f"run{k}", **overrides))
        video, frozen, _ = build_model(cfg, torch.device("cpu"), "no")
        objective = make_objective(cfg, video, frozen, torch.device("cpu"))
        data = build_data(cfg, frozen, rank=0, world=1)
        sizes: list[int] = []

        def counted(params, noise, *args, _sample=objective.sample, _sizes=sizes, **kwargs):
            _sizes.append(noise.shape[0])
            return _sample(params, noise, *args, **kwargs)

        objective.sample = counted
        figures[k] = objective.distillation_gain(data.validation, 2)
        batches[k] = set(sizes)
    clips = sum(len(batch["caption"]) for batch in data.validation)
    assert batches == {1: {clips}, 3: {3 * clips}}
    assert figures[1]["distill_error_teacher_2"] != pytest.approx(figures[3]["distill_error_teacher_2"], rel=1e-3)


@pytest.mark.parametrize("latents", ["teacher", "data"])
def test_the_clean_latents_are_the_teachers_samples_or_the_clips(tiny_assets, tmp_path, latents):
    """``train.distill_latents``: with ``teacher`` the clips give only their captions (another video under the same
    caption changes nothing); with ``data`` their VAE latents are what the student's inputs are noised from."""
    from lvdm.training.objectives import make_objective
    from lvdm.training.setup import build_data, build_model
    from lvdm.training.step import step_generator

    cfg = load_config([], distill_overrides(tiny_assets, tmp_path, "run", **{"train.distill_latents": latents}))
    video, frozen, _ = build_model(cfg, torch.device("cpu"), "no")
    objective = make_objective(cfg, video, frozen, torch.device("cpu"))
    data = build_data(cfg, frozen, rank=0, world=1)
    data.stream.start_at(0)
    batch = next(iter(data.loader))
    other = dict(batch, video=batch["video"].flip(1))  # the same captions, the frames reversed
    with torch.no_grad():
        losses = [objective.loss(video, b, step_generator(0, 0, 0)) for b in (batch, other)]
    assert torch.equal(losses[0], losses[1]) == (latents == "teacher"), losses
    assert bool(objective.pool) == (latents == "teacher")


def test_the_per_sample_figures_read_each_noise(tiny_assets, tmp_path):
    """Beside the gain of the mean errors (a few far samples can carry it) come the median of the per-sample ratios
    and the share of samples where the student is closer, each computed from the same per-sample errors."""
    from lvdm.training.objectives import make_objective
    from lvdm.training.setup import build_data, build_model

    k = 4
    overrides = {"data.holdout": 1, "train.distill_eval_noises": k}
    cfg = load_config([], distill_overrides(tiny_assets, tmp_path, "run", **overrides))
    video, frozen, _ = build_model(cfg, torch.device("cpu"), "no")
    objective = make_objective(cfg, video, frozen, torch.device("cpu"))
    data = build_data(cfg, frozen, rank=0, world=1)
    n = sum(len(batch["caption"]) for batch in data.validation) * k
    teacher = torch.linspace(1.0, 2.0, n)  # the offsets of each sample from the reference
    student = torch.linspace(0.5, 1.5, n) ** 2 * torch.tensor([1.0] * (n - 1) + [50.0])  # one sample far away

    def fake(params, noise, text, empty, w, steps, *, cfg):
        offset = 0.0 if steps == objective.cfg.train.distill_from else (teacher if cfg else student)
        return torch.zeros_like(noise) + torch.as_tensor(offset).view(-1, 1, 1, 1, 1)

    objective.sample = fake
    figures = objective.distillation_gain(data.validation, 2)
    te, st = teacher**2, student**2
    assert figures["distill_gain_2"] == pytest.approx(float(te.mean() / st.mean()), rel=1e-5)
    assert figures["distill_gain_median_2"] == pytest.approx(float((te / st).quantile(0.5)), rel=1e-5)
    assert figures["distill_closer_2"] == pytest.approx(float((st < te).double().mean()))
    assert figures["distill_gain_2"] < 1 < figures["distill_gain_median_2"]  # the far sample carries the mean


def test_a_run_may_stop_before_its_rounds_when_they_have_a_length(tiny_assets, tmp_path):
    """With ``train.distill_round_steps`` the rounds do not follow ``train.max_steps``: a run stopped in the guidance
    round (to be resumed) was refused with max_steps below the number of rounds, and taken with one step more.
    The control: without it, such a run has rounds of no step."""
    overrides = distill_overrides(tiny_assets, tmp_path, "run", **{"train.distill_round_steps": 100})
    assert load_config([], [*overrides, "train.max_steps=2"]).train.max_steps == 2
    with pytest.raises(ConfigError, match="cannot hold 3 distillation rounds"):
        load_config([], [*overrides, "train.max_steps=2", "train.distill_round_steps=null"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"model.temporal_init": None}, "needs the teacher's temporal module"),
        ({"train.distill_from": 48}, "halved one or more times"),
        ({"model.context": "true"}, "model.context: not part of train.target=distill"),
        ({"train.distill_guidance": "[6.0, 2.0]"}, "low <= high"),
        ({"train.max_steps": 2, "train.distill_round_steps": "null"}, "cannot hold 3 distillation rounds"),
        ({"train.distill_guidance": "[1.0, .inf]"}, "train.distill_guidance.*100"),  # a traceback in the pool
        ({"train.distill_guidance": "[150, 200]"}, "train.distill_guidance.*100"),  # a student never sampled
        ({"train.lr": "1e300"}, "train.lr.*10"),  # a traceback inside AdamW
    ],
)
def test_bad_distill_settings_are_config_errors(tiny_assets, tmp_path, extra, message):
    overrides = [o for o in distill_overrides(tiny_assets, tmp_path, "run") if o.split("=")[0] not in extra]
    overrides += [f"{key}={value}" for key, value in extra.items() if value is not None]
    with pytest.raises(ConfigError, match=message):
        load_config([], overrides)


def _objective_on(scheduler_config):
    """A DistillObjective's sampler on a base with ``scheduler_config``, and a toy video model (linear in ``z``,
    reading ``t`` and the text) in place of the UNet."""
    import types

    from diffusers import DDPMScheduler

    from lvdm.training.distill import DistillObjective

    mix = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def video(z, t, text, **kwargs):
        return (
            torch.einsum("ij,bjfhw->bifhw", mix, z)
            + 0.1 * text.mean()
            + 0.05 * torch.cos(t / 200).view(-1, 1, 1, 1, 1)
        )

    objective = object.__new__(DistillObjective)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    objective.video, objective.grids, objective.device, objective.T = video, {}, torch.device("cpu"), 1000
    objective.frozen = types.SimpleNamespace(noise_scheduler=noise_scheduler)
    objective.prediction = "v_prediction"
    objective.alphas = noise_scheduler.alphas_cumprod.float()
    objective.final_alpha = objective._sampler_final_alpha()
    return objective


@pytest.mark.parametrize("base", ["sd", "alpha_to_one", "euler"])
def test_the_rounds_sample_as_the_students_sampler_does(base):
    """The rounds' own DDIM (targets, the gain's samples) against lvdm.diffusion.sample with ``ddim_trailing`` on
    the same base config: they ended the last step at alphas[0] whatever the config said (0.03 apart at 4 steps
    for ``set_alpha_to_one``), and the sampler clipped where a config did not state ``clip_sample`` (an Euler
    config: 3.6 apart)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from lvdm.diffusion import guidance_schedule, make_scheduler, sample

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    config = {
        "sd": DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"),
        "alpha_to_one": DDIMScheduler(
            **betas, clip_sample=False, set_alpha_to_one=True, prediction_type="v_prediction"
        ),
        "euler": EulerDiscreteScheduler(**betas, prediction_type="v_prediction"),
    }[base].config
    objective = _objective_on(config)
    gen = torch.Generator().manual_seed(1)
    noise, text, empty = torch.randn(1, 4, 2, 4, 4, generator=gen), torch.ones(1, 3, 8), torch.zeros(1, 3, 8)
    for steps in (4, 8):
        ours = objective.sample(None, noise, text, empty, torch.tensor([5.0]), steps, cfg=True)
        sampler = sample(lambda x, t, encoder_hidden_states: objective.video(x, t, encoder_hidden_states),
                         make_scheduler("ddim_trailing", config), latents=noise, num_inference_steps=steps,
                         cond={"encoder_hidden_states": text}, uncond={"encoder_hidden_states": empty},
                         guidance=guidance_schedule("constant", 5.0), progress=False)  # fmt: skip
        assert ours.abs().max() > 1.5  # the control: clipping at 1 would show
        torch.testing.assert_close(ours, sampler, rtol=0, atol=1e-4)


def test_a_base_whose_sampler_clips_is_refused_for_distillation():
    from diffusers import DDIMScheduler

    clipping = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=True, prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="clip_sample or thresholding"):
        _objective_on(clipping.config)


def test_the_truncated_snr_weighting_weighs_each_sample_by_max_snr_one(tiny_assets, tmp_path):
    """``train.distill_weighting=truncated_snr``: each sample's loss is the equal-weight loss times ``max(SNR(t), 1)``
    at its timestep (Salimans & Ho), so the low-noise steps weigh more; the same batch and draws otherwise."""
    from lvdm.training.objectives import make_objective
    from lvdm.training.setup import build_data, build_model
    from lvdm.training.step import step_generator

    losses, steps = {}, []
    for weighting in ("equal", "truncated_snr"):
        cfg = load_config([], distill_overrides(tiny_assets, tmp_path, weighting, **{
            "train.distill_weighting": weighting, "train.distill_from": 64, "train.distill_latents": "data",
            "train.distill_to": 16}))  # fmt: skip
        video, frozen, _ = build_model(cfg, torch.device("cpu"), "no")
        objective = make_objective(cfg, video, frozen, torch.device("cpu"))
        objective._to_x = lambda out, z, t, to_x=objective._to_x: steps.append(t) or to_x(out, z, t)  # last: student's
        data = build_data(cfg, frozen, rank=0, world=1)
        data.stream.start_at(0)
        with torch.no_grad():
            losses[weighting] = objective.loss(video, next(iter(data.loader)), step_generator(0, 0, 0))
    assert torch.equal(steps[0], steps[-1])  # the same draws
    bar = objective.alphas[steps[-1]]
    weight = (bar / (1 - bar)).clamp(min=1)
    assert (weight > 1).any() and (weight == 1).any(), weight  # the batch has steps on both sides of SNR 1
    torch.testing.assert_close(losses["truncated_snr"], losses["equal"] * weight)


def test_each_round_trains_its_student_from_a_fresh_optimizer(student):
    """Salimans & Ho start each round's student with a new optimizer: Adam's moments of the last round's target
    are dropped at the round's first step (rounds of 2 steps: at steps 3 and 6 the state has seen 1 and 2 steps;
    carried over, 3 and 6)."""
    from lvdm.training.checkpoint import load_part

    checkpoints = student["root"] / "whole" / "checkpoints"
    for step, seen in ((3, 1), (6, 2)):
        state = load_part(checkpoints / f"checkpoint-{step:08d}", "optimizer")["state"]
        counts = {float(s["step"]) for s in state.values()}
        assert state and counts == {seen}, (step, counts)


def test_the_learning_rate_warms_up_and_anneals_again_in_each_round(tiny_assets, tmp_path):
    """``train.lr_schedule`` and ``train.warmup_steps`` run per round (Salimans & Ho anneal linearly to 0 over each);
    the last round takes the steps past the others'. The control: another target's schedule spans the whole run."""
    from lvdm.training.setup import build_optimizer

    def factors(overrides):
        cfg = load_config([], overrides + ["train.lr_schedule=linear", "train.warmup_steps=1", "train.max_steps=10"])
        weight = torch.nn.Parameter(torch.zeros(1))
        optimizer, schedule = build_optimizer(cfg, [weight], torch.device("cpu"))
        seen = []
        for _ in range(cfg.train.max_steps):
            seen.append(round(schedule.get_last_lr()[0] / cfg.train.lr, 4))
            optimizer.step()
            schedule.step()
        return seen

    distill = distill_overrides(tiny_assets, tmp_path, "distill", **{"train.distill_round_steps": 3})
    assert factors(distill) == [0, 1, 0.5] + [0, 1, 0.5] + [0, 1, 0.6667, 0.3333]
    assert factors(tiny_overrides(tiny_assets, tmp_path / "t2v")) == [0, 1] + [
        round(1 - k / 9, 4) for k in range(1, 9)
    ]


@pytest.mark.parametrize(
    ("round_steps", "max_steps", "ends"),
    [(2, 6, {2: 1, 4: 2, 6: 3}), (2, 8, {2: 1, 4: 2, 8: 3}), ("null", 7, {2: 1, 4: 2, 7: 3}), (2, 4, {2: 1, 4: 2})],
)
def test_each_rounds_gain_is_printed_once_when_it_ends(tiny_assets, tmp_path, capsys, round_steps, max_steps, ends):
    """The last round takes the steps past the others' (``train.distill_round_steps`` x rounds short of
    ``train.max_steps``): its gain was printed as "round 3/3" in its middle, and as "round 4/3" at the next multiple
    of the round's length, and not at its end. The control: rounds that divide the run, and a run stopped early."""
    import re

    from lvdm.training.objectives import make_objective
    from lvdm.training.setup import build_model

    overrides = {"train.distill_round_steps": round_steps, "train.max_steps": max_steps}
    cfg = load_config([], distill_overrides(tiny_assets, tmp_path, "run", **overrides))
    video, frozen, _ = build_model(cfg, torch.device("cpu"), "no")
    objective = make_objective(cfg, video, frozen, torch.device("cpu"))
    keys = ("gain", "error_teacher", "error_student", "gain_median", "closer")
    objective.distillation_gain = lambda batches, steps: {f"distill_{key}_{steps}": 1.0 for key in keys}
    printed = {}
    for step in range(1, max_steps + 1):
        objective.step = step
        objective.evaluate(None, [{"video": None}])
        lines = capsys.readouterr().out.splitlines()
        if lines:
            assert len(lines) == 1, lines
            printed[step] = int(re.match(r"distillation round (\d+)/3 ", lines[0])[1])
    assert printed == ends


def test_a_resume_that_changes_the_rounds_is_refused(tiny_assets, tmp_path):
    """A round's teacher is taken, and the optimizer's state cleared, at its first step. Resumed with another
    ``train.distill_to`` (a round added after the last), the new round's teacher was the last round's teacher (the
    guidance round's student as a 2-step teacher) with the last round's Adam state; resumed with another
    ``train.max_steps`` where ``train.distill_round_steps`` is null, the rounds' boundaries moved under the run. Both
    were a one-line note. The control: a longer run with the rounds' length kept (the last round takes the rest)."""
    from lvdm.training.trainer import train

    common = {"data.holdout": 1, "train.distill_eval_noises": 1, "train.checkpoint_every": 100}
    run = {**common, "train.distill_to": 2, "train.max_steps": 4}
    train(load_config([], distill_overrides(tiny_assets, tmp_path, "ext", **run)), progress=False)
    more = {**common, "train.resume": "auto", "train.max_steps": 6}
    with pytest.raises(ConfigError, match=r"train.distill_to: 2 in the checkpoint, 1 now"):
        train(load_config([], distill_overrides(tiny_assets, tmp_path, "ext", **more)), progress=False)
    run = {**common, "train.distill_round_steps": "null", "train.max_steps": 3}  # rounds of 1 step
    train(load_config([], distill_overrides(tiny_assets, tmp_path, "short", **run)), progress=False)
    longer = more | run | {"train.max_steps": 6}
    longer = load_config([], distill_overrides(tiny_assets, tmp_path, "short", **longer))
    with pytest.raises(ConfigError, match=r"rounds' length: 1 steps in the checkpoint, 2 now .*distill_round_steps=1"):
        train(longer, progress=False)
    kept = {**more, "train.distill_round_steps": 1, "train.max_steps": 4}
    assert train(load_config([], distill_overrides(tiny_assets, tmp_path, "short", **kept)), progress=False).step == 4
