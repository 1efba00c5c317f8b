"""What a :class:`~lvdm.pipeline.VideoPipeline` is built from: the base with its LoRAs, the temporal module, the
image conditioning and the video decoder, loaded and checked, and the sources its sidecars record."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lvdm.errors import CheckpointError, ConfigError, check_flag
from lvdm.sampling_settings import temporal_defaults

if TYPE_CHECKING:
    from lvdm.image_sampling import ImageConditioning

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class PipelineParts:
    """The loaded models and what the pipeline records about them."""

    base: Any  # a lvdm.models.BaseModel
    video: Any | None  # a VideoUNet on base.unet, or None (image mode)
    defaults: dict[str, Any] | None  # the module's sampling defaults (lvdm.sampling_settings.temporal_defaults)
    image: ImageConditioning  # the image part, the image encoder and its folder
    decoder: Any | None  # a temporal VAE decoder, or None
    sources: dict[str, Any]  # the from_pretrained arguments, as sidecars record them


def load_parts(
    base: str | os.PathLike,
    *,
    temporal: str | os.PathLike | None = None,
    base_config: str | os.PathLike | None = None,
    loras: Sequence[Any] = (),
    spatial_weights: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    image_adapter: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    decoder: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> PipelineParts:
    """Load everything :meth:`VideoPipeline.from_pretrained <lvdm.pipeline.VideoPipeline.from_pretrained>` takes
    (its arguments, as it documents them)."""
    check_flag("allow_pickle", allow_pickle)  # "no" is truthy: it loaded the pickles it was meant to refuse
    torch_dtype = as_dtype(dtype)
    if device is not None and (problem := device_problem(device)):
        raise ConfigError(f"device {device}: {problem}")
    paths = {"base": base, "temporal": temporal, "base_config": base_config, "spatial_weights": spatial_weights,
             "image_adapter": image_adapter, "image_encoder": image_encoder, "decoder": decoder}  # fmt: skip
    for name, value in paths.items():
        if not isinstance(value, (str, os.PathLike)) and (value is not None or name == "base"):
            raise ConfigError(f"{name}: expected a path (str or os.PathLike), got {value!r}")
        if value is not None and not os.fspath(value):  # Path("") is the working folder
            raise ConfigError(f"{name}: an empty path; give a file or folder, or leave {name} out")
    if not Path(base).exists():  # before the slow imports: a typo fails at once
        raise CheckpointError(f"base model {base} does not exist (expected a diffusers folder or a checkpoint file)")
    defaults = temporal_defaults(temporal) if temporal is not None else None  # a bad module fails before loading
    from lvdm.models import LoraSpec, VideoUNet, load_base

    specs = LoraSpec.parse_all(loras)
    if defaults and defaults.get("distilled_lora"):  # a distilled student: its LoRA beside it, unless given
        own = student_lora(temporal)  # (a sidecar's model.loras lists it: a replay fused it twice)
        if not any(_same_path(spec.path, own) for spec in specs):
            specs.append(LoraSpec.parse(own))
    with warnings.catch_warnings():  # diffusers >= 0.36 renamed the torch_dtype that load_base passes
        warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
        model = load_base(
            base, base_config=base_config, loras=specs, allow_pickle=allow_pickle,
            spatial_weights=spatial_weights, dtype=torch_dtype, device=device,
        )  # fmt: skip
    refuse_upscaler(model)
    video = None
    if temporal is not None:
        video = VideoUNet.from_temporal_file(model.unet, temporal, allow_pickle=allow_pickle)
    from lvdm.image_sampling import load_image_conditioning

    image = load_image_conditioning(
        model, video, image_adapter, image_encoder, allow_pickle=allow_pickle, device=device
    )
    video_decoder = None
    if decoder is not None:
        from lvdm.models.temporal_vae import load_video_decoder

        video_decoder = load_video_decoder(decoder, vae=model.vae, allow_pickle=allow_pickle, dtype=torch_dtype)
        video_decoder.to(model.vae.device)
    sources = {
        "base": absolute(base),
        "temporal": absolute(temporal),
        "base_config": absolute(base_config),
        "loras": [spec.text(absolute(spec.path)) for spec in specs],
        "spatial_weights": absolute(spatial_weights),
        "allow_pickle": bool(allow_pickle),  # numpy's bool_ is no JSON: the sidecar failed after the video
        "image_adapter": absolute(image_adapter),
        "image_encoder": absolute(image_encoder),
        "decoder": absolute(decoder),
        "dtype": dtype_name(next(model.unet.parameters()).dtype),
    }
    return PipelineParts(model, video, defaults, image, video_decoder, sources)


def refuse_upscaler(base: Any) -> None:
    """An x4 upscaler is no text-to-image base: loaded as one, sampling stopped at its first step on diffusers'
    ValueError (the UNet's class label, the noise level, not given), a traceback from ``sample.py``."""
    if getattr(base, "is_upscaler", False):
        raise ConfigError(
            f"{base.source} is an x4 upscaler (a StableDiffusionUpscalePipeline folder): it upscales videos and does "
            "not sample them from text; give it to lvdm.UpscalePipeline (python -m lvdm.upscale VIDEO), or to "
            "sample.py --upscaler beside a text-to-image --base"
        )


def _same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def student_lora(module: str | os.PathLike) -> Path:
    """The spatial LoRA that goes with a distilled module: ``<stem>_spatial_lora.safetensors`` beside it (what
    ``python -m lvdm.export`` writes), else the run folder's ``spatial_lora.safetensors``."""
    from lvdm.errors import TemporalModuleError

    module = Path(module)
    candidates = [module.with_name(f"{module.stem}_spatial_lora.safetensors")]
    candidates.append(module.parent / "spatial_lora.safetensors")
    for path in candidates:
        if path.is_file():
            return path
    raise TemporalModuleError(
        f"temporal module {module} is a distilled student trained with a spatial LoRA, and its LoRA is not beside it "
        f"({' or '.join(str(p) for p in candidates)}); copy the two files together"
    )


def device_problem(device: str | torch.device) -> str | None:
    """Why models cannot be put on ``device`` here (a typo, no CUDA in this build, no such GPU), or ``None``."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return "not a device; use cpu, cuda, cuda:N or mps"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"there are only {torch.cuda.device_count()} CUDA device(s)"
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    elif parsed.type not in ("cpu", "cuda", "mps"):
        return f"device type {parsed.type!r} is not supported; use cpu, cuda or mps"
    return None


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` by its name in :data:`DTYPES`, or one of their torch dtypes: another (``torch.float64``) sampled,
    and its sidecar, which records it as ``"torch.float64"``, could not be replayed (``torch.int8`` blamed the base's
    folder)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, torch.dtype) or dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(DTYPES)} (or torch.float32, float16, bfloat16), got "
                          f"{dtype!r}")  # fmt: skip
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}.get(dtype, str(dtype))


def absolute(path: str | os.PathLike | None) -> str | None:
    return None if path is None else str(Path(path).absolute())
