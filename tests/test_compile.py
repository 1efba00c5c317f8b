"""torch.compile (issue 18): regional compilation gives eager's losses, weights and frames, through the commands
users run; a machine that cannot compile is one line before anything loads."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
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


@pytest.fixture(scope="module")
def one_level_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' SD1 stand-in with one level of blocks instead of two: each of its kinds of block (ResNet,
    cross-attention transformer, temporal layer) at one shape or two, so that inductor compiles a third of the
    graphs (58 s against 137 s with an empty compile cache, CI's case) and the test still runs every kind."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lvdm.testing.models import tiny_sd_components

    parts = tiny_sd_components("sd1", seed=0)
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32, cross_attention_dim=32,
        block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        attention_head_dim=8,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("one_level")
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_a_compiled_training_run_gives_the_eager_losses_and_weights(tiny_assets, one_level_base, tmp_path):
    runs = {}
    for compiled in (False, True):  # compiled with checkpointing too: the recomputation runs the compiled blocks
        settings = {"train.max_steps": 2, "train.compile": compiled, "model.gradient_checkpointing": compiled}
        settings["model.base"] = one_level_base
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


def test_compiled_sampling_gives_the_eager_frames(one_level_base):
    pipe = VideoPipeline.from_pretrained(one_level_base)  # new temporal layers: compiled and run, as a module's are
    settings = dict(num_frames=4, height=16, width=16, num_inference_steps=2, seed=3, progress=False)
    eager = pipe("a red disc", **settings).frames
    graphs = counters["stats"]["unique_graphs"]
    compiled = pipe.compile()("a red disc", **settings).frames
    assert counters["stats"]["unique_graphs"] > graphs  # the control: Dynamo traced (not eager past a limit)
    blocks = spatial_blocks(pipe.base.unet)
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)  # not eager twice
    assert eager.std() > 10  # frames, not a constant
    assert np.abs(eager.astype(int) - compiled.astype(int)).max() <= 1


def test_compiled_blocks_read_the_frame_layout_without_a_graph_break(one_level_base, monkeypatch):
    """The frame layout was a ContextVar, which Dynamo cannot trace: every spatial cross-attention broke the graph
    and ``Transformer2DModel.forward`` ran eagerly. Now nothing breaks, and what is read is guarded: 2 videos x 2
    frames and 1 video x 4 frames give every block the same input shape, and each layout gets eager's output
    (a graph kept from the other layout would project the wrong video's text). Traced by Dynamo without inductor
    (the tests above compare inductor's numbers), which takes seconds. The control: Dynamo's counter does see a
    ContextVar read as a graph break."""
    from contextvars import ContextVar

    from conftest import randomize
    from diffusers import UNet2DConditionModel

    from lvdm.models import VideoUNet

    eager = VideoUNet.from_unet2d(UNet2DConditionModel.from_pretrained(one_level_base, subfolder="unet")).eval()
    randomize(eager.temporal_parameters(), seed=2, std=0.05)  # the frames of a video mix
    module_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: module_compile(self, backend="eager", **kw))
    compiled = copy.deepcopy(eager).compile_blocks()
    breaks = sum(counters["graph_break"].values())
    gen = torch.Generator().manual_seed(0)
    texts = torch.randn(2, 77, 32, generator=gen)  # a text per video
    with torch.no_grad():
        for videos, frames in ((2, 2), (1, 4), (2, 2)):
            x = torch.randn(videos, 4, frames, 8, 8, generator=gen)
            t = torch.full((videos,), 500)
            out, want = compiled(x, t, texts[:videos]), eager(x, t, texts[:videos])
            assert torch.allclose(out, want, atol=1e-5), (videos, frames, (out - want).abs().max())
        one_text = eager(x, t, texts[:1].expand(videos, -1, -1))  # the last layout, both videos given the first text
    assert not torch.allclose(one_text[1], want[1], atol=1e-3)  # what a wrong frame count would do is visible
    assert sum(counters["graph_break"].values()) == breaks
    var = ContextVar("lvdm_test", default=2.0)
    torch.compile(lambda x: x * var.get(), backend="eager")(torch.ones(1))
    assert sum(counters["graph_break"].values()) > breaks


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
