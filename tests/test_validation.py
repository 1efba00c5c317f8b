"""The validation figures: motion gains that isolate frame order, frame metrics, the demo's shape measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvdm import testing
from lvdm.models import VideoUNet
from lvdm.testing.clips import PATTERNS
from lvdm.testing.demo_base import shape_measure, shows_a_shape
from lvdm.training.step import Frozen
from lvdm.training.validation import (
    frame_metrics,
    frames_as_videos,
    gif_summary,
    motion_gains,
    permute_frames,
    shuffle_permutations,
)


def _frozen() -> Frozen:
    base = testing.tiny_sd_components("sd1", seed=0)

    names = ("vae", "tokenizer", "text_encoder", "scheduler")  # what Frozen.from_base reads
    return Frozen.from_base(type("Base", (), {name: base[name] for name in names}))


def _latent_batches(frozen: Frozen, n: int = 2, f: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    params = torch.randn(n, 8, f, 8, 8, generator=g)  # VAE posterior parameters: 4 means, 4 log-variances
    text = torch.randn(n, 77, 32, generator=g)
    return [{"latents": params, "text": text}]


def test_the_shuffled_pass_keeps_each_frame_with_its_own_noise():
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 6, 2, 2, generator=g), torch.randn(3, 4, 6, 2, 2, generator=g)
    orders = shuffle_permutations(3, 6, g)
    assert all(not torch.equal(row, torch.arange(6)) and sorted(row.tolist()) == list(range(6)) for row in orders)
    shuffled, shuffled_noise = permute_frames(latents, orders), permute_frames(noise, orders)
    for b in range(3):
        for i in range(6):
            j = int(orders[b, i])
            assert torch.equal(shuffled[b, :, i], latents[b, :, j])
            assert torch.equal(shuffled_noise[b, :, i], noise[b, :, j])
    alone = frames_as_videos(latents)
    assert alone.shape == (18, 4, 1, 2, 2) and torch.equal(alone[1 * 6 + 2, :, 0], latents[1, :, 2])


def test_every_gain_is_one_at_initialisation_and_moves_once_the_layers_train():
    """At init the video model is the image model frame by frame: order, other frames and layers are worth nothing
    (exactly 1). With temporal weights that mix frames, removing the order changes the loss."""
    frozen = _frozen()
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=0)).eval()
    batches = _latent_batches(frozen)
    gains = motion_gains(video, batches, frozen, torch.device("cpu"))
    for key in ("motion_gain", "motion_gain_each_frame", "layers_off_ratio"):
        assert gains[key] == pytest.approx(1.0, abs=1e-5), (key, gains)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in video.temporal_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    moved = motion_gains(video, batches, frozen, torch.device("cpu"))
    assert abs(moved["motion_gain"] - 1) > 1e-3 and abs(moved["layers_off_ratio"] - 1) > 1e-3, moved
    assert moved == motion_gains(video, batches, frozen, torch.device("cpu"))  # fixed draws: the same figures


def test_frame_metrics_tell_static_smooth_and_noisy_videos_apart():
    clip = np.stack(list(PATTERNS["shapes"](8, (32, 32), 0)))  # f h w 3: a shape sliding over a gradient
    static = np.repeat(clip[:1], 8, axis=0)
    noise = np.random.default_rng(0).integers(0, 256, clip.shape, dtype=np.uint8)
    assert frame_metrics(static) == {"frame_change": 0.0, "frame_correlation": 1.0}
    smooth, noisy = frame_metrics(clip), frame_metrics(noise)
    assert 0.5 < smooth["frame_change"] < 15 and smooth["frame_correlation"] > 0.7, smooth
    assert noisy["frame_change"] > 60 and abs(noisy["frame_correlation"]) < 0.1, noisy
    # the two videos of a batch are averaged
    both = frame_metrics(np.stack([clip, noise]))
    assert both["frame_change"] == pytest.approx((smooth["frame_change"] + noisy["frame_change"]) / 2)


def test_the_shape_measure_finds_the_demo_shape_and_rejects_noise_and_blanks():
    """A frame "shows a shape" when 2-40 % of its pixels are coloured or bright, 80 % of those form one connected
    region, and the rest is grey: every frame of the demo's clips passes; noise, a blank frame and two shapes fail."""
    for seed in range(6):
        for frame in PATTERNS["shapes"](8, (32, 32), seed):
            assert shows_a_shape(frame), (seed, shape_measure(frame))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blank = np.full((32, 32, 3), 40, np.uint8)
    two = blank.copy()
    two[2:8, 2:8] = two[20:26, 20:26] = (230, 40, 40)
    colour_wash = blank.copy()
    colour_wash[..., 0] = 140  # the background itself coloured
    colour_wash[5:15, 5:15] = 250
    for frame in (noise, blank, two, colour_wash):
        assert not shows_a_shape(frame), shape_measure(frame)


