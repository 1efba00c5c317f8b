"""Building a training run's parts from its config: the model, the data, the optimizer."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lvdm.errors import ConfigError
from lvdm.pipeline_loading import DTYPES
from lvdm.training.step import Frozen

# the frozen weights' dtype by accelerate's mixed_precision, whose "no" is sampling's "fp32"
WEIGHT_DTYPES = {("no" if name == "fp32" else name): dtype for name, dtype in DTYPES.items()}
LR_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def build_model(cfg: Any, device: torch.device, mixed_precision: str) -> tuple[Any, Frozen, dict[str, Any]]:
    """The video UNet on the configured base and its trainable parameters by name.

    The base is frozen in the mixed-precision dtype; what trains (the temporal layers, plus a spatial LoRA and
    unfrozen blocks when configured) stays fp32.
    """
    from lvdm.data.cache import encoder_digests
    from lvdm.models import VideoUNet
    from lvdm.models.parts import add_configured_parts
    from lvdm.training import groups

    if cfg.train.target == "decoder":  # the temporal VAE decoder, not the UNet
        from lvdm.training.decoder import build_decoder_model

        return build_decoder_model(cfg, device, WEIGHT_DTYPES[mixed_precision])
    m = cfg.model
    base = _load_base(cfg)
    image_encoder = None
    if m.image_conditioning:
        from lvdm.models.encoders import load_image_encoder

        image_encoder = load_image_encoder(m.image_encoder, device=device)
    digests = {}
    if cfg.data.cache:  # hashed before any cast, as the cache command hashes them
        digests = encoder_digests(base.vae, base.text_encoder, image_encoder, cfg.train.image_frame)
    dtype = WEIGHT_DTYPES[mixed_precision]
    layout, init = _layout_and_init(cfg, base.unet.config)
    try:
        video = VideoUNet.from_unet2d(base.unet, layout)
    except ValueError as exc:  # a head count the base's channels do not divide into
        raise ConfigError(f"model: the temporal layers this config asks for do not fit {m.base}: {exc}") from exc
    add_configured_parts(video, m)  # the standalone parts the model section asks for (lvdm.models.parts)
    if cfg.train.target == "distill":  # the student takes the guidance weight as an input (zero until it trains)
        from lvdm.models.parts import build_part

        build_part(video, "guidance", "guidance", {})
    if m.image_adapter is not None:  # an IP-Adapter Plus starts the image attention
        from lvdm.modules.image_attention import load_ip_adapter, read_ip_adapter

        load_ip_adapter(
            video.parts["image"], video.unet, read_ip_adapter(m.image_adapter, allow_pickle=m.allow_pickle)
        )
    if init is not None:
        init.warm_start(video)
    video.freeze_base()
    trainable = dict(video.named_temporal_parameters())
    if m.spatial_lora_rank:
        trainable |= groups.add_spatial_lora(video, m.spatial_lora_rank, m.spatial_lora_alpha)
    trainable |= groups.unfreeze_blocks(video, m.unfreeze) if m.unfreeze else {}
    video.to(device)
    chosen = {id(p) for p in trainable.values()}
    for param in video.parameters():  # the UNet and the standalone parts
        param.data = param.data.float() if id(param) in chosen else param.data.to(dtype)
    if m.gradient_checkpointing:
        video.enable_gradient_checkpointing()
    video.set_attention_backend(m.attention_backend)
    if cfg.train.compile:
        video.compile_blocks()
    for module in (base.vae, base.text_encoder):
        module.to(device=device).eval().requires_grad_(False)
        if dtype != torch.float32:
            module.to(dtype=dtype)
    frozen = Frozen.from_base(base)
    frozen.digests = digests
    if image_encoder is not None:
        image_encoder.model.to(dtype=dtype)
        frozen.image_encoder = image_encoder
    return video, frozen, trainable


def _load_base(cfg: Any) -> Any:
    """``model.base`` with its LoRAs, checked to be the kind ``train.target`` trains: an x4 upscaler for
    ``upscale``, a text-to-image model otherwise."""
    from lvdm.models import load_base
    from lvdm.training.upscale import check_upscaler_folder

    m = cfg.model
    check_upscaler_folder(cfg)  # before the upscaler loads
    base = load_base(m.base, base_config=m.base_config, loras=m.loras, allow_pickle=m.allow_pickle)
    if base.is_upscaler != (cfg.train.target == "upscale"):
        raise ConfigError(
            f"model.base {m.base} is an x4 upscaler: train it with train.target=upscale"
            if base.is_upscaler
            else f"train.target=upscale needs an x4 upscaler base (a StableDiffusionUpscalePipeline folder), and "
            f"model.base {m.base} is a text-to-image model"
        )
    return base


def _layout_and_init(cfg: Any, unet_config: Any) -> tuple[Any, Any]:
    """The temporal layout to build and the module to warm-start it from (``model.temporal_init``, or ``None``):
    the config's layout, or an AnimateDiff module's own shape when it warm-starts an AnimateDiff layout; checked to
    encode ``data.num_frames``."""
    m = cfg.model
    layout, init = layout_from_config(m), None
    if m.temporal_init is not None:  # a trained module's weights; parts it lacks (context) start at zero output
        from lvdm.models.animatediff import open_temporal_module

        init = open_temporal_module(m.temporal_init, unet_config, allow_pickle=m.allow_pickle)
        if layout.style == init.layout.style == "animatediff":
            layout = init.layout  # an AnimateDiff module's own shape: mid block or not, its frame table, its heads
    if layout.max_frames is not None and cfg.data.num_frames > layout.max_frames:
        raise ConfigError(
            f"data.num_frames: {cfg.data.num_frames} frames, and these motion modules encode at most "
            f"{layout.max_frames} (their frame table)"
        )
    return layout, init


@dataclass
class DataBundle:
    """The training stream and what validation needs."""

    dataset: Any
    stream: Any
    loader: Any
    guard: Any
    validation: list[dict[str, Any]] = field(default_factory=list)


def build_data(cfg: Any, frozen: Frozen, *, rank: int, world: int, num_workers: int | None = None) -> DataBundle:
    """Video clips (or the latent cache), a rank-aware batch stream, the bad-sample guard, validation batches.

    ``num_workers`` overrides ``data.num_workers`` (the trainer caps it to the usable cores, lvdm.runtime)."""
    from lvdm.data.build import build_split
    from lvdm.data.dataset import collate
    from lvdm.data.loader import BadSampleGuard, BatchStream, make_loader
    from lvdm.training.tasks import fine_share

    data, train = cfg.data, cfg.train
    if data.cache:
        dataset, weights, holdout, collate_fn = _cached_split(data, train, frozen)
    else:
        fine = {"fine_share": fine_share(train), "fine_every": train.interpolate_every}
        dataset, weights, holdout = build_split(data, seed=train.seed, **fine)
        weights = image_share(dataset.entries, weights, train.image_batch_ratio)
        collate_fn = collate
    stream = BatchStream(dataset, train.batch_size, weights=weights, seed=train.seed, rank=rank, world_size=world)
    workers = data.num_workers if num_workers is None else num_workers
    loader = make_loader(dataset, stream, num_workers=workers, collate_fn=collate_fn)
    log = Path(cfg.output_dir) / ("skipped.jsonl" if rank == 0 else f"skipped.rank{rank}.jsonl")
    guard = BadSampleGuard(log, max_fraction=data.max_bad_fraction)
    held = holdout or dataset
    validation, unusable, held_out = [], [], holdout is not None
    if not data.cache and fine["fine_share"]:
        from lvdm.data.build import recut

        # the fine stage's gain reads the same clips cut at its rate, in batches of their own (``fine`` set)
        validation = _validation_batches(
            recut(held, fine_share=1.0), collate_fn, train.batch_size, held_out=held_out, unusable=unusable
        )
        held = recut(held, fine_share=0.0)
    validation = (
        _validation_batches(held, collate_fn, train.batch_size, held_out=held_out, unusable=unusable) + validation
    )
    _report_unusable(unusable, guard, warn=rank == 0)
    return DataBundle(dataset, stream, loader, guard, validation)


def _cached_split(data: Any, train: Any, frozen: Frozen) -> tuple[Any, list[float], Any, Any]:
    """The latent cache split like the clips would be: same holdout entries, same source weights and image share."""
    from lvdm.data.build import build_dataset, holdout_indices
    from lvdm.data.cache import LatentCache, cache_fingerprint, collate_cached

    listing, listing_weights = build_dataset(data, seed=train.seed)
    expected = cache_fingerprint(listing, **frozen.digests)
    held = holdout_indices(len(listing.entries), data.holdout)
    kept = set(range(len(listing.entries))) - held
    dataset = LatentCache(data.cache, expected=expected, only=kept, entries=listing.entries)
    holdout = LatentCache(data.cache, expected=expected, only=held, entries=listing.entries) if held else None
    entries = [listing.entries[s["index"]] for s in dataset.samples]
    weights = image_share(entries, [listing_weights[s["index"]] for s in dataset.samples], train.image_batch_ratio)
    return dataset, weights, holdout, collate_cached


def image_share(entries: list[Any], weights: list[float], ratio: float | None) -> list[float]:
    """Per-entry weights rescaled so image entries get ``ratio`` of the draws (joint image-video training).

    Batches never mix images and videos, so this is also the share of image batches.
    """
    if ratio is None:
        return weights
    is_image = [entry.is_image for entry in entries]
    image_total = sum(w for w, image in zip(weights, is_image, strict=True) if image)
    video_total = sum(weights) - image_total
    if ratio > 0 and image_total == 0:
        raise ConfigError(
            f"train.image_batch_ratio={ratio} needs still images: add a data.sources item of kind images"
        )
    if ratio < 1 and video_total == 0:
        raise ConfigError(f"train.image_batch_ratio={ratio} needs videos, but every source holds images")
    scale = {
        True: ratio / image_total if image_total else 0.0,
        False: (1 - ratio) / video_total if video_total else 0.0,
    }
    return [w * scale[image] for w, image in zip(weights, is_image, strict=True)]


def _report_unusable(unusable: list[tuple[str, str]], guard: Any, *, warn: bool) -> None:
    """Log the held-out clips that could not be used (unreadable, too short, ...) to the rank's ``skipped.jsonl``
    and, where ``warn`` (rank 0: every rank reads the same held-out clips), say so (none usable in a group of one
    shape is already an error: the dataset stops after ``data.max_consecutive_bad`` bad draws)."""
    if not unusable:
        return
    for path, reason in unusable:
        guard.log.add(path, reason)
    if not warn:
        return
    path, reason = unusable[0]
    warnings.warn(
        f"{len(dict(unusable))} held-out clip(s) cannot be used and are left out of validation (listed in "
        f"{guard.log_path}), e.g. {path}: {reason}",
        stacklevel=2,
    )


def _validation_batches(
    dataset: Any, collate_fn: Any, batch_size: int, *, held_out: bool, unusable: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """The held-out clips in batches of one shape; without a holdout, one fixed batch of training samples.

    Still images are left out: with the temporal layers bypassed for them, their gain is 1 by construction. A
    held-out clip that cannot be used is left out too (its stand-in, another held-out clip, is there already), and
    added to ``unusable`` as ``(path, reason)`` (only held-out clips are: training samples' stand-ins are as good).
    """
    batches = []
    for (is_image, _), members in dataset.groups.items():
        if is_image:
            continue
        samples = []
        for index in members if held_out else members[:batch_size]:
            sample = dataset[index]
            if held_out and sample["skipped"]:
                unusable.extend(sample["skipped"])
                continue
            samples.append(sample)
        batches += [collate_fn(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
        if not held_out:
            break
    return batches


def build_optimizer(cfg: Any, params: list[Any], device: torch.device) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters only (fused on CUDA, or bitsandbytes 8-bit) and the LR schedule."""
    from diffusers.optimization import get_scheduler

    train = cfg.train
    if train.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        optimizer = bnb.optim.AdamW8bit(params, lr=train.lr, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            params, lr=train.lr, weight_decay=train.weight_decay, fused=True if device.type == "cuda" else None
        )
    if train.target == "distill":  # the warmup and the curve run again in every round
        from lvdm.training.distill import round_lr_factor

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: round_lr_factor(step, train))
    schedule = get_scheduler(
        LR_SCHEDULES[train.lr_schedule],
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
    )
    return optimizer, schedule


def apply_rates(optimizer: torch.optim.Optimizer, schedule: Any, train: Any) -> None:
    """``train.lr`` and ``train.weight_decay`` over restored optimizer and schedule states, which hold the
    checkpoint's: a resume that changes them (a one-line note) trains with the new ones. The schedule's curve is
    recomputed at its restored position as its own step computes it, so unchanged settings give exactly the restored
    rates."""
    factors = getattr(schedule, "lr_lambdas", None)
    if factors is None or len(factors) != len(optimizer.param_groups):
        return
    schedule.base_lrs = [train.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        group["initial_lr"] = train.lr
        group["weight_decay"] = train.weight_decay
        group["lr"] = train.lr * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


def layout_from_config(model: Any):
    """The :class:`~lvdm.models.TemporalLayout` of a ``ModelConfig``: a preset with the configured details."""
    from lvdm.models.layout import LAYOUTS

    preset = LAYOUTS[model.layout]
    return replace(
        preset,
        attention_depth=model.attention_depth,
        attention_heads=model.attention_heads if model.attention_heads is not None else preset.attention_heads,
        conv_kernel=tuple(model.conv_kernel),
        mix_factor=model.mix_factor,
    )
