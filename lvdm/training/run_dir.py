"""The run folder: what lvdm may write, delete and resume there, and one run at a time.

Layout of ``output_dir``::

    .lvdm-run.json         the run marker: run id, start time, and the names below (what lvdm writes)
    .lvdm-lock             held (flock) by the process running in the folder; names it while it runs
    config.yaml            the resolved config of the latest start or resume
    checkpoints/           checkpoint-00000500/ ... (see lvdm.training.checkpoint)
    temporal.safetensors   the temporal module, exported at every checkpoint and at the end
    decoder/               instead, for train.target=decoder: the video decoder (config.json and its weights)
    log.jsonl  tensorboard/  samples/  skipped.jsonl (skipped.rank<N>.jsonl for the other processes)

What lvdm promises about this folder (see "What lvdm guarantees about your files" in the README):

- it starts a run only in a new or empty folder, or over one of its own runs; a folder holding anything lvdm
  cannot prove it wrote (not in the marker, or not looking like lvdm's: a ``config.yaml`` without lvdm's header,
  a file in a finished checkpoint that its ``COMPLETE`` does not list, a sample not named as lvdm names them) is
  refused, whatever ``train.overwrite`` says, and nothing
  is deleted; ``/``, any file-system root and the home folder are refused outright;
- ``train.overwrite=true`` deletes only lvdm's own entries; a previous run that stopped before its first checkpoint
  is cleared without it (there is nothing to resume);
- one process at a time: rank 0 holds an exclusive lock for the whole run; a second run exits at once naming the
  holder; a lock left by a killed run is reported and taken over;
- ``train.resume=auto`` never starts over while checkpoint material exists: complete checkpoints left under
  temporary names are recovered, a damaged newest checkpoint is named with the newest intact one, and temporary
  folders without any complete checkpoint stop the run with a message.

The lock and the marker's reading and writing are in :mod:`lvdm.training.run_lock`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from lvdm.errors import CheckpointError, LvdmError
from lvdm.fileio import (
    first_missing,
    is_stray_temp,
    remove_made_folders,
    remove_stray_temp,
    remove_write_probes,
    special_folder,
    undeletable,
)
from lvdm.training.checkpoint import (
    MARKER,
    OUR_FILE,
    SAVE_TEMP,
    TMP_PREFIX,
    check_writable,
    checkpoint_material,
    checkpoint_step,
    find_checkpoint,
    list_checkpoints,
    load_part,
    recover_checkpoints,
    verify_checkpoint,
)
from lvdm.training.checkpoint_files import CHECKPOINT_NAME, read_checkpoint_marker
from lvdm.training.logs import truncate_log
from lvdm.training.resume_config import (
    SAMPLE_DIR,
    check_written_again,
    compare_on_resume,
    written_again,
)
from lvdm.training.run_lock import (
    RUN_MARKER,
    lock_run,
    notice,
    read_run_marker,
    release_run,
    run_entries,
    write_run_marker,
)

RUN_FILES = (
    "config.yaml", "temporal.safetensors", "spatial_lora.safetensors", "spatial_weights.safetensors", "log.jsonl",
    "skipped.jsonl",
)  # fmt: skip
RUN_FOLDERS = ("checkpoints", "tensorboard", "samples", "decoder")
DECODER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")  # lvdm.models.temporal_vae.save_video_decoder
CONFIG_HEADER = "# Resolved lvdm config"
REFUSAL = "lvdm refuses to write a run there: give a new folder such as outputs/run"
_SKIPPED_RANK = re.compile(r"skipped\.rank\d+\.jsonl")
_SAMPLE = re.compile(r"(image_mode_)?\d{2,}(_image)?\.(mp4|gif|png)")  # validation.write_videos, objectives
_TEMP_OF = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp.*")  # fileio.atomic_path's names: the final name first


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


# ---------------------------------------------------------------------------------------------- preparing


def prepare_output_dir(
    output_dir: Path, *, resume: str | None, overwrite: bool, config: dict[str, Any] | None = None
) -> None:
    """Make ``output_dir`` ready for this run; called on the main process only, before any model is loaded.

    Refuses dangerous folders, checks it is writable, takes the run lock (held until :func:`release_run` or
    process exit), removes stray temporary files, recovers interrupted checkpoint saves, and then either checks
    the checkpoint to resume from (its config against this run's ``config``, with ``world_size``, then cutting
    ``log.jsonl`` back to its step) or
    clears a previous run of lvdm's own. A refused run leaves no folder it made behind (an empty one was left),
    here or, for a run that fails later without writing in it, when :func:`~lvdm.training.trainer.train` releases
    it (``release_run(..., failed=True)``).
    """
    output_dir = Path(output_dir)
    made = first_missing(output_dir)
    refuse_special_folder(output_dir)
    try:
        check_writable(output_dir)  # its folders under the lock: a resume writes into them, a fresh run deletes them
        lock_run(output_dir).made_folder = made
        try:
            _prepare_locked(output_dir, resume=resume, overwrite=overwrite, config=config)
        except BaseException:
            release_run(output_dir, refused=True)
            raise
    except BaseException:
        if made is not None:  # the folders this call made, each removed only if empty
            remove_made_folders(output_dir, made)
        raise


def _prepare_locked(output_dir: Path, *, resume: str | None, overwrite: bool, config: dict[str, Any] | None) -> None:
    remove_write_probes(output_dir)  # a killed start-up check's, lvdm's by name and text: a new folder's too
    if (output_dir / RUN_MARKER).exists() or resume is not None:
        _tidy(output_dir)  # renames and deletes only lvdm's temporary names; a user's folder is refused untouched
    found = resolve_resume(output_dir, resume)
    if found is not None and config is not None:  # another config's checkpoint: refused before anything is written
        metadata = verify_checkpoint(found)
        compare_on_resume(metadata.get("config", {}) | {"world_size": metadata.get("world_size")}, config)
    if found is not None:
        step = checkpoint_step(found)
        _refuse_written_through(output_dir)
        # lvdm's folders, and the step folders in them that it writes into (one was found after training)
        folders = _run_folders(output_dir)
        check_written_again(folders + (written_again(output_dir, step, config["train"]) if config else []), step)
        again = config is not None and step >= config["train"]["max_steps"]  # _finish validates
        dropped = truncate_log(output_dir / "log.jsonl", step, validates_again=again)
        if dropped:
            notice(f"log.jsonl: dropped {dropped} records after step {step} (they are redone)")
        write_run_marker(output_dir, _adopted_marker(output_dir))
    else:
        _prepare_fresh(output_dir, overwrite)
        write_run_marker(output_dir, _new_marker())


def _tidy(output_dir: Path) -> None:
    """Remove stray temporary files of a killed run and recover checkpoints a crash left under temporary names."""
    _remove_stray_temp_files(output_dir)
    root = checkpoint_root(output_dir)
    try:
        recovered = recover_checkpoints(root)
    except OSError as exc:
        raise CheckpointError(f"cannot recover interrupted checkpoints in {root}: {exc}") from exc
    for path in recovered:
        notice(f"recovered checkpoint {path} (its save was interrupted just before its final rename)")


def _refuse_written_through(output_dir: Path) -> None:
    """On resume: what the run writes again must be lvdm's own, not a link it would write through (a sample folder
    linked to yours: your videos were replaced) nor a file of yours under one of its names (replaced too)."""
    samples = output_dir / "samples"
    linked = [output_dir / name for name in RUN_FILES + RUN_FOLDERS if (output_dir / name).is_symlink()]
    if samples.is_dir() and not samples.is_symlink():
        linked += [path for path in samples.iterdir() if path.is_symlink()]
    other = [output_dir / name for name in RUN_FILES if (output_dir / name).is_file() and
             not (output_dir / name).is_symlink() and not _looks_like_ours(output_dir / name)]  # fmt: skip
    if linked or other:
        shown = ", ".join([f"{path} (a link)" for path in linked] + [f"{path} (not lvdm's)" for path in other])
        raise LvdmError(f"output_dir {output_dir}: resuming would write through or over {shown}; move it away")


def refuse_special_folder(output_dir: Path) -> None:
    """``/``, a file-system root (mount point), the home folder or a folder above it is never a run folder (the
    config check says so first; this guards other callers)."""
    reason = special_folder(output_dir)
    if reason:
        raise LvdmError(f"output_dir {output_dir} is {reason}; {REFUSAL}")


def _prepare_fresh(output_dir: Path, overwrite: bool) -> None:
    entries = run_entries(output_dir)
    if not entries:
        return
    marker = read_run_marker(output_dir)
    foreign = _foreign(output_dir, entries, marker)
    # a save killed before its rename is no checkpoint (_tidy recovered any that had finished)
    saved = [path for path in checkpoint_material(checkpoint_root(output_dir)) if not path.name.startswith(TMP_PREFIX)]
    # validation samples too: a finished run whose checkpoints and module were moved away is no crash at start-up
    material = saved or any((output_dir / name).exists() for name in ("temporal.safetensors", "decoder")) or bool(
        _plain_folders(output_dir / "samples"))  # fmt: skip
    if material and not overwrite and not foreign:
        count = len(list_checkpoints(checkpoint_root(output_dir)))
        held = f"{count} checkpoints" if saved else "no checkpoints, but its module or validation samples"
        raise LvdmError(
            f"output_dir {output_dir} already holds a run ({held}); "
            "continue it with train.resume=auto, or start over with train.overwrite=true"
        )
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        shown = ", ".join(str(path) for path in foreign[:3]) + more
        unmarked = f" (it has no {RUN_MARKER}, so lvdm cannot prove any of it is its own)" if marker is None else ""
        raise LvdmError(
            f"output_dir {output_dir} holds files lvdm did not write ({shown}){unmarked}; lvdm starts a run only in "
            "a new or empty folder or over one of its own runs, and never deletes anything else (whatever "
            "train.overwrite says): choose another output_dir or move those files away"
        )
    blocked = [(output_dir / name, found) for name in entries if (found := undeletable(output_dir / name))]
    if blocked:  # rmtree stopped part-way: a half-deleted run, and "Permission denied: 00.mp4"
        path, (folder, why) = blocked[0]
        raise LvdmError(
            f"output_dir {output_dir}: lvdm cannot clear its previous run: folder {folder} {why}, so what is in it "
            f"cannot be deleted; nothing was deleted: make it writable (chmod -R u+rwX {path}) and run again, or "
            "choose another output_dir"
        )
    if not material:
        notice(f"the previous run in {output_dir} stopped before its first checkpoint; starting over")
    _clear(output_dir, entries)


def _clear(output_dir: Path, entries: list[str]) -> None:
    """Delete lvdm's entries (checked by :func:`_foreign` just before); the lock stays, the marker is rewritten."""
    for name in entries:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _remove_stray_temp_files(output_dir: Path) -> None:
    """Half-written exports and validation samples of a killed run (``.temporal.safetensors.1a2b3c4d.tmp``,
    ``samples/step-00000010/.00.gif.1a2b3c4d.tmp``), and the start-up check's probe files in the folders it probes
    (``checkpoints/checkpoint-00000010/.write-probe-1a2b3c4d``)."""
    for name in run_entries(output_dir, everything=True):
        if is_stray_temp(name, RUN_FILES + (RUN_MARKER,)):
            remove_stray_temp(output_dir / name)
    samples, decoder = output_dir / "samples", output_dir / "decoder"
    folders = [folder for folder in _plain_folders(samples) if SAMPLE_DIR.fullmatch(folder.name)]
    for folder in folders + ([decoder] if _plain_folders(output_dir, decoder.name) else []):
        for path in folder.iterdir():
            if _sample_temp(path.name) or (folder == decoder and is_stray_temp(path.name, DECODER_FILES)):
                remove_stray_temp(path)
    checkpoints = [p for p in _plain_folders(checkpoint_root(output_dir)) if CHECKPOINT_NAME.fullmatch(p.name)]
    for folder in _run_folders(output_dir) + folders + checkpoints:
        remove_write_probes(folder)


