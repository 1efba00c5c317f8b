"""Peak training memory without a GPU: the step run on fake tensors, every storage's bytes tracked.

The model is built on ``meta``, then given fake CPU parameters (frozen base in bf16, trainable weights in fp32, as
the trainer holds them); a training step (bf16 autocast, fused AdamW in fp32) runs under ``FakeTensorMode``, so
nothing is computed or allocated, and :class:`PeakTracker` adds up the bytes of every storage alive at each op.
The optimizer state is created first (a step on zero gradients), so the peak of the one tracked step is the
steady one: parameters, optimizer state, and what the step adds (activations, gradients, temporaries). SDPA on
fake CPU tensors takes the flash-attention path (only the output and the log-sum-exp are saved for backward), as
it does on a GPU.

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: it gives the same figure (31.33 GiB for
diffusers' UNetMotionModel at SD 1.5, 16x512, both ways) but its per-module bookkeeping makes it ~40x slower
(about 7 minutes per estimate at that size); it also needs its gradient-hook registration patched for frozen
parameters. Known limits of the estimate: no allocator caching or fragmentation; CPU autocast keeps
GroupNorm/LayerNorm outputs in bf16 where CUDA autocast makes them fp32, so a GPU may use somewhat more; and
repeated estimates of one setting can differ by up to ~0.3% (the order in which storages are freed varies).

Checkpointing modes: ``none``; ``own`` (the model's switch: lvdm recomputes each spatial+temporal wrapper,
diffusers only its ResNets); ``blocks`` (a what-if applied here: each whole down/mid/up block recomputed).
"""

from __future__ import annotations

import contextlib
import json
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from benchmarks.harness import Precision, Size, video_inputs
from benchmarks.models import LABELS, MODELS, VideoModel, meta_model
from benchmarks.report import target

GIB = 2**30
CHECKPOINTING = ("none", "own", "blocks")
BF16_MIXED = Precision("bf16-mixed", torch.bfloat16, autocast=True)


class PeakTracker(TorchDispatchMode):
    """Live bytes of every storage created under it (or passed to :meth:`track`), and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, nbytes)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


def _fake_parameters(module: nn.Module, base_dtype: torch.dtype) -> None:
    """Replace every meta parameter and buffer by a fake CPU one (called inside ``FakeTensorMode``).

    Not ``module.to()``: swapping fake parameters in ``nn.Module._apply`` fails on their weak references.
    """
    for sub in module.modules():
        for key, param in sub._parameters.items():
            if param is not None:
                dtype = torch.float32 if param.requires_grad else base_dtype
                sub._parameters[key] = nn.Parameter(torch.empty(param.shape, dtype=dtype), param.requires_grad)
        for key, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[key] = torch.empty(buffer.shape, dtype=buffer.dtype)


def checkpoint_blocks(model: VideoModel) -> None:
    """What-if: recompute each whole down/mid/up block in backward (the model's own checkpointing off)."""
    if model.set_checkpointing is not None:
        model.set_checkpointing(False)
    for block in model.blocks:
        block.forward = _checkpointed(block.forward, model.frame_context)


def _checkpointed(forward: Callable[..., Any], frame_context: bool) -> Callable[..., Any]:
    from lvdm.modules.frame_context import current_frames
    from lvdm.modules.frame_context import frame_context as enter_frames

    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        context = current_frames() if frame_context else None

        def block(*a: Any, **k: Any) -> Any:
            # recomputation runs in backward, after VideoUNet.forward has left the frame context: re-enter it
            with enter_frames(context) if context is not None else contextlib.nullcontext():
                return forward(*a, **k)

        return checkpoint(block, *args, use_reentrant=False, **kwargs)

    return run


class AdamW8bitState(torch.optim.Optimizer):
    """bitsandbytes' ``AdamW8bit`` (``train.optimizer=adamw8bit``) as far as memory goes: its kernels need a GPU
    and do not run on fake tensors, so this stand-in allocates the same state and computes nothing. Tensors of
    at least 4096 elements (bnb's ``min_8bit_size``) keep both moments blockwise-quantised, one uint8 per element
    each plus an fp32 absmax per block of 256; smaller ones keep fp32 moments. The fused update allocates nothing.
    """

    MIN_8BIT_SIZE, BLOCK = 4096, 256

    def __init__(self, params: Any, lr: float = 1e-5) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and not self.state[param]:
                    self.state[param].update(self._state_for(param))

    def _state_for(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        if param.numel() < self.MIN_8BIT_SIZE:
            return {"state1": torch.zeros_like(param), "state2": torch.zeros_like(param)}
        blocks = math.ceil(param.numel() / self.BLOCK)
        return {
            "state1": torch.zeros(param.shape, dtype=torch.uint8),
            "state2": torch.zeros(param.shape, dtype=torch.uint8),
            "absmax1": torch.zeros(blocks),
            "absmax2": torch.zeros(blocks),
        }


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-5, fused=True),
    "adamw8bit": AdamW8bitState,
}


