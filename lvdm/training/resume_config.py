"""What may change when a run resumes: settings that change parameter shapes or what a step means are refused,
every other change is a one-line note."""

from __future__ import annotations

from typing import Any

from lvdm.errors import ConfigError
from lvdm.training.run_lock import notice

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
    "train.target",
)


def compare_on_resume(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Error on changed shape-affecting keys; a one-line note for every other change (lr, max_steps, ...).

    A key the checkpoint lacks is a setting added to lvdm since it was written; its default keeps the old
    behaviour, so it is not a change."""
    changed = {key: (a, b) for key, (a, b) in _flat_pairs(saved, current).items() if a != b and a is not _ABSENT}
    fixed = {key: pair for key, pair in changed.items() if key in FIXED_ON_RESUME}
    if fixed:
        lines = [f"{key}: {a!r} in the checkpoint, {b!r} now" for key, (a, b) in sorted(fixed.items())]
        raise ConfigError("cannot resume with changed settings:\n  " + "\n  ".join(lines))
    for key, (a, b) in sorted(changed.items()):
        if not key.startswith("train.resume"):
            notice(f"resuming with {key} changed: {a!r} -> {b!r}")


_ABSENT = object()  # a key the saved config does not have


def _flat_pairs(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    pairs = {}
    for key in set(saved) | set(current):
        a, b = saved.get(key, _ABSENT), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            pairs.update(_flat_pairs(a, b, f"{prefix}{key}."))
        else:
            pairs[f"{prefix}{key}"] = (a, b)
    return pairs
