"""The temporal VAE decoder (issue 13): built from SD's VAE as the identity, diffusers' AutoencoderKLTemporalDecoder
format both ways (SVD-style folders load and decode as diffusers decodes them), chunked decoding, refusals, and the
pipeline's ``decoder=`` / ``sample.py --decoder``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import cut_like_the_cache, randomize, tiny_overrides, whole_and_resumed
from safetensors import safe_open

from lvdm.errors import CheckpointError
from lvdm.models.encoders import decode_latents
from lvdm.models.temporal_vae import (
    decode_video,
    fold_error,
    load_video_decoder,
    save_video_decoder,
    video_decoder_from_vae,
)
from lvdm.testing import tiny_vae
from lvdm.testing.demo_base import demo_vae

pytestmark = pytest.mark.usefixtures("one_thread")


def _latents(vae, f: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Latents as the UNet makes them (scaled)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, vae.config.latent_channels, f, size, size, generator=g) * vae.config.scaling_factor


def _svd_style(seed: int = 0):
    """A randomly initialised AutoencoderKLTemporalDecoder as diffusers builds it (SVD's class), every weight random,
    the mixing factors included."""
    from diffusers import AutoencoderKLTemporalDecoder

    torch.manual_seed(seed)
    model = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=2,
        latent_channels=4, scaling_factor=0.18215,
    ).eval()  # fmt: skip
    randomize(model.decoder.parameters(), seed=seed, std=0.05)
    return model


@pytest.mark.parametrize("make", [tiny_vae, demo_vae], ids=["sd-shaped", "demo (8 groups, 1 layer per block)"])
@torch.no_grad()
def test_a_new_decoder_decodes_each_frame_as_the_image_decoder(make):
    """Identity at init (fp32, < 1e-5) for a VAE whose post_quant_conv has no bias; the encoder is SD's own."""
    vae = make().eval()
    vae.post_quant_conv.bias.zero_()
    decoder = video_decoder_from_vae(vae).eval()
    z = _latents(vae)
    image = decode_latents(vae, z)
    video = decode_video(decoder, z, scaling_factor=vae.config.scaling_factor, chunk_frames=3, overlap=1)
    assert (video - image).abs().max() < 1e-5
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(decoder.encode(pixels).latent_dist.mean, vae.encode(pixels).latent_dist.mean)
    assert fold_error(vae) == 0.0


@torch.no_grad()
def test_a_post_quant_bias_changes_only_what_folding_it_cannot_carry():
    """diffusers' class has no post_quant_conv: SD's is folded into conv_in, exactly but for its bias at the padded
    border; fold_error bounds that change in the first feature map."""
    vae = tiny_vae().eval()
    randomize([vae.post_quant_conv.bias], seed=2, std=0.5)
    decoder = video_decoder_from_vae(vae).eval()
    z = _latents(vae) / vae.config.scaling_factor
    frames = z.permute(0, 2, 1, 3, 4).reshape(-1, 4, 8, 8)  # b c f h w -> (b f) c h w
    ours = decoder.decoder.conv_in(frames)
    theirs = vae.decoder.conv_in(vae.post_quant_conv(frames))
    difference = (ours - theirs).abs()
    assert difference[..., 1:-1, 1:-1].max() < 1e-5  # the interior: exact
    assert 0 < difference.max() <= fold_error(vae) + 1e-5


@torch.no_grad()
def test_an_svd_style_folder_decodes_as_diffusers_decodes_it(tmp_path):
    model = _svd_style()
    model.save_pretrained(tmp_path / "vae")
    loaded = load_video_decoder(tmp_path, vae=model)  # an SVD model folder: its vae subfolder
    z = _latents(model, f=6)
    frames = (z / model.config.scaling_factor).permute(0, 2, 1, 3, 4).reshape(12, 4, 8, 8)  # b c f h w -> (b f) c h w
    expected = model.decode(frames, num_frames=6).sample.reshape(2, 6, 3, 16, 16).clamp(-1, 1)
    ours = decode_video(loaded, z, scaling_factor=model.config.scaling_factor, chunk_frames=6)
    assert (ours - expected).abs().max() < 1e-5


@torch.no_grad()
def test_a_decoder_saves_in_diffusers_format_and_loads_back(tmp_path):
    from diffusers import AutoencoderKLTemporalDecoder

    vae = tiny_vae().eval()
    decoder = video_decoder_from_vae(vae)
    randomize(p for n, p in decoder.named_parameters() if "temporal" in n or "time_" in n)
    save_video_decoder(decoder, tmp_path / "sd")
    z = _latents(vae)
    expected = decode_video(decoder.eval(), z, scaling_factor=vae.config.scaling_factor)
    again = load_video_decoder(tmp_path / "sd", vae=vae)
    assert torch.equal(decode_video(again, z, scaling_factor=vae.config.scaling_factor), expected)
    in_diffusers = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path / "sd").eval()  # the same in diffusers
    assert torch.equal(decode_video(in_diffusers, z, scaling_factor=vae.config.scaling_factor), expected)
    demo = video_decoder_from_vae(demo_vae())  # a VAE diffusers' layout cannot hold: lvdm keys say how
    save_video_decoder(demo, tmp_path / "demo")
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert config["lvdm_norm_num_groups"] == 8 and config["lvdm_mid_block_resnets"] == 2
    loaded = load_video_decoder(tmp_path / "demo")
    saved, again = demo.state_dict(), loaded.state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_decoders_that_do_not_fit_are_refused(tmp_path):
    from diffusers import AutoencoderKL

    vae = tiny_vae()
    save_video_decoder(video_decoder_from_vae(vae), tmp_path / "ok")
    other = tiny_vae()
    other.register_to_config(scaling_factor=0.13025)
    with pytest.raises(CheckpointError, match="decodes another latent space: 4 channels scaled by 0.18215"):
        load_video_decoder(tmp_path / "ok", vae=other)
    wide = AutoencoderKL(
        latent_channels=16, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="the base's VAE makes 16 channels"):
        load_video_decoder(tmp_path / "ok", vae=wide)
    vae.save_pretrained(tmp_path / "image_vae")
    with pytest.raises(CheckpointError, match="is a AutoencoderKL, not an AutoencoderKLTemporalDecoder"):
        load_video_decoder(tmp_path / "image_vae")
    with pytest.raises(CheckpointError, match="expected a diffusers AutoencoderKLTemporalDecoder folder"):
        load_video_decoder(tmp_path / "missing")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")  # a hostile folder: reading it would block forever
    with pytest.raises(CheckpointError, match="no regular file"):
        load_video_decoder(fifo)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    weights = video_decoder_from_vae(vae).state_dict()
    torch.save(weights, pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="is a pickle, which can run code"):
        load_video_decoder(pickled)
    assert load_video_decoder(pickled, allow_pickle=True) is not None
    (tmp_path / "ok" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="does not load"):
        load_video_decoder(tmp_path / "ok")