def _run_folders(output_dir: Path) -> list[Path]:
    """lvdm's folders in the run folder that are folders, not links; ``output_dir`` itself may be a link (a run
    folder on another disk), which :func:`_plain_folders` would not look into."""
    return [output_dir / name for name in sorted(RUN_FOLDERS) if _plain_folders(output_dir.resolve(), name)]


def _plain_folders(parent: Path, name: str | None = None) -> list[Path]:
    """The folders in ``parent`` (only ``name``), not links; none where ``parent`` is not a plain folder."""
    if not parent.is_dir() or parent.is_symlink():
        return []
    return [p for p in parent.iterdir() if p.is_dir() and not p.is_symlink() and name in (None, p.name)]


def _sample_temp(name: str) -> bool:
    """Whether ``name`` is a killed write of a validation sample (``.00.gif.1a2b3c4d.tmp``)."""
    final = _TEMP_OF.fullmatch(name)
    return bool(final and _SAMPLE.fullmatch(final[1]) and is_stray_temp(name, (final[1],)))


# ---------------------------------------------------------------------------------------------- what is lvdm's


def _foreign(output_dir: Path, entries: list[str], marker: dict[str, Any] | None) -> list[Path]:
    """Entries (or files inside lvdm's folders) that lvdm cannot prove it wrote: without a run marker, all of them;
    with one, those it does not list or that no longer look like lvdm's."""
    if marker is None:
        return [output_dir / name for name in entries]
    return _unproven(output_dir, entries, set(marker["files"]))


