"""Context frames (issue 11): the context encoder part, the training tasks, warm start and the context gain."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import deepcopy, frame_by_frame, randomize, tiny_overrides, video_inputs
from safetensors.torch import load_file

from lvdm import testing
from lvdm.config import load_config
from lvdm.errors import ConfigError, TemporalModuleError
from lvdm.models import VideoUNet, load_base
from lvdm.models.parts import build_part
from lvdm.modules.context_encoder import FLAGS, site_level
from lvdm.training.tasks import draw_tasks, given_frames, made_frames_loss
from lvdm.training.trainer import train

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
    from lvdm.modules.video_blocks import _VideoWrapper

    for module in list(unet.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, _VideoWrapper):
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
    whole = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "whole", **CONTEXT_RUN)), progress=False)
    split = tiny_overrides(tiny_assets, tmp_path / "split", **CONTEXT_RUN, **{"train.max_steps": 2})
    train(load_config([], split), progress=False)
    resumed = tiny_overrides(tiny_assets, tmp_path / "split", **CONTEXT_RUN, **{"train.resume": "auto"})
    train(load_config([], resumed), progress=False)
    a, b = load_file(whole.temporal_path), load_file(tmp_path / "split" / "temporal.safetensors")
    assert any(k.startswith("parts.context.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)

    lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    logged = {key for line in lines for key in line}
    assert {"loss_text", "loss_predict", "loss_interpolate"} & logged  # per task, where drawn
    gains = whole.gain
    for task in ("predict", "interpolate"):
        expected = gains[f"loss_{task}_without_context"] / gains[f"loss_{task}_with_context"]
        assert gains[f"context_gain_{task}"] == pytest.approx(expected)


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


def test_an_untrained_context_part_has_a_context_gain_of_exactly_one(tiny_assets, tmp_path):
    """The control: a model that cannot use the given frames gets 1, so the figure can fail."""
    from lvdm.training.step import Frozen
    from lvdm.training.tasks import context_gains

    cfg = load_config([], tiny_overrides(tiny_assets, tmp_path / "x", **CONTEXT_RUN))
    base = load_base(tiny_assets["base"])
    video = VideoUNet.from_unet2d(base.unet)
    randomize(video.temporal_parameters(), seed=3, std=0.05)
    build_part(video, "context", "context", {})  # zero projections: the given frames change nothing
    g = torch.Generator().manual_seed(0)
    batch = {
        "video": torch.rand(2, 4, 3, 16, 16, generator=g) * 2 - 1,  # b f c h w
        "caption": ["a red disc", "a blue square"],
        "is_image": torch.zeros(2),
    }
    gains = context_gains(video, [batch], Frozen.from_base(base), torch.device("cpu"), cfg.train)
    assert gains["context_gain_predict"] == 1.0 and gains["context_gain_interpolate"] == 1.0
