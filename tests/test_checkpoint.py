"""Training checkpoints: exact resume, atomic saves, safe retention, verified and pickle-safe loading, RNG state."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lvdm.errors import CheckpointError
from lvdm.training import checkpoint
from lvdm.training.checkpoint import (
    MARKER,
    check_writable,
    checkpoint_step,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from lvdm.training.rng import capture_rng, restore_rng

# --- a tiny training run ----------------------------------------------------------------------------------------


class _Run:
    """A model with dropout, AdamW, a LambdaLR warmup and a GradScaler: everything a resume must restore."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: min(1.0, (step + 1) / 4))
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)

    def step(self, n: int) -> None:
        for _ in range(n):
            x = torch.randn(3, 4) + float(np.random.rand()) + random.random()  # every RNG feeds the step
            loss = self.model(x).square().mean()
            self.optimizer.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()

    def parts(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng(),
        }

    def load(self, parts: dict) -> None:
        self.model.load_state_dict(parts["model"])
        self.optimizer.load_state_dict(parts["optimizer"])
        self.scheduler.load_state_dict(parts["scheduler"])
        self.scaler.load_state_dict(parts["scaler"])
        restore_rng(parts["rng"])


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _small(step: int = 0) -> dict:
    return {"model": {"w": torch.full((2, 3), float(step))}, "state": {"step": step}}


def _tmp_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp"))


def _rewrite_marker(ckpt: Path) -> None:
    """Make the marker match the files again, as an attacker who edits a checkpoint would."""
    marker = json.loads((ckpt / MARKER).read_text())
    for record in marker["files"]:
        data = (ckpt / record["name"]).read_bytes()
        record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / MARKER).write_text(json.dumps(marker))


# --- round trip and exact resume --------------------------------------------------------------------------------


def test_resume_gives_identical_weights(tmp_path: Path) -> None:
    run = _Run()
    run.step(3)
    ckpt = save_checkpoint(tmp_path, 3, run.parts(), metadata={"lr": 1e-2})
    run.step(3)
    expected, expected_lr = _weights(run.model), run.scheduler.get_last_lr()

    torch.manual_seed(123)  # a different process state
    np.random.seed(123)
    random.seed(123)
    resumed = _Run(seed=99)
    parts, metadata = load_checkpoint(ckpt)
    resumed.load(parts)
    resumed.step(3)

    assert metadata == {"lr": 1e-2, "step": 3}
    assert resumed.scheduler.get_last_lr() == expected_lr
    assert resumed.scaler.get_scale() == run.scaler.get_scale()
    for key, value in _weights(resumed.model).items():
        assert torch.equal(value, expected[key]), key


def test_tensors_round_trip_bit_exact(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.tensor([float("inf"), -0.0, 65504.0]).half(),
        "i64": torch.arange(-3, 3),
        "bool": torch.tensor([True, False]),
        "strided": base.t(),  # not contiguous
        "tied_a": base,
        "tied_b": base,  # shares storage with tied_a
        "param": torch.nn.Parameter(torch.randn(2)),
    }
    parts, _ = load_checkpoint(save_checkpoint(tmp_path, 0, {"model": tensors}))
    assert parts["model"].keys() == tensors.keys()
    for key, value in tensors.items():
        loaded = parts["model"][key]
        assert loaded.dtype == value.dtype and torch.equal(loaded, value.detach()), key


