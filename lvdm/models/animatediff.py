"""AnimateDiff motion modules in and out of lvdm.

    python -m lvdm.convert motion-module mm_sd_v15_v2.ckpt mm_v2.safetensors --allow-pickle
    python -m lvdm.convert to-diffusers outputs/run/temporal.safetensors my_motion_adapter/

**In** (:func:`import_motion_module`): an original AnimateDiff checkpoint (v1, v2 with its mid-block module, v3;
``.safetensors``, or ``.ckpt`` with ``allow_pickle``) or a diffusers ``MotionAdapter`` folder becomes an lvdm
temporal module of the ``animatediff`` layout (:class:`~lvdm.models.layout.TemporalLayout`). Original keys are
renamed by diffusers' own converter; the adapter's shape is read from the tensors (or the folder's config) and
checked against the ``MotionAdapter`` diffusers builds from it, so a missing or unexpected key is named. The one
thing no tensor records, the head count, is 8 in every released module (``heads=``). ``sample.py --temporal``,
``VideoPipeline.from_pretrained(temporal=)`` and ``model.temporal_init`` take such files directly
(:func:`open_temporal_module`).

**Out** (:func:`export_motion_adapter`): an lvdm module of the ``animatediff`` layout, fine-tuned or not, becomes a
``MotionAdapter`` folder that diffusers' ``AnimateDiffPipeline`` and the tools built on it load.

The family: a module of SD's block widths is an SD 1.5 module (AnimateDiff ships no SD2 ones), so it loads onto
SD 1.x bases only; SDXL modules are refused. A module of other widths (the tests' tiny ones) takes the family of
the base it is imported for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lvdm.errors import CheckpointError, ConfigError, TemporalModuleError
from lvdm.fileio import atomic_folder, read_json
from lvdm.models.layout import TemporalLayout
from lvdm.models.loading import PICKLE_SUFFIXES, check_weights_file, load_pickled_weights, tensor_problem
from lvdm.models.temporal_file import (
    TemporalModule,
    base_shape,
    first_names,
    read_temporal_file,
    tensor_diff,
    write_temporal_file,
)
from lvdm.outputs import output_folder

SD_WIDTHS = (320, 640, 1280, 1280)
SDXL_WIDTHS = (320, 640, 1280)
ADAPTER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_MAX_CONFIG_BYTES = 1 << 20
_MAX_TABLE = 4096  # frames in a motion module's position table: AnimateDiff's are 24 or 32
_ADAPTER_KEYS = (
    "block_out_channels", "motion_layers_per_block", "motion_transformer_layers_per_block",
    "motion_mid_block_layers_per_block", "motion_transformer_layers_per_mid_block", "motion_num_attention_heads",
    "motion_norm_num_groups", "motion_max_seq_length", "use_motion_mid_block", "conv_in_channels",
)  # fmt: skip


@dataclass
class MotionWeights:
    """A motion module as diffusers' ``MotionAdapter`` holds it: tensors by its keys (no frame table), its config."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    format: str  # "animatediff" (original keys) or "diffusers"


