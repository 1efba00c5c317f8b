"""Files and folders the user may not read: each is named with the reason, in one line, never a traceback, never
reported as missing and never silently left out.

Root reads everything whatever the mode says (CI and these sessions run as root), so the calls run in a forked
child that drops to the ``nobody`` user first; run as anyone else, chmod 000 bites the test process itself."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import signal
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_cache import base, cached, folder  # noqa: F401 - the latent cache fixtures

NOBODY = 65534


def unprivileged(fn, *args):
    """``fn(*args)`` as a user who cannot read what chmod 000 closed: ``("ok", repr(result))`` or ``("error",
    "Type: message")``, with what it printed to stderr and the warnings it raised as a third item."""

    def call():
        err = io.StringIO()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with contextlib.redirect_stderr(err):
                    outcome = "ok", repr(fn(*args))
            except Exception as exc:  # noqa: BLE001 - returned to the test, which checks it
                outcome = "error", f"{type(exc).__name__}: {exc}"
        return *outcome, err.getvalue() + "".join(f"warning: {w.message}\n" for w in caught)

    if os.geteuid() != 0:
        return call()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nobody from here on
        os.close(read)
        try:
            torch.set_num_threads(1)  # no OpenMP pool carried over a fork
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome = call()
            with os.fdopen(write, "wb") as pipe:
                pickle.dump(outcome, pipe)
        finally:
            os._exit(0)
    os.close(write)

    def stuck(signum, frame):
        raise TimeoutError("the unprivileged call did not return within 120 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(120)  # a stuck child fails this test, not the whole run
    try:
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    if not data:
        raise AssertionError("the child dropped to nobody returned nothing (could it not change user?)")
    return pickle.loads(data)


@pytest.fixture
def shared(tmp_path_factory):
    """A folder the unprivileged child can reach (pytest's own are the test user's alone)."""
    made = Path(tempfile.mkdtemp(prefix="lvdm-perm-"))
    made.chmod(0o755)
    yield made
    for path in [made, *made.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(made)


def test_a_weights_file_that_cannot_be_read_is_named_so_not_missing(shared):
    from lvdm.models.loading import check_weights_file
    from lvdm.models.temporal_file import read_temporal_metadata

    path = shared / "weights.safetensors"
    save_file({"a": torch.zeros(2)}, path, metadata={"format": "other"})
    path.chmod(0o644)
    check = lambda: check_weights_file(path, allow_pickle=False, what="LoRA")  # noqa: E731
    assert unprivileged(check) == ("ok", "['a']", "")  # the control: readable, accepted (its tensor names)
    path.chmod(0)
    kind, message, _ = unprivileged(check)
    assert message == f"CheckpointError: LoRA {path} cannot be read: Permission denied", message
    kind, message, _ = unprivileged(read_temporal_metadata, path)  # was "No such file or directory"
    assert message == f"TemporalModuleError: temporal module {path} cannot be read: Permission denied", message


def test_a_base_folder_that_cannot_be_read_is_one_line_without_the_pickle_hint(shared, tiny_assets):
    from lvdm.models.loading import load_base

    copy = shutil.copytree(tiny_assets["base"], shared / "base")
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.chmod(0)
    kind, message, _ = unprivileged(load_base, copy)
    assert kind == "error" and "could not load the diffusers folder" in message, message
    assert "Permission denied" in message and "allow_pickle" not in message, message
    copy.chmod(0)  # the folder itself: a PermissionError out of Path.is_file, a traceback before
    kind, message, _ = unprivileged(load_base, copy)
    assert message == f"CheckpointError: could not load the diffusers folder {copy}: Permission denied", message


def test_a_data_folder_that_cannot_be_listed_is_a_bad_entry(shared):
    from lvdm.data.sources import folder_source

    (shared / "locked").mkdir()
    for name in ("a.mp4", "locked/b.mp4"):
        (shared / name).write_bytes(b"")
    (shared / "locked").chmod(0)
    kind, entries, printed = unprivileged(lambda: [(e.path.name, e.problem) for e in folder_source(shared)])
    assert kind == "ok" and "('locked', 'folder cannot be listed (Permission denied)" in entries, entries
    assert "locked folder cannot be listed (Permission denied)" in printed  # warned at once, not when drawn
    kind, message, _ = unprivileged(folder_source, shared / "locked")
    assert message.startswith("DataError: data folder") and message.endswith("cannot be listed: Permission denied")


def test_any_other_permission_error_is_one_line_with_exit_1(shared):
    """Checkpoints, run folders and outputs are read and written in many places; what the user may not touch
    there ends the command in one line naming the file, as a full disk does."""
    from lvdm.cli import run_cli
    from lvdm.training.checkpoint import find_checkpoint

    checkpoint = shared / "checkpoints" / "checkpoint-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("{}")
    assert unprivileged(run_cli, lambda argv: print(find_checkpoint(shared / "checkpoints")), [])[:2] == ("ok", "0")
    checkpoint.chmod(0)
    kind, code, printed = unprivileged(run_cli, lambda argv: find_checkpoint(shared / "checkpoints"), [])
    assert (kind, code) == ("ok", "1"), (code, printed)
    assert printed == f"error: Permission denied: {checkpoint / 'COMPLETE'} (check its permissions)\n"


def test_an_unreadable_cache_shard_or_decoder_file_is_named_so(shared, cached):  # noqa: F811
    """Two more safetensors reads said "No such file or directory" for a file the user may not read: the latent
    cache's shards (a FileNotFoundError without an errno: a traceback through the CLI) and a temporal decoder's."""
    from lvdm.cli import run_cli
    from lvdm.data.cache import LatentCache

    cache = shutil.copytree(cached[1], shared / "cache")
    for path in [cache, *cache.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert unprivileged(run_cli, lambda argv: print(len(LatentCache(cache))), [])[:2] == ("ok", "0")  # the control
    shard = cache / "shard-00001.safetensors"
    shard.chmod(0)
    kind, code, printed = unprivileged(run_cli, lambda argv: LatentCache(cache), [])
    assert (kind, code) == ("ok", "1"), (code, printed)
    assert printed == f"error: Permission denied: {shard} (check its permissions)\n"

    from lvdm.models.temporal_vae import _read_weights

    decoder = shared / "decoder"
    decoder.mkdir()
    decoder.chmod(0o755)
    save_file({"w": torch.zeros(1)}, decoder / "diffusion_pytorch_model.safetensors")
    (decoder / "diffusion_pytorch_model.safetensors").chmod(0)
    kind, message, _ = unprivileged(_read_weights, decoder, "dec", False)
    assert message.endswith("diffusion_pytorch_model.safetensors: Permission denied"), message


def test_unwritable_run_subfolders_are_refused_before_any_training(shared, tiny_assets):
    """``chmod 555 RUN/checkpoints`` then ``train.resume=auto`` trained every step before "cannot write
    checkpoints", and an unwritable ``samples/`` failed after the final checkpoint: the start-up check covers the
    run's subfolders that exist, in one line, before any training; and the ``checkpoints/checkpoint-N`` and
    ``samples/step-N`` folders the resumed run writes into again (an unwritable ``step-N`` failed after the final
    save, and an unwritable ``checkpoint-N`` left its old files in a ``.tmp-checkpoint-*`` folder for good).
    (``train.py`` runs as a process of its own, as root without the capabilities that override file modes: training
    in a forked child hangs, and ``nobody`` cannot reach the interpreter.)"""
    import subprocess
    import sys

    from conftest import tiny_overrides

    from lvdm.config import load_config
    from lvdm.training.trainer import train

    assets = {name: shutil.copytree(tiny_assets[name], shared / name) for name in ("base", "clips")}
    for path in [shared, *shared.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    run, repo = shared / "run", Path(__file__).resolve().parents[1]
    extra = {"train.validate_every": 2, "train.validation_prompts": "[a cat]", "train.validation_steps": 2}
    train(load_config([], tiny_overrides(assets, run, **extra, **{"train.max_steps": 2})), progress=False)
    log = (run / "log.jsonl").read_text()
    caps = "-dac_override,-dac_read_search"  # root without them: the modes bite, as for anyone else
    as_user = ["setpriv", "--bounding-set", caps, "--inh-caps", caps] if os.geteuid() == 0 else []
    if as_user and not shutil.which("setpriv"):
        pytest.skip("root without setpriv cannot drop the capabilities that override file modes")
    resume = [*as_user, sys.executable, repo / "train.py", "train.resume=auto",
              *tiny_overrides(assets, run, **extra, **{"train.max_steps": 4})]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}

    def resumed() -> subprocess.CompletedProcess:
        return subprocess.run(resume, capture_output=True, text=True, env=env, cwd=shared, timeout=300)

    folders = [run / name for name in ("checkpoints", "samples", "tensorboard") if (run / name).is_dir()]
    assert folders[:2] == [run / "checkpoints", run / "samples"], folders
    for sub in folders:
        sub.chmod(0o555)
    done = resumed()  # each named, in one line
    unwritable = "; ".join(f"folder {sub} is not writable: Permission denied" for sub in folders)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    said = done.stderr.strip().splitlines()[-1]
    assert said == f"error: {unwritable} (a run resumed at step 2 writes into them again: make them writable)", said
    assert (run / "log.jsonl").read_text() == log  # refused before a step was trained
    for sub in folders:
        sub.chmod(0o755)
    done = resumed()  # the control: writable again, it resumes to the end
    assert done.returncode == 0 and (run / "checkpoints" / "checkpoint-00000004").is_dir(), done.stderr[-2000:]
    log = (run / "log.jsonl").read_text()
    again = [run / "checkpoints" / "checkpoint-00000004", run / "samples" / "step-00000004"]  # saved, validated again
    for sub in again:
        sub.chmod(0o555)
    done = resumed()  # at its last step
    unwritable = "; ".join(f"folder {sub} is not writable: Permission denied" for sub in again)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    said = done.stderr.strip().splitlines()[-1]
    assert said == f"error: {unwritable} (a run resumed at step 4 writes into them again: make them writable)", said
    assert (run / "log.jsonl").read_text() == log and not list((run / "checkpoints").glob(".tmp-*"))


def test_a_resume_probes_the_step_folders_it_writes_into_again_and_only_those(tmp_path):
    """Resumed at step 2 to 6: it validates at 4 and 6 (every 2) and saves at 3 and 6 (every 3, and the last);
    step folders before, between or past those, or links, are not written (the same run resumed at 6, past its
    last step, writes into step 6's alone)."""
    from lvdm.training.resume_config import written_again

    for name in ("samples/step-0000000{}", "checkpoints/checkpoint-0000000{}"):
        for step in (1, 2, 3, 4, 5, 6, 7):
            (tmp_path / name.format(step)).mkdir(parents=True)
    (tmp_path / "samples" / "step-00000004").rmdir()
    (tmp_path / "samples" / "step-00000004").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "samples" / "step-4").mkdir()  # not a name lvdm writes
    train = {"max_steps": 6, "validate_every": 2, "checkpoint_every": 3}
    found = [str(path.relative_to(tmp_path)) for path in written_again(tmp_path, 2, train)]
    assert found == ["checkpoints/checkpoint-00000003", "checkpoints/checkpoint-00000006", "samples/step-00000006"]
    found = [str(path.relative_to(tmp_path)) for path in written_again(tmp_path, 6, train)]
    assert found == ["checkpoints/checkpoint-00000006", "samples/step-00000006"]
    found = [str(path.relative_to(tmp_path)) for path in written_again(tmp_path, 7, train)]
    assert found == ["checkpoints/checkpoint-00000007", "samples/step-00000007"]


