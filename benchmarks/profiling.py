"""Where a training step's time goes: one step of each video model under ``torch.profiler``.

Gives, per model, the self time of every op grouped into categories (matmul, convolution, attention, norms,
optimizer, copies, elementwise) and the top ops: ``python -m benchmarks --profile`` (after the other sections) or
``--only profile`` (alone).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import Precision, Size, make_optimizer, training_step, video_inputs
from benchmarks.models import LABELS, build_all, spatial_unet

CATEGORIES = {  # first match wins, on the aten op name
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention"),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "convolution": ("conv", "mkldnn_convolution", "cudnn_convolution"),
    "norm": ("group_norm", "layer_norm"),
    "optimizer": ("_fused_adam", "_foreach"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::cat"),
}
VIDEO_MODELS = ("lvdm", "lvdm-attn", "motion")


def _category(name: str) -> str:
    for category, needles in CATEGORIES.items():
        if any(needle in name for needle in needles):
            return category
    return "elementwise/other"


def _self_time(event: Any, cuda: bool) -> float:
    return event.self_device_time_total if cuda else event.self_cpu_time_total


def run(size: Size, device: torch.device, *, warmup: int = 1, repeats: int = 1, top: int = 15) -> dict[str, Any]:
    """Per model: seconds by category and the ``top`` ops by self time of one training step (after ``warmup``)."""
    if size.needs_cuda and device.type != "cuda":
        return {"notes": [f"not profiled: --size {size.name} trains only on a CUDA GPU; this run has none"]}
    precision = Precision.for_device(device)
    unet = spatial_unet(size.unet())
    models = build_all(unet, list(VIDEO_MODELS))
    inputs = video_inputs(size, unet.config.cross_attention_dim, device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    result: dict[str, Any] = {"by_category": {}, "top_ops": {}}
    for name, model in models.items():
        precision.apply(model, device).module.train()
        step = training_step(model, make_optimizer(model.trainable()), inputs, precision)
        for _ in range(warmup):
            step()
        with profile(activities=activities) as prof:
            step()
        events = [e for e in prof.key_averages() if _self_time(e, cuda) > 0]
        by_category: dict[str, float] = {}
        for event in events:
            key = _category(event.key)
            by_category[key] = by_category.get(key, 0.0) + _self_time(event, cuda) / 1e6
        result["by_category"][name] = by_category
        ranked = sorted(events, key=lambda e: _self_time(e, cuda), reverse=True)[:top]
        result["top_ops"][name] = [{"op": e.key, "self s": _self_time(e, cuda) / 1e6, "calls": e.count}
                                   for e in ranked]  # fmt: skip
        model.module.to("cpu")
    result["tables"] = _tables(result)
    return result


def _tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    categories = [*CATEGORIES, "elementwise/other"]
    rows = []
    for name, seconds in result["by_category"].items():
        total = sum(seconds.values())
        row: dict[str, Any] = {"model": LABELS[name], "total self s": total}
        row.update({category: seconds.get(category, 0.0) / total for category in categories})
        rows.append(row)
    tables = [{"title": "Share of a training step's self time by op category (torch.profiler)", "rows": rows}]
    for name, ops in result["top_ops"].items():
        tables.append({"title": f"Top ops: {LABELS[name]}", "rows": ops})
    return tables