@torch.no_grad()
def test_a_chunked_decode_of_a_frame_independent_decoder_equals_the_whole():
    vae = tiny_vae().eval()
    vae.post_quant_conv.bias.zero_()
    decoder = video_decoder_from_vae(vae).eval()
    z = _latents(vae, f=23)
    whole = decode_video(decoder, z, scaling_factor=vae.config.scaling_factor, chunk_frames=23)
    chunked = decode_video(decoder, z, scaling_factor=vae.config.scaling_factor, chunk_frames=8, overlap=3)
    assert (whole - chunked).abs().max() < 1e-5
    with pytest.raises(ValueError, match="overlap"):
        decode_video(decoder, z, scaling_factor=1.0, chunk_frames=4, overlap=4)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def svd_decoder(sd_folders, tmp_path_factory):
    """An SVD-style decoder (random temporal layers) for the tiny SD1 base's latent space."""
    from lvdm.models import load_base

    vae = load_base(sd_folders["sd1"]).vae
    decoder = video_decoder_from_vae(vae)
    randomize(p for n, p in decoder.named_parameters() if "temporal" in n or "time_" in n)
    return save_video_decoder(decoder, tmp_path_factory.mktemp("decoder") / "vae")


def test_the_pipeline_decodes_with_the_decoder_and_records_it(sd_folders, svd_decoder):
    from lvdm import VideoPipeline

    fast = {"num_inference_steps": 2, "num_frames": 4, "height": 16, "width": 16, "progress": False}
    plain = VideoPipeline.from_pretrained(sd_folders["sd1"])
    pipe = VideoPipeline.from_pretrained(sd_folders["sd1"], decoder=svd_decoder)
    a, b = plain("a cat", seed=1, **fast), pipe("a cat", seed=1, **fast)
    assert torch.equal(a.latents, b.latents) and not np.array_equal(a.frames, b.frames)
    assert np.array_equal(pipe.decode(b.latents), b.frames)  # decode() is what the call used
    assert np.array_equal(plain.decode(a.latents), a.frames)
    assert b.metadata[0]["model"]["decoder"] == str(svd_decoder.absolute())
    with pytest.raises(Exception, match=r"latents must be \(b, 4, f, h, w\)"):
        pipe.decode(b.latents[:, :3])


