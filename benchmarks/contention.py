"""The demo's training step alone and beside one busy process: how much a competing program costs.

``python -m benchmarks --only contention`` (CPU). Each measurement is a fresh process (the OpenMP wait
policy is read when the runtime loads), timing the median of ``steps`` training steps of the demo-sized
video UNet (the tiny SD1 UNet, batch 2 x 8 frames at 16x16 latents, AdamW on the temporal layers). The
busy program is one single-threaded Python loop. Settings:

- ``lvdm``: what the CLIs choose (``lvdm.runtime``): threads = usable cores, OpenMP waiting passive;
- ``torch defaults``: threads = cores, GNU OpenMP's active (spinning) waiting;
- ``1 thread``: for reference.

Alone and busy runs are interleaved, ``repeats`` times each; the figure is the median busy / alone ratio. On a
machine whose other cores are busy already the "alone" runs are not alone: the header says how loaded it was.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

import torch

from benchmarks.harness import Size
from benchmarks.report import target

SETTINGS = {  # name -> (environment changes, torch threads; None: the usable cores)
    "lvdm": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "torch defaults": ({"OMP_WAIT_POLICY": "ACTIVE"}, None),
    "1 thread": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1),
}
CHILD = """
import json, statistics, sys, time
import torch
from lvdm import testing
from lvdm.models import VideoUNet
from lvdm.runtime import apply_threads, plan_threads
threads, steps = (None if sys.argv[1] == "auto" else int(sys.argv[1])), int(sys.argv[2])
apply_threads(plan_threads(threads=threads, data_workers=0))
unet = testing.tiny_unet("sd1", seed=0)
video = VideoUNet.from_unet2d(unet).freeze_base()
optimizer = torch.optim.AdamW(list(video.temporal_parameters()), lr=1e-4)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 8, 16, 16, generator=g)
t = torch.randint(0, 1000, (2,), generator=g)
text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
times = []
for _ in range(steps + 2):
    start = time.perf_counter()
    video(x, t, text).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
print(json.dumps({"median": statistics.median(times[2:]), "threads": torch.get_num_threads()}))
"""


def _step_seconds(setting: str, steps: int) -> dict[str, Any]:
    changes, threads = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)} | changes
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "auto" if threads is None else str(threads), str(steps)],
        env=env, capture_output=True, text=True, check=True, timeout=900,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run(size: Size, device: torch.device | None = None, *, warmup: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Median step seconds of each setting alone and beside one busy process, and their ratio."""
    steps = 4 if size.name == "tiny" else 10
    samples: dict[str, dict[str, list[float]]] = {name: {"alone": [], "busy": []} for name in SETTINGS}
    threads: dict[str, int] = {}
    for _ in range(repeats):
        for name in SETTINGS:
            alone = _step_seconds(name, steps)
            busy_process = _busy()
            try:
                busy = _step_seconds(name, steps)
            finally:
                busy_process.kill()
                busy_process.wait()
            samples[name]["alone"].append(alone["median"])
            samples[name]["busy"].append(busy["median"])
            threads[name] = alone["threads"]
    rows = []
    for name, by in samples.items():
        alone, busy = statistics.median(by["alone"]), statistics.median(by["busy"])
        rows.append({"setting": name, "torch threads": threads[name], "alone s/step": alone, "busy s/step": busy,
                     "busy / alone": busy / alone})  # fmt: skip
    ratio = {row["setting"]: row["busy / alone"] for row in rows}
    return {
        "samples": samples,
        "notes": [
            "the demo-sized step (tiny SD1 UNet, batch 2 x 8 frames at 16x16 latents), median of "
            f"{steps} steps per fresh process, {repeats} interleaved alone/busy pairs per setting; "
            "busy = beside one single-threaded CPU-bound process",
            f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        ],
        "tables": [{"title": "Training step beside a busy process", "rows": rows}],
        "targets": [target("demo step beside one busy process / alone, lvdm's thread settings", ratio["lvdm"], 2.3)],
    }
