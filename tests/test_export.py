"""python -m lvdm.export: the temporal module of any checkpoint, equal to what training itself exported."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from lvdm.cli import run_cli
from lvdm.config import load_config
from lvdm.export import export_checkpoint, main
from lvdm.training.checkpoint import load_checkpoint
from lvdm.training.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    """A 3-step run with an EMA and a checkpoint at every step (the last one also exported by the trainer)."""
    out = tmp_path_factory.mktemp("export") / "run"
    extra = {"train.max_steps": 3, "train.checkpoint_every": 1, "train.ema_decay": 0.5, "train.keep_last": 3}
    train(load_config([], tiny_overrides(tiny_assets, out, **extra)), progress=False)
    return out


def checkpoint(run, step: int):
    return run / "checkpoints" / f"checkpoint-{step:08d}"


def test_the_last_checkpoint_exports_what_training_exported(run, tmp_path, capsys):
    out = tmp_path / "last.safetensors"
    assert run_cli(main, [str(checkpoint(run, 3)), str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out)]
    exported, trained = load_file(out), load_file(run / "temporal.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_raw_weights_and_an_earlier_checkpoint(run, tmp_path):
    [ema] = export_checkpoint(checkpoint(run, 2), tmp_path / "ema.safetensors")
    [raw] = export_checkpoint(checkpoint(run, 2), tmp_path / "raw.safetensors", raw=True)
    parts, _ = load_checkpoint(checkpoint(run, 2))
    ema, raw, last = load_file(ema), load_file(raw), load_file(run / "temporal.safetensors")
    trained = {name.removeprefix("unet."): t for name, t in parts["trainable"].items()}
    averaged = {name.removeprefix("unet."): t for name, t in parts["ema"].items()}
    for name, tensor in raw.items():
        assert torch.equal(tensor, trained[name]) and torch.equal(ema[name], averaged[name]), name
    assert any(not torch.equal(ema[k], raw[k]) for k in raw) and any(not torch.equal(ema[k], last[k]) for k in last)


@pytest.mark.parametrize(
    ("case", "message"),
    [("not_a_checkpoint", "checkpoint"), ("wrong_suffix", "as .safetensors"), ("exists", "already exists")],
)
def test_mistakes_are_one_line(run, tmp_path, capsys, case, message):
    existing = tmp_path / "there.safetensors"
    existing.write_bytes(b"keep me")
    args = {
        "not_a_checkpoint": [str(tmp_path), str(tmp_path / "out.safetensors")],
        "wrong_suffix": [str(checkpoint(run, 3)), str(tmp_path / "out.pt")],
        "exists": [str(checkpoint(run, 3)), str(existing)],
    }[case]
    assert run_cli(main, args) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert existing.read_bytes() == b"keep me"