def _unproven(output_dir: Path, entries: list[str], listed: set[str] | None) -> list[Path]:
    """Entries not listed in ``listed`` or not looking like lvdm's (``listed=None``: judged by content alone)."""
    foreign: list[Path] = []
    for name in entries:
        path = output_dir / name
        in_list = listed is None or name in listed or (_SKIPPED_RANK.fullmatch(name) and "skipped.jsonl" in listed)
        if is_stray_temp(name, RUN_FILES + (RUN_MARKER,)) and not path.is_dir():
            continue  # a killed run's half-written file (a folder of one is gone by now, unless a user's is in it)
        if path.is_symlink() or not in_list:
            foreign.append(path)
        elif name in RUN_FOLDERS:
            foreign += _foreign_inside(path, name)
        elif name in RUN_FILES or _SKIPPED_RANK.fullmatch(name):
            foreign += [] if _looks_like_ours(path) else [path]
        elif listed is None:
            foreign.append(path)  # an unknown name: only a marker can vouch for it
    return foreign


def _looks_like_ours(path: Path) -> bool:
    """A file with one of lvdm's names whose contents are what lvdm writes there."""
    if not path.is_file():
        return False
    try:
        if path.name == "config.yaml":
            with path.open(encoding="utf-8", errors="replace") as handle:
                return handle.readline().startswith(CONFIG_HEADER)
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8", errors="replace") as handle:
                first = handle.readline()
            return not first or isinstance(json.loads(first), dict)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            if str((handle.metadata() or {}).get("format", "")).startswith("lvdm"):
                return True
            return path.name == "spatial_lora.safetensors" and all(k.startswith("unet.") for k in handle.keys())
    except (OSError, ValueError, Exception):  # unreadable, not JSON, not safetensors: not provably lvdm's
        return False


