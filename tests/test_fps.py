"""Motion-speed (FPS) conditioning (issue 12): clip rates drawn per clip, the FPS part, its gain, sampling."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from conftest import randomize, tiny_overrides, video_inputs, whole_and_resumed

from lvdm import testing
from lvdm.config import load_config
from lvdm.data.sampling import plan_clip
from lvdm.errors import ConfigError, VideoReadError
from lvdm.models import VideoUNet, load_base
from lvdm.models.parts import build_part
from lvdm.sampling_settings import training_fps
from lvdm.training.checkpoint import list_checkpoints, load_checkpoint
from lvdm.training.validation import farthest_rates, fps_gains


# ------------------------------------------------------------------------------------------------ clip rates
def test_a_stride_range_draws_every_stride_the_video_is_long_enough_for():
    rng = random.Random(0)
    long = Counter(plan_clip("v.mp4", 100, 24.0, 8, stride=(1, 4), rng=rng).fps for _ in range(400))
    assert set(long) == {24.0, 12.0, 8.0, 6.0} and min(long.values()) > 60  # uniform over 1..4
    # 8 frames at stride 3 need 22 source frames: a 20-frame video draws strides 1 and 2 only, never a bad sample
    short = {plan_clip("v.mp4", 20, 24.0, 8, stride=(1, 4), rng=rng).fps for _ in range(200)}
    assert short == {24.0, 12.0}
    for _ in range(50):
        plan = plan_clip("v.mp4", 22, 24.0, 8, stride=(1, 4), rng=rng)
        assert plan.indices[-1] < 22
    with pytest.raises(VideoReadError, match="too short"):
        plan_clip("v.mp4", 7, 24.0, 8, stride=(1, 4), rng=rng)


def test_a_target_fps_range_draws_rates_log_uniformly_within_it():
    rng = random.Random(0)
    rates = [plan_clip("v.mp4", 600, 60.0, 8, target_fps=(4.0, 16.0), rng=rng).fps for _ in range(2000)]
    assert all(4.0 - 1e-9 <= r <= 16.0 + 1e-9 for r in rates)
    below = sum(r < 8.0 for r in rates) / len(rates)  # 8 is the geometric middle of [4, 16]
    assert 0.45 < below < 0.55
    # a 40-frame 60 fps video fits 8 frames only at >= 60 * 7 / 39.5 fps: lower rates are not drawn
    short = [plan_clip("v.mp4", 40, 60.0, 8, target_fps=(4.0, 16.0), rng=rng) for _ in range(200)]
    assert all(p.fps >= 60 * 7 / 39.5 - 1e-6 and p.indices[-1] < 40 for p in short)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.frame_stride=[3,1]", "data.frame_stride: a range is [low, high] with low <= high, got [3, 1]"),
        ("data.frame_stride=[1,2,3]", "data.frame_stride: a range is [low, high]"),
        ("data.frame_stride=[0,2]", "data.frame_stride[0]: must be >= 1, got 0"),
        ("data.target_fps=[8,4]", "data.target_fps: a range is [low, high] with low <= high, got [8.0, 4.0]"),
        ("data.target_fps=[0,4]", "data.target_fps[0]: must be > 0, got 0.0"),
        ("data.frame_stride=fast", "data.frame_stride: expected int or list of int or null, got 'fast' (str)"),
    ],
)
def test_bad_rate_ranges_are_config_errors(override, message):
    with pytest.raises(ConfigError) as error:
        load_config([], ["model.base=b", "data.root=d", override])
    assert message in str(error.value)


def test_held_out_clips_alternate_the_lowest_and_highest_rate(tiny_assets, tmp_path):
    from lvdm.data.build import build_split

    cfg = load_config([], tiny_overrides(tiny_assets, tmp_path, **{"data.frame_stride": "[1,3]", "data.holdout": 3}))
    _, _, holdout = build_split(cfg.data, seed=0)
    assert [holdout[i]["fps"] for i in range(3)] == [8.0, 24.0, 8.0]  # 24 fps clips at stride 3, 1, 3
    assert [holdout[i]["fps"] for i in range(3)] == [8.0, 24.0, 8.0]  # and the same at every validation


def test_the_sampling_default_of_a_rate_range_is_its_middle_speed():
    assert training_fps({"data": {"target_fps": [4.0, 16.0]}}) == pytest.approx(8.0)
    assert training_fps({"data": {"frame_stride": [1, 3]}, "clip_fps": 12.0}) == 12.0


# ------------------------------------------------------------------------------------------------ the part
def trained_video(seed: int = 0) -> VideoUNet:
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=seed))
    randomize(video.temporal_parameters(), seed=3, std=0.05)
    return video


@torch.no_grad()
def test_fps_conditioning_changes_nothing_until_it_trains_and_never_touches_image_mode():
    video = trained_video()
    sample, t, text = video_inputs(video.unet, f=4)
    before = video(sample, t, text)
    image_mode = video(sample, t, text, image_only_indicator=torch.ones(2))
    build_part(video, "fps", "fps", {})
    for fps in (1.0, 8.0, torch.tensor([4.0, 30.0])):
        assert torch.equal(video(sample, t, text, fps=fps), before)
    randomize(video.parts["fps"].parameters(), seed=5, std=0.2)  # as if trained
    slow, fast = video(sample, t, text, fps=4.0), video(sample, t, text, fps=24.0)
    assert not torch.allclose(slow, fast) and not torch.allclose(slow, before)
    assert torch.equal(video(sample, t, text), before)  # no rate given: nothing added
    for fps in (4.0, 24.0):  # the spatial layers never see the rate
        assert torch.equal(video(sample, t, text, fps=fps, image_only_indicator=torch.ones(2)), image_mode)
    with pytest.raises(ValueError, match="fps must be a number or"):
        video(sample, t, text, fps=torch.tensor([4.0, 8.0, 12.0]))
    with pytest.raises(ValueError, match="finite rates"):
        video(sample, t, text, fps=float("nan"))


def test_farthest_rates_pick_a_rate_the_clips_really_have():
    rates = torch.tensor([24.0, 12.0, 8.0, 6.0])
    assert farthest_rates(rates).tolist() == [6.0, 24.0, 24.0, 24.0]


RUN = {"model.fps_conditioning": "true", "data.frame_stride": "[1,3]", "data.holdout": 2}


def test_fps_training_saves_the_part_reports_an_fps_gain_and_resumes_exactly(tiny_assets, tmp_path):
    whole, a, b = whole_and_resumed(lambda out, **extra: tiny_overrides(tiny_assets, out, **RUN, **extra), tmp_path)
    assert any(k.startswith("parts.fps.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["parts.fps.linear_2.weight"].abs().sum()) > 0  # it trained

    g = whole.gain
    assert g["fps_gain"] == pytest.approx(g["loss_wrong_fps"] / g["loss_true_fps"])
    lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert any("fps_gain" in line for line in lines)

    # the module file rebuilds the part; the sampling default is the median training rate
    video = VideoUNet.from_temporal_file(load_base(tiny_assets["base"]).unet, whole.temporal_path)
    assert video.part_specs["fps"].kind == "fps" and "fps" in video.conditioning_inputs
    metadata = json.loads(load_file_metadata(whole.temporal_path)["training_config"])
    assert metadata["clip_fps"] in (24.0, 12.0, 8.0)
    resumed = json.loads(load_file_metadata(tmp_path / "split" / whole.temporal_path.name)["training_config"])
    assert resumed["clip_fps"] == metadata["clip_fps"]
    counts = [load_checkpoint(list_checkpoints(tmp_path / run / "checkpoints")[-1])[0]["trainer"]["clip_rates"]
              for run in ("whole", "split")]  # fmt: skip
    assert counts[0] == counts[1] and sum(n for _, n in counts[0]) >= 4  # the steps before the resume count too


def test_a_module_trained_over_a_range_of_rates_samples_at_its_middle_speed(tiny_assets, tmp_path):
    """``data.target_fps: [4, 16]`` (the shipped i2v and fps configs) made a module every loader refused as broken:
    "target_fps = [4.0, 16.0]; expected a number". It loads, and sampling defaults to the range's middle speed."""
    from lvdm import VideoPipeline
    from lvdm.sampling_settings import temporal_defaults
    from lvdm.training.trainer import train

    settings = {"model.fps_conditioning": "true", "data.target_fps": "[4,16]", "train.max_steps": 2}
    result = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **settings)), progress=False)
    assert temporal_defaults(result.temporal_path)["fps"] == pytest.approx(8.0)
    pipe = VideoPipeline.from_pretrained(tiny_assets["base"], temporal=result.temporal_path)
    assert pipe.defaults["fps"] == pytest.approx(8.0) and "fps" in pipe.video.conditioning_inputs
    from lvdm.models.temporal_file import _training_problem

    for wrong in ([16.0, 4.0], [4.0, 1e9], [4.0, float("nan")], [4.0]):  # the control: what is still refused
        assert "target_fps" in _training_problem({"target_fps": wrong}), wrong