def _marked_run(out: Path) -> None:
    """A run folder of lvdm's (its marker) with a checkpoint, a validation sample and a TensorBoard file: no model."""
    from lvdm.training.checkpoint import save_checkpoint
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    prepare_output_dir(out, resume=None, overwrite=False)
    save_checkpoint(out / "checkpoints", 1, {"trainable": {"w": torch.zeros(2)}})
    (out / "samples" / "step-00000001").mkdir(parents=True)
    (out / "samples" / "step-00000001" / "00.mp4").write_bytes(b"video")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"events")
    release_run(out)


def test_what_a_killed_writability_probe_leaves_is_lvdms_and_goes(tmp_path):
    """A kill during the start-up check leaves its ``.write-probe-<8 characters>`` file in a folder it probes: in the
    run's subfolders (and the step folders a resume probes) nothing removed it, and ``train.overwrite=true`` was
    refused for good ("files lvdm did not write"); one left in a new folder, killed at its first probe, refused
    every run there. Only lvdm's probe goes, known by its name and its text: a file or folder of yours named
    ``.write-probe-...`` stays (the top-level ones were deleted, a folder by overwrite)."""
    from lvdm.errors import LvdmError
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    out = tmp_path / "run"
    _marked_run(out)
    folders = ["", "checkpoints", "checkpoints/checkpoint-00000001", "samples", "samples/step-00000001", "tensorboard"]

    def killed_probes() -> list[Path]:  # killed before, during and after writing its text
        probes = [out / where / f".write-probe-{i}b_x9z0q" for i, where in enumerate(folders)]
        for i, probe in enumerate(probes):
            probe.write_bytes(b"lvdm write probe\n"[: (0, 8, 17)[i % 3]])
        return probes

    probes = killed_probes()
    yours = [out / ".write-probe-notes", out / "samples" / "step-00000001" / ".write-probe-ab12cd34"]
    yours[0].mkdir()
    (yours[0] / "a.txt").write_text("mine")
    yours[1].write_text("my notes")
    prepare_output_dir(out, resume="auto", overwrite=False)
    release_run(out)
    assert not any(probe.exists() for probe in probes) and all(path.exists() for path in yours)
    probes = killed_probes()
    with pytest.raises(LvdmError, match="write-probe-notes.*write-probe-ab12cd34"):
        prepare_output_dir(out, resume=None, overwrite=True)
    assert (out / "checkpoints" / "checkpoint-00000001").is_dir() and (yours[0] / "a.txt").exists()
    shutil.rmtree(yours[0])
    yours[1].unlink()
    prepare_output_dir(out, resume=None, overwrite=True)  # the control: lvdm's alone, so it clears the run
    release_run(out)
    assert sorted(path.name for path in out.iterdir()) == [".lvdm-lock", ".lvdm-run.json"]
    new = tmp_path / "new"
    new.mkdir()
    (new / ".write-probe-x1y2z3w4").write_bytes(b"lvdm write")
    prepare_output_dir(new, resume=None, overwrite=False)
    release_run(new)
    assert sorted(path.name for path in new.iterdir()) == [".lvdm-lock", ".lvdm-run.json"]


