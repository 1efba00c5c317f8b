"""Context frames (issue 11): the context encoder part, the training tasks, warm start and the context gain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import deepcopy, frame_by_frame, randomize, tiny_overrides, video_inputs, whole_and_resumed
from safetensors.torch import load_file

from lvdm import testing
from lvdm.config import load_config
from lvdm.errors import ConfigError, TemporalModuleError
from lvdm.models import VideoUNet, load_base
from lvdm.models.parts import build_part
from lvdm.modules.context_encoder import FLAGS, site_level
from lvdm.testing import clips
from lvdm.training.tasks import draw_tasks, given_frames, made_frames_loss
from lvdm.training.trainer import train

SAMPLE = Path(__file__).resolve().parents[1] / "sample.py"
F = 5
TASKS = {
    "text": (torch.zeros(F, dtype=torch.bool), FLAGS["none"]),
    "predict 1": (given_frames("predict", F, count=1), FLAGS["none"]),
    "predict 2": (given_frames("predict", F, count=2), FLAGS["none"]),
    "interpolate": (given_frames("interpolate", F, every=2), FLAGS["interpolate"]),
}


def trained_video(seed: int = 0) -> VideoUNet:
    """A tiny video model whose temporal layers hold random (non-zero) weights, as if trained."""
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=seed))
    randomize(video.temporal_parameters(), seed=3, std=0.05)
    return video


def context_inputs(sample: torch.Tensor, mask: torch.Tensor, flag: int) -> dict[str, torch.Tensor]:
    b = sample.shape[0]
    return {
        "context_latents": torch.randn_like(sample),
        "context_mask": mask[None].expand(b, -1),
        "context_flag": torch.full((b,), flag),
    }


@torch.no_grad()
def test_adding_context_support_changes_nothing_until_it_trains():
    video = trained_video()
    sample, t, text = video_inputs(video.unet, f=F)
    before = video(sample, t, text)
    build_part(video, "context", "context", {})
    for name, (mask, flag) in TASKS.items():
        assert torch.equal(video(sample, t, text, **context_inputs(sample, mask, flag)), before), name
    assert torch.equal(video(sample, t, text), before)  # no context given at all


@torch.no_grad()
def test_trained_context_reaches_the_temporal_layers_and_image_mode_stays_the_base():
    video = trained_video()
    reference = deepcopy(video.unet)  # inflated, but image mode is the frozen 2D UNet exactly
    build_part(video, "context", "context", {})
    randomize(video.parts.parameters(), seed=4, std=0.05)
    sample, t, text = video_inputs(video.unet, f=F)
    mask, flag = TASKS["predict 2"]
    inputs = context_inputs(sample, mask, flag)
    with_context = video(sample, t, text, **inputs)
    assert not torch.allclose(with_context, video(sample, t, text), atol=1e-4)  # the given frames are used
    other = dict(inputs, context_latents=torch.randn_like(sample))
    assert not torch.allclose(with_context, video(sample, t, text, **other), atol=1e-4)
    interp = dict(inputs, context_flag=torch.full((2,), FLAGS["interpolate"]))
    assert (with_context - video(sample, t, text, **interp)).abs().max() > 1e-6  # the flag matters

    images = video(sample, t, text, image_only_indicator=torch.ones(2), **inputs)
    expected = frame_by_frame(_spatial_only(reference), sample, t, text)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _spatial_only(unet):
    """``unet`` with every video wrapper replaced by its spatial block: the 2D UNet the model was inflated from."""
    from lvdm.modules.video_blocks import VideoWrapper

    for module in list(unet.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, VideoWrapper):
                setattr(module, child_name, child.spatial)
    return unet


def test_site_levels_follow_the_unet_resolutions():
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=0))
    levels = len(video.unet.config.block_out_channels)
    assert site_level("down_blocks.0.resnets.1", levels) == 0
    assert site_level("mid_block.attentions.0", levels) == levels - 1
    assert site_level("up_blocks.0.resnets.0", levels) == levels - 1
    assert site_level(f"up_blocks.{levels - 1}.attentions.2", levels) == 0
    encoder = build_part(video, "context", "context", {})
    assert set(encoder.levels_of) == {site.name for site in video.sites}


def test_bad_context_inputs_are_clear_errors():
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=0))
    sample, t, text = video_inputs(video.unet, f=F)
    with pytest.raises(TypeError, match="context_mask"):
        video(sample, t, text, context_mask=torch.ones(F))  # no context support
    build_part(video, "context", "context", {})
    with pytest.raises(ValueError, match="context_mask must have shape"):
        video(sample, t, text, context_latents=sample, context_mask=torch.ones(3))
    with pytest.raises(ValueError, match="no context_latents"):
        video(sample, t, text, context_mask=torch.ones(F))
    with pytest.raises(ValueError, match="one latent per frame"):
        video(sample, t, text, context_latents=sample[:, :, :2], context_mask=torch.ones(F))


# ------------------------------------------------------------------------------------------------ tasks
def test_tasks_are_drawn_by_weight_with_their_given_frames():
    class Train:
        tasks = {"text": 0, "predict": 1, "interpolate": 1}
        predict_frames = [1, 2]
        interpolate_every = 4

    tasks = draw_tasks(Train, 64, 9, torch.Generator().manual_seed(0))
    assert set(tasks.names) == {"predict", "interpolate"}  # weight 0: never drawn
    for name, mask, flag in zip(tasks.names, tasks.mask, tasks.flag.tolist(), strict=True):
        if name == "interpolate":
            assert mask.nonzero().flatten().tolist() == [0, 4, 8] and flag == FLAGS["interpolate"]
        else:
            assert mask.nonzero().flatten().tolist() in ([0], [0, 1]) and flag == FLAGS["none"]
    again = draw_tasks(Train, 64, 9, torch.Generator().manual_seed(0))
    assert again.names == tasks.names and torch.equal(again.mask, tasks.mask)  # the generator decides: resumable
    images = draw_tasks(Train, 2, 9, torch.Generator().manual_seed(0), images=torch.tensor([1.0, 0.0]))
    assert images.names[0] == "image" and not images.mask[0].any()


def test_clips_cut_for_the_fine_stage_get_it_and_the_others_draw_among_the_rest():
    from lvdm.training.tasks import fine_share

    class Train:
        tasks = {"text": 1, "interpolate": 1, "interpolate_fine": 2}
        predict_frames = [1]
        interpolate_every = 4

    assert fine_share(Train) == 0.5  # the loader cuts half the clips for it
    fine = torch.arange(64) % 2 == 0
    tasks = draw_tasks(Train, 64, 9, torch.Generator().manual_seed(0), fine=fine)
    for name, mask, flag, is_fine in zip(tasks.names, tasks.mask, tasks.flag.tolist(), fine.tolist(), strict=True):
        assert (name == "interpolate_fine") == is_fine
        if name.startswith("interpolate"):
            assert mask.nonzero().flatten().tolist() == [0, 4, 8]
        assert flag == FLAGS[name] if name.startswith("interpolate") else flag == FLAGS["none"]
    assert set(tasks.names) == {"text", "interpolate", "interpolate_fine"}


def test_the_loss_counts_only_the_frames_to_make():
    target = torch.zeros(1, 4, 3, 2, 2)
    prediction = target.clone()
    prediction[:, :, 0] = 1.0  # wrong only on frame 0
    assert made_frames_loss(prediction, target, torch.tensor([[0.0, 1.0, 1.0]])).item() == 0.0
    assert made_frames_loss(prediction, target, torch.tensor([[1.0, 1.0, 1.0]])).item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.tasks": "{text: 1, predcit: 1}"}, "unknown task"),
        ({"train.tasks": "{predict: 1}"}, "model.context=true"),
        ({"model.context": "true", "train.tasks": "{predict: 0}"}, "every weight is 0"),
        ({"model.context": "true", "train.tasks": "{predict: -1}"}, "weights must be numbers"),
        ({"model.context": "true", "train.tasks": "{predict: 1}", "train.predict_frames": "[0, 4]"}, "0 .. 3"),
        ({"model.context": "true", "train.tasks": "{interpolate: 1}", "train.interpolate_every": 4}, "less than"),
        ({"train.tasks": "{interpolate_fine: 1}", "train.interpolate_every": 2}, "model.context=true"),
        (
            {
                "model.context": "true",
                "train.tasks": "{interpolate_fine: 1}",
                "train.interpolate_every": 2,
                "data.frame_stride": 3,
            },
            "divisible by 2",
        ),
        (
            {
                "model.context": "true",
                "train.tasks": "{interpolate_fine: 1}",
                "train.interpolate_every": 2,
                "data.frame_stride": "[2,4]",
            },
            "one number divisible",
        ),
        (
            {
                "model.context": "true",
                "train.tasks": "{interpolate_fine: 1}",
                "train.interpolate_every": 2,
                "data.frame_stride": 2,
                "data.cache": "somewhere",
            },
            "latent cache holds one cut",
        ),
    ],
)
def test_bad_task_settings_are_config_errors(tiny_assets, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], tiny_overrides(tiny_assets, tmp_path / "x", **overrides))


# ------------------------------------------------------------------------------------------------ training
CONTEXT_RUN = {
    "model.context": "true",
    "train.tasks": "{text: 1, predict: 1, interpolate: 1}",
    "train.interpolate_every": 2,
    "data.holdout": 1,
}


def test_context_training_logs_each_task_reports_gains_and_resumes_exactly(tiny_assets, tmp_path):
    whole, a, b = whole_and_resumed(
        lambda out, **extra: tiny_overrides(tiny_assets, out, **CONTEXT_RUN, **extra), tmp_path
    )
    assert any(k.startswith("parts.context.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)

    lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    logged = {key for line in lines for key in line}
    assert {"loss_text", "loss_predict", "loss_interpolate"} & logged  # per task, where drawn
    gains = whole.gain
    for task in ("predict", "interpolate"):
        expected = gains[f"loss_{task}_without_context"] / gains[f"loss_{task}_with_context"]
        assert gains[f"context_gain_{task}"] == pytest.approx(expected)


def test_each_tasks_logged_loss_is_its_window_mean_after_a_resume_and_a_skip(tiny_assets, tmp_path, monkeypatch):
    """``loss_<task>`` is the mean over the steps taken since the last log line, as ``loss`` is: a run resumed from a
    checkpoint inside that window logs what an uninterrupted one logs (the window was not checkpointed: step 4 had
    no ``loss_text``), and a skipped non-finite step adds nothing (it made ``loss_predict`` NaN)."""
    import lvdm.training.objectives as objectives_module
    from lvdm.training.logs import read_log
    from lvdm.training.trainer import Trainer

    run = {**CONTEXT_RUN, "train.tasks": "{text: 1, predict: 1}", "train.log_every": 4}
    overrides = lambda out, **extra: tiny_overrides(tiny_assets, out, **(run | extra))  # noqa: E731
    whole_and_resumed(overrides, tmp_path)  # stopped at the checkpoint of step 2, inside the window of step 4

    def figures(out):
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss")} for r in read_log(out / "log.jsonl")
                if "grad_norm" in r}  # fmt: skip

    assert figures(tmp_path / "split") == figures(tmp_path / "whole")
    assert {"loss_text", "loss_predict"} <= set(figures(tmp_path / "whole")[4])

    trainer = Trainer(load_config([], overrides(tmp_path / "nan", **{"train.log_every": 2})), progress=False)
    real = objectives_module.training_loss

    def nan_prediction(*args, **kwargs):
        terms = real(*args, **kwargs)
        terms.prediction = terms.prediction * float("nan")
        return terms

    for nonfinite in (False, True, False):
        monkeypatch.setattr(objectives_module, "training_loss", nan_prediction if nonfinite else real)
        loss, grad_norm, stepped = trainer._optimizer_step()
        assert stepped != nonfinite
        if stepped:
            trainer._after_step(loss, grad_norm, 0.0)
    logged = [r for r in read_log(tmp_path / "nan" / "log.jsonl") if "grad_norm" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert all(isinstance(v, float) for r in logged for k, v in r.items() if k.startswith("loss_"))


FINE_RUN = {
    "model.context": "true",
    "train.tasks": "{text: 1, interpolate: 1, interpolate_fine: 1}",
    "train.interpolate_every": 2,
    "data.frame_stride": 2,  # the fine stage reads stride 1
    "data.holdout": 1,
}


def test_the_fine_interpolation_stage_trains_reports_its_gains_and_resumes_exactly(tiny_assets, tmp_path):
    overrides = lambda out, **extra: tiny_overrides(tiny_assets, out, **FINE_RUN, **extra)  # noqa: E731
    whole, a, b = whole_and_resumed(overrides, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert any("loss_interpolate_fine" in line for line in lines)
    g = whole.gain
    assert g["context_gain_interpolate_fine"] == pytest.approx(
        g["loss_interpolate_fine_without_context"] / g["loss_interpolate_fine_with_context"]
    )
    assert g["stage_flag_gain"] == pytest.approx(
        g["loss_interpolate_fine_coarse_flag"] / g["loss_interpolate_fine_with_context"]
    )
    # measured on the held-out clip cut at the fine rate, apart from the coarse figures' clip
    assert g["loss_interpolate_fine_with_context"] != g["loss_interpolate_with_context"]
    from lvdm.sampling_settings import temporal_defaults
    from lvdm.training.report import format_report

    assert temporal_defaults(whole.temporal_path)["tasks"] == ["interpolate", "interpolate_fine", "text"]
    report = format_report(whole)
    assert "context gain:    interpolate_fine" in report and "stage flag gain:" in report
    from lvdm.training.demo import demo_summary

    summary = demo_summary(whole, None)  # the demo printed "aim: above 1" for a figure the README expects at 1.000
    assert any(line.startswith("demo figure: stage flag gain") and "no aim" in line for line in summary), summary
    assert any(line.startswith("demo check: context gain (interpolate_fine)") for line in summary), summary


def test_a_text_to_video_module_warm_starts_a_context_model_unchanged(tiny_assets, tmp_path):
    t2v = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "t2v")), progress=False)
    context = tiny_overrides(tiny_assets, tmp_path / "ctx", **CONTEXT_RUN, **{
        "model.temporal_init": t2v.temporal_path, "train.max_steps": 1, "train.lr": 1e-12,
    })  # fmt: skip
    run = train(load_config([], context), progress=False)
    trained = load_file(run.temporal_path)
    start = load_file(t2v.temporal_path)
    # the text-to-video weights were the starting point (a 1e-12 step moves them by at most ~1e-12)
    assert all(torch.allclose(trained[k], start[k], atol=1e-9) for k in start)

    # and that start computes what the text-to-video model computes, for every task
    base = tiny_assets["base"]
    plain = VideoUNet.from_temporal_file(load_base(base).unet, t2v.temporal_path)
    video = VideoUNet.from_unet2d(load_base(base).unet)
    build_part(video, "context", "context", {})
    assert video.part_specs["context"].kind == "context"
    from lvdm.models.temporal_file import read_temporal_file

    assert read_temporal_file(t2v.temporal_path).warm_start(video) == ["context"]
    sample, t, text = video_inputs(video.unet, f=F)
    with torch.no_grad():
        expected = plain(sample, t, text)
        for name, (mask, flag) in TASKS.items():
            assert torch.equal(video(sample, t, text, **context_inputs(sample, mask, flag)), expected), name

    # a module with parts the model lacks cannot start it
    bare = VideoUNet.from_unet2d(load_base(base).unet)
    with pytest.raises(TemporalModuleError, match="standalone parts differ"):
        read_temporal_file(run.temporal_path).warm_start(bare)


def test_a_model_that_cannot_use_the_given_frames_has_a_context_gain_of_exactly_one(tiny_assets, tmp_path):
    """The control: untrained temporal layers and encoder (every branch zero: each frame is denoised on its own, so
    the given frames, clean or noised, cannot reach the others) get exactly 1, so the figure can fail."""
    from lvdm.training.step import Frozen
    from lvdm.training.tasks import context_gains

    every_task = {"train.tasks": "{text: 1, predict: 1, interpolate: 1, interpolate_fine: 1}"}
    cfg = load_config([], tiny_overrides(tiny_assets, tmp_path / "x", **(FINE_RUN | every_task)))
    base = load_base(tiny_assets["base"])
    video = VideoUNet.from_unet2d(base.unet)
    build_part(video, "context", "context", {})
    g = torch.Generator().manual_seed(0)
    batch = {
        "video": torch.rand(2, 4, 3, 16, 16, generator=g) * 2 - 1,  # b f c h w
        "caption": ["a red disc", "a blue square"],
        "is_image": torch.zeros(2),
    }
    fine = {**batch, "video": torch.rand(2, 4, 3, 16, 16, generator=g) * 2 - 1, "fine": torch.ones(2, dtype=bool)}
    gains = context_gains(video, [batch], Frozen.from_base(base), torch.device("cpu"), cfg.train, fine_batches=[fine])
    for task in ("predict", "interpolate", "interpolate_fine"):
        assert gains[f"context_gain_{task}"] == 1.0, task
    assert gains["stage_flag_gain"] == 1.0  # an untrained flag embedding changes nothing either
    randomize(video.parts.parameters(), seed=4, std=0.05)
    randomize(video.temporal_parameters(), seed=5, std=0.05)
    moved = context_gains(video, [batch], Frozen.from_base(base), torch.device("cpu"), cfg.train, fine_batches=[fine])
    assert all(moved[key] != 1.0 for key in ("context_gain_interpolate_fine", "stage_flag_gain")), moved  # they move


# ------------------------------------------------------------------------------------------------ sampling
CONTEXT_TRAINING = {
    "data": {"num_frames": 5, "resolution": [16, 16], "target_fps": 10.0},
    "train": {"tasks": {"text": 1, "predict": 1, "interpolate": 1}},
}


@pytest.fixture(scope="module")
def context_files(tmp_path_factory):
    """A tiny base and a context module "trained" (random weights) on 5-frame clips, plus a plain module."""
    root = tmp_path_factory.mktemp("context")
    base = testing.make_tiny_sd(root / "base", "sd1", seed=0)
    video = VideoUNet.from_unet2d(load_base(base).unet)
    randomize(video.temporal_parameters(), seed=1, std=0.05)
    video.save_temporal(root / "plain.safetensors", training_config=CONTEXT_TRAINING)
    build_part(video, "context", "context", {})
    randomize(video.parts.parameters(), seed=2, std=0.05)
    video.save_temporal(root / "context.safetensors", training_config=CONTEXT_TRAINING)
    text_only = {**CONTEXT_TRAINING, "train": {"tasks": {"text": 1, "predict": 1}}}
    video.save_temporal(root / "predict_only.safetensors", training_config=text_only)
    fine = {**CONTEXT_TRAINING, "train": {"tasks": {"interpolate": 1, "interpolate_fine": 1}, "interpolate_every": 4}}
    video.save_temporal(root / "fine.safetensors", training_config=fine)
    every_2 = {**CONTEXT_TRAINING, "train": {"tasks": {"interpolate": 1}, "interpolate_every": 2}}
    video.save_temporal(root / "every_2.safetensors", training_config=every_2)
    two_given = {**CONTEXT_TRAINING, "train": {"tasks": {"text": 1, "predict": 1}, "predict_frames": [0, 1, 2]}}
    video.save_temporal(root / "two_given.safetensors", training_config=two_given)
    none_given = {**CONTEXT_TRAINING, "train": {"tasks": {"text": 1, "interpolate": 1}, "predict_frames": [0]}}
    video.save_temporal(root / "none_given.safetensors", training_config=none_given)
    no_predict = {**CONTEXT_TRAINING, "train": {"tasks": {"text": 1, "interpolate": 1}, "predict_frames": [0, 1, 2]}}
    video.save_temporal(root / "no_predict.safetensors", training_config=no_predict)
    no_tasks = {**CONTEXT_TRAINING, "train": {"tasks": {}, "predict_frames": [0, 1, 2]}}  # empty: text only
    video.save_temporal(root / "no_tasks.safetensors", training_config=no_tasks)
    one_given = {**CONTEXT_TRAINING, "train": {"tasks": {"text": 1, "predict": 1}, "predict_frames": [0, 1]}}
    video.save_temporal(root / "one_given.safetensors", training_config=one_given)
    return {"base": base, "context": root / "context.safetensors", "two_given": root / "two_given.safetensors",
            "no_predict": root / "no_predict.safetensors", "no_tasks": root / "no_tasks.safetensors",
            "one_given": root / "one_given.safetensors",
            "none_given": root / "none_given.safetensors", "plain": root / "plain.safetensors",
            "predict_only": root / "predict_only.safetensors", "fine": root / "fine.safetensors",
            "every_2": root / "every_2.safetensors"}  # fmt: skip


def pipeline(files, module="context"):
    from lvdm import VideoPipeline

    return VideoPipeline.from_pretrained(files["base"], temporal=files[module])


def count_calls(pipe):
    shapes = []
    handle = pipe.video.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


FAST = {"num_inference_steps": 3, "seed": 0, "progress": False}


def test_rollout_never_shows_the_model_more_frames_than_it_trained_on(context_files):
    pipe = pipeline(context_files)
    shapes, handle = count_calls(pipe)
    out = pipe("a red disc", num_frames=15, **FAST)  # 3x the training length
    handle.remove()
    assert out.frames.shape[:2] == (1, 15) and out.latents.shape[2] == 15 and out.noise.shape[2] == 15
    assert max(shape[2] for shape in shapes) == 5  # never more than trained
    # chunks (given, new): (0, 5) from text, then (2, 3) three times and (2, 1): 5 chunks x 3 steps
    assert len(shapes) == 5 * 3
    again = pipe("a red disc", num_frames=15, **FAST)
    assert np.array_equal(again.frames, out.frames)  # seeded: the same video


def test_a_rollout_takes_one_base_noise_per_video_in_any_batch_size(context_files):
    """A mixed prior's base noise given per video ``(b, c, 1, h', w')``, as the call documents it, was refused in a
    rollout with ``batch_size`` below ``b`` ("base_noise must be (1, 4, 1, 8, 8), got (2, ...)"): each chunk was
    checked against its batch. Each batch now takes its videos' rows; each video equals itself sampled alone."""
    pipe = pipeline(context_files)
    base = torch.randn((2, 4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    mixed = {**FAST, "num_frames": 9, "noise_prior": "mixed"}  # 9 > 5 trained: a rollout
    together = pipe(["a", "b"], base_noise=base, **mixed)
    split = pipe(["a", "b"], base_noise=base, batch_size=1, **mixed)
    alone = pipe("b", base_noise=base[1:], **{**mixed, "seed": 1})
    scale = together.latents.abs().max()
    assert (split.latents - together.latents).abs().max() <= 1e-5 * scale
    assert (alone.latents - together.latents[1:]).abs().max() <= 1e-5 * scale
    other = pipe("b", base_noise=base[:1], **{**mixed, "seed": 1})  # the control: the base noise is used
    assert (other.latents - alone.latents).abs().max() > 0.1


def test_context_guidance_adds_no_forward_per_step(context_files):
    pipe = pipeline(context_files)
    clip = pipe("a red disc", num_frames=5, **FAST).frames[0]
    shapes, handle = count_calls(pipe)
    pipe("a red disc", context=clip, num_frames=3, guidance_scale=5.0, context_guidance=2.0, **FAST)
    handle.remove()
    assert len(shapes) == 3  # one forward per step: text guidance and context guidance in one batch
    assert {shape[0] for shape in shapes} == {3}  # unconditional, conditional, without the given frames
    shapes, handle = count_calls(pipe)
    plain = pipe("a red disc", context=clip, num_frames=3, guidance_scale=5.0, **FAST)
    guided = pipe("a red disc", context=clip, num_frames=3, guidance_scale=5.0, context_guidance=3.0, **FAST)
    handle.remove()
    assert {shape[0] for shape in shapes} == {2, 3} and not np.array_equal(plain.frames, guided.frames)


def test_continuing_a_video_holds_its_frames_and_records_the_source(context_files, tmp_path):
    from lvdm.media import write_video

    pipe = pipeline(context_files)
    clip = pipe("a red disc", num_frames=5, **FAST)
    path = write_video(clip.frames[0], tmp_path / "clip.mp4", fps=10)
    out = pipe("a red disc", context=path, num_frames=4, **FAST)
    assert out.frames.shape[:2] == (1, 4)
    assert out.metadata[0]["context"] == {"source": str(path.absolute()), "frames": 2, "resized": None}
    big = np.repeat(np.repeat(clip.frames[0], 2, axis=1), 3, axis=2)  # 32x48: resized and centre-cropped
    resized = pipe("a red disc", context=big, num_frames=4, **FAST)
    assert resized.metadata[0]["context"]["resized"] == "48x32 -> 16x16, centre crop"


def test_interpolation_keeps_the_keyframes_and_multiplies_the_fps(context_files, tmp_path):
    from lvdm.data.readers import probe
    from lvdm.media import write_video

    pipe = pipeline(context_files)
    keys = pipe("a red disc", num_frames=3, **FAST).frames[0]
    out = pipe.interpolate(keys, factor=4, **FAST)
    assert out.frames.shape[1] == 4 * (3 - 1) + 1 and out.fps == 4 * 10.0
    assert np.array_equal(out.frames[0, ::4], keys)  # the given frames come back unchanged
    path = write_video(keys, tmp_path / "keys.mp4", fps=6)
    sixteen = pipe.interpolate(path, factor=16, **FAST)
    assert sixteen.frames.shape[1] == 16 * (3 - 1) + 1 and sixteen.fps == 16 * 6.0
    assert np.array_equal(sixteen.frames[0, ::16], pipe.interpolate(path, factor=4, **FAST).frames[0, ::4])
    saved = sixteen.save(tmp_path / "smooth.mp4")[0]
    info = probe(saved)
    assert (info.num_frames, info.fps) == (33, 96.0)
    with pytest.raises(ConfigError, match="100 fps interpolated by 16 would be 1600 fps, past 1000"):
        pipe.interpolate(keys, factor=16, **FAST, fps=100.0)  # made, and refused only when saved


def test_by_16_the_second_pass_is_the_fine_stage_where_the_module_learnt_it(context_files):
    keys = np.zeros((2, 16, 16, 3), np.uint8)
    for module, second in (("fine", FLAGS["interpolate_fine"]), ("context", FLAGS["interpolate"])):
        pipe = pipeline(context_files, module)
        flags: list[int] = []
        handle = pipe.video.register_forward_pre_hook(
            lambda _, args, kwargs, seen=flags: seen.append(int(kwargs["context_flag"][0])), with_kwargs=True
        )
        out = pipe.interpolate(keys, factor=16, **FAST)
        handle.remove()
        # 2 keyframes -> 5 (one window of 5 frames), then 5 -> 17 (four windows): 3 steps each
        assert flags == [FLAGS["interpolate"]] * 3 + [second] * 12, module
        stages = out.metadata[0]["interpolate"]["stages"]
        assert stages == ["interpolate", "interpolate_fine" if module == "fine" else "interpolate"]


@pytest.mark.parametrize(
    ("module", "call", "message"),
    [
        ("plain", lambda pipe, clip: pipe("x", context=clip, **FAST), "no context support"),
        ("plain", lambda pipe, clip: pipe.interpolate(clip, **FAST), "no context support"),
        ("plain", lambda pipe, clip: pipe("x", context_guidance=2.0, **FAST), "no context support"),
        ("predict_only", lambda pipe, clip: pipe.interpolate(clip, **FAST), "interpolate in train.tasks"),
        ("every_2", lambda pipe, clip: pipe.interpolate(clip, **FAST), "interpolate_every=4"),
        ("context", lambda pipe, clip: pipe.interpolate(clip, factor=8, **FAST), "must be 4 or 16"),
        ("context", lambda pipe, clip: pipe.interpolate(clip[:1], **FAST), "at least 2 frames"),
        # these failed in numpy, torch or the resize (a division by zero), or in the tokenizer
        ("context", lambda pipe, clip: pipe.interpolate([clip[0], clip[0, :8]], **FAST), r"shapes \(16, 16, 3\), \(8"),
        ("context", lambda pipe, clip: pipe.interpolate(clip[:, :0], **FAST), "with f, h, w >= 1, got uint8 .3, 0,"),
        ("context", lambda pipe, clip: pipe("x", context=clip[:, :, :0], **FAST), "with f, h, w >= 1"),
        ("context", lambda pipe, clip: pipe.interpolate(torch.from_numpy(clip).to("meta"), **FAST), "a meta torch"),
        ("context", lambda pipe, clip: pipe.interpolate(None, **FAST), r"a video file \(str or os.PathLike\) or"),
        ("context", lambda pipe, clip: pipe.interpolate(clip, negative_prompt=["a", "b"], **FAST), "got 2 for 1"),
        ("context", lambda pipe, clip: pipe("x", context=clip[:1], **FAST), "context_frames=2 needs at least 2"),
        # taken and ignored: interpolation has no image to weigh (a call without image= refuses them likewise)
        ("context", lambda pipe, clip: pipe.interpolate(clip, image_scale=0.5, **FAST), "image_scale=0.5: interp"),
        ("context", lambda pipe, clip: pipe.interpolate(clip, image_guidance_scale=2, **FAST), "takes no image"),
        ("context", lambda pipe, clip: pipe("x", context=clip, image_mode=True, **FAST), "image mode"),
        ("context", lambda pipe, clip: pipe("x", context=clip.astype(float), **FAST), "must be uint8"),
        ("context", lambda pipe, clip: pipe("x", context="missing.mp4", **FAST), "does not exist"),
        (
            "context",
            lambda pipe, clip: pipe.interpolate(np.zeros((3, 1, 32, 3), np.uint8), **FAST),
            "32x1 frames are too far",
        ),
        ("context", lambda pipe, clip: pipe("x", num_frames=12, context_frames=5, **FAST), "no new frame"),
        # taken and ignored: no context video, and 5 frames made in one pass (the control: the next test)
        ("context", lambda pipe, clip: pipe("x", num_frames=5, context_guidance=3, **FAST), "context_guidance=3: t"),
        ("context", lambda pipe, clip: pipe("x", num_frames=5, context_frames=1, **FAST), "has no given frames"),
        ("two_given", lambda pipe, clip: pipe("x", num_frames=12, context_frames=3, **FAST), "at most 2 given"),
        ("two_given", lambda pipe, clip: pipe("x", context=clip, context_frames=3, **FAST), "at most 2 given"),
        ("none_given", lambda pipe, clip: pipe("x", context=clip, context_frames=1, **FAST), "not trained to contin"),
        ("none_given", lambda pipe, clip: pipe("x", num_frames=12, **FAST), "roll out past 5 frames"),
        ("no_predict", lambda pipe, clip: pipe("x", context=clip, **FAST), "not trained to continue"),
        ("no_tasks", lambda pipe, clip: pipe("x", context=clip, **FAST), "not trained to continue"),
    ],
)
def test_bad_context_requests_are_one_clear_error(context_files, module, call, message):
    from lvdm.errors import ConfigError

    clip = np.zeros((3, 16, 16, 3), np.uint8)
    with pytest.raises(ConfigError, match=message):
        call(pipeline(context_files, module), clip)


def test_a_context_video_far_from_the_outputs_shape_is_refused_before_it_is_decoded(context_files, tmp_path):
    """Covering the output, a 16x4096 video decoded 512x131072 frames (200 MB each) to keep 1/256 of each; a shape
    more than 16 times the output's pixels away is refused, by name. The control: a 4 times wider one is taken."""
    from lvdm.errors import ConfigError

    pipe = pipeline(context_files, "context")
    thin = clips.write_clip(tmp_path / "thin.mp4", num_frames=4, size=(16, 1024))
    with pytest.raises(ConfigError, match=r"thin.mp4: 16x1024 frames are too far from the 16x16 output's shape"):
        pipe("x", context=thin, height=16, width=16, **FAST)
    taken = clips.write_clip(tmp_path / "taken.mp4", num_frames=4, size=(16, 64))
    assert pipe("x", context=taken, height=16, width=16, **FAST).frames.shape[2:4] == (16, 16)


def test_interpolation_takes_numpy_factors_tensors_and_one_negative_prompt_in_a_list(context_files):
    """The controls of the refusals above: numpy's integers were refused as factors, and a list of one negative
    prompt (as ``__call__`` takes one per prompt) failed in the tokenizer."""
    pipe = pipeline(context_files)
    keys = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = pipe.interpolate(keys, factor=4, negative_prompt="blur", **FAST)
    defaults = {"image_scale": 1.0, "image_guidance_scale": None}  # as a sidecar records them: taken
    same = pipe.interpolate(torch.from_numpy(keys), factor=np.int64(4), negative_prompt=["blur"], **defaults, **FAST)
    assert np.array_equal(out.frames, same.frames) and out.metadata == same.metadata
    assert type(same.metadata[0]["interpolate"]["factor"]) is int and out.metadata[0]["settings"]["negative_prompt"]


def test_as_many_context_frames_as_the_module_trained_with_are_accepted(context_files):
    """The control of the refusals above: the module that learnt from up to 2 given frames rolls out with 2; and a
    call with no given frames takes the context settings its sidecar records (the defaults), and makes what it makes
    without them."""
    out = pipeline(context_files, "two_given")("x", num_frames=7, context_frames=2, **FAST)
    assert out.frames.shape[1] == 7
    pipe = pipeline(context_files)
    plain = pipe("x", num_frames=5, **FAST)
    assert np.array_equal(pipe("x", **plain.metadata[0]["settings"], progress=False).frames, plain.frames)
    used = pipe("x", num_frames=5, context_frames=1, context_guidance=3, context=plain.frames[0], **FAST)
    assert used.frames.shape[1] == 5  # where the settings are used, they are taken
    one = pipeline(context_files, "one_given")  # the default 2, not asked for, comes down to the 1 it learnt
    assert one("x", num_frames=7, **FAST).metadata[0]["settings"]["context_frames"] == 1
    clip = np.zeros((3, 16, 16, 3), np.uint8)
    assert one("x", context=clip, num_frames=3, **FAST).frames.shape[1] == 3


def test_sample_cli_rolls_out_and_interpolates(context_files, tmp_path, command):
    """sample.py's main in this process (as a user's command line, without the interpreter start-ups)."""
    from lvdm.data.readers import probe

    def cli(*args: str) -> tuple[int, str]:
        done = command(SAMPLE, "--quiet", "--base", context_files["base"], "--steps", "2", *args)
        return done.returncode, done.stderr

    module = ["--temporal", str(context_files["context"])]
    long, smooth = tmp_path / "long.mp4", tmp_path / "smooth.mp4"
    assert cli(*module, "--prompt", "a disc", "--frames", "12", "--out", str(long))[0] == 0
    assert cli(*module, "--interpolate", str(long), "--factor", "4", "--out", str(smooth))[0] == 0
    assert (probe(long).num_frames, probe(smooth).num_frames) == (12, 45)
    assert probe(smooth).fps == 4 * probe(long).fps
    assert cli("--from-json", f"{smooth}.json", "--out", str(tmp_path / "again.mp4"))[0] == 0  # replayed
    assert probe(tmp_path / "again.mp4").num_frames == 45
    for extra, message in (
        (["--interpolate", str(long), "--factor", "3"], "invalid choice"),
        (["--prompt", "x", "--factor", "4"], "--factor goes with --interpolate"),
        (["--prompt", "x", "--context", str(long), "--image-mode"], "--image-mode has no temporal layers"),
        (["--prompt", "x", "--context", str(tmp_path / "nope.mp4")], "no such video file"),
        (["--prompt", "x", "--context", str(tmp_path)], "not a regular file"),  # was "no such video file"
    ):
        code, err = cli(*module, *extra, "--out", str(tmp_path / "bad.mp4"))
        assert code == 2 and message in err and err.count("\n") == 1, err
    plain = ["--temporal", str(context_files["plain"])]
    code, err = cli(*plain, "--interpolate", str(long), "--out", str(tmp_path / "p.mp4"))
    assert code == 2 and "model.context=true" in err and "Traceback" not in err, err


def test_sample_cli_reads_from_the_module_file_what_context_it_takes_before_loading(
    context_files, tmp_path, command, monkeypatch
):
    """A module without context frames, or one trained to continue from fewer, was found out only after loading
    (``--context-frames`` alone: not at all). Each control, the same option on a module that takes it, reaches the
    reading of the base's weights."""
    from lvdm.errors import ConfigError
    from lvdm.models import loading

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    monkeypatch.setattr(loading, "_load_folder", reached)
    video = tmp_path / "given.mp4"
    video.write_bytes(b"read only after loading")
    frames = ["--context-frames", "1000000"]
    for wrong, right, message in (
        (("plain", frames), ("context", frames), "has no context support"),
        (("plain", ["--context-guidance", "2"]), ("context", ["--context-guidance", "2"]), "has no context support"),
        (("plain", ["--context", str(video)]), ("context", ["--context", str(video)]), "cannot continue a video"),
        (("predict_only", ["--interpolate", str(video)]), ("context", ["--interpolate", str(video)]),
         "trained for predict, text only"),
        (("two_given", ["--context-frames", "3"]), ("two_given", ["--context-frames", "2"]), "at most 2 given"),
        (("every_2", ["--interpolate", str(video)]), ("context", ["--interpolate", str(video)]),
         "keyframes 2 frames apart (train.interpolate_every=2)"),
    ):  # fmt: skip
        for (module, options), reaches in ((wrong, False), (right, True)):
            done = command(SAMPLE, "--quiet", "--base", context_files["base"], "--prompt", "a disc",
                           "--out", tmp_path / "x.mp4", "--temporal", context_files[module], *options)  # fmt: skip
            code, err = done.returncode, done.stderr
            assert code == 2 and err.count("\n") == 1 and ("reached the loading" if reaches else message) in err, err


def test_a_fifo_or_folder_given_as_a_video_is_refused_without_reading_it(context_files, tmp_path):
    import os

    from lvdm.errors import ConfigError

    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)  # opening it for reading would block forever
    pipe = pipeline(context_files)
    for path in (fifo, tmp_path):
        with pytest.raises(ConfigError, match="not a file"):
            pipe("x", context=path, **FAST)
        with pytest.raises(ConfigError, match="not a file"):
            pipe.interpolate(path, **FAST)
    assert fifo.exists()


def test_a_half_precision_pipeline_runs_the_context_part_in_its_dtype(context_files):
    """As ``test_fps``'s: the context encoder follows the pipeline's dtype, or its bf16 run fails."""
    from lvdm import VideoPipeline

    half = VideoPipeline.from_pretrained(context_files["base"], temporal=context_files["context"], dtype="bf16")
    assert {p.dtype for p in half.video.parts.parameters()} == {torch.bfloat16}
    a = pipeline(context_files)("a red disc", num_frames=8, **FAST).frames
    b = half("a red disc", num_frames=8, **FAST).frames
    assert abs(a.astype(float) - b.astype(float)).mean() < 5.0  # bf16 rounding (3.4 and 2.8 of 255; another seed: 69)