def test_numpy_and_python_state_survive_weights_only(tmp_path: Path) -> None:
    np.random.seed(5)
    data = {
        "order": np.random.permutation(10).astype(np.int32),
        "epoch": np.int64(3),
        "loss": np.float32(0.5),
        "numpy_state": np.random.get_state(),
        "random_state": random.getstate(),
        "position": (2, [1, 2], {"seen": {4, 5}}),
        "shape": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
    }
    parts, _ = load_checkpoint(save_checkpoint(tmp_path, 1, {"data": data}))
    loaded = parts["data"]
    assert loaded["order"].dtype == np.int32 and np.array_equal(loaded["order"], data["order"])
    assert loaded["epoch"] == 3 and type(loaded["epoch"]) is int and loaded["loss"] == 0.5
    assert loaded["position"] == data["position"] and loaded["random_state"] == data["random_state"]
    assert loaded["shape"] == torch.Size([2, 3]) and loaded["dtype"] is torch.bfloat16
    np.random.set_state(loaded["numpy_state"])
    first = np.random.rand(3)
    np.random.set_state(data["numpy_state"])
    assert np.array_equal(first, np.random.rand(3))


def test_unstorable_object_refused_before_writing(tmp_path: Path) -> None:
    class Position:
        index = 3

    with pytest.raises(CheckpointError, match=r"part 'data'\['where'\]\[1\].*Position"):
        save_checkpoint(tmp_path / "ckpts", 1, {"data": {"where": [1, Position()]}})
    assert not (tmp_path / "ckpts").exists()


def test_layout_marker_and_metadata(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path, 42, _small(42), metadata={"config": {"lr": 1e-4}})
    assert ckpt == tmp_path / "checkpoint-00000042" and checkpoint_step(ckpt) == 42
    assert sorted(p.name for p in ckpt.iterdir()) == [MARKER, "metadata.json", "model.safetensors", "state.pt"]
    marker = json.loads((ckpt / MARKER).read_text())
    assert [r["name"] for r in marker["files"]] == ["model.safetensors", "state.pt", "metadata.json"]
    for record in marker["files"]:
        data = (ckpt / record["name"]).read_bytes()
        assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((ckpt / "metadata.json").read_text()) == {"config": {"lr": 1e-4}, "step": 42}
    assert _tmp_dirs(tmp_path) == []


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, _small(1))
    ckpt = save_checkpoint(tmp_path, 5, _small(2))
    parts, _ = load_checkpoint(ckpt)
    assert parts["state"] == {"step": 2} and list_checkpoints(tmp_path) == [ckpt]
    assert _tmp_dirs(tmp_path) == []


def test_bad_arguments(tmp_path: Path) -> None:
    for step in (-1, 10**8, 1.0, True):
        with pytest.raises(ValueError, match="step"):
            save_checkpoint(tmp_path, step, _small())
    with pytest.raises(ValueError, match="part name"):
        save_checkpoint(tmp_path, 1, {"../model": {"w": torch.zeros(1)}})
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, _small(), keep_last=0)
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, _small(), metadata={"x": object()})
    with pytest.raises(CheckpointError, match="final"):
        checkpoint_step(tmp_path / "checkpoint-final")
    assert list_checkpoints(tmp_path) == []


# --- retention ----------------------------------------------------------------------------------------------------


def test_keep_last_deletes_oldest_after_new_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prune = checkpoint._prune

    def checked_prune(root: Path, keep_last: int, new: Path) -> None:
        assert new in list_checkpoints(root) and not _tmp_dirs(root)  # the new one is complete and in place
        prune(root, keep_last, new)

    monkeypatch.setattr(checkpoint, "_prune", checked_prune)
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, _small(step), keep_last=2)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [3, 4]

    monkeypatch.setattr(torch, "save", _raise_disk_full)
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 5, _small(5), keep_last=1)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [3, 4]  # a failed save deletes nothing


def test_keep_last_keeps_the_new_one_even_if_older(tmp_path: Path) -> None:
    for step in (10, 20):
        save_checkpoint(tmp_path, step, _small(step))
    save_checkpoint(tmp_path, 15, _small(15), keep_last=2)  # e.g. a run restarted from an earlier checkpoint
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [15, 20]


