"""torch.compile (issue 18): regional compilation gives eager's losses, weights and frames, through the commands
users run; a machine that cannot compile is one line before anything loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, write_sampling_files
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from lvdm.config import check_machine, load_config
from lvdm.errors import ConfigError
from lvdm.models import compile as compile_module
from lvdm.models.compile import spatial_blocks
from lvdm.pipeline import VideoPipeline
from lvdm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(compile_module.compile_problem(torch.device("cpu")) is not None, reason="no C++ compiler"),
]


def test_a_compiled_training_run_gives_the_eager_losses_and_weights(tiny_assets, tmp_path):
    runs = {}
    for compiled in (False, True):  # compiled with checkpointing too: the recomputation runs the compiled blocks
        settings = {"train.max_steps": 2, "train.compile": compiled, "model.gradient_checkpointing": compiled}
        overrides = tiny_overrides(tiny_assets, tmp_path / f"compile-{compiled}", **settings)
        graphs = counters["stats"]["unique_graphs"]
        result = train(load_config([], overrides), progress=False)
        runs[compiled] = (result.first_loss, result.last_loss, load_file(result.temporal_path))
        # the control: the compiled run did compile (Dynamo made graphs), the eager one did not
        assert (counters["stats"]["unique_graphs"] > graphs) == compiled
    (eager_first, eager_last, eager), (first, last, compiled) = runs[False], runs[True]
    assert first == pytest.approx(eager_first, rel=1e-5) and last == pytest.approx(eager_last, rel=1e-5)
    assert eager.keys() == compiled.keys()  # nn.Module.compile keeps parameter names: files load anywhere
    # AdamW turns float-order noise in near-zero gradients into visible steps: within half of one step's size
    apart = max((eager[key] - compiled[key]).abs().max().item() for key in eager)
    assert apart < 0.5 * load_config([], overrides).train.lr


def test_compiled_sampling_gives_the_eager_frames(tmp_path):
    files = write_sampling_files(tmp_path)
    pipe = VideoPipeline.from_pretrained(files["a"], temporal=files["module"])
    settings = dict(num_frames=4, height=16, width=16, num_inference_steps=2, seed=3, progress=False)
    eager = pipe("a red disc", **settings).frames
    compiled = pipe.compile()("a red disc", **settings).frames
    blocks = spatial_blocks(pipe.base.unet)
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)  # not eager twice
    assert eager.std() > 10  # frames, not a constant
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1


def test_no_compiler_is_one_line_before_anything_loads(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    cfg = load_config([], tiny_overrides(tiny_assets, tmp_path / "run", **{"train.compile": True}))
    with pytest.raises(ConfigError, match="train.compile: compiling for the CPU needs a C.. compiler"):
        check_machine(cfg)
    with pytest.raises(ConfigError, match="train.compile: belongs to the UNet"):  # the decoder target has none
        decoder = {"train.compile": True, "train.target": "decoder"}
        load_config([], tiny_overrides(tiny_assets, tmp_path / "d", **decoder))
    env = {key: value for key, value in os.environ.items() if key != "CXX"} | {"PATH": str(tmp_path)}
    cli = [sys.executable, str(REPO / "sample.py"), "--base", str(tiny_assets["base"]), "--prompt", "x", "--compile"]
    cli += ["--out", str(tmp_path / "x.mp4")]
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: --compile: compiling for the CPU needs a C++ compiler (g++ or clang++ on PATH, or CXX), none was "
        "found; sample without it"
    ]