def test_sample_videos_become_one_animated_tensorboard_image():
    import io

    from PIL import Image

    videos = np.random.default_rng(0).integers(0, 256, (2, 5, 8, 12, 3), dtype=np.uint8)
    summary = gif_summary("samples/x", videos, fps=4)
    image = summary.value[0].image
    assert (image.height, image.width) == (8, 24)
    gif = Image.open(io.BytesIO(image.encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 5


@pytest.mark.parametrize("fps", [8.0, 120.0])
def test_validation_samples_of_clips_faster_than_a_gif_can_play_are_written(tmp_path, fps):
    """Clips of 120 fps train the model at 120 fps: the samples' mp4 plays at that rate and the GIF at a GIF's
    fastest (100 fps), instead of the run stopping at its first validation with a traceback."""
    import av
    from PIL import Image

    from lvdm.training.validation import write_videos

    videos = np.random.default_rng(0).integers(0, 256, (1, 4, 16, 16, 3), dtype=np.uint8)
    written = write_videos(videos, tmp_path, fps=fps)
    assert [p.name for p in written] == ["00.mp4", "00.gif"]
    with av.open(str(tmp_path / "00.mp4")) as container:
        assert float(container.streams.video[0].average_rate) == pytest.approx(fps)
    with Image.open(tmp_path / "00.gif") as gif:
        assert gif.n_frames == 4 and gif.info["duration"] == round(1000 / min(fps, 100), -1)


def test_more_sample_videos_than_a_gif_is_wide_are_shown_as_many_as_fit():
    """Many validation prompts at a large width (130 prompts at 512 px: 66560 px side by side) overflowed the GIF's
    16-bit width and stopped the run at its validation; the TensorBoard image shows the first ones that fit."""
    import io

    from PIL import Image

    videos = np.zeros((9, 2, 4, 8192, 3), dtype=np.uint8)
    videos[6, :, :, :8] = 255  # the 7th video: the last that fits (7 x 8192 <= 65535 < 8 x 8192)
    image = gif_summary("samples/x", videos, fps=8).value[0].image
    assert (image.height, image.width) == (4, 7 * 8192)
    gif = Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")
    assert gif.getpixel((6 * 8192, 0)) == (255, 255, 255) and gif.getpixel((6 * 8192 - 1, 0)) == (0, 0, 0)


def test_sample_videos_of_a_run_with_no_known_clip_rate_reach_tensorboard(tmp_path):
    """Only still images training (a spatial LoRA, no data.target_fps): no clip rate is known, and the validation's
    TensorBoard GIF divided by None, stopping the run with a TypeError; it plays at sampling's default rate, as the
    sample files do."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lvdm.training.logs import RunLog

    log = RunLog(tmp_path)
    log.add_videos({"samples": np.zeros((1, 3, 8, 8, 3), np.uint8)}, 1, fps=None)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/samples")] == [1]
