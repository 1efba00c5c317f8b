"""Section 1, the training step: time, FLOPs, time per FLOP and peak memory of each video model, side by side.

Every model has the same spatial UNet (copies of one), frozen base, inputs, dtype policy and attention backend
(SDPA). Timed: the inference forward (no autograd), the training step (forward, MSE loss, backward, fused AdamW
step) without and with each model's own gradient checkpointing, and the floor (the image UNet's forward over the
same ``b * f`` frames). The calls are interleaved round-robin. Memory: the fake-tensor estimate at this size
(:mod:`benchmarks.memory`), and on a GPU also the measured ``max_memory_allocated`` of each step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.flops import model_flops
from benchmarks.harness import (
    Precision,
    Size,
    inference_forward,
    make_optimizer,
    time_round_robin,
    training_step,
    video_inputs,
)
from benchmarks.memory import GIB, estimate_peak
from benchmarks.models import LABELS, MODELS, VideoModel, build_all, image_model, spatial_unet
from benchmarks.report import target

VIDEO_MODELS = ("lvdm", "lvdm-attn", "lvdm-ad", "motion")
MODES = ("forward", "step", "step+ckpt")


def count_flops(size: Size) -> dict[str, dict[str, int]]:
    """FLOPs of every model and mode at ``size`` (counted on ``meta``)."""
    config = size.unet()
    flops = {"image": model_flops(image_model, config, size)}
    flops.update({name: model_flops(MODELS[name], config, size) for name in VIDEO_MODELS})
    return flops


def estimate_memory(size: Size) -> dict[str, dict[str, float]]:
    """Fake-tensor peak GiB of each model's step at ``size`` as a GPU would train it (bf16 frozen base, fp32
    temporal weights), without and with its own checkpointing."""
    config = size.unet()
    return {
        name: {
            mode: estimate_peak(MODELS[name], config, size, frames=size.frames, latent=size.latent,
                                checkpointing=ckpt)["peak_gib"]
            for mode, ckpt in (("step", "none"), ("step+ckpt", "own"))
        }
        for name in VIDEO_MODELS
    }  # fmt: skip


def _calls(
    models: dict[str, VideoModel], inputs: dict[str, torch.Tensor], precision: Precision
) -> dict[str, Callable[[], Any]]:
    """``"<model>:<mode>"`` -> a callable running it once."""
    calls: dict[str, Callable[[], Any]] = {"image:forward": inference_forward(models["image"], inputs, precision)}
    for name in VIDEO_MODELS:
        model = models[name]
        step = training_step(model, make_optimizer(model.trainable()), inputs, precision)
        calls[f"{name}:forward"] = inference_forward(model, inputs, precision)
        calls[f"{name}:step"] = _with_checkpointing(model, False, step)
        calls[f"{name}:step+ckpt"] = _with_checkpointing(model, True, step)
    return calls


def _with_checkpointing(model: VideoModel, enabled: bool, step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        model.set_checkpointing(enabled)
        step()

    return run


def _cuda_peaks(calls: dict[str, Callable[[], Any]], models: dict[str, VideoModel]) -> dict[str, float]:
    """Measured peak GiB of each call on the GPU: what it allocates on top of what is resident, plus its own
    model's weights and optimizer state (the other models stay resident while it runs)."""
    peaks = {}
    for key, call in calls.items():
        model = models[key.split(":")[0]]
        own = sum(p.numel() * p.element_size() for p in model.module.parameters())
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        torch.cuda.synchronize()
        states = 0 if key.endswith("forward") else _optimizer_bytes(model)
        peaks[key] = (torch.cuda.max_memory_allocated() - before + own + states) / GIB
    return peaks


def _optimizer_bytes(model: VideoModel) -> int:
    # AdamW keeps two fp32 moments per trainable weight
    return sum(2 * p.numel() * 4 for p in model.trainable())


def measure(size: Size, device: torch.device, *, warmup: int, repeats: int) -> dict[str, Any]:
    """Time every model and mode; on CUDA also measure each one's peak memory."""
    precision = Precision.for_device(device)
    unet = spatial_unet(size.unet())
    models = {
        name: precision.apply(model, device) for name, model in build_all(unet, [*VIDEO_MODELS, "image"]).items()
    }
    for model in models.values():
        model.module.train()
    inputs = video_inputs(size, unet.config.cross_attention_dim, device)
    calls = _calls(models, inputs, precision)
    timings = time_round_robin(calls, warmup=warmup, repeats=repeats, device=device)
    out: dict[str, Any] = {"precision": precision.name, "timing": {key: t.to_dict() for key, t in timings.items()}}
    if device.type == "cuda":
        out["cuda_peak_gib"] = _cuda_peaks(calls, models)
    out["parameters"] = {
        name: {"trainable": m.count(trainable=True), "frozen": m.count(trainable=False)} for name, m in models.items()
    }
    return out


