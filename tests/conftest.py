"""Shared fixtures: tiny SD-shaped models built in code (no network, seeded)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from lvdm import testing


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n auto``, the default), each worker gets its share of the cores: the workers run side by
    side, and torch's default of one thread per core in every worker would oversubscribe the machine."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)  # what the trainer and the CLIs read when they pick threads
        torch.set_num_threads(share)


DEMO_BASE_FIRST = "test_demo.py"  # builds the demo's base (minutes), then trains on it
DEMO_BASE_USERS = (  # the longest first
    "test_demo_i2v.py",
    "test_demo_upscale.py",
    "test_demo_decoder.py",
    "test_demo_control.py",
    "test_demo_interpolate.py",
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """tests/test_demo.py first and the other files that train on the demo base last: pytest-xdist hands out files
    in this order (``--no-loadscope-reorder``), so the worker that builds the base does it while the others run
    everything else, and no worker sits waiting for the base (they did, for minutes, when a base user came up
    first)."""
    name = lambda item: item.path.name  # noqa: E731
    first = [item for item in items if name(item) == DEMO_BASE_FIRST]
    last = [item for user in DEMO_BASE_USERS for item in items if name(item) == user]
    items[:] = first + [item for item in items if name(item) not in (DEMO_BASE_FIRST, *DEMO_BASE_USERS)] + last


@pytest.fixture(params=["sd1", "sd2"])
def flavour(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def unet_pair(flavour: str):
    """A tiny 2D UNet and an untouched copy of it (``from_unet2d`` inflates in place)."""
    unet = testing.tiny_unet(flavour, seed=0)
    return unet, copy.deepcopy(unet)


@pytest.fixture(scope="session")
def sd_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Diffusers folders of each flavour (seed 0) written once per session."""
    root = tmp_path_factory.mktemp("bases")
    return {flavour: testing.make_tiny_sd(root / flavour, flavour, seed=0) for flavour in ("sd1", "sd2")}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the models are tiny, and on a shared machine a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODULE_TRAINING = {"data": {"num_frames": 4, "resolution": [16, 24], "target_fps": 12.0}}


def write_sampling_files(root) -> dict[str, object]:
    """Base A (folder), a temporal module "trained" on A, base B (single file) and a kohya LoRA for B, an SD2 base."""
    from lvdm.models import VideoUNet, load_base

    folder_a = testing.make_tiny_sd(root / "base_a", "sd1", seed=0)
    video = VideoUNet.from_unet2d(load_base(folder_a).unet)
    randomize(video.temporal_parameters(), seed=1, std=0.2)  # so that video mode differs from image mode
    video.save_temporal(root / "motion.safetensors", training_config=MODULE_TRAINING)
    components_b = testing.tiny_sd_components("sd1", seed=1)
    single_b = testing.write_single_file_checkpoint(components_b, root / "dreambooth_b.safetensors")
    lora = testing.write_lora(components_b["unet"], root / "style.safetensors", format="kohya", seed=3)
    sd2 = testing.make_tiny_sd(root / "base_sd2", "sd2", seed=0)
    return {"a": folder_a, "module": root / "motion.safetensors", "b": single_b, "lora": lora, "sd2": sd2}


