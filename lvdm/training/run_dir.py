"""The run folder: refuse to clobber a run, resolve ``train.resume``, and compare configs on resume.

Layout of ``output_dir``::

    config.yaml            the resolved config of the latest start or resume
    checkpoints/           checkpoint-00000500/ ... (see lvdm.training.checkpoint)
    temporal.safetensors   the temporal module, exported at every checkpoint and at the end
    log.jsonl  tensorboard/  samples/  skipped.jsonl (skipped.rank<N>.jsonl for the other processes)
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from lvdm.errors import CheckpointError, ConfigError, LvdmError
from lvdm.training.checkpoint import check_writable, find_checkpoint, list_checkpoints

RUN_FILES = ("config.yaml", "temporal.safetensors", "log.jsonl", "skipped.jsonl")
RUN_FOLDERS = ("checkpoints", "tensorboard", "samples")

# Config keys that change parameter shapes or what a step means: resuming with them changed is an error.
FIXED_ON_RESUME = (
    "model.base",
    "model.layout",
    "model.attention_depth",
    "model.attention_heads",
    "model.conv_kernel",
    "model.spatial_lora_rank",
    "model.unfreeze",
    "data.num_frames",
    "data.resolution",
    "train.batch_size",
    "train.gradient_accumulation",
    "train.seed",
)


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def prepare_output_dir(output_dir: Path, *, resume: str | None, overwrite: bool) -> None:
    """Check ``output_dir`` is writable; a fresh run into a folder holding a run needs ``resume`` or ``overwrite``.

    Called on the main process only, before any model is loaded.
    """
    check_writable(output_dir)
    if resume is None and _holds_run(output_dir):
        if not overwrite:
            count = len(list_checkpoints(checkpoint_root(output_dir)))
            raise LvdmError(
                f"output_dir {output_dir} already holds a run ({count} checkpoints); "
                "continue it with train.resume=auto, or start over with train.overwrite=true"
            )
        _clear_run(output_dir)


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``train.resume`` names: ``None`` (fresh), ``auto`` (latest, if any), ``latest`` or a path."""
    root = checkpoint_root(output_dir)
    if resume is None:
        return None
    if resume == "auto":
        return find_checkpoint(root, "latest")
    if resume == "latest":
        found = find_checkpoint(root, "latest")
        if found is None:
            raise CheckpointError(f"train.resume=latest: no complete checkpoint in {root}")
        return found
    path = Path(resume)
    if not path.exists() and (root / resume).exists():
        path = root / resume
    if not path.exists():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint")
    return find_checkpoint(root, path)


def _holds_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_FILES + RUN_FOLDERS)


def _clear_run(output_dir: Path) -> None:
    """Remove the previous run's own files (only the names lvdm writes; nothing else in the folder)."""
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    for path in output_dir.glob("skipped.rank*.jsonl"):
        path.unlink()
    for name in RUN_FOLDERS:
        folder = output_dir / name
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)


def compare_on_resume(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Error on changed shape-affecting keys, warn on every other change (lr, max_steps, ...)."""
    changed = {key: (a, b) for key, (a, b) in _flat_pairs(saved, current).items() if a != b}
    fixed = {key: pair for key, pair in changed.items() if key in FIXED_ON_RESUME}
    if fixed:
        lines = [f"{key}: {a!r} in the checkpoint, {b!r} now" for key, (a, b) in sorted(fixed.items())]
        raise ConfigError("cannot resume with changed settings:\n  " + "\n  ".join(lines))
    for key, (a, b) in sorted(changed.items()):
        if not key.startswith("train.resume"):
            warnings.warn(f"resuming with {key} changed: {a!r} -> {b!r}", stacklevel=2)


def _flat_pairs(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    pairs = {}
    for key in set(saved) | set(current):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            pairs.update(_flat_pairs(a, b, f"{prefix}{key}."))
        else:
            pairs[f"{prefix}{key}"] = (a, b)
    return pairs