def test_sample_cli_takes_a_decoder_and_replays_it(sd_folders, svd_decoder, tmp_path, command):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "v.mp4"
    args = [
        sys.executable, str(repo / "sample.py"), "--base", str(sd_folders["sd1"]), "--decoder", str(svd_decoder),
        "--prompt", "a cat", "--frames", "4", "--height", "16", "--width", "16", "--steps", "2", "--out", str(out),
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    meta = json.loads(out.with_name("v.mp4.json").read_text())
    assert meta["model"]["decoder"] == str(svd_decoder.absolute())
    bad = command(*args[1:4], "--decoder", tmp_path, *args[6:-1], tmp_path / "w.mp4")  # refused, in this process
    assert bad.returncode != 0 and "AutoencoderKLTemporalDecoder" in bad.stderr


# ------------------------------------------------------------------------------------------------ training
def _decoder_run(assets, out, **extra):
    values = {"train.target": "decoder", "data.holdout": 2, "train.disc_start": 1, "train.decoder_latent_noise": 0.2}
    return tiny_overrides(assets, out, **(values | extra))


def test_decoder_training_writes_a_diffusers_folder_and_resumes_exactly(tiny_assets, tmp_path):
    """Both optimizers (the decoder's, the discriminator's) and the discriminator itself resume exactly."""
    from diffusers import AutoencoderKLTemporalDecoder

    whole, a, b = whole_and_resumed(lambda out, **extra: _decoder_run(tiny_assets, out, **extra), tmp_path)
    assert whole.temporal_path == tmp_path / "whole" / "decoder"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert AutoencoderKLTemporalDecoder.from_pretrained(whole.temporal_path) is not None
    with safe_open(whole.temporal_path / "diffusion_pytorch_model.safetensors", "pt") as weights:
        recorded = json.loads(weights.metadata()["training_config"])  # was dropped: the folder said nothing of it
    assert recorded["train"]["target"] == "decoder" and recorded["clip_fps"] > 0, recorded
    g = whole.gain
    assert g["flicker_gain"] == pytest.approx(g["flicker_image_decoder"] / g["flicker_video_decoder"])
    assert g["temporal_flicker_gain"] == pytest.approx(g["flicker_each_frame"] / g["flicker_video_decoder"])
    lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert any("disc_loss" in line for line in lines) and any("psnr_video_decoder" in line for line in lines)
    samples = sorted(p.name for p in whole.samples)
    assert samples == ["00.gif", "00.mp4", "01.gif", "01.mp4"]  # each held-out clip beside its reconstructions


def test_a_resume_with_a_changed_discriminator_rate_trains_with_it(tiny_assets, tmp_path):
    """The restored optimizer state held the checkpoint's ``train.disc_lr``: the note said it changed, the
    discriminator went on at the old rate. The control: unchanged, the restored rate is the run's."""
    from lvdm.config import load_config
    from lvdm.training.trainer import Trainer, train

    train(load_config([], _decoder_run(tiny_assets, tmp_path, **{"train.max_steps": 1, "train.disc_lr": 1e-4})),
          progress=False)  # fmt: skip
    for rate in (1e-4, 3e-3):
        again = {"train.max_steps": 2, "train.disc_lr": rate, "train.resume": "latest"}
        trainer = Trainer(load_config([], _decoder_run(tiny_assets, tmp_path, **again)), progress=False)
        assert trainer.step == 1 and trainer.objective.disc_optimizer.param_groups[0]["lr"] == rate


def test_each_network_gets_gradients_only_on_its_own_step(tiny_assets, tmp_path):
    from lvdm.config import load_config
    from lvdm.training.step import step_generator
    from lvdm.training.trainer import Trainer

    trainer = Trainer(load_config([], _decoder_run(tiny_assets, tmp_path, **{"train.disc_start": 0})), progress=False)
    objective, batch = trainer.objective, next(trainer.batches)
    disc_before = {k: v.clone() for k, v in objective.disc.state_dict().items()}
    loss = objective.loss(trainer.model_fn, batch, step_generator(0, 0, 0)).mean()
    loss.backward()
    assert all(p.grad is None for p in objective.disc.parameters())  # the decoder's step
    assert all(p.grad is not None for p in trainer.trainable.values())
    assert objective.adv_weight is not None and objective.adv_weight > 0
    decoder_grads = {k: p.grad.clone() for k, p in trainer.trainable.items()}
    objective.after_step(1)  # the discriminator's step
    assert all(torch.equal(p.grad, decoder_grads[k]) for k, p in trainer.trainable.items())
    after = objective.disc.state_dict()
    assert any(not torch.equal(after[k], disc_before[k]) for k in after)
    frozen = [p for n, p in trainer.video.model.named_parameters() if n not in trainer.trainable]
    assert frozen and not any(p.requires_grad for p in frozen)  # the encoder and the spatial decoder stay


def test_an_untrained_decoder_has_a_temporal_flicker_gain_of_exactly_one(tiny_assets, tmp_path):
    """The control: a new decoder treats every frame alone, so giving it the other frames changes nothing."""
    from lvdm.config import load_config
    from lvdm.training.trainer import Trainer

    trainer = Trainer(load_config([], _decoder_run(tiny_assets, tmp_path)), progress=False)
    figures = trainer.objective.evaluate(trainer.video, trainer.data.validation)
    assert figures["temporal_flicker_gain"] == 1.0
    assert figures["flicker_video_decoder"] == figures["flicker_each_frame"]
    randomize(trainer.trainable.values(), seed=4, std=0.05)
    assert trainer.objective.evaluate(trainer.video, trainer.data.validation)["temporal_flicker_gain"] != 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model.context": "true"}, "model.context: belongs to the UNet"),
        ({"train.noise_prior": "mixed"}, "train.noise_prior: belongs to the UNet"),  # was ignored without a word
        ({"train.snr_gamma": 5}, "train.snr_gamma: belongs to the UNet"),
        # the UNet's temporal layers' shape, its LoRAs and its samples: each was ignored without a word
        ({"model.attention_depth": 2}, "model.attention_depth: belongs to the UNet"),
        ({"model.conv_kernel": "[5,1,1]"}, "model.conv_kernel: belongs to the UNet"),
        ({"model.layout": "attention_only"}, "model.layout: belongs to the UNet"),
        ({"model.loras": "[style.safetensors]"}, "model.loras: belongs to the UNet"),
        ({"train.validation_prompts": "[a cat]"}, "train.validation_prompts: belongs to the UNet"),
        # it advised a spatial LoRA, which the decoder target refuses in turn
        ({"train.image_batch_ratio": 0.3}, "train.image_batch_ratio: train.target=decoder trains on video clips only"),
        ({"train.perceptual_backbone": "vgg.pth"}, "perceptual_backbone: the LPIPS loss.s, which train"),
        ({"train.decoder_layers": "some"}, "train.decoder_layers"),
    ],
)
def test_decoder_settings_are_checked(tiny_assets, tmp_path, override, message):
    from lvdm.config import load_config
    from lvdm.errors import ConfigError

    load_config([], _decoder_run(tiny_assets, tmp_path))  # the control: the same run without it loads
    with pytest.raises(ConfigError, match=message):
        load_config([], _decoder_run(tiny_assets, tmp_path, **override))


