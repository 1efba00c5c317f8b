"""What every benchmark section shares: the sizes, the models compared, the inputs and the timer.

Three video models are built on copies of one spatial UNet and called the same way,
``forward(x (b, c, f, h, w), t (b,), text (b, n, d)) -> (b, c, f, h, w)``:

- ``lvdm``: :class:`~lvdm.models.VideoUNet` with the default Video LDM layout (temporal attention and 3D convs);
- ``lvdm-attn``: a VideoUNet with temporal attention only (``LAYOUTS["attention_only"]``), the layout closest to
  AnimateDiff's motion modules in size;
- ``motion``: diffusers' ``UNetMotionModel.from_unet2d`` with an AnimateDiff v2 shaped ``MotionAdapter``
  (motion modules after every down/mid/up layer, 8 heads, mid block).

``image`` is the floor: the frozen image UNet's forward over the same ``b * f`` frames. All models have a frozen
base, the same attention backend (PyTorch SDPA) and the same dtype policy.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

# SD 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), random weights.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
# The same architecture at a fifth of the width (37.5M parameters): SD-shaped, CPU-sized.
SMALL_UNET: dict[str, Any] = {**SD15_UNET, "sample_size": 32, "block_out_channels": (64, 128, 256, 256)}
# SD 1.5's VAE (AutoencoderKL defaults but for these) and its CLIP ViT-L/14 text encoder.
SD15_VAE: dict[str, Any] = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
SMALL_VAE: dict[str, Any] = {**SD15_VAE, "block_out_channels": (32, 64, 128, 128), "sample_size": 256}


def _tiny_unet_config() -> dict[str, Any]:
    from lvdm.testing import tiny_unet

    return dict(tiny_unet("sd1").config)


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
        _tiny_unet_config,
        frames=4,
        latent=8,
        text_tokens=7,
        steps=2,
        memory_unet=_tiny_unet_config,
        memory_points=((4, 8),),
        components="tiny",
        data_setting="smoke",
    ),  # fmt: skip
    "small": Size("small", lambda: dict(SMALL_UNET), frames=8, latent=32, steps=4),
    "sd15": Size("sd15", lambda: dict(SD15_UNET), frames=16, latent=64, steps=25, components="sd15", needs_cuda=True),
}


# --------------------------------------------------------------------------------------------------- models
@dataclass
class VideoModel:
    """A model under test, called as ``forward(x (b, c, f, h, w), t (b,), text (b, n, d))``.

    Attributes:
        name: a key of :data:`MODELS` (or ``"image"``).
        module: the nn.Module (its parameters, dtype, device).
        forward: the call.
        set_checkpointing: the model's own gradient checkpointing switch (``None``: none).
        blocks: the down, mid and up blocks (for whole-block checkpointing).
        frame_context: the blocks read lvdm's frame context (a recomputation must re-enter it).
    """

    name: str
    module: nn.Module
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    set_checkpointing: Callable[[bool], Any] | None = None
    blocks: list[nn.Module] = field(default_factory=list)
    frame_context: bool = False

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def count(self, trainable: bool) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad == trainable)


def _unet_blocks(unet: nn.Module) -> list[nn.Module]:
    mid = [unet.mid_block] if unet.mid_block is not None else []
    return [*unet.down_blocks, *mid, *unet.up_blocks]


def _lvdm(layout_name: str) -> Callable[[nn.Module], VideoModel]:
    def build(unet: nn.Module) -> VideoModel:
        from lvdm.models import LAYOUTS, VideoUNet

        video = VideoUNet.from_unet2d(unet, LAYOUTS[layout_name]).freeze_base().set_attention_backend("sdpa")
        name = "lvdm" if layout_name == "videoldm" else "lvdm-attn"
        return VideoModel(
            name, video, video, video.enable_gradient_checkpointing, _unet_blocks(video.unet), frame_context=True
        )

    return build


def motion_adapter(unet_config: Mapping[str, Any]) -> nn.Module:
    """An AnimateDiff v2 shaped ``MotionAdapter`` for a UNet of this config (random weights)."""
    from diffusers import MotionAdapter

    return MotionAdapter(
        block_out_channels=tuple(unet_config["block_out_channels"]),
        motion_layers_per_block=unet_config["layers_per_block"],
        motion_norm_num_groups=unet_config["norm_num_groups"],
        motion_num_attention_heads=8,
        use_motion_mid_block=True,
    )


def _motion(unet: nn.Module) -> VideoModel:
    from diffusers import UNetMotionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = UNetMotionModel.from_unet2d(unet, motion_adapter(unet.config))
    model.freeze_unet2d_params()
    model.set_attn_processor(AttnProcessor2_0())

    def forward(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # UNetMotionModel takes the text once per frame: b n d -> (b f) n d
        return model(x, t, encoder_hidden_states=text.repeat_interleave(x.shape[2], dim=0)).sample

    def checkpointing(enabled: bool) -> None:
        model.enable_gradient_checkpointing() if enabled else model.disable_gradient_checkpointing()

    return VideoModel("motion", model, forward, checkpointing, _unet_blocks(model))


def image_model(unet: nn.Module) -> VideoModel:
    """The floor: the frozen image UNet run on every frame."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())

    def forward(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        # b c f h w -> (b f) c h w
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        out = unet(frames, t.repeat_interleave(f), text.repeat_interleave(f, dim=0), return_dict=False)[0]
        # (b f) c h w -> b c f h w
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    return VideoModel("image", unet, forward)


MODELS: dict[str, Callable[[nn.Module], VideoModel]] = {
    "lvdm": _lvdm("videoldm"),
    "lvdm-attn": _lvdm("attention_only"),
    "motion": _motion,
}
LABELS = {
    "lvdm": "lvdm VideoUNet (videoldm layout)",
    "lvdm-attn": "lvdm VideoUNet (attention_only)",
    "motion": "diffusers UNetMotionModel (AnimateDiff v2)",
    "image": "image UNet, frame by frame (floor)",
}


def spatial_unet(config: Mapping[str, Any], *, seed: int = 0) -> nn.Module:
    """A ``UNet2DConditionModel`` of ``config`` with diffusers' default init from ``seed``."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(dict(config))


def meta_model(build: Callable[[nn.Module], VideoModel], unet_config: Mapping[str, Any]) -> VideoModel:
    """The model ``build`` makes, on the ``meta`` device: shapes only, built in about a second at SD size."""
    with torch.device("meta"):
        return build(spatial_unet(unet_config))


def build_all(unet: nn.Module, names: list[str]) -> dict[str, VideoModel]:
    """Each named model on its own copy of ``unet``; ``"image"`` gets ``unet`` itself."""
    models = {name: MODELS[name](copy.deepcopy(unet)) for name in names if name != "image"}
    if "image" in names:
        models["image"] = image_model(unet)
    return models


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


# --------------------------------------------------------------------------------------------------- components
def components(size: Size, seed: int = 0) -> dict[str, Any]:
    """The frozen parts around the UNet: ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (random weights).

    ``tiny``: lvdm.testing's; ``small``: SD's VAE at a quarter width and a 4-layer CLIP text encoder of SD's width;
    ``sd15``: SD 1.5's VAE and 12-layer CLIP ViT-L/14 text encoder. The tokenizer is lvdm.testing's byte-level one
    (no download) and the scheduler SD's DDIM schedule.
    """
    from lvdm import testing

    if size.components == "tiny":
        return {"vae": testing.tiny_vae(seed), "text_encoder": testing.tiny_text_encoder("sd1", seed),
                "tokenizer": testing.tiny_tokenizer(), "scheduler": testing.tiny_scheduler("sd1")}  # fmt: skip
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = testing.tiny_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
        num_hidden_layers=12 if size.components == "sd15" else 4, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**(SD15_VAE if size.components == "sd15" else SMALL_VAE))
        text_encoder = CLIPTextModel(text_config)
    return {"vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": testing.tiny_scheduler("sd1")}  # fmt: skip


def vae_scale_factor(vae: nn.Module) -> int:
    """Pixels per latent of ``vae`` (8 for SD's)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