def frame_by_frame(unet, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The image UNet run on every frame: ``(b, c, f, h, w)`` in and out (diffusers' own call, not lvdm's)."""
    b, c, f, h, w = sample.shape
    # b c f h w -> (b f) c h w
    frames = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    out = unet(frames, timestep.repeat_interleave(f), text.repeat_interleave(f, dim=0)).sample
    # (b f) c h w -> b c f h w
    return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def video_inputs(unet, b: int = 2, f: int = 5, seed: int = 0):
    """Random latents ``(b, c, f, h, w)``, one timestep per video and text embeddings ``(b, n, d)``."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(b, unet.config.in_channels, f, size, size, generator=g)
    timestep = torch.randint(0, 1000, (b,), generator=g)
    text = torch.randn(b, 7, unet.config.cross_attention_dim, generator=g)
    return sample, timestep, text


def projection_rows(projections) -> list[int]:
    """The batch size of every call of the modules ``projections``, appended as they run."""
    rows: list[int] = []
    for projection in projections:
        projection.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    return rows


def randomize(params, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def deepcopy(module):
    return copy.deepcopy(module)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny SD1 base folder (and SD2, and an x4 upscaler) and a folder of 6 captioned synthetic clips, shared by the
    training tests."""
    from PIL import Image

    from lvdm.testing.clips import write_captioned_folder

    root = tmp_path_factory.mktemp("assets")
    base = testing.make_tiny_sd(root / "base", "sd1", seed=0)
    base_sd2 = testing.make_tiny_sd(root / "base_sd2", "sd2", seed=0)
    clips = write_captioned_folder(root / "clips", 6, num_frames=12, fps=24.0, size=(32, 24), seed=0)
    images = root / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (24, 20), (60 * i, 30, 200 - 40 * i)).save(images / f"still_{i}.png")
        (images / f"still_{i}.txt").write_text(f"a still picture number {i}")
    from lvdm.testing.image_adapters import write_image_encoder

    encoder = write_image_encoder(root / "image_encoder")
    upscaler = testing.make_tiny_upscaler(root / "upscaler", seed=0)
    return {"base": base, "base_sd2": base_sd2, "clips": clips, "images": images, "image_encoder": encoder,
            "upscaler": upscaler}  # fmt: skip


def tiny_overrides(assets: dict[str, object], output_dir: object, **extra: object) -> list[str]:
    """``key=value`` overrides for a seconds-long training run on the tiny assets."""
    values = {
        "model.base": assets["base"],
        "data.root": assets["clips"],
        "data.num_frames": 4,
        "data.resolution": "[16,16]",
        "data.num_workers": 0,
        "train.batch_size": 2,
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.validate_every": 1000,
        "train.log_every": 1,
        "train.validation_steps": 2,  # the final validation's samples: 25 steps were most of a run's seconds
        "output_dir": output_dir,
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def shared_root(tmp_path_factory: pytest.TempPathFactory, name: str, make) -> object:
    """A folder made once per test session, even across pytest-xdist workers: the first worker to get here runs
    ``make(folder)`` while holding a lock, the others wait for it and reuse the folder (the demo's clips and base,
    which several test files train on)."""
    import fcntl
    import os

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest-N/, common to the workers
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".made").exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / ".made").touch()
    return folder


def whole_and_resumed(overrides, root) -> tuple[object, dict, dict]:
    """Train ``overrides(output_dir, **extra)`` (4 steps) in one go, and again stopped at step 2 then resumed; the
    whole run's result and both runs' temporal module tensors, which exact resume makes equal."""
    from safetensors.torch import load_file

    from lvdm.config import load_config
    from lvdm.training.trainer import train

    whole = train(load_config([], overrides(root / "whole")), progress=False)
    train(load_config([], overrides(root / "split", **{"train.max_steps": 2})), progress=False)
    train(load_config([], overrides(root / "split", **{"train.resume": "auto"})), progress=False)

    def tensors(path):  # a module file, or a decoder folder (diffusers format)
        return load_file(path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path)

    return whole, tensors(whole.temporal_path), tensors(root / "split" / whole.temporal_path.name)


def cut_like_the_cache(dataset, indices: list[int]) -> dict:
    """The video batch of the clips a latent cache holds: entry ``i`` cut with the cache's own seeded draw."""
    import random

    from lvdm.data.dataset import collate

    samples = [
        dataset.load(i, random.Random(f"{dataset.seed}:cache:{i}")) | {"index": i, "skipped": []} for i in indices
    ]
    return collate(samples)


@pytest.fixture
def command(capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """``command(SCRIPT, *args, env=None, cwd=None)``: ``python SCRIPT ARGS`` (the path of train.py, sample.py or an
    example, or ``-m module``) run in this process, its ``main`` through :func:`lvdm.cli.run_cli` as its
    ``__main__`` does, for the refusals that would otherwise spend most of their seconds starting an interpreter
    and importing torch.

    Returns a :class:`subprocess.CompletedProcess` as ``subprocess.run`` would. Its stdout and stderr are captured at
    the file descriptors (library output counts), Python's warnings show as ``PYTHONWARNINGS=default`` shows them,
    and an exception run_cli lets through (a traceback on the command line) fails the test. Keep attacks that could
    hang or fill memory, signals and what the libraries print while importing in real subprocesses."""
    import importlib
    import os
    import subprocess
    import sys
    import warnings
    from pathlib import Path

    from lvdm.cli import QUIET_LIBRARIES, run_cli

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 (the hook's form)
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    def run(*args: object, env: dict[str, str] | None = None, cwd: object = None) -> subprocess.CompletedProcess:
        words = [str(arg) for arg in args]
        if words[0] == "-m":
            main, argv = importlib.import_module(words[1]).main, words[2:]
        else:
            main, argv = _script(Path(words[0])).main, words[1:]
        capfd.readouterr()
        with monkeypatch.context() as patch, warnings.catch_warnings(), quiet_as_a_new_process():
            for key in QUIET_LIBRARIES:  # run_cli sets these in os.environ: recorded as they are, undone after
                was = key in os.environ
                patch.setenv(key, os.environ.get(key, "unset"))
                if not was:
                    patch.delenv(key)
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            if cwd is not None:
                patch.chdir(cwd)
            warnings.simplefilter("default")
            warnings.showwarning = show
            code = run_cli(main, argv)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(words, code, out, err)

    return run


def sample_here(command, *args: object) -> tuple[int, str, str]:
    """``python sample.py --quiet ARGS`` through :func:`command` (its fixture's value): exit code, stdout, stderr."""
    from pathlib import Path

    result = command(Path(__file__).resolve().parents[1] / "sample.py", "--quiet", *args)
    return result.returncode, result.stdout, result.stderr


def _script(path):
    """The script at ``path`` (train.py, sample.py, an example) as a module, loaded once per process."""
    import importlib.util
    import sys

    name = f"lvdm_script_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@contextlib.contextmanager
def quiet_as_a_new_process():
    """The libraries' logging as a command's process has it: run_cli sets TRANSFORMERS_VERBOSITY,
    DIFFUSERS_VERBOSITY and HF_HUB_DISABLE_PROGRESS_BARS before they load, but this process loaded them before. And
    what is still logged reaches the stderr being captured now: diffusers' and transformers' handlers hold the
    stderr of when they were made, and pytest's handlers on the root logger take the place of Python's last-resort
    one, which prints a library's warnings in a command's process."""
    import logging
    import sys

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    handlers = [handler for name in ("diffusers", "transformers") for handler in logging.getLogger(name).handlers
                if type(handler) is logging.StreamHandler]  # fmt: skip
    streams = [handler.setStream(sys.stderr) for handler in handlers]
    last_resort = logging.StreamHandler(sys.stderr)
    last_resort.setLevel(logging.WARNING)  # for the libraries without handlers: these two print with their own
    last_resort.addFilter(lambda record: record.name.split(".")[0] not in ("diffusers", "transformers"))
    logging.getLogger().addHandler(last_resort)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(last_resort)
        for handler, stream in zip(handlers, streams, strict=True):
            handler.setStream(stream)
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])
        if bars:
            transformers_logging.enable_progress_bar()
