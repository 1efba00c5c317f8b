"""What every benchmark section shares: the sizes, the dtype policy, the inputs, the step and the timer.

The models compared are in :mod:`benchmarks.models`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.models import SD15_UNET, SMALL_UNET, VideoModel, tiny_unet_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    """One benchmark setting: the spatial UNet, the video shape and the sampling and memory settings.

    Attributes:
        name: the ``--size`` value.
        unet: a function returning the spatial UNet's ``UNet2DConditionModel`` config.
        frames, latent, batch: the video batch ``(batch, 4, frames, latent, latent)``.
        text_tokens: text embedding length ``n``.
        steps, guidance: sampling steps and CFG weight.
        memory_unet, memory_points: the UNet config and ``(frames, latent)`` shapes of the memory estimates.
        components: ``"tiny"`` (lvdm.testing's VAE and text encoder), ``"small"`` or ``"sd15"``.
        data_setting: ``"smoke"`` or ``"default"``, the :mod:`benchmarks.data_sampling` setting.
        needs_cuda: time only on a GPU (FLOPs and memory estimates run anywhere).
    """

    name: str
    unet: Callable[[], dict[str, Any]]
    frames: int
    latent: int
    batch: int = 1
    text_tokens: int = 77
    steps: int = 4
    guidance: float = 7.5
    memory_unet: Callable[[], dict[str, Any]] = lambda: dict(SD15_UNET)
    memory_points: tuple[tuple[int, int], ...] = ((16, 32), (16, 64))
    components: str = "small"
    data_setting: str = "default"
    needs_cuda: bool = False

    def describe(self) -> str:
        cfg = self.unet()
        return (
            f"UNet block_out_channels={list(cfg['block_out_channels'])}, batch {self.batch} x {self.frames} frames "
            f"at {self.latent}x{self.latent} latents"
        )


SIZES: dict[str, Size] = {
    "tiny": Size(
        "tiny",
        tiny_unet_config,
        frames=4,
        latent=8,
        text_tokens=7,
        steps=2,
        memory_unet=tiny_unet_config,
        memory_points=((4, 8),),
        components="tiny",
        data_setting="smoke",
    ),  # fmt: skip
    "small": Size("small", lambda: dict(SMALL_UNET), frames=8, latent=32, steps=2),
    "sd15": Size("sd15", lambda: dict(SD15_UNET), frames=16, latent=64, steps=25, components="sd15", needs_cuda=True),
}


# --------------------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """How weights and compute are typed: ``fp32`` (CPU), or ``bf16`` frozen base + fp32 trainable + bf16 autocast."""

    name: str
    base_dtype: torch.dtype
    autocast: bool

    @classmethod
    def for_device(cls, device: torch.device) -> Precision:
        if device.type == "cuda":
            return cls("bf16-mixed", torch.bfloat16, True)
        return cls("fp32", torch.float32, False)

    def apply(self, model: VideoModel, device: torch.device | str) -> VideoModel:
        """Move ``model`` to ``device``: frozen weights in ``base_dtype``, trainable ones in fp32 (as the trainer)."""
        model.module.to(device)
        for param in model.module.parameters():
            param.data = param.data.float() if param.requires_grad else param.data.to(self.base_dtype)
        return model

    def context(self, device_type: str) -> contextlib.AbstractContextManager:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16)


def video_inputs(
    size: Size, text_dim: int, device: torch.device | str, *, frames: int | None = None, latent: int | None = None
) -> dict[str, torch.Tensor]:
    """Seeded ``x (b, 4, f, h, w)``, ``t (b,)``, ``text (b, n, d)`` and a regression ``target`` like ``x``."""
    frames, latent = frames or size.frames, latent or size.latent
    gen = torch.Generator().manual_seed(0)
    shape = (size.batch, 4, frames, latent, latent)
    out = {
        "x": torch.randn(shape, generator=gen),
        "t": torch.randint(100, 900, (size.batch,), generator=gen),
        "text": torch.randn(size.batch, size.text_tokens, text_dim, generator=gen),
        "target": torch.randn(shape, generator=gen),
    }
    return {key: value.to(device) for key, value in out.items()}


def make_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, fused (the trainer's choice on CUDA; on CPU the same for every model)."""
    return torch.optim.AdamW(params, lr=1e-5, fused=True)


def temporal_step(
    model: Any, inputs: dict[str, torch.Tensor], extra: Callable[[], dict[str, torch.Tensor]]
) -> Callable[[], None]:
    """One step of a video model's temporal layers on ``inputs`` (``x``, ``t``, ``text``, ``target``) with the
    keyword inputs ``extra()`` makes: forward, MSE loss, backward, optimizer step, gradients released."""
    optimizer = make_optimizer(list(model.temporal_parameters()))

    def step() -> None:
        out = model(inputs["x"], inputs["t"], inputs["text"], **extra())
        nn.functional.mse_loss(out.float(), inputs["target"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_step(
    model: VideoModel, optimizer: torch.optim.Optimizer, inputs: dict[str, torch.Tensor], precision: Precision
) -> Callable[[], None]:
    """One step: forward, MSE loss, backward, optimizer step, gradients released."""

    def step() -> None:
        with precision.context(inputs["x"].device.type):
            out = model.forward(inputs["x"], inputs["t"], inputs["text"])
        loss = nn.functional.mse_loss(out.float(), inputs["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_forward(
    model: VideoModel, inputs: dict[str, torch.Tensor], precision: Precision
) -> Callable[[], torch.Tensor]:
    """One forward pass without autograd (as sampling runs it)."""

    @torch.no_grad()
    def forward() -> torch.Tensor:
        with precision.context(inputs["x"].device.type):
            return model.forward(inputs["x"], inputs["t"], inputs["text"])

    return forward


# --------------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds of each repeat; median and spread ((max - min) / median)."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        return (max(self.samples) - min(self.samples)) / self.median if self.median else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": min(self.samples), "max_s": max(self.samples),
                "spread": self.spread, "samples_s": self.samples}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    calls: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int, device: torch.device
) -> dict[str, Timing]:
    """Time every call ``repeats`` times after ``warmup`` untimed calls each.

    The calls are interleaved (one round runs each once), so load from other processes on a shared machine
    falls on all of them alike and the ratios between them stay meaningful.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(repeats, 1)):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(values) for name, values in samples.items()}


@contextlib.contextmanager
def threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count afterwards (some callees set their own)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------- environment
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and the library versions, for the results file."""
    import diffusers
    import transformers

    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "device": str(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "lvdm_commit": f"{commit}{'+dirty' if dirty else ''}" if commit else None,
    }
