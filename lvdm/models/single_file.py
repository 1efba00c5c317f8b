"""Single-file SD checkpoints (the original layout, as community fine-tunes ship): loaded by diffusers'
``from_single_file``, with ``base_config`` giving the architecture offline and any VAE or text encoder the file
leaves out (a "UNet only" checkpoint). Called by :func:`lvdm.models.loading.load_base`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lvdm.errors import CheckpointError
from lvdm.models.loading import check_weights_file, one_line


def load_single_file(
    path: Path, *, base_config: str | os.PathLike | None, allow_pickle: bool, dtype: torch.dtype | None
) -> Any:
    """diffusers' ``StableDiffusionPipeline`` of the single file ``path``; a part it holds no weights of is taken from
    ``base_config`` (with a warning), and without ``base_config`` is one line naming it."""
    from diffusers import StableDiffusionPipeline

    keys = check_weights_file(path, allow_pickle=allow_pickle, what="checkpoint")  # a safetensors' names, as checked
    keys = pickled_keys(path) if keys is None else keys
    kwargs: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False, "dtype": dtype}
    if keys is not None and not any(key.startswith(_UNET) for key in keys):  # it was diffusers' Python advice
        raise CheckpointError(
            f"checkpoint {path} holds no UNet weights (no {_UNET}* tensors): give a whole Stable Diffusion "
            "checkpoint, or a diffusers folder"
        )
    missing = _missing_parts(keys)
    if base_config is not None:
        base_config = Path(base_config)
        if not (base_config / "model_index.json").is_file():
            raise CheckpointError(f"base_config {base_config} is not a diffusers folder (no model_index.json)")
        kwargs.update(config=str(base_config), local_files_only=True)
        kwargs.update(_parts_from(base_config, missing, allow_pickle=allow_pickle, dtype=dtype))
    elif missing:
        names = " and ".join(_PARTS[name][0] for name in missing)
        raise CheckpointError(
            f"checkpoint {path} holds no weights of {names}; pass base_config=<diffusers folder of the same "
            "architecture> (--base-config) to take them from there"
        )
    try:
        with warnings.catch_warnings():  # torch warns of a pickle's protocol before it refuses it: lvdm's one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as exc:  # diffusers raises many kinds here; all mean "this file did not load"
        hint = "" if base_config else "; pass base_config=<diffusers folder of the same architecture> (--base-config)"
        text = one_line(exc)
        if "Cannot copy out of meta tensor" in text:  # torch's advice to use Module.to_empty(), for a missing weight
            text = "weights of its UNet or VAE are missing from the file (a pruned or damaged checkpoint?)"
        raise CheckpointError(f"could not load checkpoint {path}: {text}{hint}") from exc


_UNET = "model.diffusion_model."  # where a single file's UNet is, as diffusers reads it (LDM_UNET_KEY)
# the parts of SD a single file may leave out (a "UNet only" checkpoint), and the key prefixes that hold them
_PARTS = {
    "vae": ("the VAE", ("first_stage_model.",)),
    "text_encoder": ("the text encoder", ("cond_stage_model.", "conditioner.")),
}


def _missing_parts(keys: list[str] | None) -> list[str]:
    """The parts (``vae``, ``text_encoder``) a single file of tensors ``keys`` holds no weights of; none known
    missing where its keys cannot be listed without loading it (``None``)."""
    if keys is None:
        return []
    return [name for name, (_, prefixes) in _PARTS.items() if not any(key.startswith(prefixes) for key in keys)]


def pickled_keys(path: Path) -> list[str] | None:
    """The tensor names in the pickle ``path`` (allowed by check_weights_file), read as diffusers reads it
    (``weights_only``, nested ``state_dict``s unwrapped) but memory-mapped, so no tensor is read. ``None`` for a
    pickle in torch's legacy format or holding more than tensors: diffusers then decides as it loads."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # legacy format (no mmap), objects weights_only refuses, ...: not listed here
        return None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return [key for key in state if isinstance(key, str)] if isinstance(state, dict) else None


def _parts_from(folder: Path, names: list[str], *, allow_pickle: bool, dtype: torch.dtype | None) -> dict[str, Any]:
    """The ``names`` parts loaded from the diffusers ``folder``, with a warning for each."""
    from diffusers import AutoencoderKL

    parts = {}
    for name in names:
        try:
            if name == "text_encoder":  # float32 first: transformers keeps an fp16 folder's dtype
                entry = ["transformers", "CLIPTextModel"]
                part = text_encoder_from(folder, entry, allow_pickle=allow_pickle, dtype=torch.float32)
            else:
                part = AutoencoderKL.from_pretrained(
                    folder, subfolder=name, use_safetensors=None if allow_pickle else True, local_files_only=True,
                    dtype=torch.float32,
                )  # fmt: skip
        except Exception as exc:  # OSError (no weights there), SafetensorError, ...
            what = f"{_PARTS[name][0]} from base_config {folder}"
            raise CheckpointError(f"could not load {what}: {one_line(exc)}") from exc
        parts[name] = part if dtype is None else part.to(dtype)
        warnings.warn(f"the checkpoint holds no weights of {_PARTS[name][0]}: taken from base_config {folder}",
                      stacklevel=5)  # fmt: skip
    return parts


def text_encoder_from(folder: Path, entry: Any, *, allow_pickle: bool, dtype: torch.dtype) -> Any:
    """The text encoder of the diffusers ``folder`` where ``entry`` (its ``model_index.json`` entry) names a
    transformers model class, else ``None``. A weight its files lack is an error naming it: transformers initialised
    it at random, printing only a table, where diffusers' UNet and VAE refuse."""
    import transformers
    from transformers.utils import logging as transformers_logging

    known = isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" and isinstance(entry[1], str)
    model_class = getattr(transformers, entry[1], None) if known else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        return None  # diffusers loads it, or names what is wrong
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its table of the missing weights: lvdm says it in one line
    try:
        model, info = model_class.from_pretrained(
            folder, subfolder="text_encoder", use_safetensors=None if allow_pickle else True, dtype=dtype,
            local_files_only=True, output_loading_info=True,
        )  # fmt: skip
    finally:
        transformers_logging.set_verbosity(level)
    if missing := sorted(info["missing_keys"]):
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{folder / 'text_encoder'} lacks weights of its text encoder: {', '.join(missing[:3])}"
                              f"{more} (saved from a text encoder of another shape?)")  # fmt: skip
    return model
