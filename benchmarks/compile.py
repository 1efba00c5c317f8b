"""What regional ``torch.compile`` gives (issue 18): compile time, speed-up and the loss against eager.

``python -m benchmarks --only compile`` (any device). Two copies of lvdm's VideoUNet (Video LDM layout, the same
weights and inputs): one eager, one with :meth:`~lvdm.models.VideoUNet.compile_blocks`. The first call of the
compiled copy compiles (its time minus an eager call's is the compile time); then both are timed interleaved, a
training step (forward, MSE loss, backward, AdamW) and a sampling forward (no autograd), each with its own graphs.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from benchmarks.harness import Size, make_optimizer, time_round_robin, video_inputs
from benchmarks.report import target


def _calls(model: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    optimizer = make_optimizer(list(model.temporal_parameters()))

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(inputs["x"], inputs["t"], inputs["text"]).float(), inputs["target"])

    def step() -> float:
        value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value.item()

    @torch.no_grad()
    def forward() -> float:
        return loss().item()

    return {"training step": step, "sampling forward": forward}


def _first_call(call: Any) -> tuple[float, float]:
    start = time.perf_counter()
    value = call()
    return time.perf_counter() - start, value


def run(size: Size, device: torch.device | None = None, *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from lvdm.models import VideoUNet

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    eager = VideoUNet.from_unet2d(UNet2DConditionModel(**size.unet())).freeze_base().to(device)
    compiled = copy.deepcopy(eager).compile_blocks()
    inputs = video_inputs(size, eager.unet.config.cross_attention_dim, device)
    calls = {"eager": _calls(eager, inputs), "compiled": _calls(compiled, inputs)}
    first: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in calls}
    for what in ("sampling forward", "training step"):  # the forward first: both copies' weights still equal
        for name in calls:
            first[name][what] = _first_call(calls[name][what])
    timing = time_round_robin(
        {f"{what}, {name}": call for name, group in calls.items() for what, call in group.items()},
        warmup=warmup, repeats=repeats, device=device,
    )  # fmt: skip
    rows, targets = [], []
    for what in ("training step", "sampling forward"):
        eager_s, compiled_s = timing[f"{what}, eager"].median, timing[f"{what}, compiled"].median
        (_, eager_loss), (compile_s, compiled_loss) = first["eager"][what], first["compiled"][what]
        rel = abs(compiled_loss - eager_loss) / abs(eager_loss)
        rows.append({
            "call": what, "eager s": eager_s, "compiled s": compiled_s, "speed-up": eager_s / compiled_s,
            "compile s": compile_s - first["eager"][what][0], "first loss rel. diff": rel,
        })  # fmt: skip
        targets.append(target(f"{what}: compiled loss vs eager, relative", rel, 1e-5))
    return {
        "timing": {name: t.to_dict() for name, t in timing.items()},
        "notes": [
            f"lvdm VideoUNet (videoldm layout), batch {size.batch} x {size.frames} frames at {size.latent}x"
            f"{size.latent} latents; compile_blocks: each spatial block and temporal layer compiled alone, static "
            "shapes, inductor; compile s = the first compiled call minus the first eager call",
        ],
        "tables": [{"title": "Regional torch.compile vs eager", "rows": rows}],
        "targets": targets,
    }
