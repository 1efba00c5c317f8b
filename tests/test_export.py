"""python -m lvdm.export: the temporal module of any checkpoint, equal to what training itself exported."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from lvdm.config import load_config
from lvdm.errors import ConfigError
from lvdm.export import export_checkpoint
from lvdm.training.checkpoint import load_checkpoint
from lvdm.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    """A 3-step run with an EMA, a spatial LoRA and a checkpoint at every step (the last one also exported by the
    trainer)."""
    out = tmp_path_factory.mktemp("export") / "run"
    extra = {"train.max_steps": 3, "train.checkpoint_every": 1, "train.ema_decay": 0.5, "train.keep_last": 3,
             "model.spatial_lora_rank": 2}  # fmt: skip
    train(load_config([], tiny_overrides(tiny_assets, out, **extra)), progress=False)
    return out


def checkpoint(run, step: int):
    return run / "checkpoints" / f"checkpoint-{step:08d}"


@pytest.fixture
def export(command):
    """``python -m lvdm.export ARGS``, in this process (conftest's ``command``)."""
    return lambda *args: command("-m", "lvdm.export", *args)


def test_the_last_checkpoint_exports_what_training_exported(run, tmp_path, export):
    out = tmp_path / "last.safetensors"
    done = export(checkpoint(run, 3), out)
    lora = tmp_path / "last_spatial_lora.safetensors"
    assert done.returncode == 0 and done.stdout.split() == [str(out), str(lora)], done.stderr
    for exported, trained in ((out, run / "temporal.safetensors"), (lora, run / "spatial_lora.safetensors")):
        exported, trained = load_file(exported), load_file(trained)
        assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_raw_weights_and_an_earlier_checkpoint(run, tmp_path):
    ema, _ = export_checkpoint(checkpoint(run, 2), tmp_path / "ema.safetensors")  # the module, its LoRA
    raw, _ = export_checkpoint(checkpoint(run, 2), tmp_path / "raw.safetensors", raw=True)
    parts, _ = load_checkpoint(checkpoint(run, 2))
    ema, raw, last = load_file(ema), load_file(raw), load_file(run / "temporal.safetensors")
    trained = {name.removeprefix("unet."): t for name, t in parts["trainable"].items()}
    averaged = {name.removeprefix("unet."): t for name, t in parts["ema"].items()}
    for name, tensor in raw.items():
        assert torch.equal(tensor, trained[name]) and torch.equal(ema[name], averaged[name]), name
    assert any(not torch.equal(ema[k], raw[k]) for k in raw) and any(not torch.equal(ema[k], last[k]) for k in last)


@pytest.mark.parametrize(
    ("case", "message"),
    [("not_a_checkpoint", "checkpoint"), ("wrong_suffix", "as .safetensors"), ("exists", "already exists"),
     ("its_lora_exists", "there_spatial_lora.safetensors already exists"),
     ("inside_a_checkpoint", "inside a checkpoint folder"), ("newline", "holds a control character ('\\n')"),
     ("base_of_another_family", "is of base family 'custom-4x32-32-64-64', and the module of checkpoint"),
     ("fifo", "fifo is a FIFO, not a checkpoint folder"), ("empty_out", "the output is empty ('')")],
)  # fmt: skip
def test_mistakes_are_one_line(run, tiny_assets, tmp_path, export, case, message):
    """``its_lora_exists``: a user's file where the module's LoRA goes was replaced (only OUT was checked);
    ``inside_a_checkpoint``: keep_last would delete the module with the folder; ``base_of_another_family``: an SD2
    --base for a module trained on SD1 blamed the checkpoint ("its weights do not fit"), after loading the base."""
    existing, sd2 = tmp_path / "there.safetensors", str(tiny_assets["base_sd2"])
    existing.write_bytes(b"keep me")
    (tmp_path / "there_spatial_lora.safetensors").write_bytes(b"keep me")
    args = {
        "not_a_checkpoint": [str(tmp_path), str(tmp_path / "out.safetensors")],
        "wrong_suffix": [str(checkpoint(run, 3)), str(tmp_path / "out.pt")],
        "exists": [str(checkpoint(run, 3)), str(existing)],
        "its_lora_exists": [str(checkpoint(run, 3)), str(existing)],
        "inside_a_checkpoint": [str(checkpoint(run, 3)), str(checkpoint(run, 3) / "step3.safetensors")],
        "newline": [str(checkpoint(run, 3)), str(tmp_path / "a\nb.safetensors")],  # sample.py refused it, not export
        "base_of_another_family": [str(checkpoint(run, 3)), str(tmp_path / "o.safetensors"), "--base", sd2],
        "fifo": [str(tmp_path / "fifo"), str(tmp_path / "o.safetensors")],  # it was "not found"
        "empty_out": [str(checkpoint(run, 3)), ""],  # it was ".: the temporal module is written as .safetensors"
    }[case]
    if case == "its_lora_exists":
        existing.unlink()  # OUT itself is free
    if case == "fifo":
        os.mkfifo(tmp_path / "fifo")
    refused = export(*args)
    err = refused.stderr
    assert refused.returncode in (1, 2), err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert (tmp_path / "there_spatial_lora.safetensors").read_bytes() == b"keep me"
    assert case == "its_lora_exists" or existing.read_bytes() == b"keep me"
    assert not (checkpoint(run, 3) / "step3.safetensors").exists()
    if case == "base_of_another_family":  # both families named, the trained one as the one to give
        assert f"trained on 'custom-4x32-32-64' (model.base {tiny_assets['base']})" in err
        assert refused.returncode == 2 and not (tmp_path / "o.safetensors").exists()


def test_a_base_of_another_family_is_named_where_the_recorded_base_is_gone(run, tiny_assets, tmp_path, export):
    """Checkpoints record the family their module trained on: where the recorded model.base has moved, a --base of
    another family is still refused before it loads, naming both (SD1 and SD2 temporal layers have the same shapes,
    so the weights would have loaded, labelled with the wrong family). A checkpoint from before that record (the
    control) falls back to the weights check, which names the --base and its family as the likely cause."""
    import json

    metadata = json.loads((checkpoint(run, 3) / "metadata.json").read_text())
    assert metadata["base_family"] == "custom-4x32-32-64"
    metadata["config"]["model"]["base"] = str(tmp_path / "moved")
    for recorded in (True, False):
        record = metadata if recorded else {k: v for k, v in metadata.items() if k != "base_family"}
        folder = tampered(run, tmp_path / str(recorded), files={"metadata.json": json.dumps(record).encode()})
        refused = export(folder, tmp_path / "o.safetensors", "--base", tiny_assets["base_sd2"])
        assert refused.stderr.count("\n") == 1 and not (tmp_path / "o.safetensors").exists(), refused.stderr
        if recorded:
            assert refused.returncode == 2 and "was trained on 'custom-4x32-32-64'" in refused.stderr, refused.stderr
        else:
            assert refused.returncode == 1, refused.stderr
            assert f"is --base {tiny_assets['base_sd2']} (base family 'custom-4x32-32-64-64')" in refused.stderr


def tampered(run, tmp_path, change=None, files: dict[str, bytes] | None = None):
    """A copy of the last checkpoint whose EMA weights ``change(weights)`` rewrites, or whose ``files`` (name ->
    bytes) are replaced, with its COMPLETE rewritten to match (consistent tampering: the checksums pass)."""
    import hashlib
    import json
    import shutil

    from safetensors.torch import save_file

    folder = shutil.copytree(checkpoint(run, 3), tmp_path / "checkpoint-00000003")
    if change is not None:
        save_file(change(load_file(folder / "ema.safetensors")), folder / "ema.safetensors")
    for name, data in (files or {}).items():
        (folder / name).write_bytes(data)
    marker = json.loads((folder / "COMPLETE").read_text())
    for record in marker["files"]:
        data = (folder / record["name"]).read_bytes()
        record["size"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (folder / "COMPLETE").write_text(json.dumps(marker))
    return folder


def test_metadata_nested_deeper_than_python_recurses_is_a_damaged_checkpoint(run, tmp_path):
    from lvdm.errors import CheckpointError

    deep = ("[" * 100000 + "]" * 100000).encode()
    folder = tampered(run, tmp_path, files={"metadata.json": deep})  # a RecursionError traceback
    with pytest.raises(CheckpointError, match="metadata.json: not valid JSON"):
        export_checkpoint(folder, tmp_path / "out.safetensors")


def test_an_impossible_config_in_a_checkpoint_is_one_line_naming_the_checkpoint(run, tmp_path, command):
    """It was the config check's several lines, exit 2, as for a mistake on the command line."""
    import json

    metadata = json.loads((checkpoint(run, 3) / "metadata.json").read_text())
    metadata["config"]["data"]["num_frames"] = 10**9
    folder = tampered(run, tmp_path, files={"metadata.json": json.dumps(metadata).encode()})
    result = command("-m", "lvdm.export", folder, tmp_path / "out.safetensors")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "the checkpoint's config is not one lvdm can build: " in result.stderr and "num_frames" in result.stderr


def test_a_foreign_pickle_in_a_checkpoint_is_one_line_and_does_not_run(run, tmp_path):
    """torch's two-line warning about the pickle's protocol came before the error line."""
    import io
    import pickle
    import subprocess
    import sys

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    buffer = io.BytesIO()
    pickle.dump({"step": Evil()}, buffer, protocol=4)
    folder = tampered(run, tmp_path, files={"trainer.pt": buffer.getvalue()})
    result = subprocess.run([sys.executable, "-m", "lvdm.export", str(folder), str(tmp_path / "out.safetensors")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "trainer.pt" in result.stderr and not (tmp_path / "pwned").exists()


def test_weights_of_another_shape_are_refused_even_where_they_broadcast(run, tmp_path):
    """A checkpoint's tensor of shape (..., 1) was copied into (..., n) by broadcasting: a wrong module, exported
    without a word."""
    from lvdm.errors import CheckpointError

    ema = load_file(checkpoint(run, 3) / "ema.safetensors")
    name = next(k for k, t in ema.items() if t.ndim == 2 and t.shape[-1] > 1)
    folder = tampered(run, tmp_path, lambda weights: weights | {name: weights[name][..., :1].contiguous()})
    with pytest.raises(CheckpointError, match=f"{name} is .*, the model its config builds has"):
        export_checkpoint(folder, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_weights_that_are_not_finite_are_not_exported(run, tmp_path):
    """They were written, exit 0, and every reader then refused the module."""
    from lvdm.errors import CheckpointError

    ema = load_file(checkpoint(run, 3) / "ema.safetensors")
    name = next(k for k, t in ema.items() if t.is_floating_point())
    folder = tampered(run, tmp_path, lambda weights: weights | {name: weights[name] * float("nan")})
    with pytest.raises(CheckpointError, match=f"{name} holds NaN or infinite values; export an earlier"):
        export_checkpoint(folder, tmp_path / "out.safetensors")
    assert not list(tmp_path.glob("out*"))
    export_checkpoint(tampered(run, tmp_path / "control", lambda weights: weights), tmp_path / "out.safetensors")


def test_python_arguments_of_the_wrong_type_are_refused_by_name(run, tmp_path):
    """``export_checkpoint(..., overwrite="no")`` replaced the user's module ("no" is truthy), ``raw="no"`` exported
    the raw weights, and a path of the wrong type or an empty ``base`` was a TypeError from pathlib or blamed the
    checkpoint's config. Each is a ConfigError naming the argument, before anything is read or written."""
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"the user's module")
    for kwargs, message in (
        ({"overwrite": "no"}, "overwrite must be True or False, got 'no'"),
        ({"overwrite": 1}, "overwrite must be True or False, got 1"),
        ({"raw": "no"}, "raw must be True or False, got 'no'"),
        ({"base": 3}, r"base: expected a path \(str or os.PathLike\), got 3"),
        ({"base": ""}, "base: an empty path"),
        ({"base_config": ""}, "base_config: an empty path"),
    ):
        with pytest.raises(ConfigError, match=message):
            export_checkpoint(checkpoint(run, 3), taken, **kwargs)
    for args, message in (((3, taken), "checkpoint: expected a path"), ((checkpoint(run, 3), None), "out: expected")):
        with pytest.raises(ConfigError, match=message):
            export_checkpoint(*args)
    assert taken.read_bytes() == b"the user's module" and sorted(tmp_path.iterdir()) == [taken]
    assert export_checkpoint(checkpoint(run, 3), taken, overwrite=True)[0] == taken  # the control: replaced
    assert load_file(taken)


def test_a_decoder_run_checkpoint_is_refused_and_leaves_nothing(tiny_assets, tmp_path, export):
    """A temporal VAE decoder run's checkpoint has no temporal module: its export wrote the decoder's diffusers
    folder where the module goes, then said "could not write OUT: Not a directory ... any previous version is
    unchanged", leaving an empty OUT (which blocked the next try) and the 4 MB temporary folder beside it; with
    --overwrite, OUT became that folder. Now one line saying what the checkpoint is, and nothing written."""
    values = {"train.target": "decoder", "data.holdout": 2, "train.max_steps": 1, "train.checkpoint_every": 1}
    train(load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **values)), progress=False)
    out = tmp_path / "out"
    for flags in ([], ["--overwrite"]):
        refused = export(tmp_path / "run" / "checkpoints" / "checkpoint-00000001", out / "dec.safetensors", *flags)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert "is of a temporal VAE decoder run (train.target: decoder)" in refused.stderr
        assert not out.exists()


def test_an_overwrite_that_fails_part_way_leaves_the_old_files(run, tmp_path, monkeypatch, export):
    """--overwrite replaced the user's module, then failed on its LoRA (a full disk, a folder there) and deleted
    the new module as "what this export had written", saying the old files were unchanged: both were gone. Now
    nothing is placed until every file is written, and a folder where one goes is refused first."""
    import errno

    from lvdm.training import groups

    out, lora = tmp_path / "old.safetensors", tmp_path / "old_spatial_lora.safetensors"
    for path in (out, lora):
        path.write_bytes(b"version 1")

    def full_disk(video, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(groups, "export_spatial_lora", full_disk)
        failed = export(checkpoint(run, 3), out, "--overwrite")
    err = failed.stderr
    assert failed.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith(f"error: could not write {lora}: No space left on device ("), err
    assert out.read_bytes() == lora.read_bytes() == b"version 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, lora.name]  # no temporary file left
    lora.unlink()
    lora.mkdir()
    refused = export(checkpoint(run, 3), out, "--overwrite")
    assert refused.returncode == 2 and f"{lora} is a folder" in refused.stderr and out.read_bytes() == b"version 1"
    lora.rmdir()
    long = tmp_path / ("L" * 235 + ".safetensors")  # fits; its LoRA's name, 248 + 13 bytes, does not
    refused = export(checkpoint(run, 3), long)
    assert refused.returncode == 2 and "bytes long; a file name holds at most 255" in refused.stderr
    assert not long.exists()
    assert export(checkpoint(run, 3), out, "--overwrite").returncode == 0  # the control: both replaced
    assert load_file(out) and load_file(lora)


@pytest.mark.parametrize("target", ["module", "lora"])
def test_a_file_that_appears_during_the_export_is_kept(run, tmp_path, monkeypatch, target):
    """OUT and its LoRA were checked before the export but replaced when written: a file another program put there
    meanwhile was lost. Without --overwrite the final rename is exclusive; with it (the control) it replaces."""
    from lvdm import fileio
    from lvdm.errors import OutputWriteError

    out = tmp_path / "late.safetensors"
    late = out if target == "module" else tmp_path / "late_spatial_lora.safetensors"
    place = fileio._place

    def someone_writes_first(temp, path):
        if path == late and not late.exists():
            late.write_bytes(b"written meanwhile")
        place(temp, path)

    monkeypatch.setattr(fileio, "_place", someone_writes_first)
    with pytest.raises(OutputWriteError, match="or another run wrote it while lvdm was writing") as caught:
        export_checkpoint(checkpoint(run, 3), out)
    assert late.read_bytes() == b"written meanwhile"
    if target == "lora":  # the module placed before it is removed again: an export is all or nothing
        assert not out.exists() and str(late) in str(caught.value)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    export_checkpoint(checkpoint(run, 3), out, overwrite=True)
    assert load_file(late)


def test_a_single_file_base_exports_with_its_base_config(run, tiny_assets, tmp_path, export):
    """--base onto a single-file checkpoint needs the folder giving its architecture (offline there is no other
    way), and the error said to pass --base-config, which export did not have."""
    from diffusers import StableDiffusionPipeline

    from lvdm.testing import write_single_file_checkpoint

    parts = StableDiffusionPipeline.from_pretrained(tiny_assets["base"])
    single = write_single_file_checkpoint(parts.components, tmp_path / "b.safetensors")
    out = tmp_path / "on_single.safetensors"
    done = export(checkpoint(run, 3), out, "--base", single, "--base-config", tiny_assets["base"])
    assert done.returncode == 0, done.stderr
    exported, trained = load_file(out), load_file(run / "temporal.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_a_base_recorded_relative_to_another_folder_says_to_give_base(tiny_assets, tmp_path, monkeypatch, export):
    """A run trained with a relative model.base, exported from another folder: "base model ... does not exist"."""
    import os

    monkeypatch.chdir(tiny_assets["base"].parent)
    out = tmp_path / "run"
    extra = {"model.base": tiny_assets["base"].name, "train.max_steps": 1, "train.checkpoint_every": 1}
    train(load_config([], tiny_overrides(tiny_assets, out, **extra)), progress=False)
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists(tiny_assets["base"].name)
    refused = export(checkpoint(out, 1), tmp_path / "m.safetensors")
    err = refused.stderr
    assert refused.returncode == 2, err
    assert f"model.base {tiny_assets['base'].name} does not exist here (relative to the folder training ran in)" in err
    assert export(checkpoint(out, 1), tmp_path / "m.safetensors", "--base", tiny_assets["base"]).returncode == 0
