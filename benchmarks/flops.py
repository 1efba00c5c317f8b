"""FLOPs counted without running anything: each model built on the ``meta`` device under ``FlopCounterMode``.

On ``meta`` tensors PyTorch's SDPA is counted (on CPU tensors it dispatches to a fused kernel the counter does not
know, and attention would be missing). A training step's count is forward plus backward, recomputation under
gradient checkpointing included; the optimizer's elementwise work is not counted (it is not matmul/conv work).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import Size, video_inputs
from benchmarks.models import VideoModel, meta_model


def _count(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(
    build: Callable[[nn.Module], VideoModel],
    unet_config: Mapping[str, Any],
    size: Size,
    *,
    frames: int | None = None,
    latent: int | None = None,
) -> dict[str, int]:
    """FLOPs of the model ``build`` makes on ``size``'s inputs: ``forward``, and for a trainable model ``step``
    (forward + backward) and ``step+ckpt`` (the same with the model's own gradient checkpointing)."""
    model = meta_model(build, unet_config)
    model.module.train()
    inputs = video_inputs(size, unet_config["cross_attention_dim"], "meta", frames=frames, latent=latent)

    def forward() -> torch.Tensor:
        return model.forward(inputs["x"], inputs["t"], inputs["text"])

    if not model.trainable():
        with torch.no_grad():
            return {"forward": _count(forward)}
    flops = {}
    for mode, checkpointing in (("step", False), ("step+ckpt", True)):
        model.set_checkpointing(checkpointing)
        with FlopCounterMode(display=False) as counter:
            out = forward()
            flops["forward"] = int(counter.get_total_flops())  # the same with and without checkpointing
            nn.functional.mse_loss(out.float(), inputs["target"]).backward()
        flops[mode] = int(counter.get_total_flops())
    return flops