PEAK_TFLOPS = {"H200": 790.0}  # dense bf16 TFLOP/s to compute model FLOP utilisation against (the figure)
GPU_STEP_TARGET_MS = 180.0  # lvdm's default layout, SD 1.5 at 16x512 on an H200


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The peak TFLOP/s that MFU is measured against: ``override``, else a known GPU's, else None."""
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def run(size: Size, device: torch.device, *, warmup: int, repeats: int, peak: float | None = None) -> dict[str, Any]:
    """The section: FLOPs and memory estimates always, timings where the size may run on this device.

    ``peak``: TFLOP/s for the MFU column (default: the GPU's from :data:`PEAK_TFLOPS`; none on CPU).
    """
    result: dict[str, Any] = {"flops": count_flops(size), "memory_estimate_gib": estimate_memory(size)}
    if size.needs_cuda and device.type != "cuda":
        result["skipped_timing"] = f"--size {size.name} is timed only on a CUDA GPU; this run has none"
    else:
        result.update(measure(size, device, warmup=warmup, repeats=repeats))
        result["peak_tflops"] = peak_tflops(device, peak)
        result["gpu_step_target"] = size.name == "sd15" and device.type == "cuda"
    result["tables"] = tables(result)
    result["targets"] = targets(result)
    result["notes"] = _notes(size, result)
    return result


def _notes(size: Size, result: dict[str, Any]) -> list[str]:
    params = {name: p["trainable"] / 1e6 for name, p in result.get("parameters", {}).items() if p["trainable"]}
    timed = f"; {result['precision']}" if "precision" in result else ""
    notes = [
        f"{size.describe()}{timed}; every model with a frozen base and SDPA; "
        "forward = inference forward (no autograd); step = forward + MSE + backward + fused AdamW step",
        "FLOPs counted on the meta device (SDPA included; recomputation included under checkpointing); "
        "TFLOP/s = FLOPs / median time; time/FLOP vs motion compares like modes; it/s = 1 / median step time",
        "est. peak = fake-tensor estimate of the step as a GPU trains it (bf16 frozen base, fp32 temporal weights "
        "and AdamW state), see section 2",
    ]
    if result.get("peak_tflops"):
        notes.append(f"MFU = TFLOP/s / {result['peak_tflops']:g} TFLOP/s peak (model FLOPs, recomputation included)")
    if params:
        notes.append("trainable parameters: " + ", ".join(f"{LABELS[n]} {v:.2f}M" for n, v in params.items()))
    if "skipped_timing" in result:
        notes.append(f"not timed: {result['skipped_timing']}")
    return notes


# --------------------------------------------------------------------------------------------------- derived figures
def _median(result: dict[str, Any], key: str) -> float | None:
    timing = result.get("timing", {}).get(key)
    return timing["median_s"] if timing else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _per_flop(result: dict[str, Any], name: str, mode: str) -> float | None:
    return _ratio(_median(result, f"{name}:{mode}"), result["flops"][name][mode])


def _row(result: dict[str, Any], name: str, mode: str, floor: float | None) -> dict[str, Any]:
    seconds, flops = _median(result, f"{name}:{mode}"), result["flops"][name][mode]
    versus_motion = (
        None if name == "image" else _ratio(_per_flop(result, name, mode), _per_flop(result, "motion", mode))
    )
    row = {
        "model": LABELS[name],
        "mode": mode,
        "median s": seconds,
        "spread": result.get("timing", {}).get(f"{name}:{mode}", {}).get("spread"),
        "GFLOP": flops / 1e9,
        "TFLOP/s": _ratio(flops / 1e12, seconds),
        "it/s": _ratio(1.0, seconds) if mode != "forward" else None,
        "time/FLOP vs motion": versus_motion,
        "time vs floor": _ratio(seconds, floor),
        "est. peak GiB (bf16)": result["memory_estimate_gib"].get(name, {}).get(mode),
        "GPU peak GiB": result.get("cuda_peak_gib", {}).get(f"{name}:{mode}"),
    }
    if result.get("peak_tflops"):
        row["MFU"] = _ratio(row["TFLOP/s"], result["peak_tflops"])
    return row


def tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The section's markdown tables (figures and ratios)."""
    floor = _median(result, "image:forward")
    rows = [_row(result, "image", "forward", floor)]
    rows += [_row(result, name, mode, floor) for name in VIDEO_MODELS for mode in MODES]
    ratios = [
        {
            "model": LABELS[name],
            "ratio": f"{mode} / forward",
            "time": _ratio(_median(result, f"{name}:{mode}"), _median(result, f"{name}:forward")),
            "FLOPs": result["flops"][name][mode] / result["flops"][name]["forward"],
        }
        for name in VIDEO_MODELS
        for mode in ("step", "step+ckpt")
    ]
    return [
        {"title": "Training step and forward", "rows": rows},
        {"title": "Training step / forward of the same model (frozen base)", "rows": ratios},
    ]


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for this section: time per FLOP vs diffusers, and step / forward."""
    out = []
    for name in ("lvdm", "lvdm-attn", "lvdm-ad"):
        if name not in result["flops"]:
            continue
        for mode in MODES:
            value = _ratio(_per_flop(result, name, mode), _per_flop(result, "motion", mode))
            out.append(target(f"time/FLOP {name} / motion, {mode}", value, 1.10))
        flops = result["flops"][name]
        step_time = _ratio(_median(result, f"{name}:step"), _median(result, f"{name}:forward"))
        out.append(target(f"{name} step / forward, time", step_time, 2.6))
        out.append(target(f"{name} step / forward, FLOPs", flops["step"] / flops["forward"], 2.6))
    if result.get("gpu_step_target"):
        for mode in MODES[1:]:
            seconds = _median(result, f"lvdm:{mode}")
            ms = seconds * 1e3 if seconds is not None else None
            out.append(target(f"lvdm {mode} at SD 1.5 16x512, ms", ms, GPU_STEP_TARGET_MS))
    return out
