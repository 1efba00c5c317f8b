"""Loading a Stable Diffusion base: a diffusers folder, a single-file checkpoint, plus LoRAs.

Everything goes through diffusers' own loaders (``from_pretrained``, ``from_single_file``,
``load_lora_weights``, which convert kohya/A1111 and diffusers/peft LoRA formats); what is
written here is the policy around them:

- safetensors only, unless the caller passes ``allow_pickle=True`` (then torch's
  ``weights_only`` loader, as diffusers uses it); never a silent fallback to a pickle;
- a corrupt, truncated or non-finite file is a :class:`~lvdm.errors.CheckpointError`
  naming the file (and the tensor, where one is at fault);
- LoRAs are fused into the base weights at their scales, so the result is a plain model that a
  temporal module goes on top of, with no adapter overhead at sampling time.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lvdm.errors import CheckpointError, ConfigError, check_flag
from lvdm.fileio import unreadable
from lvdm.models.family import base_family
from lvdm.models.lora_spec import PICKLE_SUFFIXES, LoraSpec


@dataclass
class BaseModel:
    """The components of a loaded SD base, ready to inflate (``VideoUNet.from_unet2d(base.unet)``)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    source: str
    loras: list[LoraSpec] = field(default_factory=list)
    low_res_scheduler: Any = None  # an x4 upscaler's low-res noise schedule (None for a text-to-image base)
    max_noise_level: int | None = None  # ... and the highest noise level it takes

    @property
    def family(self) -> str:
        return base_family(self.unet.config)

    @property
    def is_upscaler(self) -> bool:
        """An SD x4 upscaler (``StableDiffusionUpscalePipeline``: low-res RGB beside the latents, noise level as
        class label), not a text-to-image base."""
        return self.low_res_scheduler is not None

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")


USABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor_problem(tensor: torch.Tensor) -> str | None:
    """Why a weight read from a file cannot be used, or None: a float type lvdm does not compute in (float8,
    complex), or NaN or infinite values."""
    if tensor.is_complex() or (tensor.is_floating_point() and tensor.dtype not in USABLE_DTYPES):
        return f"has dtype {tensor.dtype} (lvdm reads float32, float16 and bfloat16 weights)"
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        return "holds NaN or infinite values"
    return None


def load_base(
    path: str | os.PathLike,
    *,
    base_config: str | os.PathLike | None = None,
    loras: Any = (),
    allow_pickle: bool = False,
    spatial_weights: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> BaseModel:
    """Load an SD base model and fuse ``loras`` into it.

    Args:
        path: a diffusers folder (``model_index.json``) or a single-file checkpoint
            (``.safetensors``; ``.ckpt`` etc. only with ``allow_pickle``).
        base_config: for single files, a diffusers folder to take the architecture (and
            scheduler, tokenizer) from. Needed offline, and for shapes that are not a standard
            SD1.x/2.x; without it diffusers infers the architecture and fetches its config.
        loras: ``LoraSpec``, ``(path, scale)`` or ``"PATH[:SCALE]"`` items, fused in order (as
            :meth:`LoraSpec.parse_all` takes them).
        allow_pickle: permit pickle-based files (loaded with ``weights_only=True``).
        spatial_weights: a ``.safetensors`` of UNet weights by diffusers name (as training with ``model.unfreeze``
            exports), replacing those weights after the LoRAs are fused; every key must exist with its shape.
        dtype: the dtype the parts are built in (``None``: float32, whatever dtype the weight files hold).
        device: where the UNet, VAE and text encoder go once loaded (``None``: they stay on the CPU).
    """
    check_flag("allow_pickle", allow_pickle)  # "no" is truthy: it loaded the pickle it was meant to refuse
    if not os.fspath(path):  # Path("") is the working folder
        raise ConfigError("base model '': an empty path; expected a diffusers folder or a checkpoint file")
    path = Path(path)
    if base_config is not None and path.is_dir():  # a folder has its own architecture: base_config was ignored
        raise ConfigError(
            f"base_config {base_config} goes with a single-file base; {path} is a diffusers folder, which gives its "
            "own architecture: leave base_config out"
        )
    if not path.exists():
        raise CheckpointError(f"base model {path} does not exist (expected a diffusers folder or a checkpoint file)")
    if fmt := _lvdm_format(path):  # diffusers would look for its config on the Hugging Face Hub
        use = (
            SPATIAL_WEIGHTS_USE if fmt == SPATIAL_WEIGHTS else "the temporal module (--temporal, model.temporal_init)"
        )
        raise CheckpointError(f"base model {path} is an lvdm module file, not a base: give it as {use} and a Stable "
                              "Diffusion checkpoint as the base")  # fmt: skip
    with _no_loading_bars():
        if path.is_dir():
            pipe = _load_folder(path, allow_pickle=allow_pickle, dtype=dtype)
        else:
            from lvdm.models.single_file import load_single_file

            pipe = load_single_file(path, base_config=base_config, allow_pickle=allow_pickle, dtype=dtype)
    _check_unet_kind(pipe, path)
    specs = LoraSpec.parse_all(loras)
    _fuse_loras(pipe, specs, allow_pickle=allow_pickle)
    if spatial_weights is not None:
        _replace_weights(pipe.unet, Path(spatial_weights))
    for name in ("unet", "vae", "text_encoder"):
        _check_finite(getattr(pipe, name), f"{path} ({name})")
    _check_parts(pipe, path)
    base = BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, str(path), specs)
    if hasattr(pipe, "low_res_scheduler"):
        base.low_res_scheduler = pipe.low_res_scheduler
        base.max_noise_level = int(pipe.config.max_noise_level)
    if device is not None:
        for module in (base.unet, base.vae, base.text_encoder):
            module.to(device)
    return base