def test_a_users_file_in_a_checkpoint_folder_is_never_deleted(tmp_path: Path) -> None:
    """keep_last and a re-save of a step deleted whole checkpoint folders, a user's files put there with them (an
    exported module, notes). Only the files COMPLETE lists are lvdm's: such a folder is kept, with a warning, or
    not replaced, with an error."""
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _small(step))
    notes = tmp_path / "checkpoint-00000001" / "notes.txt"
    notes.write_text("mine")
    with pytest.warns(UserWarning, match=r"kept old checkpoint .*checkpoint-00000001 .*\(notes.txt\)"):
        save_checkpoint(tmp_path, 3, _small(3), keep_last=1)
    assert notes.read_text() == "mine"
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [1, 3]  # 2 (all lvdm's) was pruned
    with pytest.raises(CheckpointError, match=r"holds what lvdm did not write there \(notes.txt\)"):
        save_checkpoint(tmp_path, 1, _small(1))  # a re-save of step 1 would replace the folder
    assert notes.read_text() == "mine" and not _tmp_dirs(tmp_path)
    notes.unlink()
    save_checkpoint(tmp_path, 3, _small(3), keep_last=1)  # the control: without it, retention deletes step 1
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [3]


def test_retention_touches_nothing_else(tmp_path: Path) -> None:
    root, outside = tmp_path / "ckpts", tmp_path / "outside"
    save_checkpoint(outside, 0, _small())  # a complete checkpoint outside the root
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    (root / "checkpoint-final").mkdir()
    (root / "checkpoint-123").mkdir()
    (root / "checkpoint-00000000").symlink_to(outside / "checkpoint-00000000", target_is_directory=True)
    (root / ".tmp-checkpoint-link").symlink_to(outside, target_is_directory=True)
    for step in range(1, 4):
        save_checkpoint(root, step, _small(step), keep_last=1)
    assert [checkpoint_step(p) for p in list_checkpoints(root)] == [3]  # the symlink is not listed either
    assert (root / "notes.txt").read_text() == "keep me"
    assert (root / "checkpoint-final").is_dir() and (root / "checkpoint-123").is_dir()
    assert (root / "checkpoint-00000000").is_symlink() and (root / ".tmp-checkpoint-link").is_symlink()
    load_checkpoint(outside / "checkpoint-00000000")


def test_a_folder_of_yours_under_a_temporary_name_is_left_with_a_warning(tmp_path: Path) -> None:
    """Every ``.tmp-checkpoint-*`` folder was deleted at the next save, a user's notes too; now only what a killed
    save or retention leaves (lvdm's names, a save's files only). The control: a killed save's folder is removed."""
    notes, mine = tmp_path / ".tmp-checkpoint-notes", tmp_path / ".tmp-checkpoint-00000002-mine"
    for folder in (notes, mine):
        folder.mkdir()
        (folder / "todo.txt").write_text("mine")
    killed = tmp_path / ".tmp-checkpoint-00000004-abcd_123"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half written")
    with pytest.warns(UserWarning, match="not a save lvdm left"):
        save_checkpoint(tmp_path, 5, _small(5))
    assert (notes / "todo.txt").read_text() == "mine" and (mine / "todo.txt").read_text() == "mine"
    assert not killed.exists()


# --- failures while saving ----------------------------------------------------------------------------------------


def _raise_disk_full(*args, **kwargs) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_save_keeps_previous_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = save_checkpoint(tmp_path, 1, _small(1))
    monkeypatch.setattr(torch, "save", _raise_disk_full)  # the 2nd part (state.pt) fails
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path, 2, _small(2))
    assert "state.pt" in str(caught.value) and "No space left on device" in str(caught.value)
    assert list_checkpoints(tmp_path) == [first] and _tmp_dirs(tmp_path) == []
    assert not (tmp_path / "checkpoint-00000002").exists()
    assert load_checkpoint(first)[0]["state"] == {"step": 1}


_CRASH = """
import os, sys, torch
from lvdm.training.checkpoint import save_checkpoint
torch.save = lambda *args, **kwargs: os._exit(9)  # killed while writing the 2nd part
save_checkpoint(sys.argv[1], 2, {"model": {"w": torch.zeros(3)}, "state": {"step": 2}})
"""


