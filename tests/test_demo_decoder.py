"""The temporal decoder demo (configs/demo_decoder.yaml), shortened: on the demo's held-out clips, with per-frame
latent errors like a video model's, the trained video decoder flickers less than SD's image decoder at about the
same PSNR, and less than itself given one frame at a time (its temporal layers do it). The control, an untrained
decoder with a temporal flicker gain of exactly 1, is in tests/test_temporal_vae.py."""

from __future__ import annotations

from pathlib import Path

from test_demo import REPO, demo_root  # noqa: F401 - the shared fixture

from lvdm.config import load_config
from lvdm.training.trainer import train

DECODER_STEPS = 300  # the demo's: 600


def test_the_video_decoder_flickers_less_at_the_same_psnr(demo_root: Path):  # noqa: F811
    cfg = load_config([REPO / "configs" / "demo_decoder.yaml"], [
        f"model.base={demo_root / 'base'}", f"data.root={demo_root / 'clips'}", f"output_dir={demo_root / 'decoder'}",
        f"train.max_steps={DECODER_STEPS}", "train.disc_start=200", "train.checkpoint_every=1000",
        "train.validate_every=1000",
    ])  # fmt: skip
    g = train(cfg, progress=False).gain
    assert g["flicker_gain"] > 1.15 and g["temporal_flicker_gain"] > 1.1, g
    assert g["psnr_video_decoder"] >= g["psnr_image_decoder"] - 0.5, g
