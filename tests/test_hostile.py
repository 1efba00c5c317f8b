"""Attacks a hostile (or unlucky) user makes, each through the real command lines: as a subprocess with a timeout
where the attack could hang or fill memory, or involves signals or what the libraries print as they import; in this
process (conftest's ``command``, the commands' own ``main`` through run_cli) where it is refused or fails once loaded.

Every attack must end with a one-line message and a non-zero exit (or the right outcome), never a traceback or a
hang, and must never lose a file that is not lvdm's. The README section "What lvdm guarantees about your files"
lists what these check. Attacks that fail before a model loads are batched and run concurrently to stay fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from safetensors import safe_open
from safetensors.torch import save_file

from lvdm.training.checkpoint import MARKER, list_checkpoints, load_checkpoint
from lvdm.training.logs import read_log

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "train.py")
SAMPLE = str(REPO / "sample.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}


def _command(args: list[str]) -> list[str]:
    return [sys.executable, *map(str, args)]


def cli(*args: object, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` from the repository root; a traceback in its output fails the test."""
    result = subprocess.run(
        _command(list(args)), capture_output=True, text=True, env=env or ENV, cwd=REPO, timeout=timeout
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def cli_all(*commands: list[object], timeout: float = 180) -> list[subprocess.CompletedProcess[str]]:
    """Several quick attacks at once (each fails before a model loads); results in order, none with a traceback."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "errors": "backslashreplace",
             "env": ENV, "cwd": REPO}  # fmt: skip
    procs = [subprocess.Popen(_command(list(c)), **pipes) for c in commands]
    results = []
    for proc, command in zip(procs, commands, strict=True):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
        assert "Traceback" not in err, err[-3000:]
    return results


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def train_args(assets: dict, out: Path, **extra: object) -> list[object]:
    return [TRAIN, "--quiet", *tiny_overrides(assets, out, **extra)]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_marker(checkpoint: Path) -> None:
    """Make the COMPLETE marker agree with whatever the files now hold (a tamperer with the right checksums)."""
    marker = json.loads((checkpoint / MARKER).read_text())
    for record in marker["files"]:
        data = (checkpoint / record["name"]).read_bytes()
        record["size"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (checkpoint / MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoints at steps 1 and 2), trained once in process; attacks use copies."""
    from lvdm.config import load_config
    from lvdm.training.run_lock import release_run
    from lvdm.training.trainer import train

    out = tmp_path_factory.mktemp("hostile") / "run"
    train(load_config([], tiny_overrides(tiny_assets, out, **{"train.max_steps": 2, "train.checkpoint_every": 1})),
          progress=False)  # fmt: skip
    release_run(out)
    return out


def copy_run(trained: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(trained, target)
    return target


# ---------------------------------------------------------------------------------------------- output folders


def test_a_users_folder_root_and_home_are_refused_and_nothing_is_touched(tiny_assets, tmp_path, command):
    mine = tmp_path / "my_project"
    for name, text in {
        "samples/holiday/img1.jpg": "jpeg bytes",
        "tensorboard/events.mine": "my events",
        "checkpoints/model.ckpt": "my model",
        "config.yaml": "my: config\n",
    }.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = snapshot(mine)
    home = tmp_path / "home"
    home.mkdir()
    users = command(*train_args(tiny_assets, mine, **{"train.overwrite": "true", "train.max_steps": 2}))
    root = command(*train_args(tiny_assets, Path("/"), **{"train.overwrite": "true"}))
    one_line_error(users, 1, "holds files lvdm did not write", "whatever train.overwrite says")
    assert snapshot(mine) == before and not (mine / ".lvdm-run.json").exists()
    assert root.returncode == 2 and "output_dir: '/' is a file-system root" in root.stderr  # the config check
    at_home = command(*train_args(tiny_assets, home, **{"train.overwrite": "true"}), env={"HOME": str(home)})
    assert at_home.returncode == 2 and "is your home folder; lvdm refuses" in at_home.stderr
    assert list(home.iterdir()) == []


def test_the_life_of_a_run_folder(tiny_assets, tmp_path, command):
    """A second run is refused while the first holds the folder; a killed run's lock is taken over and, having no
    checkpoint, does not block the next run; a crash in the middle of replacing a checkpoint is recovered; the
    resumed log has no duplicate steps and config.yaml is rewritten; a stray export temp file is removed.
    (Overwriting a finished run, as the demo does on every rerun, is checked in process below and in
    test_training.) The first run is a process of its own; the others run train.py's main in this process."""

    def run(**extra: object) -> subprocess.CompletedProcess[str]:
        return command(*train_args(tiny_assets, out, **extra))

    out = tmp_path / "run"
    first = subprocess.Popen(
        _command(train_args(tiny_assets, out, **{"train.max_steps": 100000, "train.checkpoint_every": 100000})),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while not (out / "log.jsonl").exists():  # training has started, under the lock
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.5)
        started = time.monotonic()
        second = run(**{"train.resume": "auto"})
        one_line_error(second, 1, "in use by another lvdm run", f"pid {first.pid}", "still running")
        assert time.monotonic() - started < 60
    finally:
        first.kill()
        first.wait()

    third = run(**{"train.max_steps": 2, "train.checkpoint_every": 1, "train.keep_last": 1})
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"pid {first.pid}" in third.stderr and "did not exit cleanly" in third.stderr
    assert "stopped before its first checkpoint" in third.stderr

    # killed between the two renames that replace checkpoint-2 (keep_last=1): only temporary folders remain
    root = out / "checkpoints"
    shutil.copytree(root / "checkpoint-00000002", root / ".tmp-checkpoint-00000002-k1ll3d")
    os.rename(root / "checkpoint-00000002", root / ".tmp-checkpoint-checkpoint-00000002-replaced-0badf00d")
    with (out / "log.jsonl").open("a") as log:  # killed after logging step 3, before its checkpoint
        log.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    (out / ".temporal.safetensors.deadbeef.tmp").write_bytes(b"half an export")
    (out / ".temporal.safetensors.0badcafe.tmp.safetensors").write_bytes(b"half an export, written with its LoRA")
    resumed = run(**{"train.resume": "auto", "train.max_steps": 3, "train.keep_last": 1})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "recovered checkpoint" in resumed.stderr and "warning:" not in resumed.stderr
    assert "note: resuming with train.max_steps changed: 2 -> 3" in resumed.stderr
    records = [r for r in read_log(out / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] != 9.0, records
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint-00000003"]
    assert not list(out.glob(".*.tmp*")) and not list(root.glob(".tmp-*"))
    assert "max_steps: 3" in (out / "config.yaml").read_text()  # rewritten on resume


def test_checkpoint_material_without_a_complete_checkpoint_stops_resume(trained, tmp_path, command):
    out = copy_run(trained, tmp_path, "temps_only")
    root = out / "checkpoints"
    for path in list_checkpoints(root):
        (path / MARKER).unlink()
        os.rename(path, root / f".tmp-{path.name}-4b1d")
    before = snapshot(out)
    damaged = copy_run(trained, tmp_path, "damaged")
    newest = list_checkpoints(damaged / "checkpoints")[-1]
    data = bytearray((newest / "trainable.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (newest / "trainable.safetensors").write_bytes(bytes(data))
    wrong_type = copy_run(trained, tmp_path, "wrong_type")
    newest_wrong = list_checkpoints(wrong_type / "checkpoints")[-1]
    meta = json.loads((newest_wrong / "metadata.json").read_text())
    (newest_wrong / "metadata.json").write_text(json.dumps(meta | {"step": "2"}))
    rewrite_marker(newest_wrong)
    no_resume, flipped, string_step = (
        command(TRAIN, "--config", folder / "config.yaml", f"output_dir={folder}", "train.resume=auto")
        for folder in (out, damaged, wrong_type)
    )
    one_line_error(no_resume, 1, "no complete checkpoint", "nothing was deleted")
    assert snapshot(out) == before
    one_line_error(flipped, 1, "trainable.safetensors", "sha256", "checkpoint-00000001")
    one_line_error(string_step, 1, "metadata.json", "'step'")


def test_states_rewritten_with_matching_checksums_are_a_damaged_checkpoint_not_a_traceback(trained, tiny_assets,
                                                                                              tmp_path):  # fmt: skip
    """Only the counters were checked: a checkpoint whose RNG, optimizer or loss history was rewritten (its marker
    agreeing) failed in a traceback while restoring, or in AdamW at the first step (a moment of the wrong shape)."""
    from lvdm.config import load_config
    from lvdm.errors import CheckpointError
    from lvdm.training.trainer import train

    def edit(part, change):
        def apply(checkpoint):
            state = torch.load(checkpoint / f"{part}.pt", weights_only=True)
            change(state)
            torch.save(state, checkpoint / f"{part}.pt")

        return apply

    cases = {
        "rng": (edit("rng", lambda s: s.update(torch=torch.zeros(3, dtype=torch.uint8))), "CPUGeneratorImplState"),
        "moment": (edit("optimizer", lambda s: s["state"][0].update(exp_avg=torch.zeros(1))), "exp_avg is (1,)"),
        "lr": (edit("optimizer", lambda s: s["param_groups"][0].update(lr="x")), "settings are not numbers"),
        "losses": (edit("trainer", lambda s: s.update(losses=[float("nan"), "x"])), "could not convert"),
        "none": (lambda checkpoint: None, None),  # the control: the same copy, untouched, resumes
    }
    for name, (change, message) in cases.items():
        out = copy_run(trained, tmp_path, name)
        newest = list_checkpoints(out / "checkpoints")[-1]
        change(newest)
        rewrite_marker(newest)
        cfg = load_config([out / "config.yaml"], [f"output_dir={out}", "train.resume=auto", "train.max_steps=3"])
        if message is None:
            assert train(cfg, progress=False).step == 3
            continue
        with pytest.raises(
            CheckpointError, match="checkpoint-00000002 is damaged: its states cannot be restored"
        ) as e:
            train(cfg, progress=False)
        assert message in str(e.value) and "\n" not in str(e.value), name


# ---------------------------------------------------------------------------------------------- disk full


INJECT = """
import errno, os, runpy, sys
import lvdm.models.temporal_file as temporal_file
import lvdm.training.logs as logs
where, calls = os.environ["LVDM_DISK_FULL"], []
def full(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:  # the first write succeeds, the second finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kwargs)
if where == "export":
    real, temporal_file.save_safetensors = temporal_file.save_safetensors, full
elif where == "tensorboard":  # in TensorBoard's writer thread, which printed a traceback before lvdm's line
    from tensorboard.summary.writer import record_writer
    real, record_writer.RecordWriter.write = record_writer.RecordWriter.write, full
else:
    real, logs._append_line = logs._append_line, full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("where", ["export", "log", "tensorboard"])
def test_a_full_disk_is_one_line_and_the_checkpoints_stay_intact(where, tiny_assets, tmp_path):
    out = tmp_path / "run"
    inject = tmp_path / "inject.py"
    inject.write_text(INJECT)
    extra = {"train.max_steps": 4, "train.checkpoint_every": 1, "train.log_every": 1}
    result = cli(inject, *train_args(tiny_assets, out, **extra), env={**ENV, "LVDM_DISK_FULL": where})
    target = {"export": "temporal.safetensors", "log": "log.jsonl", "tensorboard": "tensorboard"}[where]
    one_line_error(result, 1, f"could not write {out / target}", "No space left on device")
    checkpoints = list_checkpoints(out / "checkpoints")
    assert checkpoints and all(load_checkpoint(path) for path in checkpoints)
    assert not list(out.glob(".*.tmp"))
    if where == "export":
        from lvdm.models.temporal_file import read_temporal_file

        read_temporal_file(out / "temporal.safetensors")  # the first export is still whole


# ---------------------------------------------------------------------------------------------- loading files


def _rewrite_module(source: Path, target: Path, *, metadata: dict | None = None, edit=None) -> Path:
    with safe_open(source, framework="pt") as handle:
        tensors, meta = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    if edit is not None:
        edit(tensors)
    save_file(tensors, target, metadata=meta | (metadata or {}))
    return target


def test_hostile_temporal_modules_are_refused_in_one_line(trained, tiny_assets, tmp_path, command):
    """Through sample.py's main in this process (eight interpreters side by side took 24 s)."""
    module = trained / "temporal.safetensors"
    first = sorted(safe_open(module, framework="pt").keys())[0]

    def nan(tensors):
        tensors[first][...] = float("nan")

    def flip(tensors):
        tensors[first].view(-1)[0] += 1.0

    def float8(tensors):  # isfinite is not implemented for it: a NotImplementedError traceback before
        tensors[first] = tensors[first].to(torch.float8_e4m3fn)

    training = json.loads(safe_open(module, framework="pt").metadata()["training_config"])
    training["data"]["num_frames"] = 10**9
    layout = json.loads(safe_open(module, framework="pt").metadata()["layout"])
    deep, heads = json.dumps(layout | {"attention_depth": 10**6}), json.dumps(layout | {"attention_heads": 7})
    cases = {
        "deep": ({"layout": deep}, None, "attention_depth=1000000: must be 1 .. 16"),  # building it hung
        "heads": ({"layout": heads}, None, "do not divide into 7 heads"),
        "version": ({"format_version": "one"}, None, "format_version 'one' is not a whole number"),
        "sites": ({"sites": json.dumps({"a": 1})}, None, "'sites' must be a list of objects"),
        "frames": ({"training_config": json.dumps(training)}, None, "num_frames = 1000000000"),
        "nan": (None, nan, f"tensor {first!r} holds NaN"),
        "flipped": (None, flip, "do not match the checksum"),
        "float8": (None, float8, "has dtype torch.float8_e4m3fn"),
    }
    for name, (metadata, edit, message) in cases.items():
        bad = _rewrite_module(module, tmp_path / f"{name}.safetensors", metadata=metadata, edit=edit)
        result = command(SAMPLE, "--quiet", "--base", tiny_assets["base"], "--temporal", bad, "--prompt", "a disc",
                         "--steps", "1", "--out", tmp_path / f"{name}.mp4")  # fmt: skip
        one_line_error(result, 1, message)
        assert not (tmp_path / f"{name}.mp4").exists()
    training["data"] |= {"num_frames": 4, "resolution": [7, 7]}  # a size the user never set: named as the module's
    odd = _rewrite_module(module, tmp_path / "odd.safetensors", metadata={"training_config": json.dumps(training)})
    arguments = [SAMPLE, "--quiet", "--base", tiny_assets["base"], "--temporal", odd, "--prompt", "a disc",
                 "--steps", "1", "--out", tmp_path / "odd.mp4"]  # fmt: skip
    one_line_error(command(*arguments), 2, "the temporal module's training config gave height=7, width=7")
    assert command(*arguments, "--height", "16", "--width", "16").returncode == 0  # the control: set them
    assert (tmp_path / "odd.mp4").is_file()


def test_a_malicious_pickle_is_one_line_even_with_allow_pickle(tiny_assets, tmp_path, command):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    base = tmp_path / "base"
    shutil.copytree(tiny_assets["base"], base)
    for weights in (base / "unet").glob("*.safetensors"):
        weights.unlink()
    torch.save({"conv_in.weight": Evil()}, base / "unet" / "diffusion_pytorch_model.bin")
    result = command(SAMPLE, "--quiet", "--base", base, "--allow-pickle", "--prompt", "x", "--out", tmp_path / "o.mp4")
    one_line_error(result, 1, str(base))
    # a single file and a LoRA: torch's two-line warning of the pickle's protocol came first
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": Evil()}}, evil, pickle_protocol=4)
    base_config = ("--base-config", tiny_assets["base"])
    for given in (("--base", evil, *base_config), ("--base", tiny_assets["base"], "--lora", evil)):
        result = command(SAMPLE, "--quiet", *given, "--allow-pickle", "--prompt", "x", "--out", tmp_path / "o.mp4")
        one_line_error(result, 1, str(evil))
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------- configs and data


def test_hostile_configs_are_refused_quickly(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 50000 + "]" * 50000 + "\n")
    started = time.monotonic()
    results = cli_all(
        [TRAIN, "--config", bomb], [TRAIN, "--config", deep],
        [TRAIN, "model.base=x", "data.root=y", "train.seed=-1", "train.max_steps=1000000000"],
    )  # fmt: skip
    assert time.monotonic() - started < 60
    assert all(r.returncode == 2 for r in results), [r.stderr for r in results]
    assert "alias bomb" in results[0].stderr and "nested more than 64 levels" in results[1].stderr
    assert "train.seed" in results[2].stderr and "train.max_steps" in results[2].stderr


def test_absurd_numbers_are_refused_before_anything_loads(tiny_assets, tmp_path):
    """Each once hung (a billion-frame clip plan, a hundred million output names) or ended in a traceback
    (diffusers' step limit, an allocation, a seed past 64 bits, NaN frames from an infinite guidance)."""
    from lvdm.errors import ConfigError
    from lvdm.sampling_settings import sampling_settings

    sample = [SAMPLE, "--quiet", "--base", tiny_assets["base"], "--out", tmp_path / "x.mp4"]
    attacks = [
        [TRAIN, "model.base=x", "data.root=y", "data.num_frames=1000000000"],
        [*sample, "--prompt", "x", "--steps", "5000"],
        [*sample, "--prompts", "/dev/zero"],
        [*sample, "--prompt", "a \udcff disc", "--steps", "1"],  # the byte 0xff: a TypeError in the tokenizer
    ]
    started = time.monotonic()
    train, steps, zeros, latin = cli_all(*attacks)
    assert time.monotonic() - started < 60
    assert train.returncode == 2 and "data.num_frames: must be <= 1024, got 1000000000" in train.stderr
    one_line_error(steps, 2, "num_inference_steps: must be <= 1000")
    one_line_error(zeros, 2, "prompts file /dev/zero cannot be read", "larger than 16 MiB")  # it filled memory
    one_line_error(latin, 2, "is not UTF-8 text")
    assert not (tmp_path / "x.mp4").exists()
    # the other maxima, where sample.py checks them (as --steps above), in this process
    for setting, value in (("num_frames", 10**8), ("height", 100000), ("seed", 10**23), ("guidance_scale", math.inf),
                           ("num_videos_per_prompt", 10**8)):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{setting}: must be <= "):
            sampling_settings(**{setting: value})


def test_a_fifo_no_process_writes_is_refused_and_a_slow_writer_is_waited_for(tiny_assets, tmp_path):
    """A named FIFO as --prompts or --config once blocked forever in open(); a pipe whose writer is slow (the
    process substitution ``<(...)`` users give) must still be read whole."""
    import threading

    from lvdm.fileio import read_bounded

    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    sample = [SAMPLE, "--quiet", "--base", tiny_assets["base"], "--out", tmp_path / "x.mp4", "--prompts", fifo]
    started = time.monotonic()
    prompts, config = cli_all(sample, [TRAIN, "--config", fifo], timeout=120)
    assert time.monotonic() - started < 60
    one_line_error(prompts, 2, f"prompts file {fifo} cannot be read", "a pipe that no process writes to")
    assert config.returncode == 2 and "a pipe that no process writes to" in config.stderr, config.stderr[-2000:]

    read_end, write_end = os.pipe()  # what bash's <(...) gives: /dev/fd/N, a writer that is slower than lvdm

    def write_late() -> None:
        with os.fdopen(write_end, "wb") as writer:
            time.sleep(0.5)
            writer.write(b"a slow pipe\n")
            writer.flush()
            time.sleep(0.5)
            writer.write(b"second line\n")

    thread = threading.Thread(target=write_late)
    thread.start()
    try:
        assert read_bounded(f"/dev/fd/{read_end}", 1 << 10) == b"a slow pipe\nsecond line\n"
    finally:
        thread.join(timeout=10)
        os.close(read_end)


def test_a_non_finite_video_is_one_clear_error(tiny_assets):
    """Latents that blew up (too large a guidance or threshold, a module with extreme weights) decode to NaN: one
    line naming the likely causes, not media's ValueError."""
    from lvdm import VideoPipeline
    from lvdm.errors import LvdmError

    pipe = VideoPipeline.from_pretrained(tiny_assets["base"])
    latents = torch.zeros(1, 4, 2, 2, 2)
    assert pipe.decode(latents).shape[:2] == (1, 2)  # the control
    latents[0, 0, 1, 0, 0] = float("inf")
    with pytest.raises(LvdmError, match="NaN or infinite values.*lower the guidance"):
        pipe.decode(latents)


def test_hostile_data_is_reported_not_hung_on(tmp_path):
    from lvdm.testing.clips import write_captioned_folder

    folder = write_captioned_folder(tmp_path / "clips", 3, num_frames=12, size=(32, 24), seed=0)
    clips = sorted(folder.rglob("*.mp4"))
    clips[0].with_suffix(".txt").unlink()
    os.mkfifo(clips[0].with_suffix(".txt"))  # a caption that would block a plain read forever
    outside = tmp_path / "secret.mp4"
    shutil.copy(clips[2], outside)
    (folder / "link.mp4").symlink_to(outside)
    (folder / "link.txt").write_text("a caption")
    os.mkfifo(folder / "pipe.mp4")  # a video that is a FIFO: opening it would block the decoder
    (folder / "pipe.txt").write_text("a caption")
    latin = os.fsencode(folder) + b"/caf\xe9.mp4"  # a name that is not UTF-8 (made on a Latin-1 system)
    open(latin, "wb").close()
    open(latin[:-4] + b".txt", "w").write("a caption")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f'video,caption\n{clips[1].name},fine\nbad\0name.mp4,a NUL in the path\n{clips[2].name},"{"x" * (2 << 20)}"\n',
        encoding="utf-8",
    )
    shutil.copy(clips[1], tmp_path / clips[1].name)
    shutil.copy(clips[2], tmp_path / clips[2].name)
    args = ["data.num_frames=4", "data.resolution=[16,16]", "--quiet"]
    on_folder, on_manifest = cli_all(
        ["-m", "lvdm.data.check", f"data.root={folder}", *args, "--report", tmp_path / "folder.jsonl"],
        ["-m", "lvdm.data.check", f"data.manifest={manifest}", *args, "--report", tmp_path / "manifest.jsonl"],
        timeout=120,
    )
    assert on_folder.returncode == 1 and on_manifest.returncode == 1  # too many bad files, reported
    folder_report = {Path(r["path"]).name: r.get("reason") for r in map(json.loads, open(tmp_path / "folder.jsonl"))}
    assert "not a regular file" in folder_report[clips[0].name]
    assert "escapes the data root" in folder_report["link.mp4"]
    assert folder_report["pipe.mp4"] == "not a regular file"
    assert folder_report["caf\udce9.mp4"] == "zero-byte file"  # the report was written (it failed on the name)
    reasons = sorted(r.get("reason") or "ok" for r in map(json.loads, open(tmp_path / "manifest.jsonl")))
    assert reasons[0] == "ok" and "NUL byte" in reasons[1] and "unreadable CSV row" in reasons[2], reasons


def test_out_of_memory_is_one_line_and_a_path_stdout_cannot_encode_is_escaped(tmp_path, capsys):
    """Short of memory (a ulimit, the GPU) a run ended in a MemoryError or an allocator's RuntimeError traceback;
    with PYTHONIOENCODING=ascii a non-ASCII path printed at the end was a UnicodeEncodeError after the work."""
    from lvdm.cli import run_cli

    def fails(exc):
        def main(argv):
            raise exc

        return main

    cpu = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"
    for exc in (MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), RuntimeError(cpu)):
        assert run_cli(fails(exc), []) == 1
        assert capsys.readouterr().err.startswith("error: out of memory (")
    with pytest.raises(RuntimeError, match="a bug"):  # the control: any other RuntimeError is a bug, not a user's
        run_cli(fails(RuntimeError("a bug")), [])
    folder = tmp_path / "clïps"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(b"")
    (folder / "a.txt").write_text("a disc")
    command = _command(["-m", "lvdm.data.check", f"data.root={folder}", "--quiet"])
    result = subprocess.run(command, capture_output=True, text=True, env={**ENV, "PYTHONIOENCODING": "ascii"},
                            cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cl\\xefps" in result.stdout and "verdict: too many bad files" in result.stdout


def test_a_relative_path_in_a_deleted_working_folder_is_named_as_such(tmp_path):
    """It was "a link that loops" (os.getcwd's FileNotFoundError taken for a loop)."""
    from lvdm.errors import ConfigError
    from lvdm.fileio import special_folder

    gone, here = tmp_path / "gone", os.getcwd()
    gone.mkdir()
    os.chdir(gone)
    try:
        gone.rmdir()
        with pytest.raises(ConfigError, match="'run' is relative to the working folder, which no longer exists"):
            special_folder("run")
        assert special_folder(tmp_path / "run") is None  # the control: an absolute path is judged as ever
    finally:
        os.chdir(here)


def test_a_closed_pipe_is_not_a_traceback():
    proc = subprocess.Popen(_command([TRAIN, "--help-config"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV, cwd=REPO)  # fmt: skip
    proc.stdout.close()  # the reader is gone before anything was written, like `| head` after its lines
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
    with open("/dev/full", "w") as full:  # stdout on a full disk: one line, exit 1
        result = subprocess.run(_command([TRAIN, "--help-config"]), stdout=full, stderr=subprocess.PIPE, text=True,
                                env=ENV, cwd=REPO, timeout=60)  # fmt: skip
    assert result.returncode == 1 and result.stderr == "error: No space left on device writing stdout\n"
    with open("/dev/full", "w") as full:  # argparse drops --help's write error: it exited 0 with nothing written
        result = subprocess.run(_command([SAMPLE, "--help"]), stdout=full, stderr=subprocess.PIPE, text=True, env=ENV,
                                cwd=REPO, timeout=60)  # fmt: skip
    assert result.returncode == 1 and result.stderr == "error: No space left on device writing stdout\n"
    closed = subprocess.run(_command([TRAIN, "--help-config"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=REPO, timeout=60, preexec_fn=lambda: os.close(1))  # fmt: skip
    assert closed.returncode == 0 and not closed.stderr, closed.stderr  # an AttributeError traceback before


def test_a_write_error_names_stdout_only_where_stdout_failed():
    """The control for the test above: a nameless full-disk error (a file object's write) with stdout writable."""
    script = ("import errno, sys; from lvdm.cli import run_cli\n"
              "def main(argv):\n    print('made')\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "sys.exit(run_cli(main))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, cwd=REPO,
                            timeout=60)  # fmt: skip
    assert result.returncode == 1 and result.stderr == "error: No space left on device writing the output\n"


def test_sigterm_stops_resumably_with_its_own_exit_code_and_skips_sampling(tiny_assets, tmp_path):
    out = tmp_path / "run"
    extra = {"train.max_steps": 100000, "train.checkpoint_every": 100000, "train.validation_prompts": "[a disc]"}
    proc = subprocess.Popen(_command(train_args(tiny_assets, out, **extra)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 150
    while not (out / "log.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "stopped" in err and "train.resume=auto" in err and "Traceback" not in err
    assert list_checkpoints(out / "checkpoints") and not (out / "samples").exists()


def test_a_refused_resume_leaves_no_new_folder_behind(trained, tiny_assets, tmp_path, command):
    """train.resume= a file, another config's checkpoint or a folder that is not a checkpoint: each was refused
    but left a new, empty output_dir (with a tensorboard/ folder, for the changed config); the last one said
    "incomplete: COMPLETE is missing (interrupted save?)". The control: the run's own checkpoint resumes there."""
    checkpoint = trained / "checkpoints" / "checkpoint-00000002"
    (tmp_path / "a_file").write_text("mine")
    cases = [
        (tmp_path / "a_file", {}, "a_file is a regular file, not a checkpoint folder"),
        (checkpoint, {"data.num_frames": 6}, "data.num_frames"),
        (trained, {}, "is not a checkpoint folder (no COMPLETE, no metadata.json)"),
    ]
    for resume, extra, message in cases:
        out = tmp_path / "new_run"
        result = command(*train_args(tiny_assets, out, **{"train.resume": resume, "train.max_steps": 3, **extra}))
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    result = command(
        *train_args(tiny_assets, tmp_path / "new_run", **{"train.resume": checkpoint, "train.max_steps": 3})
    )
    assert result.returncode == 0 and (tmp_path / "new_run" / "temporal.safetensors").exists(), result.stderr[-2000:]


SIGTERM_MID_WRITE = """
import os, signal, sys, time
from lvdm.cli import run_cli
from lvdm.fileio import atomic_path

def main(argv):
    child = os.fork()
    if child == 0:  # a forked worker still dies of SIGTERM at once
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(0)
    assert os.waitpid(child, 0)[1] == signal.SIGTERM, "the child did not die of the signal"
    with atomic_path(argv[0]) as temp:
        temp.write_text("half written")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

sys.exit(run_cli(main))
"""


def test_sigterm_while_writing_cleans_up_and_a_too_long_name_is_one_line(tmp_path):
    """A command killed by SIGTERM while writing left its temporary file (a 2.3 MB hidden export); it now cleans up
    as on Ctrl-C and exits 143. A name over 255 bytes was an OSError traceback in every command."""
    result = subprocess.run(_command(["-c", SIGTERM_MID_WRITE, tmp_path / "out.safetensors"]), capture_output=True,
                            text=True, env=ENV, cwd=REPO, timeout=60)  # fmt: skip
    assert result.returncode == 143 and result.stderr == "terminated\n", result.stderr
    assert not list(tmp_path.iterdir())  # neither the output nor its temporary file
    long = "a" * 300
    check = ["-m", "lvdm.data.check"]
    for command in ([*check, f"data.root={tmp_path / long}"], [*check, f"data.root={tmp_path}", "--report",
                                                                tmp_path / f"{long}.jsonl"]):  # fmt: skip
        result = cli(*command, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: File name too long: ") and long in result.stderr, result.stderr


SIGNAL_IN_A_FINALIZER = """
import os, signal, sys, time, weakref
from lvdm.cli import run_cli

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background job starts ignoring it

class Collected:  # a library's object, collected when the signal comes
    def __del__(self):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(0.05)  # the handler runs here, inside __del__

def main(argv):
    Collected()
    weakref.finalize(Collected(), os.kill, os.getpid(), getattr(signal, argv[0]))
    time.sleep(5)  # the rest of the work
    print("finished")

sys.exit(run_cli(main))
"""


@pytest.mark.parametrize(("name", "code", "said"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_that_lands_in_a_finalizer_still_stops_the_command(name, code, said):
    """A signal whose exception was raised inside a library object's ``__del__`` was discarded by Python ("Exception
    ignored in ..." and a traceback), and the command ran on and exited 0 (the review hit it 5 times in 51 timed
    SIGTERMs to lvdm.convert, and with Ctrl-C in an example). It is now sent again outside, and stops the command."""
    start = time.monotonic()
    result = subprocess.run(_command(["-c", SIGNAL_IN_A_FINALIZER, name]), capture_output=True, text=True, env=ENV,
                            cwd=REPO, timeout=60)  # fmt: skip
    assert (result.returncode, result.stderr, result.stdout) == (code, f"{said}\n", ""), result.stderr
    assert time.monotonic() - start < 4.5  # stopped, not run to the end


SIGNAL_WHILE_REPORTING = """
import os, signal, sys, time
from lvdm.cli import run_cli

signal.signal(signal.SIGINT, signal.default_int_handler)

class Stderr:  # a second signal arrives while the command says how it stopped
    def __init__(self, stream):
        self.stream = stream
    def write(self, text):
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        time.sleep(0.05)  # a handler would run here
        return self.stream.write(text)
    def flush(self):
        self.stream.flush()

def main(argv):
    sys.stderr = Stderr(sys.stderr)
    os.kill(os.getpid(), getattr(signal, argv[0]))
    time.sleep(5)
    print("finished")

sys.exit(run_cli(main))
"""


@pytest.mark.parametrize(("name", "code", "said"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_second_signal_while_the_command_reports_the_first_is_ignored(name, code, said):
    """A second SIGTERM (or Ctrl-C) that landed while the command printed "terminated" was raised there: a
    traceback and exit 1 (CI hit it once, with two signals sent again from finalizers)."""
    result = subprocess.run(_command(["-c", SIGNAL_WHILE_REPORTING, name]), capture_output=True, text=True, env=ENV,
                            cwd=REPO, timeout=60)  # fmt: skip
    assert (result.returncode, result.stderr, result.stdout) == (code, f"{said}\n", ""), result.stderr


SECOND_CTRL_C_IN_A_FINALIZER = """
import os, signal, sys, time, types
from lvdm.cli import run_cli
from lvdm.training.trainer import Trainer

signal.signal(signal.SIGINT, signal.default_int_handler)

class Collected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)

def main(argv):
    one = types.SimpleNamespace(is_main_process=True)
    run = types.SimpleNamespace(interrupted=False, stop_requested=False, acc=one)
    with Trainer._signals(run):  # the training loop's handlers
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop after this step
        time.sleep(0.05)
        Collected()  # the second, while a library's object is collected
        time.sleep(5)  # the rest of the step
    print("finished the step")

sys.exit(run_cli(main))
"""


def test_a_second_ctrl_c_in_a_finalizer_still_quits_training_at_once():
    result = subprocess.run(_command(["-c", SECOND_CTRL_C_IN_A_FINALIZER]), capture_output=True, text=True, env=ENV,
                            cwd=REPO, timeout=60)  # fmt: skip
    said = "\nstopping after this step (Ctrl-C again to quit)\ninterrupted\n"
    assert (result.returncode, result.stderr, result.stdout) == (130, said, ""), result.stderr


# ------------------------------------------------------------------------------------------ the same rules, in process


def test_a_changed_setting_on_resume_is_a_one_line_note_not_a_warning(capsys):
    import warnings

    from lvdm.training.run_dir import compare_on_resume

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare_on_resume({"train": {"max_steps": 2, "lr": 1.0}}, {"train": {"max_steps": 3, "lr": 1.0}})
    assert capsys.readouterr().err == "note: resuming with train.max_steps changed: 2 -> 3\n"


def test_a_changed_ema_decay_on_resume_is_a_note_but_starting_an_ema_is_refused(capsys):
    from lvdm.errors import ConfigError
    from lvdm.training.run_dir import compare_on_resume

    compare_on_resume({"train": {"ema_decay": 0.9}}, {"train": {"ema_decay": 0.99}})  # the EMA goes on
    compare_on_resume({"train": {"ema_decay": 0.9}}, {"train": {"ema_decay": None}})  # the run stops keeping one
    assert capsys.readouterr().err.count("note: resuming with train.ema_decay changed") == 2
    with pytest.raises(ConfigError, match="train.ema_decay: None in the checkpoint, 0.99 now"):
        compare_on_resume({"train": {"ema_decay": None}}, {"train": {"ema_decay": 0.99}})  # no EMA to continue


def test_a_second_lock_on_a_folder_names_the_holder(tmp_path):
    from lvdm.errors import LvdmError
    from lvdm.training.run_lock import LOCK_FILE, RunLock

    first = RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(LvdmError, match=f"in use by another lvdm run \\(pid {os.getpid()} on .*still running"):
            RunLock(tmp_path).acquire()
    finally:
        first.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean exit: the next run has nothing to report
    second = RunLock(tmp_path)
    second.acquire()
    second.release()


def _fake_run(out: Path, *, checkpoint: bool, marker: bool, samples: bool | None = None) -> None:
    from lvdm.config import Config, DataConfig, ModelConfig, save_config
    from lvdm.training.checkpoint import save_checkpoint
    from lvdm.training.run_dir import _new_marker
    from lvdm.training.run_lock import RUN_MARKER

    save_config(Config(model=ModelConfig(base="b"), data=DataConfig(root="d")), out / "config.yaml")
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    if checkpoint if samples is None else samples:  # a run that stopped before its first checkpoint validated none
        (out / "samples" / "step-00000001").mkdir(parents=True)
        (out / "samples" / "step-00000001" / "00.mp4").write_bytes(b"video")
    if checkpoint:
        save_checkpoint(out / "checkpoints", 1, {"trainable": {"w": torch.zeros(2)}})
    if marker:
        (out / RUN_MARKER).write_text(json.dumps(_new_marker()))


def test_without_a_run_marker_nothing_is_deleted_even_what_looks_like_a_run(tmp_path):
    from lvdm.errors import LvdmError
    from lvdm.training.run_dir import prepare_output_dir, resolve_resume
    from lvdm.training.run_lock import release_run

    out = tmp_path / "run"
    _fake_run(out, checkpoint=True, marker=False)  # a run of an lvdm from before markers, or a copy of one
    before = snapshot(out)
    with pytest.raises(LvdmError, match="has no .lvdm-run.json"):
        prepare_output_dir(out, resume=None, overwrite=True)
    assert snapshot(out) == before
    prepare_output_dir(out, resume="auto", overwrite=False)  # it can still be resumed, which deletes nothing
    release_run(out)
    assert resolve_resume(out, "auto").name == "checkpoint-00000001"


def test_overwrite_deletes_lvdm_runs_and_only_them(tmp_path):
    from lvdm.errors import LvdmError
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    out = tmp_path / "run"
    _fake_run(out, checkpoint=True, marker=True)
    with pytest.raises(LvdmError, match="already holds a run"):
        prepare_output_dir(out, resume=None, overwrite=False)
    (out / "samples" / "step-00000001" / "my_edit.jpg").write_bytes(b"mine")
    with pytest.raises(LvdmError, match="my_edit.jpg"):
        prepare_output_dir(out, resume=None, overwrite=True)
    assert (out / "checkpoints" / "checkpoint-00000001").is_dir()  # refused: nothing deleted
    (out / "samples" / "step-00000001" / "my_edit.jpg").unlink()
    prepare_output_dir(out, resume=None, overwrite=True)
    release_run(out)
    assert sorted(p.name for p in out.iterdir()) == [".lvdm-lock", ".lvdm-run.json"]


def test_a_folder_of_event_files_you_put_in_tensorboard_is_yours(tmp_path):
    """A baseline's logs copied in for comparison (``tensorboard/baseline/events.out.tfevents...``) were deleted by
    overwrite: only the name was checked. lvdm's writer puts its files at the top, which stay lvdm's (the control)."""
    from lvdm.errors import LvdmError
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    out = tmp_path / "run"
    _fake_run(out, checkpoint=True, marker=True)
    (out / "tensorboard" / "baseline").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"ours")
    (out / "tensorboard" / "baseline" / "events.out.tfevents.2.host.1.0").write_bytes(b"yours")
    with pytest.raises(LvdmError, match="baseline/events.out.tfevents.2.host.1.0"):
        prepare_output_dir(out, resume=None, overwrite=True)
    shutil.rmtree(out / "tensorboard" / "baseline")
    prepare_output_dir(out, resume=None, overwrite=True)
    release_run(out)
    assert not (out / "tensorboard").exists()


def test_resuming_never_writes_through_a_link_or_over_a_file_of_yours(tmp_path):
    """A sample folder linked to yours had your 00.mp4 and 00.gif replaced by the resumed run's samples; a linked
    log.jsonl was appended to, a config.yaml without lvdm's header replaced. The control: the same run resumes."""
    from lvdm.errors import LvdmError
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    out, yours = tmp_path / "run", tmp_path / "yours"
    yours.mkdir()
    (yours / "00.mp4").write_bytes(b"my video")
    (yours / "log.jsonl").write_text("")
    _fake_run(out, checkpoint=True, marker=True)
    prepare_output_dir(out, resume="auto", overwrite=False)  # the control
    release_run(out)
    attacks = {
        "samples/step-00000002": lambda path: path.symlink_to(yours, target_is_directory=True),
        "log.jsonl": lambda path: (path.unlink(), path.symlink_to(yours / "log.jsonl")),
        "config.yaml": lambda path: path.write_text("my notes\n"),
    }
    for name, attack in attacks.items():
        before = (out / name).read_bytes() if name == "config.yaml" else None
        attack(out / name)
        with pytest.raises(LvdmError, match=f"resuming would write through or over {out / name}"):
            prepare_output_dir(out, resume="auto", overwrite=False)
        (out / name).unlink()
        if before is not None:
            (out / name).write_bytes(before)
    assert (yours / "00.mp4").read_bytes() == b"my video" and (yours / "log.jsonl").read_text() == ""


def test_a_newer_checkpoint_folder_that_is_not_one_is_named_not_passed_over(tmp_path):
    """Without its COMPLETE (or a link, or a file) the newest checkpoint folder was skipped in silence: the run
    cut its log back, trained to that step and failed to save there. The control: moved away, the run resumes."""
    from lvdm.errors import CheckpointError
    from lvdm.training.run_dir import resolve_resume

    out = tmp_path / "run"
    _fake_run(out, checkpoint=True, marker=True)
    newer = out / "checkpoints" / "checkpoint-00000004"
    for make in (lambda: newer.mkdir(), lambda: newer.symlink_to(tmp_path), lambda: newer.write_text("")):
        make()
        with pytest.raises(CheckpointError, match="checkpoint-00000004 is newer than the newest complete checkpoint"):
            resolve_resume(out, "auto")
        newer.rmdir() if newer.is_dir() and not newer.is_symlink() else newer.unlink()
    assert resolve_resume(out, "auto").name == "checkpoint-00000001"


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_the_next(tmp_path, capsys):
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    out = tmp_path / "run"
    _fake_run(out, checkpoint=False, marker=True)
    prepare_output_dir(out, resume=None, overwrite=False)
    release_run(out)
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()


def test_a_finished_run_whose_checkpoints_were_moved_away_is_not_cleared_without_overwrite(tmp_path):
    """Its module and checkpoints moved elsewhere, the run's samples and log stayed: a plain run took it for a crash
    at start-up ("stopped before its first checkpoint") and deleted them. The control: overwrite clears it."""
    from lvdm.errors import LvdmError
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    out = tmp_path / "run"
    _fake_run(out, checkpoint=False, marker=True, samples=True)
    before = snapshot(out)
    with pytest.raises(LvdmError, match="already holds a run \\(no checkpoints, but its module or validation samples"):
        prepare_output_dir(out, resume=None, overwrite=False)
    assert snapshot(out) == before
    prepare_output_dir(out, resume=None, overwrite=True)
    release_run(out)
    assert not (out / "samples").exists()


def test_a_killed_run_can_be_overwritten_but_what_a_user_put_there_meanwhile_is_theirs(tmp_path, capsys):
    """The marker lists the names lvdm writes from the start, so a run killed with SIGKILL after a checkpoint is
    overwritten; a folder a user copied into the run folder while it ran is not lvdm's, so the overwrite is refused
    and nothing is deleted (it was once listed as "appeared while the run held the folder", and deleted)."""
    from lvdm.errors import LvdmError
    from lvdm.training import run_dir, run_lock
    from lvdm.training.checkpoint import save_checkpoint

    out = tmp_path / "run"
    run_dir.prepare_output_dir(out, resume=None, overwrite=False)
    save_checkpoint(out / "checkpoints", 1, {"trainable": {"w": torch.zeros(2)}})
    (out / "my_data").mkdir()
    (out / "my_data" / "a.txt").write_text("precious")
    run_lock.release_run(out)  # the run ends (an error, or done)
    before = snapshot(out)
    with pytest.raises(LvdmError, match="my_data"):
        run_dir.prepare_output_dir(out, resume=None, overwrite=True)
    assert snapshot(out) == before
    shutil.move(out / "my_data", tmp_path / "my_data")  # moved away, the run is lvdm's alone
    run_dir.prepare_output_dir(out, resume=None, overwrite=True)  # a second run, killed after a checkpoint
    save_checkpoint(out / "checkpoints", 1, {"trainable": {"w": torch.zeros(2)}})
    os.close(run_lock._HELD.pop(out.resolve()).fd)  # SIGKILL: no release, no exit handler
    run_dir.prepare_output_dir(out, resume=None, overwrite=True)
    run_lock.release_run(out)
    assert "did not exit cleanly" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


KILLED_WRITE = """
import os, sys
from pathlib import Path
import safetensors.torch, torch
from lvdm.fileio import atomic_path, save_safetensors
def killed(tensors, filename, metadata=None):  # what safetensors 0.8 does, and a kill -9 in the middle of it
    Path(filename).with_name(".tmpAb3dEf").write_bytes(b"half a file")
    os._exit(9)
safetensors.torch.save_file = killed
if sys.argv[2:] == ["nested"]:  # a run's export: the module is written inside atomic_paths, with the LoRA beside it
    from lvdm.fileio import atomic_paths
    with atomic_paths([Path(sys.argv[1])], keep_suffix=True) as (outer,), atomic_path(outer) as temp:
        save_safetensors({"w": torch.zeros(2)}, temp)
with atomic_path(Path(sys.argv[1])) as temp:
    save_safetensors({"w": torch.zeros(2)}, temp)
"""


def test_what_a_kill_leaves_is_lvdms_and_goes(tmp_path, capsys):
    """kill -9 during a safetensors write left safetensors' own ``.tmpXXXXXX`` beside the file, and during a
    validation sample a ``samples/step-N/.00.gif.<hex>.tmp``: ``train.overwrite=true`` refused such a run forever
    ("files lvdm did not write"). Killed in its first checkpoint's save, a run was refused with advice that could
    not work (train.resume=auto: "no complete checkpoint")."""
    from lvdm.errors import LvdmError
    from lvdm.fileio import is_stray_temp
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    out = tmp_path / "run"
    _fake_run(out, checkpoint=True, marker=True)
    for how in ("plain", "nested"):
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, out / "temporal.safetensors", how], timeout=120)
        assert killed.returncode == 9
    leftovers = [p for p in out.iterdir() if p.name.startswith((".temporal", "..temporal"))]
    assert len(leftovers) == 2 and all((leftover / ".tmpAb3dEf").is_file() for leftover in leftovers)
    assert all(is_stray_temp(leftover.name, ("temporal.safetensors",)) for leftover in leftovers), leftovers
    assert not is_stray_temp("..notes.txt.1a2b3c4d.tmp.d", ("temporal.safetensors",))  # the control
    assert not list(out.glob(".tmp*"))  # safetensors' half file is inside lvdm's folder, not beside it
    step = out / "samples" / "step-00000001"
    (step / ".00.gif.1a2b3c4d.tmp").write_bytes(b"")  # a validation gif's write, killed
    (step / ".notes.1a2b3c4d.tmp").write_bytes(b"")  # the control: not a name lvdm writes there
    with pytest.raises(LvdmError, match="notes"):
        prepare_output_dir(out, resume=None, overwrite=True)
    assert (
        not any(p.exists() for p in leftovers) and not (step / ".00.gif.1a2b3c4d.tmp").exists()
    )  # refused, ours gone
    assert (step / ".notes.1a2b3c4d.tmp").exists() and (out / "checkpoints" / "checkpoint-00000001").is_dir()
    (step / ".notes.1a2b3c4d.tmp").unlink()
    prepare_output_dir(out, resume=None, overwrite=True)
    release_run(out)
    assert sorted(p.name for p in out.iterdir()) == [".lvdm-lock", ".lvdm-run.json"]
    # a save killed before the first checkpoint's rename: the run stopped before its first checkpoint
    _fake_run(out, checkpoint=False, marker=True)
    unfinished = out / "checkpoints" / ".tmp-checkpoint-00000001-x1y2z3"
    unfinished.mkdir(parents=True)
    (unfinished / "trainable.safetensors").write_bytes(b"half")
    (unfinished / ".tmpQ7x2Lm").write_bytes(b"half")  # safetensors' own temporary file, beside its target
    prepare_output_dir(out, resume=None, overwrite=False)
    release_run(out)
    assert "stopped before its first checkpoint" in capsys.readouterr().err and not unfinished.exists()


def test_files_a_user_put_inside_lvdm_folders_are_refused_not_deleted(tmp_path):
    """Inside a finished checkpoint only what its COMPLETE lists is lvdm's; under samples/ only step-<n>/ folders
    holding files named as lvdm names them. Both were once judged by suffix (any .safetensors, any .mp4)."""
    from lvdm.errors import LvdmError
    from lvdm.training.run_dir import prepare_output_dir
    from lvdm.training.run_lock import release_run

    for place in ("checkpoints/checkpoint-00000001/my_finetune.safetensors", "samples/my_holiday/beach.mp4",
                  "samples/step-00000001/beach.mp4"):  # fmt: skip
        out = tmp_path / place.replace("/", "_")
        _fake_run(out, checkpoint=True, marker=True)
        (out / place).parent.mkdir(parents=True, exist_ok=True)
        (out / place).write_bytes(b"mine")
        before = snapshot(out)
        with pytest.raises(LvdmError, match=Path(place).name):
            prepare_output_dir(out, resume=None, overwrite=True)
        assert snapshot(out) == before, place
    out = tmp_path / "clean"  # the control: lvdm's own files alone are overwritten
    _fake_run(out, checkpoint=True, marker=True)
    prepare_output_dir(out, resume=None, overwrite=True)
    release_run(out)
    assert not (out / "checkpoints").exists() and not (out / "samples").exists()


def test_trainer_counters_of_the_wrong_type_are_refused_by_name(tmp_path):
    from lvdm.errors import CheckpointError
    from lvdm.training.checkpoint import save_checkpoint
    from lvdm.training.run_dir import check_resumable

    for step, counters in ((1, {"step": "1", "micro_batches": 1, "skipped": 0}), (2, [2, 2, 0]),
                           (3, {"step": 2, "micro_batches": 3, "skipped": 0}),
                           (5, {"step": 5, "micro_batches": 5, "skipped": 0, "clip_rates": [["x", 1]]}),
                           (6, {"step": 6, "micro_batches": 6, "skipped": 0, "skipped_in_row": -1})):  # fmt: skip
        path = save_checkpoint(tmp_path, step, {"trainable": {"w": torch.zeros(1)}, "trainer": counters})
        with pytest.raises(CheckpointError, match=rf"checkpoint-0000000{step}/trainer\.pt"):
            check_resumable(path)
    good = save_checkpoint(tmp_path, 4, {"trainer": {"step": 4, "micro_batches": 4, "skipped": 0}})
    check_resumable(good)
    rates = {"step": 7, "micro_batches": 7, "skipped": 0, "skipped_in_row": 1, "clip_rates": [(12.0, 3), (8.0, 1)]}
    check_resumable(save_checkpoint(tmp_path, 7, {"trainer": rates}))


def test_the_demo_never_replaces_a_model_folder_it_did_not_make(tmp_path):
    """The demo writes its base (and upscaler) where a stale one of its own may be: a folder without lvdm's recipe
    file is refused before any training, and a stale demo base holding a file of the user's is refused too; the
    control, a stale demo base alone, is replaced."""
    from lvdm.errors import LvdmError
    from lvdm.testing.clips import write_captioned_folder
    from lvdm.testing.demo_base import DemoBaseRecipe, make_demo_base

    write_captioned_folder(tmp_path / "clips", 2, num_frames=4, size=(32, 32), seed=0)
    clips = [(path, path.with_suffix(".txt").read_text()) for path in sorted((tmp_path / "clips").glob("*.mp4"))]
    recipe = DemoBaseRecipe(vae_steps=1, unet_steps=1, vae_batch=2, unet_batch=2)
    mine = tmp_path / "base"
    mine.mkdir()
    (mine / "my_model.safetensors").write_bytes(b"mine")
    with pytest.raises(LvdmError, match="not a demo base lvdm made"):
        make_demo_base(mine, clips, recipe=recipe, log=lambda line: None)
    assert (mine / "my_model.safetensors").read_bytes() == b"mine"

    stale = tmp_path / "stale"
    make_demo_base(stale, clips, recipe=recipe, log=lambda line: None)
    (stale / "unet" / "notes.txt").write_text("mine")
    with pytest.raises(LvdmError, match="unet/notes.txt"):
        make_demo_base(stale, clips, recipe=recipe, log=lambda line: None)
    assert (stale / "unet" / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".stale.tmp-*"))
    (stale / "unet" / "notes.txt").unlink()
    make_demo_base(stale, clips, recipe=replace(recipe, seed=1), log=lambda line: None)  # replaced
    assert json.loads((stale / "demo_base.json").read_text())["recipe"]["seed"] == 1


def test_the_demo_configs_overwrite_stays_with_the_demo_folder(tmp_path, command):
    """``python train.py output_dir=my_run`` reads configs/demo.yaml, whose ``train.overwrite: true`` lets the demo
    rerun over itself; it must not start over a run in the user's own folder (it deleted a resumable one)."""
    from lvdm.config import load_config
    from lvdm.config_rules import overwrite_stays_with_its_folder

    demo = REPO / "configs" / "demo.yaml"
    for overrides, expected in (([], True), (["output_dir=mine"], False), (["output_dir=mine", "train.overwrite=true"],
                                True), (["train.max_steps=5"], True)):  # fmt: skip
        assert overwrite_stays_with_its_folder(load_config([demo], overrides), overrides).train.overwrite is expected
    overrides = ["train.overwrite=true", "output_dir=mine"]  # the command line is one layer, in any order
    assert overwrite_stays_with_its_folder(load_config([demo], overrides), overrides, [demo]).train.overwrite
    out = tmp_path / "run"
    _fake_run(out, checkpoint=True, marker=True)
    before = snapshot(out)
    result = command(TRAIN, "--quiet", f"output_dir={out}", "model.base=nowhere")  # no --config: the demo's settings
    one_line_error(result, 1, "already holds a run", "train.resume=auto")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("mine", "expected"),
    [
        ("output_dir: mine\n", False),
        ("output_dir: mine\ntrain: {overwrite: true}\n", True),
        ("train: {lr: 0.001}\n", True),
    ],
)
def test_the_demo_configs_overwrite_stays_with_the_demo_folder_under_a_later_file(tmp_path, mine, expected):
    """``--config configs/demo.yaml --config mine.yaml`` with mine.yaml's own ``output_dir`` started over the run in
    it: the demo file's ``train.overwrite: true`` went with mine.yaml's folder."""
    from lvdm.config import load_config
    from lvdm.config_rules import overwrite_stays_with_its_folder

    files = [REPO / "configs" / "demo.yaml", tmp_path / "mine.yaml"]
    files[1].write_text(mine)
    assert overwrite_stays_with_its_folder(load_config(files), [], files).train.overwrite is expected


def test_the_demo_refuses_clips_that_are_not_its_own(tmp_path, command):
    """``python train.py`` in a folder whose outputs/demo/clips holds a user's video: one line naming it (a
    FileNotFoundError traceback before), and the video stays."""
    from lvdm.testing.clips import write_captioned_folder

    clips = tmp_path / "outputs" / "demo" / "clips"
    made = sorted(write_captioned_folder(tmp_path / "made", 1, num_frames=4, size=(32, 32), seed=0).rglob("*.mp4"))
    clips.mkdir(parents=True)
    shutil.copy(made[0], clips / "holiday.mp4")
    result = command(TRAIN, cwd=tmp_path)
    one_line_error(result, 1, "holds holiday.mp4, not one of the demo's clips")
    assert sorted(p.name for p in clips.iterdir()) == ["holiday.mp4"]


def test_mistaken_files_are_named_for_what_they_are(trained, tiny_assets, tmp_path, command):
    """Each of these said something misleading: a LoRA scale of NaN blamed the base's weights, a folder given as
    --temporal "does not exist", a file as output_dir "File exists", a module given as --base went looking for a
    config on the Hugging Face Hub."""
    from lvdm import testing
    from lvdm.models import load_base

    module, out = trained / "temporal.safetensors", tmp_path / "x.mp4"
    lora = testing.write_lora(load_base(tiny_assets["base"]).unet, tmp_path / "style.safetensors", seed=3)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    sample = [SAMPLE, "--quiet", "--prompt", "x", "--steps", "1", "--out", out]
    results = [
        command(*sample, "--base", tiny_assets["base"], "--lora", f"{lora}:nan"),
        command(*sample, "--base", tiny_assets["base"], "--temporal", tmp_path),
        command(TRAIN, "--quiet", *tiny_overrides(tiny_assets, a_file)),
        command(*sample, "--base", module),
    ]
    messages = ("the scale must be a finite number", "is not a module file", "is a file, not a folder",
                "is an lvdm module file, not a base")  # fmt: skip
    for result, message, status in zip(results, messages, (2, 1, 1, 1), strict=True):  # a bad value is usage: 2
        one_line_error(result, status, message)
    assert a_file.read_text() == "mine" and not out.exists()


def test_a_lora_of_another_architecture_is_one_line(tiny_assets, tmp_path, command):
    """diffusers logged a line per weight (about 40 here) before lvdm's error, itself 400 characters of that log."""
    from lvdm import testing
    from lvdm.models import load_base

    other = testing.write_lora(load_base(tiny_assets["base_sd2"]).unet, tmp_path / "sd2.safetensors", seed=3)
    result = command(SAMPLE, "--quiet", "--prompt", "x", "--steps", "1", "--out", tmp_path / "x.mp4",
                     "--base", tiny_assets["base"], "--lora", other)  # fmt: skip
    one_line_error(result, 1, "42 of its weights do not fit this base's")
    assert "size mismatch" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "x.mp4").exists()


NOISY_COMMAND = """
import warnings
from transformers.utils import logging

from lvdm.errors import LvdmError

def main(argv):
    warnings.warn("a warning the user sees")
    logging.get_logger("transformers").warning("library chatter a command's process does not show")
    logging.get_logger("transformers").error("a library error the user sees")
    if argv == ["bug"]:
        raise ValueError("a bug")
    raise LvdmError("a refusal")
"""


def test_the_in_process_command_shows_what_the_command_would(tmp_path, monkeypatch, command):
    """The control of conftest's ``command``, which most refusals here run through: a warning and a library's error
    show as the command shows them, the libraries' chatter does not, what would be a traceback fails the test, and
    the settings run_cli makes for the libraries do not outlive the run."""
    (tmp_path / "noisy_command.py").write_text(NOISY_COMMAND)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # as a user may have it; run_cli keeps a value it finds
    monkeypatch.delenv("DIFFUSERS_VERBOSITY", raising=False)
    result = command(tmp_path / "noisy_command.py", "refuse")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "warning: a warning the user sees", "[transformers] a library error the user sees", "error: a refusal"
    ], result.stderr  # fmt: skip
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and "DIFFUSERS_VERBOSITY" not in os.environ
    with pytest.raises(ValueError, match="a bug"):
        command(tmp_path / "noisy_command.py", "bug")


def test_a_lock_file_that_is_not_lvdms_is_refused_and_never_written_through(trained, tiny_assets, tmp_path, command):
    """``.lvdm-lock`` was opened with O_CREAT and followed: a link there made a fresh run and a resume truncate the
    file it named and write the holder into it (exit 0), a dangling one made its target, a folder was an
    IsADirectoryError traceback, a FIFO an OSError (Errno 22) from ftruncate, and 4096 bytes of ``[`` and ``]`` a
    RecursionError. Each is refused in one line naming it, and nothing in it or behind it is written. The
    control: with it moved away both runs go ahead."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    resumed = copy_run(trained, tmp_path, "resumed")
    (resumed / ".lvdm-lock").unlink()
    (resumed / ".lvdm-lock").symlink_to(victim)
    before = snapshot(resumed)
    makers = {
        "link": lambda lock: lock.symlink_to(victim),
        "dangling": lambda lock: lock.symlink_to(tmp_path / "nowhere"),
        "folder": lambda lock: lock.mkdir(),
        "fifo": lambda lock: os.mkfifo(lock),
        "hard": lambda lock: os.link(victim, lock),
        "nested": lambda lock: lock.write_text("[" * 2048 + "]" * 2048),
        "a user's": lambda lock: lock.write_text("mine"),
    }
    runs = [(resumed, {"train.resume": "auto", "train.max_steps": 3}, "a link")]
    for name, make in makers.items():
        (tmp_path / name).mkdir()
        make(tmp_path / name / ".lvdm-lock")
        runs.append((tmp_path / name, {}, ""))
    for out, extra, kind in runs:
        result = command(*train_args(tiny_assets, out, **extra))
        one_line_error(result, 1, f"{out / '.lvdm-lock'} is {kind}", "not lvdm's lock file")
        assert victim.read_text() == "precious" and not (tmp_path / "nowhere").exists()
    assert snapshot(resumed) == before
    for name in makers:
        assert [p.name for p in (tmp_path / name).iterdir()] == [".lvdm-lock"], name
    assert (tmp_path / "a user's" / ".lvdm-lock").read_text() == "mine"
    for out, extra, _ in runs[:2]:
        (out / ".lvdm-lock").unlink()
        result = command(*train_args(tiny_assets, out, **extra))
        assert result.returncode == 0 and (out / "temporal.safetensors").exists(), result.stderr[-2000:]
    assert victim.read_text() == "precious"


class Hung(Exception):
    """Raised by the alarm of :func:`no_hang`: a bug's exception, which ``command`` lets through to fail the test."""


@contextlib.contextmanager
def no_hang(seconds: int):
    """An in-process call that would wait forever on a FIFO is stopped after ``seconds``: a failure, not a hang."""

    def ring(signum, frame):
        raise Hung(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_lvdms_run_files_as_pipes_or_nested_json_are_one_line_not_a_hang(trained, tiny_assets, tmp_path, command):
    """A resume read ``.lvdm-run.json`` and ``log.jsonl`` with ``read_text``: a FIFO by either name hung forever,
    and ``[`` * 100000 + ``]`` * 100000 in either was a RecursionError traceback. A pipe is refused in one line
    naming it and left as it is; nested JSON is junk like any other: the marker is one a run from before markers
    lacked (the control, a marker of plain garbage, resumes alike) and the log line is dropped like one a crash cut
    short."""
    for name in (".lvdm-run.json", "log.jsonl"):
        out = copy_run(trained, tmp_path, f"pipe {name}")
        (out / name).unlink()
        os.mkfifo(out / name)
        with no_hang(60):
            result = command(*train_args(tiny_assets, out, **{"train.resume": "auto", "train.max_steps": 3}))
        one_line_error(result, 1, str(out / name), "not lvdm's")
        assert (out / name).is_fifo() and not list((out / "checkpoints").glob("*3"))
    nested, outcomes = "[" * 100000 + "]" * 100000, []
    for name, text in ((".lvdm-run.json", "garbage"), (".lvdm-run.json", nested), ("log.jsonl", None)):
        out = copy_run(trained, tmp_path, f"{name} {len(text or '')}")
        (out / name).write_text(text or (out / "log.jsonl").read_text() + nested + "\n")
        result = command(*train_args(tiny_assets, out, **{"train.resume": "auto", "train.max_steps": 3}))
        assert result.returncode == 0 and (out / "checkpoints" / "checkpoint-00000003").exists(), result.stderr
        assert "[[[" not in (out / "log.jsonl").read_text()
        marker = json.loads((out / ".lvdm-run.json").read_text())
        outcomes.append((marker["files"], [record["step"] for record in read_log(out / "log.jsonl")]))
    assert outcomes[1] == outcomes[0] and outcomes[2][1] == outcomes[0][1], outcomes