def test_hard_crash_leaves_previous_and_next_save_cleans_up(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path, 1, _small(1))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_CRASH), str(tmp_path)], env=env, timeout=120)
    assert result.returncode == 9
    assert len(_tmp_dirs(tmp_path)) == 1  # the half-written folder, never listed
    assert list_checkpoints(tmp_path) == [first] and find_checkpoint(tmp_path) == first
    load_checkpoint(first)
    save_checkpoint(tmp_path, 3, _small(3))
    assert _tmp_dirs(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")
def test_real_write_failure_names_file(tmp_path: Path) -> None:
    import resource
    import signal

    first = save_checkpoint(tmp_path, 1, _small(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CheckpointError, match=r"model\.safetensors.*File too large"):
            save_checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(1 << 16)}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert list_checkpoints(tmp_path) == [first] and _tmp_dirs(tmp_path) == []
    load_checkpoint(first)


def test_unwritable_root(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    root = blocker / "sub"
    with pytest.raises(CheckpointError, match=str(root)):
        check_writable(root)
    with pytest.raises(CheckpointError, match=str(root)):
        save_checkpoint(root, 1, _small())
    with pytest.raises(CheckpointError, match="free"):
        check_writable(tmp_path / "ok", min_free_bytes=2**62)
    check_writable(tmp_path / "ok" / "deeper")
    assert list((tmp_path / "ok" / "deeper").iterdir()) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "elsewhere")  # "is not writable: File exists" named no reason
    with pytest.raises(CheckpointError, match="dangling is a link to .*elsewhere, which does not exist"):
        check_writable(tmp_path / "dangling")
    (tmp_path / "elsewhere").mkdir()
    check_writable(tmp_path / "dangling")  # the control: once its target exists, it is a folder like any


# --- loading what might be broken or hostile ------------------------------------------------------------------------


def test_corrupt_or_missing_file_is_named(tmp_path: Path) -> None:
    flipped, truncated, missing = (save_checkpoint(tmp_path, step, _small(step)) for step in (1, 2, 3))
    model = flipped / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # same size, different bytes
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint-00000001/model\.safetensors.*sha256"):
        load_checkpoint(flipped)
    state = truncated / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"checkpoint-00000002/state\.pt.*bytes"):
        load_checkpoint(truncated)
    (missing / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint-00000003/state\.pt.*missing"):
        load_checkpoint(missing)
    _rewrite_marker(truncated)  # sizes and hashes agree with a broken file: the loader still names it
    with pytest.raises(CheckpointError, match=r"checkpoint-00000002/state\.pt.*cannot be loaded"):
        load_checkpoint(truncated)


def test_missing_marker(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path, 1, _small(1))
    second = save_checkpoint(tmp_path, 2, _small(2))
    (second / MARKER).unlink()
    assert list_checkpoints(tmp_path) == [first]
    with pytest.warns(UserWarning, match="checkpoint-00000002"):
        assert find_checkpoint(tmp_path) == first
    for call in (lambda: find_checkpoint(tmp_path, str(second)), lambda: load_checkpoint(second)):
        with pytest.raises(CheckpointError, match=f"{second}.*{MARKER}"):
            call()
    with pytest.raises(CheckpointError, match="not found"):
        find_checkpoint(tmp_path, tmp_path / "checkpoint-00000009")
    assert find_checkpoint(tmp_path, first) == first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_checkpoint(tmp_path / "empty") is None


class _Evil:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return os.mkdir, (str(self.sentinel),)


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, {"extra": {"a": 1}})
    sentinel = tmp_path / "pwned"
    torch.save({"a": _Evil(sentinel)}, ckpt / "extra.pt")
    _rewrite_marker(ckpt)  # the hashes match: only weights_only stands in the way
    with pytest.raises(CheckpointError, match=r"extra\.pt.*cannot be loaded safely"):
        load_checkpoint(ckpt)
    assert not sentinel.exists()