def test_chunked_decoding_memory_does_not_grow_with_length():
    """At SD 1.5's VAE size and 512 px (fake tensors: shapes only, every storage counted), decoding 64 frames in
    16-frame chunks peaks within 10 % of decoding 16 frames (measured: 16.24 vs 16.00 GiB; 64 at once: 64.0)."""
    from diffusers import AutoencoderKLTemporalDecoder
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks.memory import PeakTracker, _fake_parameters

    def peak(frames: int, chunk: int) -> int:
        with torch.device("meta"):
            model = AutoencoderKLTemporalDecoder(
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                layers_per_block=2,
            ).requires_grad_(False)  # fmt: skip
        with FakeTensorMode():
            _fake_parameters(model, torch.float32)
            with PeakTracker() as tracker, torch.no_grad():
                latents = torch.empty(1, 4, frames, 64, 64)
                tracker.track(latents)
                start = tracker.live
                decode_video(model, latents, scaling_factor=0.18215, chunk_frames=chunk, overlap=4)
            return tracker.peak - start

    sixteen, chunked, whole = peak(16, 16), peak(64, 16), peak(64, 64)
    assert chunked <= 1.1 * sixteen < whole / 3


def test_the_decoder_trains_from_the_latent_cache_as_from_the_clips(tiny_assets, tmp_path):
    """For this target the cache keeps each clip's pixels (exactly: uint8 values) beside its latents: a cached batch
    gives the loss the clips give, and a run from the cache reports the same figures' kinds."""

    from lvdm.cache import build_from_config
    from lvdm.config import load_config
    from lvdm.data.build import build_dataset
    from lvdm.data.cache import LatentCache, collate_cached
    from lvdm.training.step import step_generator
    from lvdm.training.trainer import Trainer

    cfg = load_config([], _decoder_run(tiny_assets, tmp_path / "run", **{"data.cache": tmp_path / "cache"}))
    build_from_config(cfg, shard_size=4, progress=False)
    cache = LatentCache(tmp_path / "cache")
    cached = collate_cached([cache[i] for i in range(2)])
    listing, _ = build_dataset(cfg.data, seed=cfg.train.seed)
    clips = cut_like_the_cache(listing, [sample["index"] for sample in cache.samples[:2]])
    assert torch.equal(cached["video"], clips["video"])  # the pixels, exactly
    trainer = Trainer(cfg, progress=False)
    objective = trainer.objective
    from_cache = objective.loss(trainer.model_fn, cached, step_generator(0, 0, 0))
    from_clips = objective.loss(trainer.model_fn, clips, step_generator(0, 0, 0))
    torch.testing.assert_close(from_cache, from_clips, rtol=1e-4, atol=1e-6)
    result = trainer.run()
    assert result.gain["flicker_gain"] > 0 and (result.temporal_path / "config.json").is_file()
