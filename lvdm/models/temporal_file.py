"""Temporal module files: only the new layers, as safetensors, with what is needed to check a base.

Layout of a file: tensors keyed as in the 2D UNet (``down_blocks.0.resnets.0.temporal.conv1.weight``,
``...mixer.mix_factor``) and string metadata:

- ``format`` = ``lvdm.temporal``, ``format_version`` = ``1``, ``lvdm_version``;
- ``base_family`` (``sd1``, ``sd2``, ...), ``base`` (JSON: the UNet shape the layers were made for);
- ``layout`` (JSON :class:`~lvdm.models.layout.TemporalLayout`), ``sites`` (JSON list of inserted layers);
- ``parts`` (JSON ``{name: {kind, config}}``: the standalone parts, rebuilt through
  :data:`lvdm.models.parts.PART_KINDS`; absent or ``{}`` when there are none);
- ``training_config`` (JSON, when the file comes from training);
- ``source`` (JSON, when the weights were imported: an AnimateDiff motion module, :mod:`lvdm.models.animatediff`).

A file loads onto any base of the same family and block layout: that is what lets one module
run on every DreamBooth/LoRA checkpoint of its family. Everything is checked before the first
weight is copied, so a refused file leaves the model untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lvdm import __version__
from lvdm.errors import TemporalModuleError
from lvdm.fileio import atomic_path, save_safetensors, unreadable
from lvdm.models.layout import TemporalLayout
from lvdm.models.loading import SPATIAL_WEIGHTS, SPATIAL_WEIGHTS_USE, tensor_problem

if TYPE_CHECKING:
    from lvdm.models.video_unet import VideoUNet

FORMAT = "lvdm.temporal"
FORMAT_VERSION = 1
CHECKSUM_KEY = "tensors_sha256"  # metadata: sha256 of every tensor's name, dtype, shape and bytes (tensors_checksum)
MAX_FRAMES = 4096  # a training config asking for more frames than this is not a real one
MAX_SIDE = 16384


@dataclass
class TemporalModule:
    """The contents of a temporal module file, checked and ready to load."""

    path: Path
    tensors: dict[str, torch.Tensor]
    layout: TemporalLayout
    sites: list[dict[str, Any]]
    family: str
    base: dict[str, Any]
    training_config: dict[str, Any] | None
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, Any] | None = None  # where imported weights came from (an AnimateDiff module)

    def add_parts(self, video: VideoUNet) -> None:
        """Build the file's standalone parts on ``video`` (fresh weights; :meth:`load_into` fills them)."""
        from lvdm.models.parts import build_part

        for name, spec in self.parts.items():
            if name in video.parts:
                continue
            try:
                build_part(video, name, spec["kind"], spec.get("config", {}))
            except (KeyError, TypeError, ValueError) as exc:
                raise TemporalModuleError(f"temporal module {self.path}: cannot rebuild part {name!r}: {exc}") from exc

    def load_into(self, video: VideoUNet) -> None:
        """Copy the weights into ``video`` after checking that family, layout and shapes all fit."""
        self.check_fits(video)
        self._copy_into(video)

    def check_fits(self, video: VideoUNet) -> None:
        """Refuse, naming what differs, a ``video`` that :meth:`load_into` would not fill."""
        problems = self.mismatches(video)
        if problems:
            raise TemporalModuleError(f"temporal module {self.path} does not fit this base: " + "; ".join(problems))

    def warm_start(self, video: VideoUNet) -> list[str]:
        """Copy the weights into ``video``, which may have parts the file lacks (a text-to-video module starting a
        model with context frames): those keep their fresh weights, zero-output until they train. Returns their
        names; everything else must fit as for :meth:`load_into`."""
        new = sorted(set(video.part_specs) - set(self.parts))
        problems = self.mismatches(video, new_parts=new)
        if problems:
            raise TemporalModuleError(f"temporal module {self.path} cannot start this model: " + "; ".join(problems))
        self._copy_into(video)
        return new

    def _copy_into(self, video: VideoUNet) -> None:
        params = dict(video.named_temporal_parameters())
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                params[name].copy_(tensor)

    def mismatches(self, video: VideoUNet, *, new_parts: list[str] = ()) -> list[str]:
        """What differs between this module and ``video`` (empty when it loads); ``new_parts``: parts of ``video``
        the file may lack (their weights are not looked for)."""
        problems = []
        if self.family != video.family:
            problems.append(f"it was made for base family {self.family!r}, this base is {video.family!r}")
        groups = video.unet.config.norm_num_groups  # the temporal GroupNorms take the base's: their weights fit any
        if self.base.get("norm_num_groups", groups) != groups:
            problems.append(f"its GroupNorms have {self.base['norm_num_groups']} groups, this base's {groups}")
        if self.layout != video.layout:  # then every site differs too: not listed
            from lvdm.models.layout import LAYOUTS

            diff = _dict_diff(self.layout.to_dict(), video.layout.to_dict())
            name = next((name for name, layout in LAYOUTS.items() if layout == self.layout), None)
            where = f"model.layout={name} in training, or " if name else ""
            problems.append(f"temporal layout differs ({diff}); use {where}VideoUNet.from_temporal_file in Python")
        else:
            problems += _site_diff(self.sites, [site.to_dict() for site in video.sites])
        here = {name: spec.to_dict() for name, spec in video.part_specs.items() if name not in new_parts}
        if self.parts != here:
            problems.append(f"standalone parts differ: {_dict_diff(self.parts, here)}")
        if not problems:
            # a new part's parameters, wherever they sit (an image part's attention processors inside the UNet too)
            fresh = {id(p) for name in new_parts for p in video.parts[name].parameters()}
            params = {key: p for key, p in video.named_temporal_parameters() if id(p) not in fresh}
            problems += tensor_diff(self.tensors, params)
        return problems