def _foreign_inside(folder: Path, kind: str) -> list[Path]:
    if not folder.is_dir():
        return [folder]
    foreign = []
    for parent, dirs, files in os.walk(folder):
        here = Path(parent)
        for name in dirs:
            if (here / name).is_symlink() or (kind == "checkpoints" and not _is_checkpoint_dir(here, name)):
                foreign.append(here / name)
        dirs[:] = [d for d in dirs if here / d not in foreign]
        listed = _checkpoint_files(here) if kind == "checkpoints" and here != folder else None  # once per folder
        for name in files:
            if (here / name).is_symlink() or not _ours_in(kind, here, folder, name, listed):
                foreign.append(here / name)
    return foreign


def _is_checkpoint_dir(parent: Path, name: str) -> bool:
    if parent.name != "checkpoints":
        return False  # no folders inside a checkpoint
    return name.startswith(".tmp-checkpoint-") or CHECKPOINT_NAME.fullmatch(name) is not None


def _ours_in(kind: str, parent: Path, top: Path, name: str, listed: set[str] | None) -> bool:
    """``listed``: what the checkpoint folder ``parent``'s ``COMPLETE`` lists (None: unfinished, judged by name)."""
    if kind == "checkpoints":
        if listed is not None:
            return parent != top and name in listed
        unfinished = parent.name.startswith(TMP_PREFIX) and bool(SAVE_TEMP.fullmatch(name))  # killed there
        return parent != top and (bool(OUR_FILE.fullmatch(name)) or unfinished)
    if kind == "tensorboard":  # SummaryWriter's event files, at the top (a folder of logs you put there is yours)
        return parent == top and name.startswith("events.out.tfevents.")
    if kind == "decoder":  # exactly what save_video_decoder writes, or a killed write of it
        return parent == top and (name in DECODER_FILES or is_stray_temp(name, DECODER_FILES))
    # samples/step-00000100/00.mp4, image_mode_00.gif, 00_image.png
    in_step = parent.parent == top and bool(SAMPLE_DIR.fullmatch(parent.name))
    return in_step and bool(_SAMPLE.fullmatch(name) or _sample_temp(name))


