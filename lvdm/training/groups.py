"""Which parameters train besides the temporal layers: a LoRA on the spatial attention, and named spatial blocks.

Both are off by default (the Video LDM recipe trains only the temporal layers). Their names are
given and exported in plain diffusers UNet naming (the ``.spatial.`` of lvdm's wrappers removed),
so the exported files load onto any SD base: the LoRA through ``load_base(loras=...)``, the
unfrozen blocks through ``load_base(spatial_weights=...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lvdm.errors import ConfigError
from lvdm.fileio import atomic_path, atomic_paths, save_safetensors
from lvdm.models.loading import SPATIAL_WEIGHTS

LORA_ADAPTER = "lvdm_spatial"
# the spatial transformers' attention projections (the temporal attention blocks are excluded)
SPATIAL_ATTENTION = r".*\.spatial\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"


def plain_name(name: str) -> str:
    """A wrapped UNet's parameter name in plain diffusers naming."""
    return name.replace(".spatial.", ".").replace(".base_layer.", ".")


def add_spatial_lora(video: Any, rank: int, alpha: float | None) -> dict[str, torch.nn.Parameter]:
    """Attach a peft LoRA of ``rank`` to every spatial attention projection; returns its parameters."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=SPATIAL_ATTENTION, init_lora_weights=True)
    video.unet.add_adapter(config, adapter_name=LORA_ADAPTER)
    for param in video.temporal_parameters():  # peft marks only its adapter trainable; the temporal layers train too
        param.requires_grad_(True)
    return {name: p for name, p in video.unet.named_parameters() if f"lora_A.{LORA_ADAPTER}" in name or
            f"lora_B.{LORA_ADAPTER}" in name}  # fmt: skip


def unfreeze_blocks(video: Any, prefixes: list[str]) -> dict[str, torch.nn.Parameter]:
    """Make the base parameters under each diffusers name prefix (``up_blocks.3``, ``mid_block``) trainable."""
    base = {id(p) for p in video.base_parameters()}
    chosen = {}
    for prefix in prefixes:
        found = {
            name: p
            for name, p in video.unet.named_parameters()
            if id(p) in base and "lora_" not in name and plain_name(name).startswith(prefix.rstrip(".") + ".")
        }
        if not found:
            raise ConfigError(
                f"model.unfreeze: no spatial parameters under {prefix!r} (diffusers UNet names, e.g. up_blocks.3)"
            )
        chosen.update(found)
    for param in chosen.values():
        param.requires_grad_(True)
    return chosen


def module_file_paths(module: Path, spatial_lora_rank: Any, unfreeze: Any, *, prefix: str) -> dict[str, Path]:
    """The files a module exports, by kind: ``module``, and beside it ``lora`` and ``weights`` where a spatial LoRA
    or unfrozen blocks trained (``<prefix>spatial_lora.safetensors``: a run folder's, or ``OUT_``'s)."""
    trained = {"lora": spatial_lora_rank, "weights": unfreeze}
    return {"module": module} | {
        kind: module.with_name(f"{prefix}spatial_{kind}.safetensors") for kind, on in trained.items() if on
    }


def write_module_files(
    video: Any, trainable: dict[str, Any], paths: dict[str, Path], training_config: dict[str, Any], *,
    exclusive: bool = False,
) -> list[Path]:  # fmt: skip
    """The temporal module (``paths["module"]``, with ``training_config``) and the spatial parts trained with it
    (``"lora"``, ``"weights"``), all or nothing (:func:`lvdm.fileio.atomic_paths`): a module beside another
    step's LoRA (a kill between the two writes) sampled without a word."""
    with atomic_paths(list(paths.values()), exclusive=exclusive, keep_suffix=True) as temps:
        temp = dict(zip(paths, temps, strict=True))
        video.save_temporal(temp.pop("module"), training_config=training_config)
        if "lora" in temp:
            export_spatial_lora(video, temp["lora"])
        if "weights" in temp:
            temporal = dict(video.named_temporal_parameters())
            unfrozen = {n: p for n, p in trainable.items() if "lora_" not in n and n not in temporal}
            export_spatial_weights(unfrozen, temp["weights"])
    return list(paths.values())


def export_spatial_lora(video: Any, path: Path, *, exclusive: bool = False) -> Path:
    """Write the spatial LoRA in diffusers/peft format (``unet.<name>.lora_A.weight``), loadable by ``load_base``;
    atomically (diffusers' writer wrote in place), ``exclusive`` as :func:`lvdm.fileio.atomic_path` says.

    Each layer's scale (``model.spatial_lora_alpha`` / rank) is folded into its ``lora_B``: the file carries no
    alpha, and a loader (diffusers, kohya's tools, ComfyUI) then takes scale 1. Written unscaled, a LoRA trained at
    alpha 8, rank 2 loaded at a quarter of its strength."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    scales = {plain_name(name): module.scaling[LORA_ADAPTER] for name, module in video.unet.named_modules()
              if LORA_ADAPTER in (getattr(module, "scaling", None) or {})}  # fmt: skip
    state = {plain_name(name): tensor.detach().float().cpu()
             for name, tensor in get_peft_model_state_dict(video.unet, adapter_name=LORA_ADAPTER).items()}  # fmt: skip
    state = {name: (tensor * scales[name.removesuffix(".lora_B.weight")] if name.endswith(".lora_B.weight") else
                    tensor).contiguous() for name, tensor in state.items()}  # fmt: skip
    with atomic_path(path, exclusive=exclusive) as temp:
        StableDiffusionPipeline.save_lora_weights(temp.parent, unet_lora_layers=state, weight_name=temp.name)
    return path


def export_spatial_weights(params: dict[str, torch.nn.Parameter], path: Path, *, exclusive: bool = False) -> Path:
    """Write unfrozen spatial weights keyed by plain diffusers UNet names, loadable by ``load_base``."""
    tensors = {plain_name(name): p.detach().float().cpu().contiguous() for name, p in params.items()}
    with atomic_path(path, exclusive=exclusive) as temp:
        save_safetensors(tensors, temp, metadata={"format": SPATIAL_WEIGHTS})
    return path