def test_overwrite_removes_an_empty_unwritable_folder_and_refuses_a_full_one_before_deleting_anything(shared):
    """``train.overwrite=true`` over a run whose ``samples/`` was empty and read-only was refused ("folder ... is not
    writable"), though deleting an empty folder needs only its parent writable; and a read-only
    ``samples/step-N`` holding samples (never probed) stopped the clearing part-way, the checkpoints already gone,
    with "Permission denied: 00.mp4". Now the empty one goes with the rest, and the full one is refused before
    anything is deleted, saying what to do."""
    from lvdm.training.run_dir import prepare_output_dir

    out, step = shared / "run", shared / "run" / "samples" / "step-00000001"
    _marked_run(out)
    for path in [out, *out.rglob("*")] if os.geteuid() == 0 else []:
        os.chown(path, NOBODY, NOBODY)  # the run is nobody's, as it would be had nobody trained it
    overwrite = lambda: prepare_output_dir(out, resume=None, overwrite=True)  # noqa: E731
    files = lambda: {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lvdm-lock"}  # noqa: E731
    before = files()
    step.chmod(0o555)
    kind, message, _ = unprivileged(overwrite)
    assert message == (
        f"LvdmError: output_dir {out}: lvdm cannot clear its previous run: folder {step} is not writable, so what is "
        f"in it cannot be deleted; nothing was deleted: make it writable (chmod -R u+rwX {out / 'samples'}) and run "
        "again, or choose another output_dir"
    ), message
    assert files() == before
    step.chmod(0o755)
    shutil.rmtree(step)
    (out / "samples").chmod(0o555)  # empty, of lvdm's name: removed like the rest
    assert unprivileged(overwrite)[:2] == ("ok", "None")
    assert sorted(path.name for path in out.iterdir()) == [".lvdm-lock", ".lvdm-run.json"]


def test_a_run_folder_reached_through_a_link_has_its_folders_probed_too(shared):
    """``output_dir`` may be a link (a run folder on another disk). The resume's probe of the run's folders looked
    only into plain folders, so through a link a read-only ``checkpoints/`` was found after training, at the first
    save. The control: the same run by its real path is refused alike, and resumes through the link once it is
    writable."""
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    out, link = shared / "run", shared / "link"
    _marked_run(out)
    link.symlink_to(out)
    for path in [out, *out.rglob("*")] if os.geteuid() == 0 else []:
        os.chown(path, NOBODY, NOBODY)
    (out / "checkpoints").chmod(0o555)
    for run in (link, out):
        kind, message, _ = unprivileged(lambda run=run: prepare_output_dir(run, resume="auto", overwrite=False))
        assert kind == "error" and f"folder {run / 'checkpoints'} is not writable" in message, message
    (out / "checkpoints").chmod(0o755)

    def resume() -> None:
        prepare_output_dir(link, resume="auto", overwrite=False)
        release_run(link)

    assert unprivileged(resume)[:2] == ("ok", "None")
