"""Encode a dataset once through the VAE and text encoder (and the CLIP image encoder, with image conditioning),
so training reads latents instead of video; for ``train.target: decoder`` the cache also keeps the clips' pixels.

    python -m lvdm.cache --config configs/t2v_sd15.yaml data.cache=cache/webvid
    python train.py --config configs/t2v_sd15.yaml data.cache=cache/webvid      # then trains from it

The cache is written to ``data.cache`` (see :mod:`lvdm.data.cache` for the layout). An interrupted
run resumes at its first missing shard; a cache made with another model or other data settings
is refused, naming what differs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvdm.cli import Parser, run_cli, split_overrides
from lvdm.config import Config, load_config
from lvdm.errors import ConfigError, DataError


def encoders(base: Any, *, chunk_frames: int = 16) -> dict[str, Any]:
    """The callables :func:`lvdm.data.cache.build_cache` needs, bound to a loaded base model."""
    from lvdm.models.encoders import encode_text, encode_video

    return {
        "encode_video": lambda video: encode_video(base.vae, video, chunk_frames=chunk_frames),
        "encode_text": lambda captions: encode_text(base.tokenizer, base.text_encoder, captions),
    }


MAX_SHARD_SIZE = 65536  # samples per shard file (at least 1: 0 and -1 write no shard)


@dataclass(frozen=True)
class BuiltCache:
    """A finished cache: its folder, how many samples were listed, and the files that could not be cached (path ->
    reason, as ``skipped.jsonl`` holds them)."""

    path: Path
    listed: int
    skipped: dict[str, str]


def build_from_config(cfg: Config, *, shard_size: int = 64, progress: bool = True) -> BuiltCache:
    """Build (or resume) the cache at ``cfg.data.cache`` for ``cfg``'s data and base model."""
    if not cfg.data.cache:  # a config error: reported before torch and diffusers are imported
        raise ConfigError("data.cache: set it to the folder the cache is written to")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ConfigError(f"--shard-size {shard_size!r}: must be a whole number in 1 .. {MAX_SHARD_SIZE}")
    from lvdm.data.build import build_dataset
    from lvdm.data.cache import build_cache, cache_fingerprint, encoder_digests
    from lvdm.data.skip_log import SkipLog
    from lvdm.models.encoders import frame_tokens, load_image_encoder
    from lvdm.models.loading import load_base

    dataset, _ = build_dataset(cfg.data, seed=cfg.train.seed)
    m = cfg.model
    base = load_base(m.base, base_config=m.base_config, loras=m.loras, allow_pickle=m.allow_pickle)
    image_encoder = load_image_encoder(m.image_encoder) if m.image_conditioning else None
    digests = encoder_digests(base.vae, base.text_encoder, image_encoder, cfg.train.image_frame)
    fingerprint = cache_fingerprint(dataset, **digests, frames=cfg.train.target == "decoder")
    images = {"encode_frames": lambda frames: frame_tokens(image_encoder, frames)} if image_encoder else {}
    out = build_cache(
        dataset, cfg.data.cache, **encoders(base), **images, fingerprint=fingerprint, shard_size=shard_size,
        progress=progress,
    )  # fmt: skip
    return BuiltCache(out, len(dataset), SkipLog(out / "skipped.jsonl").logged)


def verdict(built: BuiltCache, max_bad_fraction: float) -> str:
    """The line the command ends with; a :class:`DataError` when more than ``data.max_bad_fraction`` of the samples
    could not be cached (the cache is kept: it is complete without them)."""
    if not built.skipped:
        return f"latent cache ready: {built.path}"
    count, share = len(built.skipped), len(built.skipped) / built.listed
    what = (
        f"{count} of {built.listed} samples could not be cached (reasons in {built.path / 'skipped.jsonl'}); the "
        "cache is complete without them; mend them and run this command again to add them"
    )
    if share > max_bad_fraction:
        raise DataError(f"{what}: {100 * share:.1f}% > data.max_bad_fraction {100 * max_bad_fraction:.1f}%")
    return f"latent cache ready: {built.path} ({what})"


def main(argv: list[str]) -> int:
    parser = Parser(prog="python -m lvdm.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config file(s); later ones win")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard file")
    overrides, rest = split_overrides(argv, parser)
    args = parser.parse_args(rest)
    cfg = load_config(args.config, overrides)
    print(verdict(build_from_config(cfg, shard_size=args.shard_size), cfg.data.max_bad_fraction))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