def write_temporal_file(
    video: VideoUNet,
    path: str | os.PathLike,
    *,
    training_config: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    source: dict[str, Any] | None = None,
    family: str | None = None,
    exclusive: bool = False,
) -> Path:
    """Save ``video``'s temporal layers to ``path`` atomically (a temp file, then a rename).

    ``tensors``: the weights to write instead of ``video``'s own (an imported module, whose model was built on the
    meta device for its shape only); ``source``: where the weights came from (JSON metadata ``source``); ``family``:
    the base family they are for, where it is not ``video``'s own (an SD 1.5 motion module); ``exclusive``: a
    ``path`` that appeared meanwhile is an error, not replaced (:func:`lvdm.fileio.atomic_path`).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TemporalModuleError(f"temporal module path must end in .safetensors, got {path}")
    tensors = video.temporal_state_dict() if tensors is None else tensors
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "lvdm_version": __version__,
        "base_family": family or video.family,
        "base": json.dumps(base_shape(video.unet.config)),
        "layout": json.dumps(video.layout.to_dict()),
        "sites": json.dumps([site.to_dict() for site in video.sites]),
        CHECKSUM_KEY: tensors_checksum(tensors),
        "parts": json.dumps({name: spec.to_dict() for name, spec in video.part_specs.items()}),
    }
    if training_config is not None:
        metadata["training_config"] = json.dumps(training_config, default=str)
    if source is not None:
        metadata["source"] = json.dumps(source)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    with atomic_path(path, exclusive=exclusive) as temp:
        save_safetensors(tensors, temp, metadata=metadata)
    return path


def base_shape(config: Any) -> dict[str, Any]:
    """What a module file records of the UNet it was made for (metadata ``base``)."""
    return {
        "in_channels": config.in_channels,
        "block_out_channels": list(config.block_out_channels),
        "cross_attention_dim": config.cross_attention_dim,
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_num_groups,
    }


def read_temporal_file(path: str | os.PathLike) -> TemporalModule:
    """Read and check a temporal module file; every problem is a :class:`TemporalModuleError` naming it."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"  # a folder, a FIFO, a device
        raise TemporalModuleError(f"temporal module {path} {what}")
    metadata = _read_metadata(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise TemporalModuleError(f"temporal module {path} is corrupt or truncated: {exc}") from exc
    for name, tensor in tensors.items():
        if problem := tensor_problem(tensor):
            raise TemporalModuleError(f"temporal module {path}: tensor {name!r} {problem}")
    if CHECKSUM_KEY in metadata and tensors_checksum(tensors) != metadata[CHECKSUM_KEY]:
        raise TemporalModuleError(
            f"temporal module {path} is corrupt: its tensors do not match the checksum in its metadata"
        )
    try:
        return TemporalModule(
            path=path,
            tensors=tensors,
            layout=TemporalLayout.from_dict(json.loads(metadata["layout"])),
            sites=json.loads(metadata["sites"]),
            family=metadata["base_family"],
            base=json.loads(metadata.get("base", "{}")),
            training_config=json.loads(metadata["training_config"]) if "training_config" in metadata else None,
            parts=json.loads(metadata.get("parts", "{}")),
            source=json.loads(metadata["source"]) if "source" in metadata else None,
        )
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise TemporalModuleError(f"temporal module {path} has broken metadata: {exc}") from exc


def read_temporal_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw string metadata of a temporal module file (for defaults such as frames and fps)."""
    return _read_metadata(Path(path))


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        if reason := unreadable(path):
            raise TemporalModuleError(f"temporal module {path} cannot be read: {reason}") from None
        raise TemporalModuleError(f"temporal module {path} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") == SPATIAL_WEIGHTS:
        raise TemporalModuleError(f"{path} holds spatial UNet weights (model.unfreeze), not a temporal module: give "
                                  f"it as {SPATIAL_WEIGHTS_USE}")  # fmt: skip
    if metadata.get("format") != FORMAT:
        raise TemporalModuleError(
            f"{path} is not an lvdm temporal module (its metadata has no format={FORMAT!r}); "
            "load base checkpoints and LoRAs with load_base instead"
        )
    version = str(metadata.get("format_version", "0") or "0")
    if not version.isdigit():
        raise TemporalModuleError(f"temporal module {path}: format_version {version[:40]!r} is not a whole number")
    found = int(version)
    if found > FORMAT_VERSION:
        raise TemporalModuleError(
            f"temporal module {path} has format version {found}; this lvdm reads up to {FORMAT_VERSION}: upgrade lvdm"
        )
    problem = _metadata_problem(metadata)
    if problem:
        raise TemporalModuleError(f"temporal module {path} has broken metadata: {problem}")
    return metadata


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (stored as ``tensors_sha256``)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{str(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _metadata_problem(metadata: dict[str, str]) -> str | None:
    """What is wrong with the JSON entries of a temporal module's metadata (their shape, absurd values)."""
    try:
        sites = json.loads(metadata.get("sites", "[]"))
        parts = json.loads(metadata.get("parts", "{}"))
        training = json.loads(metadata.get("training_config", "{}"))
    except (ValueError, RecursionError) as exc:
        return f"an entry is not valid JSON ({exc})"
    if not isinstance(sites, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in sites):
        return "'sites' must be a list of objects, each with a 'name'"
    if not isinstance(parts, dict) or not all(isinstance(p, dict) for p in parts.values()):
        return "'parts' must be an object of objects"
    if not isinstance(training, dict):
        return f"'training_config' must be an object, got {type(training).__name__}"
    return _training_problem(training.get("data"))


def _training_problem(data: Any) -> str | None:
    """Frame count, size and rate in ``training_config.data`` (used as sampling defaults) must be plausible."""
    if data is None:
        return None
    if not isinstance(data, dict):
        return "'training_config.data' must be an object"
    frames, fps, size = data.get("num_frames"), data.get("target_fps"), data.get("resolution")
    if frames is not None and (type(frames) is not int or not 1 <= frames <= MAX_FRAMES):
        return f"training_config.data.num_frames = {frames!r}; expected a whole number in [1, {MAX_FRAMES}]"
    rates = fps if isinstance(fps, list) and len(fps) == 2 else [fps]  # a rate or a [low, high] range of rates
    if fps is not None and not (all(_number(v) and 0 < v <= 1000 for v in rates) and rates[0] <= rates[-1]):
        return (
            f"training_config.data.target_fps = {fps!r}; expected a number in (0, 1000] or a range [low, high] of them"
        )
    sides = [size] if type(size) is int else size if isinstance(size, list) else None
    if size is not None and not (sides and all(type(v) is int and 1 <= v <= MAX_SIDE for v in sides)):
        return f"training_config.data.resolution = {size!r}; expected sizes in [1, {MAX_SIDE}]"
    return None


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _site_diff(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[str]:
    saved_by_name = {site["name"]: site for site in saved}
    current_by_name = {site["name"]: site for site in current}
    problems = []
    missing = [name for name in current_by_name if name not in saved_by_name]
    extra = [name for name in saved_by_name if name not in current_by_name]
    if missing:
        problems.append(f"the base has temporal sites the module lacks: {first_names(missing)}")
    if extra:
        problems.append(f"the module has temporal sites the base lacks: {first_names(extra)}")
    for name in saved_by_name.keys() & current_by_name.keys():
        a, b = saved_by_name[name], current_by_name[name]
        if a != b:
            problems.append(f"{name}: module {_dict_diff(a, b)}")
    return problems


def tensor_diff(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``tensors`` (from a file) from loading into ``params``: missing and unexpected names, wrong
    shapes; empty when they fit."""
    problems = []
    missing = sorted(params.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - params.keys())
    if missing:
        problems.append(f"missing tensors {first_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {first_names(unexpected)}")
    for name in sorted(tensors.keys() & params.keys()):
        if tensors[name].shape != params[name].shape:
            problems.append(
                f"{name}: shape {tuple(tensors[name].shape)} in the file, {tuple(params[name].shape)} here"
            )
    return problems


def _dict_diff(saved: dict[str, Any], current: dict[str, Any]) -> str:
    keys = sorted(set(saved) | set(current))
    return ", ".join(
        f"{k}={saved.get(k)!r} vs {current.get(k)!r} here" for k in keys if saved.get(k) != current.get(k)
    )


def first_names(names: list[str], n: int = 5) -> str:
    """The first ``n`` of ``names``, comma-separated, with how many more there are: ``"a, b and 3 more"``."""
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