def _fake_step(
    model: VideoModel, inputs: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, precision: Precision
) -> None:
    with precision.context("cpu"):
        out = model.forward(inputs["x"], inputs["t"], inputs["text"])
    nn.functional.mse_loss(out.float(), inputs["target"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """Step once on zero gradients: the optimizer state then exists, as in every step after the first."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def estimate_peak(
    build: Callable[[nn.Module], VideoModel],
    unet_config: Mapping[str, Any],
    size: Size,
    *,
    frames: int,
    latent: int,
    checkpointing: str = "none",
    precision: Precision = BF16_MIXED,
    optimizer: str = "adamw",
) -> dict[str, float]:
    """Peak GiB of a training step of ``build``'s model at ``batch x frames x latent^2``, with its breakdown.

    ``optimizer``: ``adamw`` (fused, fp32 moments) or ``adamw8bit`` (:class:`AdamW8bitState`). Results are
    remembered for the process (sections 1 and 2 ask for some of the same estimates).
    """
    key = (build, json.dumps(dict(unet_config), sort_keys=True, default=list), size.batch, size.text_tokens,
           frames, latent, checkpointing, precision, optimizer)  # fmt: skip
    if key not in _ESTIMATES:
        _ESTIMATES[key] = _estimate_peak(build, unet_config, size, frames, latent, checkpointing, precision, optimizer)
    return dict(_ESTIMATES[key])


_ESTIMATES: dict[tuple, dict[str, float]] = {}


def _estimate_peak(
    build: Callable[[nn.Module], VideoModel],
    unet_config: Mapping[str, Any],
    size: Size,
    frames: int,
    latent: int,
    checkpointing: str,
    precision: Precision,
    optimizer_name: str = "adamw",
) -> dict[str, float]:
    model = meta_model(build, unet_config)
    if checkpointing == "blocks":
        checkpoint_blocks(model)
    elif model.set_checkpointing is not None:
        model.set_checkpointing(checkpointing == "own")
    model.module.train()
    tracker = PeakTracker()
    with FakeTensorMode():
        _fake_parameters(model.module, precision.base_dtype)
        params = sum(p.untyped_storage().nbytes() for p in model.module.parameters())
        for tensor in [*model.module.parameters(), *model.module.buffers()]:
            tracker.track(tensor)
        optimizer = OPTIMIZERS[optimizer_name](model.trainable())
        with tracker:
            _create_state(optimizer)
            inputs = video_inputs(size, unet_config["cross_attention_dim"], "cpu", frames=frames, latent=latent)
            before = tracker.live
            tracker.reset_peak()
            _fake_step(model, inputs, optimizer, precision)
    states = sum(
        t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    return {
        "peak_gib": tracker.peak / GIB,
        "params_gib": params / GIB,
        "optimizer_gib": states / GIB,
        "step_gib": (tracker.peak - before) / GIB,
    }


# --------------------------------------------------------------------------------------------------- section 2
VIDEO_MODELS = ("lvdm", "lvdm-attn", "motion")
MODES = {"none": "none", "own": "own", "blocks": "whole blocks (what-if)"}


def run(size: Size, device: torch.device | None = None, *, warmup: int = 0, repeats: int = 1) -> dict[str, Any]:
    """Section 2: peak GiB of every model x checkpointing mode at each of ``size.memory_points`` (SD 1.5 but for
    ``tiny``). Runs on fake CPU tensors whatever ``device`` is; ``warmup`` and ``repeats`` do not apply.
    """
    config = size.memory_unet()
    estimates: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for frames, latent in size.memory_points:
        point = f"{frames}x{latent * 8}"
        estimates[point] = {
            name: {ckpt: estimate_peak(MODELS[name], config, size, frames=frames, latent=latent, checkpointing=ckpt)
                   for ckpt in CHECKPOINTING}
            for name in VIDEO_MODELS
        }  # fmt: skip
    largest = f"{size.memory_points[-1][0]}x{size.memory_points[-1][1] * 8}"
    frames, latent = size.memory_points[-1]
    eight_bit = estimate_peak(MODELS["lvdm"], config, size, frames=frames, latent=latent, checkpointing="own",
                              optimizer="adamw8bit")  # fmt: skip
    return {
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")},
        "batch": size.batch,
        "precision": BF16_MIXED.name,
        "estimates": estimates,
        "notes": [
            f"UNet block_out_channels={list(config['block_out_channels'])}, batch {size.batch}, frames x pixels "
            "(latents = pixels / 8); bf16 frozen base, fp32 temporal weights, fused AdamW (fp32 moments), SDPA",
            "checkpointing 'own': lvdm recomputes each spatial+temporal wrapper, diffusers only its ResNets; "
            "'whole blocks' is applied by the harness to every down/mid/up block, as a what-if",
        ],
        "tables": [
            {"title": "Peak GiB of a training step", "rows": _rows(estimates, largest)},
            {
                "title": f"Memory options, lvdm default layout with its checkpointing, {largest}",
                "rows": _option_rows(estimates[largest]["lvdm"]["own"], eight_bit),
            },
        ],  # fmt: skip
        "targets": [
            *_targets(estimates, largest),
            target(
                f"peak GiB at {largest}, lvdm default layout, checkpointing + train.optimizer=adamw8bit",
                eight_bit["peak_gib"],
                11,
            ),
        ],  # fmt: skip
    }


def _option_rows(default: dict[str, float], eight_bit: dict[str, float]) -> list[dict[str, Any]]:
    """Each memory option's peak and its saving against the default (fused AdamW, fp32 moments)."""
    rows = [("fused AdamW, fp32 moments (default)", default), ("train.optimizer=adamw8bit (bitsandbytes)", eight_bit)]
    return [
        {"option": name, "peak GiB": figures["peak_gib"], "optimizer state GiB": figures["optimizer_gib"],
         "saving GiB": default["peak_gib"] - figures["peak_gib"]}
        for name, figures in rows
    ]  # fmt: skip


def _rows(estimates: dict[str, Any], largest: str) -> list[dict[str, Any]]:
    rows = []
    motion_own = estimates[largest]["motion"]["own"]["peak_gib"]
    for name in VIDEO_MODELS:
        for ckpt, label in MODES.items():
            row: dict[str, Any] = {"model": LABELS[name], "checkpointing": label}
            for point, by_model in estimates.items():
                row[f"{point} peak GiB"] = by_model[name][ckpt]["peak_gib"]
            figures = estimates[largest][name][ckpt]
            row["weights GiB"] = figures["params_gib"]
            row["AdamW state GiB"] = figures["optimizer_gib"]
            row[f"{largest} vs motion own ckpt"] = figures["peak_gib"] / motion_own
            rows.append(row)
    return rows


def _targets(estimates: dict[str, Any], largest: str) -> list[dict[str, Any]]:
    at = estimates[largest]
    motion_own = at["motion"]["own"]["peak_gib"]
    return [
        target(f"peak GiB at {largest}, lvdm default layout, lvdm checkpointing", at["lvdm"]["own"]["peak_gib"], 20),
        target(
            f"peak GiB at {largest}, lvdm attention_only + checkpointing vs UNetMotionModel's own ({motion_own:.2f})",
            at["lvdm-attn"]["own"]["peak_gib"], motion_own,
        ),
    ]  # fmt: skip
