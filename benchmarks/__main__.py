"""lvdm against diffusers' own video models, in one process and one run: ``python -m benchmarks``.

    python -m benchmarks --size small                  # CPU, an SD-shaped 37.5M-parameter UNet: a few minutes
    python -m benchmarks --size sd15                   # SD 1.5's architecture (random weights); times on a GPU
                                                       # (it/s, MFU against --peak-tflops or a known GPU's peak)
    python -m benchmarks --size sd15 --only memory     # the full-size memory estimates, no GPU needed
    python -m benchmarks --size tiny --repeats 1 --warmup 0   # the smoke setting the test runs
    python -m benchmarks --size small --only training --profile   # plus where a step's time goes

Sections (``--only``, repeatable or comma-separated): ``training`` (step and forward time, FLOPs, time per
FLOP and memory of lvdm's VideoUNet vs diffusers' UNetMotionModel, with and without gradient checkpointing,
and the image UNet as the floor), ``memory`` (fake-tensor peak-memory estimates at SD 1.5 16x256 and 16x512),
``sampling`` (lvdm's loop and VideoPipeline vs AnimateDiffPipeline) and ``data`` (clips/s from
``benchmarks.data_sampling``; cached latents vs on-the-fly encoding); on request, ``contention`` (the demo's
training step alone and beside one busy process, with lvdm's and torch's thread settings) and ``context`` (a
training step with the context encoder vs without, and rollout sampling time per frame vs one clip's) and ``image``
(a training step with image or FPS conditioning vs text to video) and ``upscale`` (the x4 video upscaler's sampling
memory whole vs in tiles, and a patch training step's time per pixel vs a full frame's) and ``compile`` (regional
``torch.compile``: compile time, speed-up and loss vs eager). Results:
``benchmarks/results/<date>-<size>.json`` (every figure and sample) and ``.md`` (the tables and the targets); a
run with ``--only`` writes ``<date>-<size>-<sections>.*`` and leaves the full run's files alone.

Timing on a CPU that other processes share: pass ``--threads 1``. With two OpenMP threads on two busy cores a
thread that is descheduled stalls the other at every barrier, and single calls take up to 10x their time.
Timings with ``--size sd15`` need a CUDA GPU with about 64 GB (all models stay resident, interleaved).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks import report
from benchmarks.harness import SIZES, Size, environment
from lvdm.cli import Parser, run_cli
from lvdm.errors import ConfigError
from lvdm.fileio import nearest_existing, write_problem

SECTIONS = ("training", "memory", "sampling", "data")


SECTION_MODULES = {  # each has run(size, device, *, warmup, repeats) -> dict
    "training": "benchmarks.training_step",
    "memory": "benchmarks.memory",
    "sampling": "benchmarks.sampling",
    "data": "benchmarks.data",
    "profile": "benchmarks.profiling",  # only when asked for: --profile or --only profile
    "contention": "benchmarks.contention",  # only when asked for: --only contention (CPU, fresh processes)
    "context": "benchmarks.context",  # only when asked for: --only context (context frames: training and rollout)
    "image": "benchmarks.image",  # only when asked for: --only image (image and FPS conditioning: training step)
    "upscale": "benchmarks.upscale",  # only when asked for: --only upscale (x4 upscaler: tiles' memory, patch step)
    "compile": "benchmarks.compile",  # only when asked for: --only compile (regional torch.compile vs eager)
}


def _sections(values: list[str] | None, profile: bool) -> list[str]:
    chosen = [part.strip() for value in values or [] for part in value.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(SECTION_MODULES))
    if unknown:
        raise ConfigError(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTION_MODULES)}")
    chosen = chosen or list(SECTIONS)
    return [name for name in SECTION_MODULES if name in chosen or (name == "profile" and profile)]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available")
    return torch.device(name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model and video size (default small)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of every call (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each before timing")
    parser.add_argument(
        "--only", action="append", metavar="SECTION", help=f"run only these: {', '.join(SECTION_MODULES)}"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="also profile a training step of each model")
    parser.add_argument("--out", type=Path, default=report.RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak TFLOP/s for the MFU column (default: known GPUs only)"
    )
    parser.add_argument("--note", default=None, help="a line for the results header (e.g. 'shared, noisy machine')")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    probe = nearest_existing(args.out)  # before the sections run: their results are written at the end
    if problem := write_problem(probe):
        parser.error(f"--out {args.out} cannot be a results folder ({probe} is not a writable folder: {problem})")
    return args


def _run_section(name: str, size: Size, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
    try:
        run = importlib.import_module(SECTION_MODULES[name]).run  # imported late: each pulls in its own deps
        options = {"peak": args.peak_tflops} if name == "training" else {}
        result = run(size, device, warmup=args.warmup, repeats=args.repeats, **options)
    except Exception:  # noqa: BLE001 - one failing section is reported; the others still run
        result = {"error": traceback.format_exc()}
        print(result["error"], file=sys.stderr)
    result["seconds"] = time.perf_counter() - started
    print(f"[benchmarks] {name} done in {result['seconds']:.0f} s", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, write the results, print the markdown; 1 if a section failed."""
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    size, device = SIZES[args.size], _device(args.device)
    meta = {
        "date": report.today(), "size": size.name, "setting": size.describe(), "repeats": args.repeats,
        "warmup": args.warmup, "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "note": args.note, "environment": environment(device),
    }  # fmt: skip
    names = _sections(args.only, args.profile)
    partial = "" if set(SECTIONS) <= set(names) else "-" + "-".join(names)  # a partial run keeps the full one
    meta["file_stem"] = f"{meta['date']}-{size.name}{partial}"
    sections = {name: _run_section(name, size, device, args) for name in names}
    json_path, md_path = report.write(meta, sections, args.out)
    print(md_path.read_text())
    print(f"[benchmarks] wrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if any("error" in result for result in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a mistake, Ctrl-C or a closed pipe: one line and an exit status
