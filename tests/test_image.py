"""Image-to-video (issue 12): CLIP image tokens through IP-Adapter-style attention, training, the image gain,
sampling with one encoder call, IP-Adapter Plus files equal to diffusers', and hostile images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cut_like_the_cache, projection_rows, randomize, tiny_overrides, video_inputs, whole_and_resumed
from PIL import Image
from safetensors.torch import load_file

from lvdm import testing
from lvdm.config import load_config
from lvdm.errors import CheckpointError, ConfigError, DataError
from lvdm.models import VideoUNet, load_base
from lvdm.models.encoders import encode_image, image_pixels, load_image_encoder
from lvdm.models.parts import build_part
from lvdm.modules import image_attention
from lvdm.modules.image_attention import cross_attentions
from lvdm.testing.image_adapters import write_image_encoder, write_ip_adapter_plus
from lvdm.training.trainer import train

FAST = {"num_inference_steps": 2, "progress": False}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image")
    unet = testing.tiny_unet("sd1")
    widths = [attn.to_k.out_features for _, attn in cross_attentions(unet)]
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "picture.png")
    return {
        "encoder": write_image_encoder(root / "image_encoder"),
        "adapter": write_ip_adapter_plus(root / "ip.safetensors", cross_attention_dim=32, layer_widths=widths),
        "picture": root / "picture.png",
        "root": root,
    }


def _embeds(encoder, b: int = 2) -> torch.Tensor:
    images = [np.full((40, 50, 3), 30 + 80 * i, np.uint8) for i in range(b)]
    return encode_image(encoder, image_pixels(encoder, images))


# ------------------------------------------------------------------------------------------------ the part
@torch.no_grad()
def test_image_conditioning_changes_nothing_until_it_trains_and_no_image_is_the_text_attention(image_files):
    encoder = load_image_encoder(image_files["encoder"])
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    randomize(video.temporal_parameters(), seed=3, std=0.05)
    sample, t, text = video_inputs(video.unet, f=3)
    before = video(sample, t, text)
    image_mode = video(sample, t, text, image_only_indicator=torch.ones(2))
    build_part(video, "image", "image", {"embed_dims": encoder.width, "num_queries": 4})
    embeds = _embeds(encoder)
    assert torch.equal(video(sample, t, text, image_embeds=embeds), before)  # value projections at zero
    assert torch.equal(video(sample, t, text, image_embeds=embeds, image_only_indicator=torch.ones(2)), image_mode)

    randomize(video.parts["image"].parameters(), seed=5, std=0.05)  # as if trained
    with_image = video(sample, t, text, image_embeds=embeds)
    assert not torch.allclose(with_image, before)
    assert torch.equal(video(sample, t, text), before)  # no image: the text attention alone, exactly
    assert torch.equal(video(sample, t, text, image_only_indicator=torch.ones(2)), image_mode)
    assert torch.allclose(video(sample, t, text, image_embeds=embeds, image_scale=0.0), before, atol=1e-6)
    with pytest.raises(ValueError, match="one image per video"):
        video(sample, t, text, image_embeds=embeds[:1])


def test_text_and_image_tokens_are_projected_once_per_video_with_the_per_frame_result(image_files, monkeypatch):
    encoder = load_image_encoder(image_files["encoder"])
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    build_part(video, "image", "image", {"embed_dims": encoder.width, "num_queries": 4})
    randomize(video.temporal_parameters(), seed=3, std=0.05)
    randomize(video.parts["image"].parameters(), seed=5, std=0.05)  # as if trained
    sample, t, text = video_inputs(video.unet, f=3)
    embeds = _embeds(encoder)
    attentions = [attn for _, attn in cross_attentions(video.unet)]
    rows = projection_rows([attn.to_k for attn in attentions] + [attn.processor.to_k_ip[0] for attn in attentions])
    with torch.no_grad():
        shared = video(sample, t, text, image_embeds=embeds)
        assert sorted(set(rows)) == [2]
        rows.clear()  # the control: diffusers' IP-Adapter processor, text and image tokens projected per frame
        monkeypatch.setattr(image_attention, "frames_sharing_context", lambda *args: None)
        per_frame = video(sample, t, text, image_embeds=embeds)
    assert sorted(set(rows)) == [6]
    assert (shared - video(sample, t, text)).abs().max() > 1e-3  # the image tokens do act
    torch.testing.assert_close(shared, per_frame, rtol=0, atol=1e-6)


def test_the_image_weights_live_in_the_module_file_under_unet_paths(image_files, tmp_path):
    encoder = load_image_encoder(image_files["encoder"])
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1"))
    build_part(video, "image", "image", {"embed_dims": encoder.width, "num_queries": 4})
    randomize(video.parts["image"].parameters(), seed=5, std=0.05)
    video.save_temporal(tmp_path / "i2v.safetensors")
    saved = load_file(tmp_path / "i2v.safetensors")
    assert "down_blocks.0.attentions.0.spatial.transformer_blocks.0.attn2.processor.to_v_ip.0.weight" in saved
    assert any(k.startswith("parts.image.projection.") for k in saved)
    # onto another checkpoint of the family: same layers, same weights
    other = VideoUNet.from_temporal_file(testing.tiny_unet("sd1", seed=4), tmp_path / "i2v.safetensors")
    assert all(torch.equal(p, saved[n]) for n, p in other.named_temporal_parameters())
    sample, t, text = video_inputs(other.unet, f=2)
    with torch.no_grad():
        assert not torch.allclose(other(sample, t, text, image_embeds=_embeds(encoder)), other(sample, t, text))


# ------------------------------------------------------------------------------------------------ IP-Adapter
@pytest.fixture(scope="module")
def sd_folder(image_files):
    return testing.make_tiny_sd(image_files["root"] / "base", "sd1", seed=0)


def test_image_mode_with_an_ip_adapter_equals_diffusers(image_files, sd_folder):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from lvdm import VideoPipeline

    pipe = VideoPipeline.from_pretrained(
        sd_folder, image_adapter=image_files["adapter"], image_encoder=image_files["encoder"]
    )
    picture = Image.open(image_files["picture"])
    out = pipe("a lighthouse", image=picture, num_frames=2, seed=3, num_inference_steps=3, progress=False)
    assert out.metadata[0]["image"]["source"] == "PIL image" and out.metadata[0]["mode"] == "image"

    reference = StableDiffusionPipeline.from_pretrained(
        sd_folder, safety_checker=None, image_encoder=CLIPVisionModelWithProjection.from_pretrained(
            image_files["encoder"]), feature_extractor=CLIPImageProcessor.from_pretrained(image_files["encoder"]),
    )  # fmt: skip
    adapter = image_files["adapter"]
    reference.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    reference.set_progress_bar_config(disable=True)
    for j in range(2):
        expected = reference(
            "a lighthouse", ip_adapter_image=picture, latents=out.noise[:, :, j], num_inference_steps=3,
            guidance_scale=7.5, output_type="np",
        ).images[0] * 255  # fmt: skip
        assert np.abs(out.frames[0, j].astype(np.float64) - expected).max() <= 1.01  # uint8 rounding only
    # and the adapter does something: without it the frames differ
    plain = VideoPipeline.from_pretrained(sd_folder)("a lighthouse", latents=out.noise, num_inference_steps=3,
                                                     seed=3, progress=False)  # fmt: skip
    assert np.abs(plain.frames.astype(int) - out.frames).mean() > 1


def test_ip_adapter_files_that_do_not_fit_are_refused(image_files, sd_folder, tmp_path):
    from lvdm import VideoPipeline

    sd2 = testing.make_tiny_sd(tmp_path / "sd2", "sd2", seed=0)  # another family: other layers and widths
    with pytest.raises(CheckpointError, match="made for another base family"):
        VideoPipeline.from_pretrained(sd2, image_adapter=image_files["adapter"], image_encoder=image_files["encoder"])
    wide = write_ip_adapter_plus(tmp_path / "wide.safetensors", cross_attention_dim=64, layer_widths=[64] * 6)
    with pytest.raises(CheckpointError, match="does not fit this base"):
        VideoPipeline.from_pretrained(sd_folder, image_adapter=wide, image_encoder=image_files["encoder"])
    fewer = write_ip_adapter_plus(tmp_path / "few.safetensors", cross_attention_dim=32, layer_widths=[32, 32])
    with pytest.raises(CheckpointError, match="2 image attention layers, this base has 6"):
        VideoPipeline.from_pretrained(sd_folder, image_adapter=fewer, image_encoder=image_files["encoder"])
    flat = tmp_path / "plain.safetensors"  # an IP-Adapter (not Plus): a linear projection of the pooled token
    from safetensors.torch import save_file

    save_file({"image_proj.proj.weight": torch.zeros(128, 32), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 32)},
              flat)  # fmt: skip
    with pytest.raises(CheckpointError, match="not an IP-Adapter Plus"):
        VideoPipeline.from_pretrained(sd_folder, image_adapter=flat, image_encoder=image_files["encoder"])
    with pytest.raises(ConfigError, match="needs image_encoder"):
        VideoPipeline.from_pretrained(sd_folder, image_adapter=image_files["adapter"])


# ------------------------------------------------------------------------------------------------ training
def _image_run(assets, image_files, out, **extra):
    values = {
        "model.image_conditioning": "true", "model.image_encoder": image_files["encoder"], "data.holdout": 2,
        "train.image_dropout": 0.2,
    }  # fmt: skip
    return tiny_overrides(assets, out, **(values | extra))


def test_image_training_reports_an_image_gain_saves_and_resumes_exactly(tiny_assets, image_files, tmp_path):
    whole, a, b = whole_and_resumed(lambda out, **extra: _image_run(tiny_assets, image_files, out, **extra), tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained_v = [v for k, v in a.items() if "to_v_ip" in k]
    assert trained_v and all(float(v.abs().sum()) > 0 for v in trained_v)  # the image attention trained
    g = whole.gain
    assert g["image_gain"] == pytest.approx(g["loss_without_image"] / g["loss_with_image"])
    lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert any("image_gain" in line for line in lines)


def test_validation_animates_the_first_frames_of_held_out_clips(tiny_assets, image_files, tmp_path):
    """Validation samples with image conditioning: prompt i animates held-out clip i's first frame (cycling), written
    beside the sample as <i>_image.png."""
    from lvdm.media import to_uint8_frames
    from lvdm.training.trainer import Trainer

    extra = {"train.max_steps": 1, "train.validation_prompts": "[a, b, c]", "train.validation_steps": 2}
    trainer = Trainer(load_config([], _image_run(tiny_assets, image_files, tmp_path / "run", **extra)), progress=False)
    result = trainer.run()
    pictures = sorted(p.name for p in result.samples if p.suffix == ".png")
    assert pictures == ["00_image.png", "01_image.png", "02_image.png"]
    held = [to_uint8_frames(clip[:1])[0] for batch in trainer.data.validation for clip in batch["video"]]
    assert len(held) == 2
    for i in range(3):
        shown = np.asarray(Image.open(result.samples[i]))
        assert np.array_equal(shown, held[i % 2])
    assert len([p for p in result.samples if p.suffix == ".mp4"]) == 6  # the 3 videos, and in image mode


@pytest.mark.parametrize("frame", ["first", "random"])
def test_the_latent_cache_holds_the_clip_tokens_training_reads(tiny_assets, image_files, tmp_path, frame):
    """Built with image conditioning, the cache holds each clip's CLIP tokens (the first frame's, or every frame's for
    a random conditioning frame): training draws the same frames and dropouts from them as from the clips, and the
    encoder no longer runs per step; a cache built without them is refused, naming the image encoder."""

    from lvdm.cache import build_from_config
    from lvdm.data.build import build_dataset
    from lvdm.data.cache import LatentCache, collate_cached
    from lvdm.training.step import Frozen, image_inputs, step_generator
    from lvdm.training.trainer import Trainer

    cache = tmp_path / "cache"
    extra = {"data.cache": cache, "train.image_frame": frame, "train.image_dropout": 0.5, "train.max_steps": 2}
    cfg = load_config([], _image_run(tiny_assets, image_files, tmp_path / "run", **extra))
    build_from_config(cfg, shard_size=4, progress=False)
    samples = LatentCache(cache).samples
    batch = collate_cached([LatentCache(cache)[i] for i in range(4)])
    frames = cfg.data.num_frames if frame == "random" else 1
    assert batch["image_tokens"].shape[:2] == (4, frames) and batch["image_tokens"].dtype == torch.float32
    listing, _ = build_dataset(cfg.data, seed=cfg.train.seed)  # the clips as the cache cut them
    clips = cut_like_the_cache(listing, [sample["index"] for sample in samples[:4]])
    frozen = Frozen.from_base(load_base(tiny_assets["base"]))
    frozen.image_encoder = load_image_encoder(image_files["encoder"])
    for n in range(3):
        cached = image_inputs(batch, frozen, cfg.train, step_generator(0, 0, n))
        fresh = image_inputs(clips, frozen, cfg.train, step_generator(0, 0, n))
        torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-5)
    if frame == "random":
        return  # training from the cache, once
    trainer = Trainer(cfg, progress=False)
    calls = []
    trainer.frozen.image_encoder.model.register_forward_hook(lambda *args: calls.append(1))
    result = trainer.run()
    assert result.gain["image_gain"] > 0 and len(calls) <= 1  # at most "no image", once
    plain = {key: value for key, value in extra.items() if not key.startswith("train.image_")}  # nothing reads them
    stale = load_config([], tiny_overrides(tiny_assets, tmp_path / "stale", **plain | {
        "data.holdout": 2, "data.cache": tmp_path / "plain",
    }))  # fmt: skip
    build_from_config(stale, shard_size=4, progress=False)
    with pytest.raises(DataError, match="image_encoder: None in the cache"):
        Trainer(load_config([], _image_run(tiny_assets, image_files, tmp_path / "r2", **extra | {
            "data.cache": tmp_path / "plain"
        })), progress=False)  # fmt: skip


def test_a_text_to_video_module_warm_starts_an_image_model(tiny_assets, image_files, tmp_path):
    t2v = train(load_config([], tiny_overrides(tiny_assets, tmp_path / "t2v", **{"train.max_steps": 1})),
                progress=False)  # fmt: skip
    overrides = _image_run(tiny_assets, image_files, tmp_path / "i2v", **{
        "model.temporal_init": t2v.temporal_path, "train.max_steps": 1, "train.lr": 1e-12,
    })  # fmt: skip
    run = train(load_config([], overrides), progress=False)
    start, trained = load_file(t2v.temporal_path), load_file(run.temporal_path)
    assert all(torch.allclose(trained[k], start[k], atol=1e-9) for k in start)
    assert any("to_v_ip" in k for k in trained) and set(start) < set(trained)


def test_an_ip_adapter_warm_starts_training(tiny_assets, image_files, tmp_path):
    overrides = _image_run(tiny_assets, image_files, tmp_path / "warm", **{
        "model.image_adapter": image_files["adapter"], "train.max_steps": 1, "train.lr": 1e-12,
    })  # fmt: skip
    run = train(load_config([], overrides), progress=False)
    saved = load_file(run.temporal_path)
    adapter = load_file(image_files["adapter"])
    key = "down_blocks.0.attentions.0.spatial.transformer_blocks.0.attn2.processor.to_v_ip.0.weight"
    assert torch.allclose(saved[key], adapter["ip_adapter.1.to_v_ip.weight"], atol=1e-9)
    assert torch.allclose(saved["parts.image.projection.latents"], adapter["image_proj.latents"], atol=1e-9)


def test_a_model_that_cannot_use_the_image_has_an_image_gain_of_exactly_one(tiny_assets, image_files):
    """The control: untrained image attention (value projections zero) cannot pass anything on, so 1 exactly."""
    from lvdm.training.step import Frozen, batch_inputs
    from lvdm.training.validation import image_gains

    base = load_base(tiny_assets["base"])
    video = VideoUNet.from_unet2d(base.unet)
    randomize(video.temporal_parameters(), seed=3, std=0.05)
    encoder = load_image_encoder(image_files["encoder"])
    build_part(video, "image", "image", {"embed_dims": encoder.width, "num_queries": 4})
    frozen = Frozen.from_base(base)
    frozen.image_encoder = encoder
    g = torch.Generator().manual_seed(0)
    clips = torch.rand(2, 3, 3, 16, 16, generator=g) * 2 - 1  # b f c h w
    batch = {"video": clips, "caption": ["a", "b"], "is_image": torch.zeros(2)}
    cpu = torch.device("cpu")
    inputs = lambda b: batch_inputs(b, video.conditioning_inputs, cpu, frozen=frozen)  # noqa: E731
    assert image_gains(video, [batch], frozen, cpu, inputs=inputs)["image_gain"] == 1.0
    randomize(video.parts["image"].parameters(), seed=5, std=0.1)
    assert image_gains(video, [batch], frozen, cpu, inputs=inputs)["image_gain"] != 1.0


def test_image_settings_are_checked(tiny_assets, image_files, tmp_path):
    with pytest.raises(ConfigError, match="model.image_encoder: required with image_conditioning"):
        load_config([], tiny_overrides(tiny_assets, tmp_path, **{"model.image_conditioning": "true"}))
    with pytest.raises(ConfigError, match="model.image_adapter: starts the image attention"):
        load_config([], tiny_overrides(tiny_assets, tmp_path, **{"model.image_adapter": image_files["adapter"]}))
    with pytest.raises(ConfigError, match="train.image_frame"):
        load_config([], _image_run(tiny_assets, image_files, tmp_path, **{"train.image_frame": "last"}))


# ------------------------------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def i2v(image_files, sd_folder):
    """A module with image conditioning (random weights, as if trained) recording its encoder."""
    video = VideoUNet.from_unet2d(load_base(sd_folder).unet)
    build_part(video, "image", "image", {"embed_dims": 32, "num_queries": 4, "encoder": str(image_files["encoder"])})
    randomize(video.temporal_parameters(), seed=1, std=0.1)
    path = image_files["root"] / "i2v.safetensors"
    video.save_temporal(path, training_config={"data": {"num_frames": 3, "resolution": [16, 16]}})
    return path


def test_the_encoder_runs_once_per_call_and_image_guidance_adds_no_forward(image_files, sd_folder, i2v):
    from lvdm import VideoPipeline

    pipe = VideoPipeline.from_pretrained(sd_folder, temporal=i2v)  # the encoder the module recorded
    encoder_calls, forwards = [], []
    pipe.image_encoder.model.register_forward_hook(lambda *a: encoder_calls.append(1))
    pipe.video.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    out = pipe(["a", "b"], image=image_files["picture"], seed=0, num_inference_steps=3, progress=False)
    assert len(encoder_calls) == 1 and forwards == [4, 4, 4]  # 2 videos x (cond, uncond), one forward per step
    record = out.metadata[0]["image"]
    assert record["source"] == str(image_files["picture"].absolute()) and len(record["sha256"]) == 16
    forwards.clear()
    two = pipe("a", image=image_files["picture"], image_guidance_scale=2.0, seed=0, num_inference_steps=3,
               progress=False)  # fmt: skip
    assert forwards == [3, 3, 3]  # uncond, image only, both: one batched forward
    assert not (two.frames == out.frames[:1]).all()
    no_image = pipe("a", seed=0, **FAST)  # text only: the "no image" tokens the module saw for dropped images
    assert "image" not in no_image.metadata[0]


def _hostile_images(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    files = {}
    for name, image in {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "sixteen.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "one.png": Image.fromarray(rgb[:1, :1]),
    }.items():
        image.save(root / name)
        files[name] = root / name
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: read upright
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif)
    files["rotated.jpg"] = root / "rotated.jpg"
    return files


def test_any_image_a_user_has_is_read(image_files, sd_folder, i2v, tmp_path):
    from lvdm.image_sampling import read_conditioning_image

    files = _hostile_images(tmp_path)
    for name, path in files.items():
        pixels, record = read_conditioning_image(path)
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3, name
    assert read_conditioning_image(files["rotated.jpg"])[0].shape[:2] == (20, 30)  # EXIF applied
    assert read_conditioning_image(files["sixteen.png"])[0].max() > 200  # scaled, not clipped to white
    from lvdm import VideoPipeline

    pipe = VideoPipeline.from_pretrained(sd_folder, temporal=i2v)
    out = pipe("a", image=files["one.png"], seed=0, **FAST)  # a 1x1 picture is resized like any other
    assert out.frames.shape[0] == 1


def test_bad_image_requests_are_one_clear_error(image_files, sd_folder, i2v, tmp_path):
    from lvdm import VideoPipeline
    from lvdm.image_sampling import read_conditioning_image

    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image_files["picture"].read_bytes()[:200])
    (tmp_path / "text.png").write_text("not an image")
    for path, message in ((truncated, "truncated or corrupt"), (tmp_path / "text.png", "not an image"),
                          (tmp_path / "missing.png", "no such file"), (tmp_path, "not a regular file")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            read_conditioning_image(path)
    with pytest.raises(ConfigError, match=r"uint8 \(h, w, 3\)"):
        read_conditioning_image(np.zeros((4, 4), np.uint8))
    t2v = image_files["root"] / "t2v.safetensors"
    VideoUNet.from_unet2d(load_base(sd_folder).unet).save_temporal(t2v)
    with pytest.raises(ConfigError, match="no image conditioning"):
        VideoPipeline.from_pretrained(sd_folder, temporal=t2v)("a", image=image_files["picture"], **FAST)
    with pytest.raises(ConfigError, match="no temporal module was given"):  # it named a module nobody gave
        VideoPipeline.from_pretrained(sd_folder)("a", image=image_files["picture"], **FAST)
    with pytest.raises(ConfigError, match="has its own image attention"):
        VideoPipeline.from_pretrained(sd_folder, temporal=i2v, image_adapter=image_files["adapter"],
                                      image_encoder=image_files["encoder"])  # fmt: skip
    moved = VideoPipeline.from_pretrained(sd_folder, temporal=i2v)
    moved.image_encoder = None  # as when the recorded encoder folder is not on this machine
    with pytest.raises(ConfigError, match="needs its CLIP image encoder"):
        moved("a", image=image_files["picture"], **FAST)
    with pytest.raises(ConfigError, match="image_as_first_frame needs an image"):
        moved("a", image_as_first_frame=True, **FAST)
    for weights, named in (({"image_scale": 0.5}, "image_scale=0.5"), ({"image_guidance_scale": 2.0},
                           "image_guidance_scale=2 weigh an image, and none was given")):  # fmt: skip
        with pytest.raises(ConfigError, match=named):  # they would weigh the "no image" tokens: refused
            moved("a", **weights, **FAST)
    pipe = VideoPipeline.from_pretrained(sd_folder, temporal=i2v)
    assert pipe("a", image_scale=1.0, **FAST).frames.shape[0] == 1  # the default, as a replay records it, samples


def test_sample_cli_animates_a_picture_and_replays_it(image_files, sd_folder, i2v, tmp_path, command):
    sample = Path(__file__).resolve().parents[1] / "sample.py"
    out = tmp_path / "cat.mp4"
    argv = ["--base", sd_folder, "--temporal", i2v, "--image", image_files["picture"], "--prompt", "a cat", "--steps",
            "2", "--seed", "1", "--image-scale", "0.5", "--out", out, "--quiet"]  # fmt: skip
    assert command(sample, *argv).returncode == 0
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["settings"]["image_scale"] == 0.5 and meta["image"]["source"] == str(image_files["picture"].absolute())
    again = tmp_path / "again.mp4"
    assert command(sample, "--from-json", f"{out}.json", "--out", again, "--quiet").returncode == 0
    assert json.loads(Path(f"{again}.json").read_text())["image"] == meta["image"]
    t2v_args = ["--base", sd_folder, "--image", tmp_path / "none.png", "--prompt", "a", "--out", tmp_path / "x.mp4"]
    refused = command(sample, *t2v_args)
    assert refused.returncode == 2 and "no such image file" in refused.stderr, refused.stderr
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # refused without being opened: no hang
    refused = command(sample, *t2v_args[:2], "--image", fifo, *t2v_args[4:])
    assert refused.returncode == 2 and "not a regular file" in refused.stderr, refused.stderr
    from lvdm.pipeline import VideoPipeline

    loads = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VideoPipeline, "from_pretrained", lambda *a, **k: loads.append(1))
        no_image = [*argv[:4], "--prompt", "a cat", "--out", tmp_path / "none.mp4"]
        for flags, message in ((["--image-guidance", "3"], "image_guidance_scale=3 weigh an image"),
                               (["--image-as-first-frame"], "--image-as-first-frame needs --image")):  # fmt: skip
            refused = command(sample, *no_image, *flags)
            assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert not loads  # refused before loading


def test_the_image_can_also_be_the_first_context_frame(image_files, sd_folder):
    from lvdm import VideoPipeline

    video = VideoUNet.from_unet2d(load_base(sd_folder).unet)
    build_part(video, "context", "context", {})
    build_part(video, "image", "image", {"embed_dims": 32, "num_queries": 4, "encoder": str(image_files["encoder"])})
    randomize(video.temporal_parameters(), seed=1, std=0.1)
    path = image_files["root"] / "ctx_i2v.safetensors"
    training = {"data": {"num_frames": 3, "resolution": [16, 16]}, "train": {"tasks": {"text": 1, "predict": 1}}}
    video.save_temporal(path, training_config=training)
    pipe = VideoPipeline.from_pretrained(sd_folder, temporal=path)
    out = pipe("a", image=image_files["picture"], image_as_first_frame=True, num_frames=3, seed=0, **FAST)
    meta = out.metadata[0]
    assert out.frames.shape[1] == 3 and meta["context"]["frames"] == 1 and meta["image"]["sha256"]
    with pytest.raises(ConfigError, match="makes the image the context"):
        pipe("a", image=image_files["picture"], image_as_first_frame=True, context=out.frames[0], **FAST)


def test_image_dropout_runs_where_the_image_encoder_runs(monkeypatch):
    """The dropout draw is made on the CPU (a CPU generator) and the tokens where the encoder is (a GPU): the choice
    between them must follow the tokens. The meta device stands in for the GPU here."""
    from types import SimpleNamespace

    from lvdm.models import encoders
    from lvdm.training.step import Frozen, image_inputs

    on_the_gpu = lambda encoder, frames: torch.zeros(len(frames), 5, 8, device="meta")  # noqa: E731
    monkeypatch.setattr(encoders, "frame_tokens", on_the_gpu)
    frozen = Frozen(None, None, None, None, torch.zeros(1, 7, 8), _no_image=torch.zeros(1, 5, 8))
    train = SimpleNamespace(image_frame="first", image_dropout=0.5)
    batch = {"video": torch.zeros(6, 3, 3, 8, 8)}
    tokens = image_inputs(batch, frozen, train, torch.Generator().manual_seed(0))  # drops some of the 6, not all
    assert tokens.device.type == "meta" and tokens.shape == (6, 5, 8)
