"""Regional ``torch.compile`` of a :class:`~lvdm.models.VideoUNet`.

Compiling the whole UNet traces one large graph: minutes of compile time, repeated whenever a shape changes.
The UNet is made of a few kinds of blocks repeated at a few widths, so lvdm compiles each spatial block and each
temporal layer on its own (PyTorch's "regional compilation"): blocks of one kind and shape share their compiled
code, and compile time grows with the number of distinct shapes, not with depth. Shapes are static (one compiled
graph per shape; a new video size compiles once more), which is also what inductor handles best.

The frame layout reaches the spatial cross-attentions (which project the text once per video) through a
``threading.local`` that Dynamo traces, guarding on the frame count it reads: every block compiles whole, without
a graph break (``TORCH_LOGS=graph_breaks`` shows none; a ``ContextVar`` there left ``Transformer2DModel.forward``
eager, with its blocks compiled piecemeal).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterable

import torch

from lvdm.errors import ConfigError


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here (inductor needs a C++ compiler on CPU, Triton on a GPU),
    or ``None``."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "compiling for a GPU needs Triton (pip install triton), which this environment lacks"
        return None
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None and shutil.which("clang++") is None:
        return f"compiling for the CPU needs a C++ compiler ({compiler} or clang++ on PATH, or CXX), none was found"
    return None


def compile_blocks(modules: Iterable[torch.nn.Module], device: torch.device) -> int:
    """Compile each of ``modules`` (a UNet's repeated blocks) in place with static shapes (``nn.Module.compile``,
    so parameter names and checkpoints are unchanged); returns how many. Compilation itself happens on the first
    call of each shape."""
    problem = compile_problem(device)
    if problem is not None:
        raise ConfigError(f"compile: {problem}; run without compiling instead")
    import torch._dynamo

    modules = list(modules)
    # blocks of one class share a cache of compiled graphs, one entry per shape: allow one per block
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(modules))
    for module in modules:
        module.compile(dynamic=False)
    return len(modules)


def spatial_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The ResNet and transformer blocks of a diffusers 2D UNet (inflated or not), the units compiled for it."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [module for module in unet.modules() if isinstance(module, (ResnetBlock2D, Transformer2DModel))]
