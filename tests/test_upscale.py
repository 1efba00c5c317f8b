"""The x4 upscaler (issue 14): loading and family, sampling equal to diffusers frame by frame, the video upscaler at
init, tiles, bad inputs, and the ``upscale`` training target on patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import randomize, sample_here, tiny_overrides, whole_and_resumed

from lvdm import UpscalePipeline
from lvdm.config import load_config
from lvdm.errors import CheckpointError, ConfigError, TemporalModuleError
from lvdm.models import VideoUNet, load_base
from lvdm.testing.upscaler import make_tiny_upscaler

FAST = {"num_inference_steps": 3, "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    return make_tiny_upscaler(tmp_path_factory.mktemp("upscaler") / "x4", seed=0)


@pytest.fixture(scope="module")
def frames():
    """6 smooth 16x24 frames drifting right (a low-res video)."""
    yy, xx = np.mgrid[0:16, 0:24]
    return np.stack([
        np.stack([128 + 100 * np.sin((xx + 2 * i) / 4), 128 + 100 * np.cos(yy / 3), np.full_like(xx, 90.0)], -1)
        for i in range(6)
    ]).astype(np.uint8)  # fmt: skip


def diffusers_frames(upscaler, frames, latents, *, seed, noise_level, steps, prompt="a cat", guidance=9.0):
    """diffusers' StableDiffusionUpscalePipeline on each frame, its low-res noise drawn where lvdm draws that frame's
    (one generator, frame after frame) and the same initial latents."""
    from diffusers import StableDiffusionUpscalePipeline

    ref = StableDiffusionUpscalePipeline.from_pretrained(upscaler, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    generator, out = torch.Generator().manual_seed(seed), []
    for i, frame in enumerate(frames):
        state = torch.Generator()
        state.set_state(generator.get_state())
        torch.randn((1, 3, *frame.shape[:2]), generator=generator)  # what lvdm draws for this frame
        image = ref(prompt, image=frame[None].astype(np.float32) / 255, num_inference_steps=steps,
                    guidance_scale=guidance, noise_level=noise_level, generator=state, latents=latents[:, :, i],
                    output_type="np").images[0]  # fmt: skip
        out.append((image * 255).round().astype(np.uint8))
    return np.stack(out)


def test_an_upscaler_folder_loads_as_an_upscaler_and_text_to_image_bases_do_not(upscaler, tiny_assets):
    base = load_base(upscaler)
    assert base.is_upscaler and base.max_noise_level == 350 and base.unet.config.in_channels == 7
    assert not load_base(tiny_assets["base"]).is_upscaler
    from types import SimpleNamespace

    from lvdm.models.family import base_family

    real = SimpleNamespace(block_out_channels=(256, 512, 512, 1024), cross_attention_dim=1024, in_channels=7,
                           num_class_embeds=1000)  # fmt: skip
    assert base_family(real) == "upscaler"
    with pytest.raises(ConfigError, match="not an x4 upscaler"):
        UpscalePipeline(load_base(tiny_assets["base"]))


@pytest.mark.parametrize("guidance", [1.0, 9.0])
def test_frame_by_frame_it_equals_diffusers_upscale_pipeline(upscaler, frames, guidance):
    latents = torch.randn(1, 4, 3, 16, 24, generator=torch.Generator().manual_seed(5))
    pipe = UpscalePipeline.from_pretrained(upscaler)
    kwargs = {"num_inference_steps": 4, "noise_level": 30, "seed": 1, "latents": latents, "guidance_scale": guidance}
    out = pipe(frames[:3], "a cat", progress=False, **kwargs)
    expected = diffusers_frames(upscaler, frames[:3], latents, seed=1, noise_level=30, steps=4, guidance=guidance)
    assert out.frames.shape == (1, 3, 64, 96, 3)
    assert np.abs(out.frames[0].astype(int) - expected).max() <= 1
    # the video upscaler at init (temporal layers added, untrained) computes the same
    pipe.video = VideoUNet.from_unet2d(pipe.base.unet)
    video = pipe(frames[:3], "a cat", progress=False, **kwargs)
    assert video.metadata[0]["mode"] == "video" and np.abs(video.frames.astype(int) - out.frames).max() <= 1
    # and a trained one does not: the equality is not trivial
    randomize(pipe.video.temporal_parameters(), seed=1, std=0.05)
    moved = pipe(frames[:3], "a cat", progress=False, **kwargs)
    assert np.abs(moved.frames.astype(int) - out.frames).max() > 1


def test_with_a_temporal_module_one_frame_and_image_mode_upscale_frame_by_frame(upscaler, frames):
    """Both ran the inner 2D UNet, whose temporal layers a loaded module had installed: a traceback ("a temporal
    layer ran outside VideoUNet.forward") for a 1-frame video or --image-mode with --temporal."""
    plain = UpscalePipeline.from_pretrained(upscaler)
    alone = plain(frames[:3], "x", **FAST).frames
    pipe = UpscalePipeline.from_pretrained(upscaler)
    pipe.video = VideoUNet.from_unet2d(pipe.base.unet)
    randomize(pipe.video.temporal_parameters(), seed=1, std=0.05)
    image_mode = pipe(frames[:3], "x", image_mode=True, **FAST)
    assert image_mode.metadata[0]["mode"] == "image" and np.abs(image_mode.frames.astype(int) - alone).max() <= 1
    one = pipe(frames[:1], "x", **FAST)
    assert np.abs(one.frames.astype(int) - plain(frames[:1], "x", **FAST).frames).max() <= 1
    assert np.abs(pipe(frames[:3], "x", **FAST).frames.astype(int) - alone).max() > 1  # the control: as a video


def test_tiles_as_large_as_the_video_are_one_call_and_smaller_ones_cover_it(upscaler, frames):
    pipe = UpscalePipeline.from_pretrained(upscaler)
    whole = pipe(frames, "x", **FAST)
    same = pipe(frames, "x", tile=24, chunk_frames=6, **FAST)
    assert np.array_equal(same.frames, whole.frames)
    calls = []
    handle = pipe.base.unet.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    tiled = pipe(frames, "x", tile=8, tile_overlap=4, **FAST)
    handle.remove()
    assert tiled.frames.shape == whole.frames.shape
    assert max(shape[-1] for shape in calls) == 8 and max(shape[-2] for shape in calls) == 8
    assert tiled.metadata[0]["upscale"]["tile"] == 8


def test_small_tiles_keep_their_own_statistics_where_the_reference_has_too_few_values(upscaler, frames):
    """8 px tiles of these 16x24 frames: the reference run is 4x8, 1x2 at the UNet's deepest level, 4 values per
    GroupNorm group there, whose variance can be near zero. Applied to the tiles, such statistics made the latents
    500x too large; those layers now normalise each tile by its own (``MIN_GROUP_VALUES``)."""
    pipe = UpscalePipeline.from_pretrained(upscaler)
    settings = {"num_inference_steps": 2, "seed": 0, "progress": False}
    whole = pipe(frames, "a cat", **settings).latents.abs().mean()
    for tile in (8, 16):
        tiled = pipe(frames, "a cat", tile=tile, **settings).latents.abs().mean()
        assert tiled < 2 * whole, (tile, float(tiled), float(whole))  # 1.19 / 1.09 against 0.80 (before: 439, 1.42)


def test_a_size_the_unet_cannot_take_is_padded_and_cropped_back(upscaler, frames):
    pipe = UpscalePipeline.from_pretrained(upscaler)
    odd = frames[:2, :13, :19]  # the UNet takes multiples of 4
    out = pipe(odd, "x", **FAST)
    assert out.frames.shape == (1, 2, 52, 76, 3) and out.latents.shape[-2:] == (16, 20)
    one = pipe(frames[:1], "x", **FAST)  # one frame: upscaled as an image
    assert one.frames.shape == (1, 1, 64, 96, 3) and one.metadata[0]["mode"] == "image"


def test_in_float16_the_vae_decodes_in_float32_as_diffusers_does(upscaler):
    """The x4 upscaler's VAE overflows in float16, and diffusers' pipeline decodes in float32 (``force_upcast``).
    lvdm decoded in float16 (sample.py's default on CUDA): a VAE whose decoder features pass 65504 (scaled up here)
    made NaN frames, refused as "the model's predictions blew up", where diffusers' pipeline decodes them."""
    import copy

    latents = torch.randn(1, 4, 2, 16, 24, generator=torch.Generator().manual_seed(0))
    pipes = [UpscalePipeline.from_pretrained(upscaler, dtype=dtype) for dtype in ("fp32", "fp16")]
    for pipe in pipes:
        with torch.no_grad():
            for weight in (pipe.base.vae.decoder.conv_in.weight, pipe.base.vae.decoder.conv_in.bias):
                weight.mul_(3000)
    for tile in (None, 16):
        whole, half = (pipe.decode(latents, tile=tile) for pipe in pipes)
        assert np.abs(half.astype(int) - whole).max() <= 1, tile
    assert pipes[1].dtype == torch.float16  # the UNet keeps the dtype asked for
    # the control: in float16 the decoder overflows on these latents
    vae = copy.deepcopy(pipes[1].base.vae).half()
    with torch.no_grad():
        assert not vae.decode(latents[:, :, 0].half() / vae.config.scaling_factor).sample.isfinite().all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_level": 351}, "noise_level must be an integer in 0 .. 350"),
        ({"noise_level": -1}, "noise_level must be"),
        ({"noise_level": 2.5}, "noise_level must be"),
        ({"tile": 6}, "tile must be a multiple of 4"),
        ({"tile": 8, "tile_overlap": 8}, "tile_overlap must be"),
        ({"tile_overlap": 2}, "goes with tile"),
        ({"chunk_frames": 1}, "chunk_frames must be"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 5000}, "1 .. 1000"),
        ({"seed": -1}, "seed must be"),
        ({"seed": 10**30}, "seed must be"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be"),
        ({"latents": torch.zeros(1, 4, 2, 8, 8)}, "latents must have shape"),
        ({"frame_norms": "frame"}, "frame_norms must be True, False or 'pooled'"),
        ({"frame_norms": "pooled"}, "frame_norms='pooled' goes with tile"),  # taken, recorded and ignored
        ({"frame_norms": False, "chunk_frames": 2}, "frame_norms=False goes with tile"),
    ],
)
def test_bad_upscale_requests_are_one_clear_error(upscaler, frames, kwargs, message):
    pipe = UpscalePipeline.from_pretrained(upscaler)
    with pytest.raises(ConfigError, match=message):
        pipe(frames, "x", **{**FAST, **kwargs})


