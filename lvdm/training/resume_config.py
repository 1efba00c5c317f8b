"""What may change when a run resumes: settings that change parameter shapes or what a step means are refused,
every other change is a one-line note; and the folders a resumed run writes into again must be writable."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from lvdm.errors import CheckpointError, ConfigError
from lvdm.training.checkpoint import check_writable
from lvdm.training.checkpoint_files import CHECKPOINT_NAME
from lvdm.training.run_lock import notice

# Config keys that change parameter shapes, the set of trained layers or what a step means: resuming with them
# changed is an error (the layers that model.context, model.fps_conditioning, model.image_conditioning and
# train.decoder_layers add or train were a note, then "its trained weights do not match" once the model had loaded).
FIXED_ON_RESUME = (
    "model.base",
    "model.loras",
    "model.layout",
    "model.attention_depth",
    "model.attention_heads",
    "model.conv_kernel",
    "model.spatial_lora_rank",
    "model.unfreeze",
    "model.context",
    "model.fps_conditioning",
    "model.image_conditioning",
    "data.num_frames",
    "data.resolution",
    "train.batch_size",
    "train.gradient_accumulation",
    "train.seed",
    "train.target",
    "train.decoder_layers",
)


def compare_on_resume(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Error on changed shape-affecting keys; a one-line note for every other change (lr, max_steps, ...).

    A key the checkpoint lacks is a setting added to lvdm since it was written; its default keeps the old
    behaviour, so it is not a change."""
    changed = {key: (a, b) for key, (a, b) in _flat_pairs(saved, current).items() if a != b and a is not _ABSENT}
    fixed = {key: pair for key, pair in changed.items() if key in FIXED_ON_RESUME}
    rounds = _distill_schedule_changes(saved, current)
    ema = changed.get("train.ema_decay")
    if ema is not None and ema[0] is None:  # refused after the model loaded: "lacks ema: cannot resume exactly"
        fixed["train.ema_decay"] = ema
    if fixed or rounds:
        lines = [f"{key}: {a!r} in the checkpoint, {b!r} now" for key, (a, b) in sorted(fixed.items())] + rounds
        raise ConfigError("cannot resume with changed settings:\n  " + "\n  ".join(lines))
    for key, (a, b) in sorted(changed.items()):
        if not key.startswith("train.resume"):
            notice(f"resuming with {key} changed: {a!r} -> {b!r}")


_ABSENT = object()  # a key the saved config does not have


def _distill_schedule_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changes the rounds of a distill run: ``train.distill_from``, ``train.distill_to`` and the rounds' length
    (``train.distill_round_steps``, or ``train.max_steps / rounds`` where it is null). A round's teacher is taken,
    and the optimizer's state cleared, at its first step: resumed past a boundary that the checkpoint's schedule did
    not have, the round ran with the last round's teacher and optimizer state, without a word."""
    from lvdm.errors import LvdmError
    from lvdm.training.distill import round_schedule

    def schedule(config: dict[str, Any]) -> tuple[Any, Any, int] | None:
        train = config.get("train") if isinstance(config.get("train"), dict) else {}
        if train.get("target") != "distill":
            return None
        try:
            _, length = round_schedule(
                train["distill_from"], train["distill_to"], train.get("distill_round_steps"), train["max_steps"]
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError, LvdmError):
            return None
        return train["distill_from"], train["distill_to"], length

    before, now = schedule(saved), schedule(current)
    if before is None or now is None or before == now:
        return []
    lines = [
        f"train.{key}: {a!r} in the checkpoint, {b!r} now (other rounds: distil the teacher again, in another "
        "output_dir)"
        for key, a, b in zip(("distill_from", "distill_to"), before[:2], now[:2], strict=True)
        if a != b
    ]
    if before[2] != now[2]:
        lines.append(
            f"the distillation rounds' length: {before[2]} steps in the checkpoint, {now[2]} now (to change "
            f"train.max_steps, set train.distill_round_steps={before[2]}: the last round takes the steps past the "
            "others')"
        )
    return lines


def _flat_pairs(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    pairs = {}
    for key in set(saved) | set(current):
        a, b = saved.get(key, _ABSENT), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            pairs.update(_flat_pairs(a, b, f"{prefix}{key}."))
        else:
            pairs[f"{prefix}{key}"] = (a, b)
    return pairs


# ---------------------------------------------------------------------------------------------- written again

SAMPLE_DIR = re.compile(r"step-(\d{8})")  # samples/step-00000010: a validation's samples
_STEP_FOLDERS = {  # folder, its step folders' names, the setting that spaces its steps
    "checkpoints": (CHECKPOINT_NAME, "checkpoint_every"),
    "samples": (SAMPLE_DIR, "validate_every"),
}


def written_again(output_dir: Path, step: int, train: dict[str, Any]) -> list[Path]:
    """The existing ``checkpoints/checkpoint-N`` and ``samples/step-N`` folders (not links) a run resumed at ``step``
    writes into again: it saves and validates at each ``checkpoint_every`` / ``validate_every`` step it trains and
    at its last one, ``max_steps``; resumed at (or past) that, it saves and validates its own step again."""
    last, found = train["max_steps"], []
    for name, (pattern, every) in _STEP_FOLDERS.items():
        folder, names = output_dir / name, []
        with contextlib.suppress(OSError):  # none, or not listed: the check of the folder itself names it
            names = sorted(os.listdir(folder)) if not folder.is_symlink() else []
        for match in filter(None, map(pattern.fullmatch, names)):
            k, path = int(match[1]), folder / match[0]
            again = k == step if step >= last else step < k <= last and (k % train[every] == 0 or k == last)
            if again and path.is_dir() and not path.is_symlink():
                found.append(path)
    return found


def check_written_again(folders: list[Path], step: int) -> None:
    """:func:`~lvdm.training.checkpoint.check_writable` on each of the ``folders`` a run resumed at ``step`` writes
    into again; every one that fails is named in one :class:`CheckpointError`."""
    failed = []
    for folder in folders:
        try:
            check_writable(folder)
        except CheckpointError as exc:
            failed.append(str(exc))
    if failed:
        them = "it" if len(failed) == 1 else "them"
        raise CheckpointError(f"{'; '.join(failed)} (a run resumed at step {step} writes into {them} again: make "
                              f"{them} writable)")  # fmt: skip