def load_pickled_weights(path: Path, what: str, error: type[Exception] = CheckpointError) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, quietly (torch warns of a pickle protocol before it
    refuses); a file it refuses or cannot read is one ``error`` line naming ``what`` and why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a refused or foreign pickle, a truncated zip: many kinds
        text = " ".join(str(exc).split())
        if "WeightsUnpickler error:" not in text:
            raise error(
                f"{what} {path} cannot be read (truncated or corrupt?): {text or type(exc).__name__}"
            ) from None
        detail = text.split("WeightsUnpickler error:")[1].split(" Check the documentation")[0].strip()
        raise error(  # torch's advice to load it with weights_only=False is not lvdm's to give
            f"{what} {path} cannot be read: torch.load(weights_only=True) refuses it ({detail}); lvdm never "
            "unpickles code"
        ) from None


def check_weights_file(path: Path, *, allow_pickle: bool, what: str) -> list[str] | None:
    """Refuse pickles without permission and corrupt safetensors, before anything is loaded; the tensor names of a
    safetensors file, as checked (``None`` for a pickle, which is not opened here)."""
    if not path.is_file():
        what_it_is = "is not a regular file" if path.exists() else "does not exist"  # /dev/zero, a FIFO, a folder
        raise CheckpointError(f"{what} {path} {what_it_is}")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{what} {path} is a pickle-based '{path.suffix}' file, which can run code when loaded; "
                "convert it to .safetensors, or pass allow_pickle=True (--allow-pickle) if you trust it"
            )
        return None
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{what} {path}: unknown file type '{path.suffix}' (use .safetensors)")
    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
            for key in keys:
                tensor = handle.get_tensor(key)
                if problem := tensor_problem(tensor):
                    raise CheckpointError(f"{what} {path}: tensor {key!r} {problem}")
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        if reason := unreadable(path):
            raise CheckpointError(f"{what} {path} cannot be read: {reason}") from None
        raise CheckpointError(
            f"{what} {path} is not a readable safetensors file (corrupt or truncated?): {exc}"
        ) from exc
    return keys


def _load_folder(path: Path, *, allow_pickle: bool, dtype: torch.dtype | None) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline

    try:  # os.stat, not Path.is_file: from Python 3.14 that says False for a folder it may not search
        indexed = stat.S_ISREG(os.stat(path / "model_index.json").st_mode)
    except (FileNotFoundError, NotADirectoryError):
        indexed = False
    except OSError as exc:  # the folder cannot be searched (permissions)
        raise CheckpointError(f"could not load the diffusers folder {path}: {exc.strerror or exc}") from None
    if not indexed:
        raise CheckpointError(f"{path} is a folder but not a diffusers model (no model_index.json)")
    from lvdm.models.single_file import text_encoder_from

    upscaler = pipeline_class(path) == "StableDiffusionUpscalePipeline"  # SD's x4 upscaler: no safety checker
    extra = {} if upscaler else {"safety_checker": None, "requires_safety_checker": False}
    try:
        text = text_encoder_from(path, pipeline_class(path, "text_encoder"), allow_pickle=allow_pickle,
                                 dtype=dtype or torch.float32)  # fmt: skip
        extra |= {"text_encoder": text} if text is not None else {}
        return (StableDiffusionUpscalePipeline if upscaler else StableDiffusionPipeline).from_pretrained(
            path,
            use_safetensors=None if allow_pickle else True,
            dtype=dtype or torch.float32,
            local_files_only=True,
            **extra,
        )  # float32 by default: transformers would otherwise build the text encoder in the files' dtype
    except CheckpointError:
        raise
    except Exception as exc:  # OSError, SafetensorError, and with allow_pickle UnpicklingError and torch's errors
        hint = "" if allow_pickle or _denied(exc) else " (only .safetensors weights are read without allow_pickle)"
        raise CheckpointError(f"could not load the diffusers folder {path}{hint}: {one_line(exc)}") from exc