def test_bad_videos_and_modules_are_refused(upscaler, tiny_assets, tmp_path, frames):
    import os

    pipe = UpscalePipeline.from_pretrained(upscaler)
    fifo = tmp_path / "in.mp4"
    os.mkfifo(fifo)  # opening it would block
    for bad, message in ((fifo, "not a file"), (tmp_path, "not a file"), (frames.astype(float), "uint8"),
                         (frames[0], "uint8 \\(f, h, w, 3\\)")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            pipe(bad, "x", **FAST)
    # too large to upscale: refused from the file's header, before its frames are read (4000x4000 px filled 23 GB)
    from lvdm.testing.clips import write_clip
    from lvdm.upscale_pipeline import _check_size

    wide = write_clip(tmp_path / "wide.mp4", num_frames=2, size=(2064, 16))
    with pytest.raises(ConfigError, match="2064x16 px would upscale to 8256x64; at most 2048 px a side"):
        pipe(wide, "x", **FAST)
    with pytest.raises(ConfigError, match="at most 2048 px a side .* and 4096 frames"):
        pipe(np.zeros((4097, 8, 8, 3), np.uint8), "x", **FAST)
    _check_size("the largest", 4096, 2048, 2048)  # the control: the limits themselves are allowed
    # a module of an SD base on the upscaler, and the upscaler's module on an SD base
    sd = VideoUNet.from_unet2d(load_base(tiny_assets["base"]).unet)
    sd.save_temporal(tmp_path / "sd.safetensors")
    with pytest.raises(TemporalModuleError):
        UpscalePipeline.from_pretrained(upscaler, temporal=tmp_path / "sd.safetensors")
    up = VideoUNet.from_unet2d(load_base(upscaler).unet)
    up.save_temporal(tmp_path / "up.safetensors")
    from lvdm import VideoPipeline

    with pytest.raises(TemporalModuleError):
        VideoPipeline.from_pretrained(tiny_assets["base"], temporal=tmp_path / "up.safetensors")
    with pytest.raises(CheckpointError, match="not a folder"):
        UpscalePipeline.from_pretrained(tmp_path / "missing")


def test_a_video_pipeline_refuses_an_upscaler_base(upscaler, tiny_assets, tmp_path, command):
    """An x4 upscaler given as a text-to-image base loaded, then sampling stopped at its first step on diffusers'
    ValueError (class_labels), a traceback from sample.py. The control: a text-to-image base loads."""
    from lvdm import VideoPipeline

    with pytest.raises(ConfigError, match="is an x4 upscaler"):
        VideoPipeline.from_pretrained(upscaler)
    with pytest.raises(ConfigError, match="is an x4 upscaler"):
        VideoPipeline(load_base(upscaler))
    code, _, err = sample_here(command, "--base", upscaler, "--prompt", "x", "--out", tmp_path / "x.mp4",
                               "--steps", "1")  # fmt: skip
    assert code == 2 and "is an x4 upscaler" in err and "Traceback" not in err, err
    assert not (tmp_path / "x.mp4").exists()
    VideoPipeline.from_pretrained(tiny_assets["base"])


# ------------------------------------------------------------------------------------------------ training
def upscale_overrides(tiny_assets, upscaler, out, **extra):
    return tiny_overrides(tiny_assets, out, **{
        "model.base": upscaler, "train.target": "upscale", "data.resolution": "[32,32]", "train.upscale_patch": 16,
        "data.holdout": 1, "train.validation_prompts": "[]", "train.validation_steps": 2, **extra,
    })  # fmt: skip


def test_the_upscale_target_trains_on_patches_resumes_exactly_and_reports(tiny_assets, upscaler, tmp_path):
    whole, a, b = whole_and_resumed(lambda out, **extra: upscale_overrides(tiny_assets, upscaler, out, **extra),
                                    tmp_path)  # fmt: skip
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    g = whole.gain
    for key in ("motion_gain", "upscale_flicker_gain", "psnr_upscaled_video", "flicker_upscaled_image"):
        assert np.isfinite(g[key]), key
    from lvdm.training.report import format_report

    assert "upscale flicker gain:" in format_report(whole)
    # the module loads onto the upscaler and upscales as a video
    pipe = UpscalePipeline.from_pretrained(upscaler, temporal=whole.temporal_path)
    assert pipe(np.zeros((2, 8, 8, 3), np.uint8), "x", **FAST).metadata[0]["mode"] == "video"


def test_an_untrained_upscaler_has_a_temporal_gain_and_flicker_gain_of_exactly_one(tiny_assets, upscaler, tmp_path):
    """The control: with untrained temporal layers every frame is upscaled on its own, whether in order, shuffled
    or in image mode, so both figures are exactly 1: they can fail."""
    from lvdm.training.setup import build_data
    from lvdm.training.step import Frozen
    from lvdm.training.upscale import UpscaleObjective

    cfg = load_config([], upscale_overrides(tiny_assets, upscaler, tmp_path / "x"))
    base = load_base(upscaler)
    video = VideoUNet.from_unet2d(base.unet)
    frozen = Frozen.from_base(base)
    objective = UpscaleObjective(cfg, video, frozen, torch.device("cpu"))
    batches = build_data(cfg, frozen, rank=0, world=1).validation
    g = objective.evaluate(video, batches)
    # to 1e-5: the shuffled pass sums the same per-frame losses in another order, and the video model mixes each
    # spatial output with itself (alpha x + (1 - alpha) x) where image mode takes it as is
    assert g["motion_gain"] == pytest.approx(1.0, abs=1e-5), g
    assert g["upscale_flicker_gain"] == pytest.approx(1.0, abs=1e-5), g
    randomize(video.temporal_parameters(), seed=2, std=0.05)
    moved = objective.evaluate(video, batches)
    assert abs(moved["motion_gain"] - 1.0) > 1e-4 and abs(moved["upscale_flicker_gain"] - 1.0) > 1e-4, moved


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"train.upscale_patch": 48}, "does not fit"),
        (
            {"data.buckets": "[[32,32],[16,32]]", "train.upscale_patch": 32},
            "does not fit in the 16x32 clips \\(data.buckets\\[1\\]\\)",
        ),
        ({"model.context": "true"}, "not part of train.target=upscale"),
        ({"model.fps_conditioning": "true"}, "model.fps_conditioning: not part of train.target=upscale"),
        ({"data.cache": "somewhere"}, "not part of train.target=upscale"),
        # exported beside the module, which no upscaler loads (lvdm.upscale has no --lora): upscales went without them
        ({"model.spatial_lora_rank": 4}, "model.spatial_lora_rank: not part of train.target=upscale"),
        ({"model.unfreeze": "[up_blocks.1]"}, "model.unfreeze: not part of train.target=upscale"),
        ({"train.validation_prompts": "[a cat]"}, "train.validation_prompts: not part of train.target=upscale"),
        # its flicker figures were NaN, and the temporal layers trained on frames that are upscaled one by one
        ({"data.num_frames": 1}, "data.num_frames: an upscaler's temporal layers learn from at least 2 frames"),
        ({"train.image_batch_ratio": 0.3}, "image_batch_ratio: train.target=upscale trains on video clips only"),
    ],
)
def test_bad_upscale_settings_are_config_errors(tiny_assets, upscaler, tmp_path, extra, message):
    load_config([], upscale_overrides(tiny_assets, upscaler, tmp_path / "x"))  # the control: without it, it loads
    with pytest.raises(ConfigError, match=message):
        load_config([], upscale_overrides(tiny_assets, upscaler, tmp_path / "x", **extra))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"train.upscale_max_noise_level": 400}, "train.upscale_max_noise_level: 400 is above the upscaler's"),
        ({"train.upscale_validation_noise_level": 351}, "upscale_validation_noise_level: 351 is above the upscaler"),
        ({"train.upscale_patch": 24}, "train.upscale_patch: 24 px must be a multiple of"),
    ],
)
def test_settings_beyond_the_upscalers_limits_are_refused_before_it_loads(
    tiny_assets, upscaler, tmp_path, monkeypatch, extra, message
):
    """Noise levels above the upscaler's max_noise_level and a patch its VAE and UNet cannot take were refused only
    once the upscaler had loaded. The control: settings within them reach the loading."""
    from lvdm.models import loading
    from lvdm.training.trainer import train

    def reached(*args: object, **kwargs: object) -> None:
        raise RuntimeError("reached the loading")

    monkeypatch.setattr(loading, "_load_folder", reached)
    with pytest.raises(ConfigError, match=message):
        train(load_config([], upscale_overrides(tiny_assets, upscaler, tmp_path / "x", **extra)), progress=False)
    with pytest.raises(RuntimeError, match="reached the loading"):
        train(load_config([], upscale_overrides(tiny_assets, upscaler, tmp_path / "y")), progress=False)