def load_file_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_model_that_cannot_read_the_rate_has_an_fps_gain_of_exactly_one(tiny_assets):
    """The control: an untrained FPS part (its last layer zero) cannot tell rates apart, so the figure is exactly 1;
    held-out clips that share one rate give no figure at all rather than a meaningless 1."""
    from lvdm.training.step import Frozen, batch_inputs

    base = load_base(tiny_assets["base"])
    video = VideoUNet.from_unet2d(base.unet)
    randomize(video.temporal_parameters(), seed=3, std=0.05)
    build_part(video, "fps", "fps", {})
    g = torch.Generator().manual_seed(0)
    batch = {
        "video": torch.rand(2, 4, 3, 16, 16, generator=g) * 2 - 1,  # b f c h w
        "caption": ["a red disc", "a blue square"],
        "is_image": torch.zeros(2),
        "fps": torch.tensor([24.0, 8.0]),
    }
    frozen, cpu = Frozen.from_base(base), torch.device("cpu")
    inputs = lambda b: batch_inputs(b, video.conditioning_inputs, cpu)  # noqa: E731
    assert fps_gains(video, [batch], frozen, cpu, inputs=inputs)["fps_gain"] == 1.0
    assert fps_gains(video, [batch | {"fps": torch.tensor([8.0, 8.0])}], frozen, cpu, inputs=inputs) == {}
    randomize(video.parts["fps"].parameters(), seed=5, std=0.2)
    assert fps_gains(video, [batch], frozen, cpu, inputs=inputs)["fps_gain"] != 1.0