def pipeline_class(path: Path, key: str = "_class_name") -> Any:
    """The pipeline class a diffusers folder names (``model_index.json``; or its entry ``key``), ``None`` when
    unreadable."""
    from lvdm.fileio import read_json

    try:
        index = read_json(path / "model_index.json")
    except (OSError, ValueError):
        return None
    return index.get(key) if isinstance(index, dict) else None


def _fuse_loras(pipe: Any, specs: list[LoraSpec], *, allow_pickle: bool) -> None:
    if not specs:
        return
    names = []
    for i, spec in enumerate(specs):
        check_weights_file(spec.path, allow_pickle=allow_pickle, what="LoRA")
        name = f"lora_{i}"
        try:  # diffusers logs the whole failure (a line per weight) before raising it: lvdm says it in one
            with warnings.catch_warnings(), _diffusers_silent():  # peft warns that a 2nd adapter is a 2nd adapter
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except Exception as exc:  # conversion and peft injection errors alike
            raise CheckpointError(f"could not apply LoRA {spec.path}: {_lora_problem(exc)}") from exc
        _check_applied(pipe, name, spec.path)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[spec.scale for spec in specs])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def _replace_weights(unet: torch.nn.Module, path: Path) -> None:
    """Overwrite named UNet weights from ``path``, after checking every key and shape (all or nothing)."""
    from safetensors.torch import load_file

    check_weights_file(path, allow_pickle=False, what="spatial weights")
    tensors = load_file(path)
    own = unet.state_dict()
    unknown = sorted(k for k in tensors if k not in own)
    wrong = sorted(k for k in tensors if k in own and tensors[k].shape != own[k].shape)
    if unknown or wrong:
        raise CheckpointError(
            f"spatial weights {path} do not fit this base: unknown keys {unknown[:3]}, wrong shapes {wrong[:3]}"
        )
    with torch.no_grad():
        for key, tensor in tensors.items():
            own[key].copy_(tensor)


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """diffusers' per-component loading bar, off while lvdm loads (its own progress is what users watch), and its
    error log too: a folder it cannot load becomes lvdm's one line, which its "An error occurred while trying to
    fetch ..." line preceded."""
    from diffusers.utils import logging as diffusers_logging

    enabled, level = diffusers_logging.is_progress_bar_enabled(), diffusers_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity(max(level, diffusers_logging.CRITICAL))
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)
        if enabled:
            diffusers_logging.enable_progress_bar()


SPATIAL_WEIGHTS = "lvdm.spatial_weights"  # the metadata format of training's unfrozen UNet weights (model.unfreeze)
SPATIAL_WEIGHTS_USE = "the spatial weights (--spatial-weights, spatial_weights=)"


def _lvdm_format(path: Path) -> str | None:
    """The metadata ``format`` of a ``.safetensors`` lvdm wrote (a temporal module, spatial weights: not a base), else
    ``None``."""
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    try:
        with safe_open(path, framework="pt") as handle:
            fmt = str((handle.metadata() or {}).get("format", ""))
    except (SafetensorError, OSError, ValueError):
        return None
    return fmt if fmt.startswith("lvdm") else None


def _check_finite(module: torch.nn.Module, what: str) -> None:
    for name, param in module.named_parameters():
        if param.is_meta:  # a class model_index.json names whose weights are not in the folder: a traceback here
            raise CheckpointError(f"{what}: weight {name!r} was not in its files (does model_index.json name the "
                                  "class those weights are of?)")  # fmt: skip
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise CheckpointError(f"{what}: weight {name!r} holds NaN or infinite values")


MAX_TOKENS = 4096  # a CLIP text encoder reads 77; a tokenizer without its config says about 1e30


def _check_unet_kind(pipe: Any, path: Path) -> None:
    """An SDXL or inpainting UNet loads as SD's pipeline and fails at the first step (diffusers' TypeError, a
    channel mismatch): refused before any LoRA or weights meet it."""
    unet, latents = pipe.unet.config, pipe.vae.config.latent_channels
    if unet.get("addition_embed_type") is not None:  # SDXL: time and pooled-text embeddings SD's pipeline lacks
        raise CheckpointError(f"{path}: its UNet takes {unet.addition_embed_type!r} embeddings (SDXL's kind); lvdm "
                              "takes Stable Diffusion 1.x and 2.x bases")  # fmt: skip
    if not hasattr(pipe, "low_res_scheduler") and unet.in_channels != latents:
        raise CheckpointError(f"{path}: its UNet takes {unet.in_channels} input channels where the VAE gives "
                              f"{latents} (inpainting, depth?); lvdm takes text-to-image bases")  # fmt: skip