def _checkpoint_files(folder: Path) -> set[str] | None:
    """The names a finished checkpoint's ``COMPLETE`` lists (and itself), or None where there is none to read."""
    try:
        return {MARKER} | {record["name"] for record in read_checkpoint_marker(folder)}
    except CheckpointError:
        return None


# ---------------------------------------------------------------------------------------------- the run marker


def _new_marker() -> dict[str, Any]:
    return {
        "format": "lvdm-run",
        "run_id": uuid.uuid4().hex,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": sorted(RUN_FILES + RUN_FOLDERS),  # what lvdm writes there; nothing else that appears
    }


def _adopted_marker(output_dir: Path) -> dict[str, Any]:
    """The existing marker, or (a run from before markers) one listing the entries that look like lvdm's."""
    marker = read_run_marker(output_dir)
    if marker is not None:
        return marker
    entries = run_entries(output_dir)
    foreign = set(_unproven(output_dir, entries, None))
    marker = _new_marker()
    marker["files"] = sorted(n for n in entries if output_dir / n not in foreign)
    return marker


# ---------------------------------------------------------------------------------------------- resuming


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``train.resume`` names: ``None`` (fresh), ``auto`` (latest, if any), ``latest`` or a path.

    ``auto`` starts fresh only when ``checkpoints/`` holds no checkpoint material at all. The chosen checkpoint
    is verified (sizes, sha256, metadata, counters); a damaged newest one is an error naming the newest intact one.
    """
    root = checkpoint_root(output_dir)
    if resume is None:
        return None
    if resume in ("auto", "latest"):
        complete = list_checkpoints(root)
        if complete:
            _refuse_newer_unfinished(resume, complete[-1])
            return _newest_intact(complete)
        material = checkpoint_material(root)
        if material:
            names = ", ".join(path.name for path in material[:3])
            raise CheckpointError(
                f"train.resume={resume}: {root} holds unfinished checkpoint folders ({names}) but no complete "
                "checkpoint; nothing was deleted. Move them away, or start over with train.resume=null "
                "train.overwrite=true"
            )
        if resume == "latest":
            raise CheckpointError(f"train.resume=latest: no complete checkpoint in {root}")
        return None
    path = Path(resume)
    if not path.exists() and (root / resume).exists():
        path = root / resume
    if not path.exists():
        raise CheckpointError(f"train.resume={resume}: no such checkpoint")
    found = find_checkpoint(root, path)
    check_resumable(found)
    return found


def _refuse_newer_unfinished(resume: str, newest: Path) -> None:
    """A ``checkpoint-<step>`` past the newest complete one that is none (no COMPLETE, a link, a file: lvdm's saves
    never leave one) was passed over in silence; the run then trained up to its step and could not save there."""
    step = checkpoint_step(newest)
    newer = [path for path in checkpoint_material(newest.parent) if not path.name.startswith(TMP_PREFIX) and
             checkpoint_step(path) > step]  # fmt: skip
    if newer:
        raise CheckpointError(
            f"train.resume={resume}: {newer[0]} is newer than the newest complete checkpoint but is not one (no "
            f"{MARKER} in it, or not a folder); lvdm does not fall back by itself: move it away, or resume from "
            f"train.resume={newest}"
        )


def _newest_intact(complete: list[Path]) -> Path:
    newest = complete[-1]
    try:
        check_resumable(newest)
        return newest
    except CheckpointError as damage:
        for older in reversed(complete[:-1]):
            try:
                check_resumable(older)
            except CheckpointError:
                continue
            raise CheckpointError(
                f"the newest checkpoint is damaged: {damage}. The newest intact one is {older}: resume from it with "
                f"train.resume={older} (lvdm does not fall back by itself)"
            ) from damage
        raise CheckpointError(f"the newest checkpoint is damaged and no older one is intact: {damage}") from damage


def check_resumable(path: Path) -> None:
    """Verify a checkpoint and the trainer's entries in it; each problem a CheckpointError naming the file."""
    metadata = verify_checkpoint(path)
    file = path / "metadata.json"
    if not isinstance(metadata.get("config", {}), dict):
        raise CheckpointError(f"{file}: 'config' must be an object, got {type(metadata['config']).__name__}")
    if type(metadata.get("world_size", 1)) is not int:
        raise CheckpointError(f"{file}: 'world_size' must be a whole number, got {metadata['world_size']!r}")
    counters = load_part(path, "trainer")
    if counters is None:
        return  # lvdm.training.checkpoint users other than the trainer; the trainer names a missing part itself
    if not isinstance(counters, dict):
        raise CheckpointError(f"{path / 'trainer.pt'}: expected a dict of counters, got {type(counters).__name__}")
    for key in ("step", "micro_batches", "skipped", "skipped_in_row"):
        value = counters.get(key, 0)
        if type(value) is not int or value < 0:
            raise CheckpointError(f"{path / 'trainer.pt'}: {key!r} must be a whole number >= 0, got {value!r}")
    rates = counters.get("clip_rates", [])
    if not isinstance(rates, list) or not all(
        isinstance(pair, list | tuple) and len(pair) == 2 and type(pair[0]) in (int, float) and type(pair[1]) is int
        for pair in rates
    ):
        raise CheckpointError(f"{path / 'trainer.pt'}: 'clip_rates' must be [rate, count] pairs, got {rates!r:.80}")
    if counters["step"] != metadata["step"]:
        step = metadata["step"]
        raise CheckpointError(f"{path / 'trainer.pt'}: step {counters['step']} but the checkpoint is step {step}")