def test_marker_cannot_point_outside(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path, 1, _small(1))
    marker = json.loads((ckpt / MARKER).read_text())
    marker["files"][0]["name"] = "../../etc/passwd"
    (ckpt / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="unsafe file name"):
        load_checkpoint(ckpt)


# --- RNG ----------------------------------------------------------------------------------------------------------


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(4).tolist()


def test_rng_capture_restore_and_checkpoint(tmp_path: Path) -> None:
    random.gauss(0, 1), np.random.randn()  # leave a cached gaussian in both
    state = capture_rng()
    expected = _draws()
    restore_rng(state)
    assert _draws() == expected
    parts, _ = load_checkpoint(save_checkpoint(tmp_path, 1, {"rng": state}))
    _draws()
    restore_rng(parts["rng"])
    assert _draws() == expected
    with pytest.raises(ValueError, match="missing"):
        restore_rng({"python": state["python"]})


def test_rng_cuda_states(monkeypatch: pytest.MonkeyPatch) -> None:
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([1], dtype=torch.uint8)] * 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    state = capture_rng()
    assert len(state["cuda"]) == 2
    restore_rng(state)
    assert sorted(restored) == [0, 1]
    restored.clear()
    with pytest.warns(UserWarning, match="1 CUDA device"):
        restore_rng({**state, "cuda": state["cuda"][:1]})
    assert sorted(restored) == [0]


def test_a_resave_of_the_same_step_always_leaves_a_complete_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """keep_last=1, same step: the atomic swap leaves the new one; a crash between the fallback's two renames leaves
    only temporary folders, which the next save (or resume) puts back instead of deleting."""
    save_checkpoint(tmp_path, 5, _small(1), keep_last=1)
    save_checkpoint(tmp_path, 5, _small(2), keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000005"] and not _tmp_dirs(tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint-00000005")[0]["state"]["step"] == 2

    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    real_rename, calls = os.rename, []

    def killed_after_first_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between the two renames
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._move_into_place(checkpoint._new_temp(tmp_path, 5), tmp_path / "checkpoint-00000005")
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    assert list_checkpoints(tmp_path) == [] and any("replaced" in name for name in _tmp_dirs(tmp_path))
    assert checkpoint.checkpoint_material(tmp_path)  # what resume=auto refuses to ignore
    assert checkpoint.recover_checkpoints(tmp_path) == [tmp_path / "checkpoint-00000005"]
    assert load_checkpoint(tmp_path / "checkpoint-00000005")[0]["state"]["step"] == 2


def test_a_complete_save_killed_before_its_rename_is_recovered_and_preferred(tmp_path: Path) -> None:
    old = save_checkpoint(tmp_path, 3, _small(1))
    newer = save_checkpoint(tmp_path / "elsewhere", 3, _small(2))
    os.rename(old, tmp_path / ".tmp-checkpoint-checkpoint-00000003-replaced-0a0b0c0d")
    os.rename(newer, tmp_path / ".tmp-checkpoint-00000003-abc_12")
    (tmp_path / ".tmp-checkpoint-00000004-half").mkdir()  # a save that never finished: not recovered
    assert checkpoint.recover_checkpoints(tmp_path) == [tmp_path / "checkpoint-00000003"]
    assert load_checkpoint(tmp_path / "checkpoint-00000003")[0]["state"]["step"] == 2
    save_checkpoint(tmp_path, 6, _small(6))  # the next save clears what is left over
    assert not _tmp_dirs(tmp_path)


def test_metadata_of_the_wrong_type_is_refused_by_name_even_with_right_checksums(tmp_path: Path) -> None:
    for step, metadata in ((1, "a string"), (2, {"step": "2"}), (3, {"step": 7})):
        path = save_checkpoint(tmp_path, step, _small(step))
        (path / "metadata.json").write_text(json.dumps(metadata))
        _rewrite_marker(path)
        with pytest.raises(CheckpointError, match=rf"checkpoint-0000000{step}/metadata\.json"):
            load_checkpoint(path)