def _check_parts(pipe: Any, path: Path) -> None:
    """What diffusers loads without a word and fails on later: a tokenizer without a usable length (its
    tokenizer_config.json missing: an OverflowError at the first prompt), an upscaler's noise-level maximum out
    of its schedule (blamed on the user's noise level)."""
    length = getattr(pipe.tokenizer, "model_max_length", None)
    if type(length) is not int or not 1 <= length <= MAX_TOKENS:
        raise CheckpointError(f"{path}: its tokenizer has no usable model_max_length ({length!r}); is "
                              "tokenizer/tokenizer_config.json missing?")  # fmt: skip
    if hasattr(pipe, "low_res_scheduler"):
        most, steps = pipe.config.get("max_noise_level"), pipe.low_res_scheduler.config.num_train_timesteps
        if type(most) is not int or not 0 < most < steps:
            raise CheckpointError(f"{path}: model_index.json's max_noise_level {most!r} must be a whole number in "
                                  f"1 .. {steps - 1} (its low-res noise schedule's)")  # fmt: skip


_LORA_DOWN = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight")


def _check_applied(pipe: Any, name: str, path: Path) -> None:
    """diffusers drops LoRA layers that name no layer of the base without a word (a LoRA for another base, or one
    with layers of another kind): none applied is an error (diffusers' set_adapters would fail on the missing
    adapter), fewer than the file holds a warning naming how many. A DoRA's magnitudes it drops too, applying the
    rest as a plain LoRA, which gives other frames than the DoRA: refused."""
    modules = [*pipe.unet.modules(), *(pipe.text_encoder.modules() if pipe.text_encoder is not None else [])]
    applied = sum(name in getattr(module, "lora_A", {}) for module in modules)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    else:  # a pickle the caller allowed: its names read memory-mapped (a pickled DoRA was applied as a plain LoRA)
        from lvdm.models.single_file import pickled_keys

        keys = pickled_keys(path)
    in_file = None if keys is None else sum(key.endswith(_LORA_DOWN) for key in keys)
    dora = next((k for k in keys or () if k.endswith(("dora_scale", "lora_magnitude_vector"))), None)
    if dora is not None:
        raise CheckpointError(f"LoRA {path} is a DoRA (it has {dora.rsplit('.', 1)[-1]} weights), which lvdm cannot "
                              "apply")  # fmt: skip
    if applied == 0:
        if in_file == 0:
            raise CheckpointError(f"LoRA {path} holds no LoRA layers")
        layers = f"none of its {in_file} layers matches" if in_file else "no layer of it matches"
        raise CheckpointError(f"LoRA {path}: {layers} a layer of this base (a LoRA for another base, or of another "
                              "kind?)")  # fmt: skip
    if in_file is not None and applied < in_file:
        warnings.warn(
            f"LoRA {path}: {in_file - applied} of its {in_file} layers match no layer of this base and are ignored "
            "(a LoRA for another base?)",
            stacklevel=4,
        )


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^]]*\])\) from checkpoint, "
    r"the shape in current model is torch.Size\((\[[^]]*\])\)"
)


def _lora_problem(exc: BaseException) -> str:
    """peft's size mismatches (one sentence per weight) as a count and the first one; anything else as it is."""
    mismatches = _SIZE_MISMATCH.findall(str(exc))
    if not mismatches:
        return one_line(exc)
    key, theirs, ours = mismatches[0]
    return (
        f"{len(mismatches)} of its weights do not fit this base's layers (e.g. {key}: {theirs} in the file, {ours} "
        "in the base); a LoRA made for another architecture (SD 1.x, SD 2.x, SDXL)?"
    )


@contextmanager
def _diffusers_silent() -> Iterator[None]:
    """Without diffusers' log of a LoRA that failed to load (a line per weight; lvdm raises its own one line); its
    other records, such as a LoRA that loaded with keys left over, still reach the user."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "was unsuccessful with the following error" not in record.getMessage()

    logger = logging.getLogger("diffusers.loaders.peft")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _denied(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what it was raised from is a permission error (then the pickle hint would mislead)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, PermissionError) or re.search(r"\[Errno (1|13)\]", str(exc)):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def one_line(exc: BaseException) -> str:
    """An error's text on one line, cut at 400 characters (diffusers' messages run to pages)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:400] + " ..."