def test_the_base_and_the_target_must_agree(tiny_assets, upscaler, tmp_path):
    from lvdm.training.trainer import train

    with pytest.raises(ConfigError, match="needs an x4 upscaler base"):
        train(load_config([], upscale_overrides(tiny_assets, tiny_assets["base"], tmp_path / "a")), progress=False)
    plain = tiny_overrides(tiny_assets, tmp_path / "b", **{"model.base": upscaler})
    with pytest.raises(ConfigError, match="train it with train.target=upscale"):
        train(load_config([], plain), progress=False)
    with pytest.raises(ConfigError, match="multiple of 16"):
        train(load_config([], upscale_overrides(tiny_assets, upscaler, tmp_path / "c", **{
            "train.upscale_patch": 24})), progress=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------ command lines
def upscale_cli(command, *args: object) -> tuple[int, str]:
    """``python -m lvdm.upscale ARGS`` in this process: its exit status and stderr."""
    done = command("-m", "lvdm.upscale", *args)
    return done.returncode, done.stderr


def test_the_upscale_command_keeps_length_and_rate_and_refuses_mistakes(upscaler, frames, tmp_path, command):
    from lvdm.data.readers import probe
    from lvdm.media import write_video
    from lvdm.testing.clips import write_clip

    source = write_video(frames, tmp_path / "low.mp4", fps=12)
    out = tmp_path / "high.mp4"
    base = ["--upscaler", str(upscaler), "--steps", "2", "--quiet"]
    assert upscale_cli(command, str(source), *base, "--out", str(out), "--tile", "8")[0] == 0
    info = probe(out)
    assert (info.num_frames, info.fps, info.width, info.height) == (6, 12.0, 96, 64)
    settings = json.loads(out.with_name("high.mp4.json").read_text())["upscale"]
    assert (settings["tile"], settings["frame_norms"]) == (8, True)
    own = tmp_path / "own.mp4"
    assert upscale_cli(command, str(source), *base, "--out", str(own), "--tile", "8", "--tile-norms", "tile")[0] == 0
    assert json.loads(own.with_name("own.mp4.json").read_text())["upscale"]["frame_norms"] is False
    pooled = tmp_path / "pooled.mp4"
    assert (
        upscale_cli(command, str(source), *base, "--out", str(pooled), "--tile", "8", "--tile-norms", "pooled")[0] == 0
    )
    assert json.loads(pooled.with_name("pooled.mp4.json").read_text())["upscale"]["frame_norms"] == "pooled"
    passes = tmp_path / "passes.mp4"
    assert upscale_cli(command, str(source), *base, "--out", str(passes), "--tile", "8", "--tile-norms", "pooled",
                      "--norm-passes", "2")[0] == 0  # fmt: skip
    assert json.loads(passes.with_name("passes.mp4.json").read_text())["upscale"]["norm_passes"] == 2
    wide = write_clip(tmp_path / "wide.mp4", num_frames=2, size=(2064, 16))
    fast = write_video(frames, tmp_path / "fast.mp4", fps=240)
    (tmp_path / "folder.mp4").mkdir()
    for args, message in (  # the last two were refused only after the upscale had run
        ([str(fast), *base, "--out", str(tmp_path / "y.gif")], "runs at 240 fps, and a GIF stores delays"),
        ([str(source), *base, "--out", str(tmp_path / "folder.mp4"), "--overwrite"], "folder.mp4 is a folder"),
        ([str(source), *base, "--out", str(out)], "already exists"),
        ([str(source), *base, "--out", str(source), "--overwrite"], "is the input video"),  # it was replaced
        ([str(tmp_path / "nope.mp4"), *base, "--out", str(tmp_path / "a.mp4")], "does not exist or is not a file"),
        ([str(source), *base, "--out", str(tmp_path / "b.mp4"), "--noise-level", "400"], "noise_level must be"),
        ([str(source), *base, "--out", str(tmp_path / "c.mkv")], "give a .mp4 or .gif"),
        ([str(source), *base, "--out", str(tmp_path / "e.mp4"), "--tile-norms", "none"], "invalid choice"),
        ([str(source), *base, "--out", str(tmp_path / "e.mp4"), "--tile-norms", "tile"], "goes with --tile N"),
        (
            [str(source), *base, "--out", str(tmp_path / "g.mp4"), "--norm-passes", "2"],
            "goes with --tile N and --tile-norms pooled",
        ),
        (
            [str(source), *base, "--out", str(tmp_path / "h.mp4"), "--tile-norms", "pooled", "--norm-passes", "0"],
            "--norm-passes 0: give 1 .. 8",
        ),
        ([str(source), "--upscaler", str(tmp_path), "--out", str(tmp_path / "d.mp4")], "not a diffusers model"),
        # too large: refused before the upscaler loads (this one does not exist, and its error would come first)
        ([str(wide), "--upscaler", str(tmp_path / "no"), "--out", str(tmp_path / "f.mp4")], "would upscale to 8256"),
    ):
        code, err = upscale_cli(command, *args)
        assert code != 0 and message in err and "Traceback" not in err, err
        assert err.splitlines()[-1].startswith("error:") and message in err.splitlines()[-1], err


def test_sample_cli_refuses_upscale_options_without_an_upscaler(tiny_assets, tmp_path, command):
    """``--tile 8 --chunk-frames 2 --noise-level 300`` without ``--upscaler`` sampled and ignored them (a user taking
    ``--tile`` / ``--chunk-frames`` for options of the sampling itself)."""
    args = ["--base", str(tiny_assets["base"]), "--prompt", "a disc", "--frames", "3", "--steps", "2"]
    cases = [
        (["--tile", "8"], "--tile goes"),
        (["--chunk-frames", "2", "--noise-level", "300", "--upscale-guidance", "3"],
         "--noise-level, --upscale-guidance, --chunk-frames go"),
        (["--tile-norms", "pooled", "--upscale-steps", "4"], "--upscale-steps, --tile-norms go"),
    ]  # fmt: skip
    for flags, named in cases:
        code, _, err = sample_here(command, *args, *flags, "--out", tmp_path / "a.mp4")
        assert code == 2 and f"{named} with --upscaler FOLDER" in err and not (tmp_path / "a.mp4").exists(), err
    # the control: their defaults, given or not, sample
    code, _, err = sample_here(
        command, *args, "--noise-level", "20", "--tile-norms", "frame", "--out", tmp_path / "b.mp4"
    )
    assert code == 0 and (tmp_path / "b.mp4").is_file(), err


def test_sample_cli_upscales_what_it_samples(upscaler, tiny_assets, tmp_path, command):
    from lvdm.data.readers import probe

    out = tmp_path / "clip.mp4"
    args = ["--quiet", "--base", str(tiny_assets["base"]), "--prompt", "a disc", "--frames", "3", "--steps", "2",
            "--upscaler", str(upscaler), "--upscale-steps", "2", "--out", str(out)]  # fmt: skip
    assert sample_here(command, *args)[0] == 0
    low, high = probe(out), probe(tmp_path / "clip_x4.mp4")
    assert (high.num_frames, high.width, high.height) == (low.num_frames, 4 * low.width, 4 * low.height)
    # each upscale takes its video's prompt, negative prompt and seed (it dropped the negative prompt and gave
    # every video seed 0)
    two = [*args[:-2], "--negative-prompt", "blurry", "--num-videos", "2", "--seed", "5", "--out", str(tmp_path / "n")]
    assert sample_here(command, *two)[0] == 0
    for k in range(2):
        low_meta, high_meta = (json.loads(p.read_text()) for p in sorted((tmp_path / "n").glob(f"00{k}-*.mp4.json")))
        assert (high_meta["seed"], high_meta["negative_prompt"], high_meta["prompt"]) == (5 + k, "blurry", "a disc")
        assert low_meta["seed"] == 5 + k
    code, _, err = sample_here(command, *args)
    assert code == 2 and "already exists" in err, err
    passes = [*args[:-2], "--norm-passes", "2", "--out", str(tmp_path / "passes.mp4")]  # before sampling
    code, _, err = sample_here(command, *passes)
    assert code == 2 and "--tile N and --tile-norms pooled" in err and not (tmp_path / "passes.mp4").exists(), err
    # the upscaler's own limits, read from its folder: refused before sampling too (they were found after it)
    for flags, message in ((["--noise-level", "400"], "noise_level must be an integer in 0 .. 350"),
                           (["--tile", "6"], "tile must be a multiple of 4"),
                           (["--upscale-steps", "0"], "num_inference_steps must be")):  # fmt: skip
        code, _, err = sample_here(command, *args[:-4], *flags, "--out", tmp_path / "early.mp4")  # not 2 steps, then 0
        assert code == 2 and message in err.splitlines()[-1] and not (tmp_path / "early.mp4").exists(), err
    code, _, err = sample_here(
        command, *args[:-6], "--upscaler-temporal", "x.safetensors", "--out", tmp_path / "y.mp4"
    )
    assert code == 2 and "goes with --upscaler" in err
    # a text-to-image base given as the upscaler: refused before anything is sampled
    wrong = [*args[:-6], "--upscaler", str(tiny_assets["base"]), "--out", str(tmp_path / "z.mp4")]
    code, _, err = sample_here(command, *wrong)
    assert code == 2 and "not an x4 upscaler" in err and not (tmp_path / "z.mp4").exists(), err
    # a size whose upscale sampling would refuse: refused before the sampling (it took the sampling to find out)
    large = [*args[:-2], "--height", "2056", "--out", str(tmp_path / "large.mp4")]
    code, _, err = sample_here(command, *large)
    assert code == 2 and "a 2056 px side would upscale to 8224 px" in err and not (tmp_path / "large.mp4").exists()
    # the control: 2048 px passes that check (the folder given as the upscaler is what stops it, before sampling)
    code, _, err = sample_here(command, *wrong[:-2], "--height", "2048", "--out", tmp_path / "z.mp4")
    assert code == 2 and "not an x4 upscaler" in err


def test_sample_cli_lets_the_first_stage_go_before_the_upscaler_loads(
    upscaler, tiny_assets, tmp_path, command, monkeypatch
):
    """``sample.py --upscaler`` kept the text-to-video pipeline (its UNet, VAE and text encoder) alive beside the
    upscaler's through the whole upscale: on a GPU, the first stage's weights held memory the x4 pass needed. The
    control: the pipeline is alive while sampling."""
    import weakref

    from lvdm.pipeline import VideoPipeline
    from lvdm.upscale_pipeline import UpscalePipeline

    made, alive = [], []
    load, load_upscaler, render = VideoPipeline.from_pretrained, UpscalePipeline.from_pretrained, VideoPipeline.render

    def tracked(*args: object, **kwargs: object) -> VideoPipeline:
        pipe = load(*args, **kwargs)
        made.append(weakref.ref(pipe.base.unet))
        return pipe

    def rendering(self: VideoPipeline, *args: object, **kwargs: object) -> list:
        alive.append(made[0]() is not None)
        return render(self, *args, **kwargs)

    def upscaler_after(*args: object, **kwargs: object) -> UpscalePipeline:
        alive.append(made[0]() is not None)
        return load_upscaler(*args, **kwargs)

    monkeypatch.setattr(VideoPipeline, "from_pretrained", staticmethod(tracked))
    monkeypatch.setattr(VideoPipeline, "render", rendering)
    monkeypatch.setattr(UpscalePipeline, "from_pretrained", staticmethod(upscaler_after))
    args = ["--quiet", "--base", str(tiny_assets["base"]), "--prompt", "a disc", "--frames", "3", "--steps", "2",
            "--upscaler", str(upscaler), "--upscale-steps", "1", "--out", str(tmp_path / "clip.mp4")]  # fmt: skip
    assert sample_here(command, *args)[0] == 0 and (tmp_path / "clip_x4.mp4").is_file()
    assert alive == [True, False]


def test_an_upscaler_folders_limits_are_read_from_its_configs(upscaler, tmp_path):
    """What ``sample.py --upscaler`` checks before it samples: the limits the loaded upscaler has, read from its
    folder's configs without loading; another VAE class refuses tiles, unreadable configs are one error."""
    import shutil

    from lvdm.upscale_pipeline import UpscaleLimits, check_upscale_settings

    limits = UpscaleLimits.of_folder(upscaler)
    assert limits == UpscalePipeline.from_pretrained(upscaler).limits == UpscaleLimits(350, 4, None)
    check_upscale_settings(limits, 350, 1, 8, 7, 2)  # the control: the edges are allowed
    edited = shutil.copytree(upscaler, tmp_path / "edited")
    index = json.loads((edited / "model_index.json").read_text())
    vae = ["diffusers", "AutoencoderKLTemporalDecoder"]
    (edited / "model_index.json").write_text(json.dumps({**index, "max_noise_level": 100, "vae": vae}))
    limits = UpscaleLimits.of_folder(edited)
    assert limits == UpscaleLimits(100, 4, "AutoencoderKLTemporalDecoder")
    with pytest.raises(ConfigError, match="noise_level must be an integer in 0 .. 100"):
        check_upscale_settings(limits, 101, 1, None, None, None)
    with pytest.raises(ConfigError, match="not AutoencoderKLTemporalDecoder; upscale whole"):
        check_upscale_settings(limits, 20, 1, 8, None, None)
    check_upscale_settings(limits, 100, 1, None, None, None)  # whole, it passes
    (edited / "unet" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot read unet/config.json"):
        UpscaleLimits.of_folder(edited)
    (edited / "unet" / "config.json").write_text('{"block_out_channels": "wide"}')
    with pytest.raises(CheckpointError, match="not a diffusers x4 upscaler's"):
        UpscaleLimits.of_folder(edited)


@torch.no_grad()
def test_a_vae_rescaled_for_the_x4_scaling_factor_encodes_and_decodes_the_same():
    """The demo upscaler reuses the demo base's VAE; diffusers' upscale pipeline forces scaling 0.08333 on it, so its
    latent space is rescaled to match: the scaled latents and the decodes are unchanged."""
    from lvdm.testing import tiny_vae
    from lvdm.testing.demo_upscaler import rescale_latent_space

    vae = tiny_vae()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = vae.encode(x).latent_dist
    decoded = vae.decode(before.mean).sample
    rescale_latent_space(vae)
    after = vae.encode(x).latent_dist
    assert vae.config.scaling_factor == 0.08333
    assert torch.allclose(after.mean * 0.08333, before.mean * 0.18215, atol=1e-5)
    assert torch.allclose(after.std * 0.08333, before.std * 0.18215, atol=1e-5)
    assert torch.allclose(vae.decode(after.mean).sample, decoded, atol=1e-5)


def test_a_sidecar_replays_an_upscale_and_with_sample_py_a_cascade(upscaler, tiny_assets, tmp_path, command):
    """``python -m lvdm.upscale --from-json`` re-renders an upscale exactly, options given winning; after
    ``sample.py --from-json`` on the low-res sidecar it replays a whole ``--upscaler`` cascade (nothing could)."""
    from lvdm.data.readers import probe, read_frames
    from lvdm.media import write_video

    def frames(path):
        return read_frames(path, range(probe(path).num_frames))

    low, high = tmp_path / "clip.mp4", tmp_path / "clip_x4.mp4"
    args = ["--quiet", "--base", str(tiny_assets["base"]), "--prompt", "a disc", "--frames", "3", "--steps", "2",
            "--negative-prompt", "blurry", "--seed", "4", "--upscaler", str(upscaler), "--upscale-steps", "2",
            "--noise-level", "30", "--out", str(low)]  # fmt: skip
    assert sample_here(command, *args)[0] == 0
    again, again_high = tmp_path / "again.mp4", tmp_path / "again_x4.mp4"
    assert sample_here(command, "--quiet", "--from-json", f"{low}.json", "--out", str(again))[0] == 0
    assert upscale_cli(command, str(again), "--quiet", "--from-json", f"{high}.json", "--out", str(again_high))[0] == 0
    assert np.array_equal(frames(again_high), frames(high))
    record, replayed = (json.loads(p.with_name(p.name + ".json").read_text()) for p in (high, again_high))
    assert replayed["upscale"] | {"source": ""} == record["upscale"] | {"source": ""}
    assert (replayed["seed"], replayed["negative_prompt"], replayed["fps"]) == (4, "blurry", record["fps"])
    # from the sidecar alone: the recorded source; an option given wins (the control: the frames change)
    alone = tmp_path / "alone.mp4"
    assert upscale_cli(command, "--quiet", "--from-json", f"{high}.json", "--out", str(alone))[0] == 0
    assert np.array_equal(frames(alone), frames(high))
    finer = tmp_path / "finer.mp4"
    assert upscale_cli(command, "--quiet", "--from-json", f"{high}.json", "--steps", "3", "--out", str(finer))[0] == 0
    assert json.loads(finer.with_name("finer.mp4.json").read_text())["upscale"]["num_inference_steps"] == 3
    assert not np.array_equal(frames(finer), frames(high))
    # a video given plays at its own rate, not the recorded one; a module given is used, though the record (made
    # without one) says frame by frame
    video = VideoUNet.from_unet2d(UpscalePipeline.from_pretrained(upscaler).base.unet)
    randomize(video.temporal_parameters(), seed=1, std=0.05)
    video.save_temporal(tmp_path / "up.safetensors")
    other, moved = write_video(frames(again)[:, ::4, ::4], tmp_path / "other.mp4", fps=12), tmp_path / "moved.mp4"
    given = [str(other), "--quiet", "--temporal", str(tmp_path / "up.safetensors"), "--out", str(moved)]
    assert upscale_cli(command, *given, "--from-json", f"{high}.json")[0] == 0
    assert probe(moved).fps == 12.0 != record["fps"] and record["mode"] == "image"
    assert json.loads(moved.with_name("moved.mp4.json").read_text())["mode"] == "video"
    # each sidecar names the command that replays it; a hostile one is one line
    code, _, err = sample_here(command, "--from-json", f"{high}.json", "--out", str(tmp_path / "x.mp4"))
    assert code == 2 and "python -m lvdm.upscale --from-json" in err, err
    code, err = upscale_cli(command, "--from-json", f"{low}.json", "--out", str(tmp_path / "y.mp4"))
    assert code == 2 and "python sample.py --from-json" in err, err
    sidecar = json.loads(high.with_name("clip_x4.mp4.json").read_text())
    for change, message in (({"seed": True}, "seed has the wrong type"),
                            ({"model": {"upscaler": 3}}, "model.upscaler has the wrong type"),
                            ({"upscale": sidecar["upscale"] | {"frame_norms": "all"}}, "frame_norms must be"),
                            ({"upscale": sidecar["upscale"] | {"source": "frames"}}, "given in Python"),
                            ({"upscale": sidecar["upscale"] | {"tile": 2.5}}, "upscale.tile has the wrong type"),
                            ({"fps": float("nan")}, "fps"),
                            ({"upscale": []}, "not the sidecar of an upscale")):  # fmt: skip
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(sidecar | change))
        code, err = upscale_cli(command, "--from-json", str(bad), "--out", str(tmp_path / "z.mp4"))
        assert code == 2 and err.count("\n") == 1 and message in err, (change, err)
        assert not (tmp_path / "z.mp4").exists()
    code, err = upscale_cli(command, "--out", str(tmp_path / "z.mp4"), "--upscaler", str(upscaler))
    assert code == 2 and "required: VIDEO (or --from-json SIDECAR)" in err, err