def test_files_and_folders_get_the_users_usual_mode(tmp_path: Path) -> None:
    """safetensors wrote 0600 and mkdtemp made checkpoint folders 0700: a module or checkpoint shared on a cluster
    was unreadable to the user's group, whatever their umask."""
    from safetensors.torch import save_file

    from lvdm.fileio import atomic_path, umask

    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        folder = save_checkpoint(tmp_path / "ckpts", 1, _small(1))
        with atomic_path(tmp_path / "module.safetensors") as temp:
            save_file({"x": torch.zeros(1)}, temp)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {(p.name, p.stat().st_mode & 0o777) for p in folder.iterdir()} == {
        (p.name, 0o640) for p in folder.iterdir()
    }
    assert (tmp_path / "module.safetensors").stat().st_mode & 0o777 == 0o640


def test_a_damaged_marker_does_not_make_lvdms_own_files_foreign(tmp_path: Path) -> None:
    """With COMPLETE unreadable every file counted as a user's: a re-save of the step was refused, naming lvdm's
    own files. Without a readable marker, files are judged by lvdm's names; a user's file still stops it."""
    folder = save_checkpoint(tmp_path, 5, _small(5))
    (folder / "COMPLETE").write_text("{trunc")
    save_checkpoint(tmp_path, 5, _small(5))  # replaced, as before the retention change
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [5] and load_checkpoint(folder)
    (folder / "COMPLETE").write_text("{trunc")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"there \(notes.txt\);"):
        save_checkpoint(tmp_path, 5, _small(5))


def test_a_write_failing_inside_files_written_together_is_one_line_naming_the_output(tmp_path: Path) -> None:
    """A writer's own atomic write to the temporary name of atomic_paths (export's module and LoRA) failed as
    "could not write X: could not write X: ..." once the two wrappings met; and what was there stays."""
    import errno

    from lvdm.errors import OutputWriteError
    from lvdm.fileio import atomic_path, atomic_paths

    module, lora = tmp_path / "m.safetensors", tmp_path / "m_spatial_lora.safetensors"
    lora.write_bytes(b"version 1")
    with pytest.raises(OutputWriteError) as caught:
        with atomic_paths([module, lora], keep_suffix=True) as (first, second):
            first.write_bytes(b"module")
            with atomic_path(second) as inner:
                raise OSError(errno.ENOSPC, "No space left on device", str(inner))
    assert str(caught.value).startswith(f"could not write {lora}: No space left on device (")
    assert str(caught.value).count("could not write") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [lora.name] and lora.read_bytes() == b"version 1"


def test_a_step_skipped_after_the_checkpoint_is_logged_once_when_it_is_redone(tmp_path):
    """A step skipped for a non-finite loss right after a checkpoint is logged at the checkpoint's step (the last that
    completed): the resume kept that record and logged the redone skip again, so log.jsonl held it twice. The
    controls: a skip before the checkpoint's step, and the checkpoint step's own training record, stay."""
    from lvdm.training.logs import read_log, truncate_log

    rows = [
        {"step": 1, "skipped_nonfinite": 1, "loss": "nan"},  # before the checkpoint: stays
        {"step": 1, "loss": 0.5, "lr": 1e-4, "grad_norm": 1.0, "skipped_nonfinite": 1},
        {"step": 2, "loss": 0.4, "lr": 1e-4, "grad_norm": 1.0, "skipped_nonfinite": 1},  # the checkpoint's step
        {"step": 2, "motion_gain": 1.2},  # its validation, before the checkpoint was saved: stays
        {"step": 2, "skipped_nonfinite": 2, "loss": 0.3},  # skipped after it (a non-finite gradient): redone
        {"step": 3, "loss": 0.2, "lr": 1e-4, "grad_norm": 1.0, "skipped_nonfinite": 2},
    ]
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert truncate_log(log, 2) == 2
    assert read_log(log) == rows[:4]