# --------------------------------------------------------------------- recognising one
def is_motion_module(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an AnimateDiff motion module rather than an lvdm temporal module: a ``MotionAdapter``
    folder, a pickle checkpoint (only motion modules come as those here), or a safetensors file of motion-module
    keys without lvdm's metadata. Reads headers only."""
    path = Path(path)
    if path.is_dir():
        return (path / "config.json").is_file()
    if path.suffix in PICKLE_SUFFIXES:
        return path.is_file()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        with safe_open(path, framework="pt") as handle:
            metadata, keys = handle.metadata() or {}, list(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return False  # the lvdm reader names the problem
    return metadata.get("format") != "lvdm.temporal" and any(".motion_modules." in key for key in keys)


def open_temporal_module(
    path: str | os.PathLike, base: Any, *, allow_pickle: bool = False, heads: int = 8
) -> TemporalModule:
    """An lvdm temporal module file, or an AnimateDiff motion module imported for ``base`` (a UNet config) in
    memory: what every command taking ``--temporal`` reads."""
    if is_motion_module(path):
        return import_motion_module(path, base=base, allow_pickle=allow_pickle, heads=heads)
    return read_temporal_file(path)


# --------------------------------------------------------------------- import
def import_motion_module(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    base: Any = None,
    allow_pickle: bool = False,
    heads: int = 8,
    exclusive: bool = False,
) -> TemporalModule:
    """Read an AnimateDiff motion module and return it as an lvdm temporal module (written to ``out`` if given).

    Args:
        path: an original AnimateDiff checkpoint (``.safetensors``; ``.ckpt``/``.pt`` with ``allow_pickle``), a
            diffusers-layout motion-module file, or a ``MotionAdapter`` folder.
        out: the ``.safetensors`` file to write, or ``None`` (in memory only).
        base: the UNet the module is for: a UNet config (``unet.config``), a diffusers folder (its
            ``unet/config.json``) or ``None`` for SD 1.5 (modules of SD's widths only).
        heads: attention heads per module where the file does not say (original checkpoints): 8 in AnimateDiff.
        exclusive: an ``out`` that exists by the time it is written is an error, left as it is (else replaced).
    """
    path = Path(path)
    weights = read_motion_weights(path, allow_pickle=allow_pickle, heads=heads)
    config = weights.config
    widths = tuple(config["block_out_channels"])
    unet_config = _base_config(base, widths, path)
    video = _meta_model(unet_config, _layout(config, path))
    if tuple(video.unet.config.block_out_channels) != widths:
        raise TemporalModuleError(
            f"motion module {path} has block widths {list(widths)}, the base has "
            f"{list(video.unet.config.block_out_channels)}: it was made for another kind of base"
        )
    tensors = _to_lvdm_keys(weights.tensors, video, path)
    family = "sd1" if widths == SD_WIDTHS else video.family
    source = {"format": weights.format, "file": path.name, "adapter": config}
    if out is not None:
        written = write_temporal_file(video, out, tensors=tensors, source=source, family=family, exclusive=exclusive)
        return read_temporal_file(written)
    return TemporalModule(
        path=path, tensors=tensors, layout=video.layout, sites=[site.to_dict() for site in video.sites],
        family=family, base=base_shape(video.unet.config), training_config=None, source=source,
    )  # fmt: skip


def read_motion_weights(path: Path, *, allow_pickle: bool = False, heads: int = 8) -> MotionWeights:
    """The tensors of a motion module in ``MotionAdapter`` keys and its ``MotionAdapter`` config, checked against
    the adapter diffusers builds from that config (missing and unexpected keys named)."""
    if path.is_dir():
        config, tensors = _read_adapter_folder(path, allow_pickle)
        fmt = "diffusers"
    else:
        tensors = _read_state_dict(path, allow_pickle)
        fmt = "animatediff" if any(".temporal_transformer." in key for key in tensors) else "diffusers"
        max_frames = _table_length(tensors, path)
        if fmt == "animatediff":
            from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

            tensors = convert_animatediff_checkpoint_to_diffusers(tensors)
        config = _infer_config(tensors, path, heads=heads, max_frames=max_frames)
    tensors = {key: value for key, value in tensors.items() if not key.endswith("pos_embed.pe")}
    if tuple(config.get("block_out_channels", ())) == SDXL_WIDTHS:
        raise TemporalModuleError(
            f"motion module {path} is an SDXL module (block widths {list(SDXL_WIDTHS)}); lvdm imports SD 1.5 "
            "modules (AnimateDiff v1, v2, v3)"
        )
    heads = config.get("motion_num_attention_heads", 8)
    if uneven := [width for width in config.get("block_out_channels", ()) if width % heads]:
        source = "its config.json's motion_num_attention_heads" if fmt == "diffusers" and path.is_dir() else "--heads"
        raise TemporalModuleError(
            f"motion module {path}: {heads} attention heads do not divide its widths {uneven} ({source})"
        )
    _check_against_diffusers(tensors, config, path)
    return MotionWeights(tensors, config, fmt)


def _read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    check_weights_file(path, allow_pickle=allow_pickle, what="motion module")
    if path.suffix != ".safetensors":
        tensors = load_pickled_weights(path, "motion module", TemporalModuleError)
    else:
        try:
            tensors = load_file(path)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise TemporalModuleError(f"motion module {path} cannot be read (truncated or corrupt?): {exc}") from exc
    if isinstance(tensors, dict) and isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise TemporalModuleError(f"motion module {path} does not hold a state dict of tensors")
    return {str(key): value for key, value in tensors.items()}


def _read_adapter_folder(path: Path, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_file = path / "config.json"
    try:  # a regular file of bounded size: a FIFO there blocked the read forever
        raw = read_json(config_file, _MAX_CONFIG_BYTES)
    except OSError as exc:
        raise TemporalModuleError(
            f"{path} is not a motion module file nor a MotionAdapter folder: its config.json cannot be read "
            f"({exc.strerror or exc})"
        ) from exc
    except ValueError as exc:  # not UTF-8 JSON, or nested too deep
        raise TemporalModuleError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("_class_name") != "MotionAdapter":
        name = raw.get("_class_name") if isinstance(raw, dict) else None
        raise TemporalModuleError(f"{path} is not a diffusers MotionAdapter folder (its config names {name!r})")
    config = {key: raw[key] for key in _ADAPTER_KEYS if key in raw}
    widths = config.get("block_out_channels")
    if not (isinstance(widths, list) and widths and all(type(w) is int and w > 0 for w in widths)):
        raise TemporalModuleError(f"{config_file}: block_out_channels={widths!r}, expected a list of widths")
    config["motion_num_attention_heads"] = _one_head_count(config.get("motion_num_attention_heads", 8), path)
    weights = next((path / name for name in ADAPTER_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise TemporalModuleError(f"MotionAdapter folder {path} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return config, _read_state_dict(weights, allow_pickle)


def _one_head_count(heads: Any, path: Path) -> int:
    if isinstance(heads, list) and heads and len(set(heads)) == 1:
        heads = heads[0]
    if type(heads) is not int or heads < 1:
        raise TemporalModuleError(f"{path}: motion_num_attention_heads={heads!r}; lvdm takes one head count >= 1")
    return heads


def _table_length(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """The frame table's length (``pos_encoder.pe`` / ``pos_embed.pe``, ``(1, length, channels)``); 32 without one.
    The table must be AnimateDiff's sinusoid, which lvdm computes rather than loads."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    tables = {key: value for key, value in tensors.items() if key.endswith((".pos_encoder.pe", ".pos_embed.pe"))}
    lengths = {value.shape[1] for value in tables.values() if value.ndim == 3}
    if len(lengths) > 1 or len(lengths) != bool(tables):
        raise TemporalModuleError(f"motion module {path}: its frame-position tables differ in shape")
    for key, value in tables.items():
        length, width = value.shape[1:] if value.ndim == 3 else (0, 0)
        if not (0 < length <= _MAX_TABLE and width > 0 and width % 2 == 0):  # the sinusoid below is length x width
            raise TemporalModuleError(
                f"motion module {path}: {key} has shape {tuple(value.shape)}, not a frame table (1, frames <= "
                f"{_MAX_TABLE}, even channels)"
            )
        expected = SinusoidalPositionalEmbedding(width, length).pe
        if (value.float() - expected).abs().max() > 1e-3:
            raise TemporalModuleError(
                f"motion module {path}: {key} is not AnimateDiff's sinusoidal frame table, which lvdm computes "
                "rather than loads"
            )
    return lengths.pop() if lengths else 32


def _infer_config(tensors: dict[str, torch.Tensor], path: Path, *, heads: int, max_frames: int) -> dict[str, Any]:
    """The ``MotionAdapter`` config of diffusers-layout tensors: widths, layers and depths from the keys."""
    layers: dict[str, set[int]] = {}
    depths: dict[str, set[int]] = {}
    for key in tensors:
        parts = key.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        rest = parts[block.count(".") + 1 :]
        if len(rest) < 2 or rest[0] != "motion_modules" or not rest[1].isdigit():
            continue  # named as unexpected by the check against diffusers' adapter
        layers.setdefault(block, set()).add(int(rest[1]))
        if len(rest) > 3 and rest[2] == "transformer_blocks" and rest[3].isdigit():
            depths.setdefault(block, set()).add(int(rest[3]))
    downs = sorted(int(b.split(".")[1]) for b in layers if b.startswith("down_blocks."))
    if not downs or downs != list(range(len(downs))):
        raise TemporalModuleError(f"{path} is not a motion module: no down_blocks.<i>.motion_modules keys in order")
    try:
        widths = [tensors[f"down_blocks.{i}.motion_modules.0.norm.weight"].shape[0] for i in downs]
    except KeyError as exc:
        raise TemporalModuleError(f"motion module {path} lacks {exc.args[0]}") from exc
    per_block = [len(layers[f"down_blocks.{i}"]) for i in downs]
    block_depths = {len(d) for name, d in depths.items() if name != "mid_block"}
    if len(block_depths) != 1:
        raise TemporalModuleError(f"motion module {path}: its modules differ in depth ({sorted(block_depths)})")
    mid = "mid_block" in layers
    return {
        "block_out_channels": widths,
        "motion_layers_per_block": per_block[0] if len(set(per_block)) == 1 else per_block,
        "motion_transformer_layers_per_block": block_depths.pop(),
        "motion_mid_block_layers_per_block": len(layers["mid_block"]) if mid else 1,
        "motion_transformer_layers_per_mid_block": len(depths.get("mid_block", ())) if mid else 1,
        "motion_num_attention_heads": heads,
        "motion_max_seq_length": max_frames,
        "use_motion_mid_block": mid,
    }


def _check_against_diffusers(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
    """The adapter diffusers builds from ``config`` must have exactly these keys and shapes."""
    from diffusers import MotionAdapter

    if config.get("conv_in_channels"):
        raise TemporalModuleError(
            f"motion module {path} has its own conv_in ({config['conv_in_channels']} input channels, a PIA/"
            "SparseCtrl-style adapter): lvdm imports motion modules only"
        )
    try:
        with torch.device("meta"):
            expected = {
                key: value.shape
                for key, value in MotionAdapter(**config).state_dict().items()
                if not key.endswith("pos_embed.pe")
            }
    except (TypeError, ValueError) as exc:
        raise TemporalModuleError(f"motion module {path}: diffusers cannot build its adapter ({exc})") from exc
    shared = sorted(expected.keys() & tensors.keys())
    found = {
        "unexpected keys": sorted(tensors.keys() - expected.keys()),
        "missing keys": sorted(expected.keys() - tensors.keys()),
        "wrong shapes": [
            f"{key} {tuple(tensors[key].shape)} (expected {tuple(expected[key])})"
            for key in shared
            if tensors[key].shape != expected[key]
        ],
    }
    problems = [f"{what}: {first_names(names)}" for what, names in found.items() if names]
    if problems:
        raise TemporalModuleError(f"motion module {path} is not a consistent motion module: {'; '.join(problems)}")
    for key, value in tensors.items():
        if problem := tensor_problem(value):
            raise TemporalModuleError(f"motion module {path}: tensor {key!r} {problem}")


def _layout(config: dict[str, Any], path: Path) -> TemporalLayout:
    mid_depth = config["motion_transformer_layers_per_mid_block"]
    if config["use_motion_mid_block"] and mid_depth != config["motion_transformer_layers_per_block"]:
        raise TemporalModuleError(
            f"motion module {path}: its mid-block modules are {mid_depth} layers deep, the others are not"
        )
    try:
        return TemporalLayout(
            conv=False,
            attention_depth=config["motion_transformer_layers_per_block"],
            attention_heads=config["motion_num_attention_heads"],
            style="animatediff",
            mid_block=bool(config["use_motion_mid_block"]),
            max_frames=config["motion_max_seq_length"],
        )
    except (TypeError, ValueError) as exc:
        raise TemporalModuleError(f"motion module {path}: {exc}") from exc


def _base_config(base: Any, widths: tuple[int, ...], path: Path) -> Any:
    """The UNet config the module is imported for: given, read from a diffusers folder, or SD 1.5's."""
    if base is None:
        if widths != SD_WIDTHS:
            raise TemporalModuleError(
                f"motion module {path} has block widths {list(widths)}, not SD 1.5's: name the base it is for (--base)"
            )
        return {"cross_attention_dim": 768}  # UNet2DConditionModel's defaults are SD 1.5's otherwise
    if isinstance(base, (str, os.PathLike)):
        folder = Path(base)
        config_file = folder / "unet" / "config.json" if (folder / "unet").is_dir() else folder / "config.json"
        try:
            config = read_json(config_file, _MAX_CONFIG_BYTES)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"base {base}: cannot read a UNet config from {config_file} ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"base {base}: {config_file} is not a UNet config (a JSON mapping)")
        return config
    return base


def _meta_model(unet_config: Any, layout: TemporalLayout) -> Any:
    """The video model of ``layout`` on a UNet of ``unet_config``, on the meta device: shapes and names only."""
    from diffusers import UNet2DConditionModel

    from lvdm.models.video_unet import VideoUNet

    config = {key: value for key, value in dict(unet_config).items() if not key.startswith("_")}
    try:
        with torch.device("meta"):
            return VideoUNet.from_unet2d(UNet2DConditionModel.from_config(config), layout)
    except (TypeError, ValueError) as exc:
        raise TemporalModuleError(f"the motion modules do not fit this base: {exc}") from exc


# --------------------------------------------------------------------- keys: MotionAdapter <-> lvdm
def _block_sites(video: Any) -> dict[str, list[str]]:
    """Each UNet block's motion sites, in layer order (``down_blocks.0`` -> ``[down_blocks.0.attentions.0, ...]``)."""
    blocks: dict[str, list[str]] = {}
    for site in video.sites:
        blocks.setdefault(site.name.rsplit(".", 2)[0], []).append(site.name)
    return blocks


def _to_lvdm_keys(tensors: dict[str, torch.Tensor], video: Any, path: Path) -> dict[str, torch.Tensor]:
    """``down_blocks.0.motion_modules.1.<rest>`` -> ``down_blocks.0.<site of layer 1>.temporal.<rest>``."""
    blocks, out, extra = _block_sites(video), {}, []
    for key, value in tensors.items():
        head, _, rest = key.partition(".motion_modules.")
        index, _, rest = rest.partition(".")
        sites = blocks.get(head, [])
        if int(index) >= len(sites):
            extra.append(key)
            continue
        out[f"{sites[int(index)]}.temporal.{rest}"] = value
    if extra:
        raise TemporalModuleError(
            f"motion module {path} has motion modules where this base has no layer: {first_names(extra)}"
        )
    problems = tensor_diff(out, dict(video.named_temporal_parameters()))
    if problems:
        raise TemporalModuleError(f"motion module {path} does not fit this base: " + "; ".join(problems))
    return out


def to_adapter_keys(tensors: dict[str, torch.Tensor], sites: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The inverse of the import's renaming: lvdm's site keys -> ``MotionAdapter`` keys."""
    index: dict[str, str] = {}
    counts: dict[str, int] = {}
    for site in sites:
        block = site["name"].rsplit(".", 2)[0]
        index[site["name"]] = f"{block}.motion_modules.{counts.setdefault(block, 0)}"
        counts[block] += 1
    out = {}
    for key, value in tensors.items():
        site, _, rest = key.partition(".temporal.")
        out[f"{index[site]}.{rest}"] = value
    return out


# --------------------------------------------------------------------- export
def export_motion_adapter(module: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an lvdm temporal module of the ``animatediff`` layout as a diffusers ``MotionAdapter`` folder.

    The folder is written beside ``out_dir`` and renamed into place, so a failure leaves nothing half-written; an
    existing ``out_dir`` that is not empty is refused (lvdm does not write into folders it did not make).
    """
    from diffusers import MotionAdapter

    out_dir = output_folder(out_dir)  # "" was the working folder: ". exists and is not an empty folder"
    source = read_temporal_file(module)
    layout = source.layout
    if layout.style != "animatediff":
        raise TemporalModuleError(
            f"temporal module {module} has the {layout.style!r} layout; only modules of the animatediff layout "
            "(model.layout: animatediff, or an imported motion module) have a MotionAdapter form"
        )
    if source.parts:
        raise TemporalModuleError(
            f"temporal module {module} has parts a MotionAdapter cannot hold ({sorted(source.parts)}): diffusers' "
            "AnimateDiff takes motion modules only"
        )
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        raise ConfigError(  # an output that exists: a usage error, as with every command's existing output
            f"{out_dir} exists and is not an empty folder (or is a link); choose a new folder"
        )
    config = _adapter_config(source)
    with torch.device("meta"):
        expected = MotionAdapter(**config).state_dict().keys()
    tensors = to_adapter_keys(source.tensors, source.sites)
    missing = sorted(key for key in expected - tensors.keys() if not key.endswith("pos_embed.pe"))
    if missing or tensors.keys() - expected:
        raise TemporalModuleError(
            f"temporal module {module} does not map onto a MotionAdapter: missing {first_names(missing)}, unexpected "
            f"{first_names(sorted(tensors.keys() - expected))}"
        )
    adapter = MotionAdapter(**config)
    adapter.load_state_dict(tensors, strict=False)  # the frame tables are the adapter's own sinusoid
    with atomic_folder(out_dir) as temp:
        adapter.save_pretrained(temp, safe_serialization=True)
    return out_dir


def _adapter_config(module: TemporalModule) -> dict[str, Any]:
    base, layout = module.base, module.layout
    if "block_out_channels" not in base or "layers_per_block" not in base:
        raise TemporalModuleError(f"temporal module {module.path}: its metadata does not record the base's shape")
    mid_sites = sum(1 for site in module.sites if site["name"].startswith("mid_block."))
    return {
        "block_out_channels": tuple(base["block_out_channels"]),
        "motion_layers_per_block": base["layers_per_block"],
        "motion_transformer_layers_per_block": layout.attention_depth,
        "motion_mid_block_layers_per_block": max(mid_sites, 1),
        "motion_transformer_layers_per_mid_block": layout.attention_depth,
        "motion_num_attention_heads": layout.attention_heads,
        "motion_norm_num_groups": base.get("norm_num_groups", 32),
        "motion_max_seq_length": layout.max_frames,
        "use_motion_mid_block": layout.mid_block and mid_sites > 0,
    }