# ------------------------------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def fps_module(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("fps")
    base = testing.make_tiny_sd(root / "base", "sd1", seed=0)
    video = VideoUNet.from_unet2d(load_base(base).unet)
    build_part(video, "fps", "fps", {})
    randomize(video.temporal_parameters(), seed=1, std=0.2)
    config = {"data": {"num_frames": 4, "resolution": [16, 16], "frame_stride": [1, 3]}, "clip_fps": 12.0}
    video.save_temporal(root / "fps.safetensors", training_config=config)
    return {"base": base, "module": root / "fps.safetensors"}


def test_the_fps_setting_conditions_sampling_and_is_recorded(fps_module):
    from lvdm import VideoPipeline

    pipe = VideoPipeline.from_pretrained(fps_module["base"], temporal=fps_module["module"])
    assert pipe.has_fps
    settings = {"num_inference_steps": 2, "seed": 0, "progress": False}
    default = pipe("a red disc", **settings)
    assert default.fps == 12.0 and default.metadata[0]["settings"]["fps"] == 12.0  # the module's training rate
    slow, same = pipe("a red disc", fps=4.0, **settings), pipe("a red disc", fps=12.0, **settings)
    assert slow.fps == 4.0 and not (slow.frames == default.frames).all()
    assert (same.frames == default.frames).all()
    assert math.isclose(slow.metadata[0]["settings"]["fps"], 4.0)


def test_the_speed_sweep_is_flat_for_a_module_that_cannot_read_the_rate(fps_module, tmp_path):
    """The control of the demo's speed check: without FPS conditioning, ``--fps`` only sets the playback rate, so
    every rate samples the same frames and the sweep cannot fall; with it (random weights here) the frames differ."""
    from lvdm.training.demo import speed_sweep

    plain = tmp_path / "plain.safetensors"
    video = VideoUNet.from_unet2d(load_base(fps_module["base"]).unet)
    randomize(video.temporal_parameters(), seed=1, std=0.2)
    video.save_temporal(plain, training_config={"data": {"num_frames": 4, "resolution": [16, 16]}})
    flat = speed_sweep(fps_module["base"], plain, ["a red disc"], steps=2)
    assert len(set(flat.values())) == 1
    reading = speed_sweep(fps_module["base"], fps_module["module"], ["a red disc"], steps=2)
    assert len(set(reading.values())) == 3


def test_a_half_precision_pipeline_runs_the_fps_part_in_its_dtype(fps_module):
    """``dtype="bf16"`` (``sample.py --dtype``, fp16 by default on a GPU) casts the standalone parts with the UNet:
    an fp32 part's embedding added to bf16 activations failed in the GroupNorm after it."""
    from lvdm import VideoPipeline

    settings = {"num_inference_steps": 2, "seed": 0, "progress": False, "fps": 4.0}
    full = VideoPipeline.from_pretrained(fps_module["base"], temporal=fps_module["module"])
    half = VideoPipeline.from_pretrained(fps_module["base"], temporal=fps_module["module"], dtype="bf16")
    assert {p.dtype for p in half.video.parts.parameters()} == {torch.bfloat16}
    a, b = full("a red disc", **settings).frames, half("a red disc", **settings).frames
    assert abs(a.astype(float) - b.astype(float)).mean() < 5.0  # bf16 rounding (3.4 and 2.8 of 255; another seed: 69)
