"""How many CPU threads lvdm uses, and how they wait: defaults that degrade gracefully on a busy machine.

Measured on a 2-core machine with other CPU-bound work running (``benchmarks/contention.py``): with
PyTorch's defaults (one OpenMP thread per core, GNU OpenMP's active waiting) a tiny training step
took 6-14 s instead of about 1.3 s, because each thread spins at every parallel region's barrier
while the other waits for a core the busy program holds. With passive waiting, threads sleep at the
barrier instead and the same step takes about 2 s. So lvdm:

- asks OpenMP to wait passively (``OMP_WAIT_POLICY=PASSIVE``) when other work already keeps the cores
  busy (at least :data:`BUSY_LOAD` busy cores per usable core, measured over a quarter second from
  ``/proc/stat``: the 1-minute load average lags, and right after another job ended it made the demo's first
  run wait passively on an idle machine, 13.1 minutes instead of 7.0), unless the user set a policy; this
  must happen before the OpenMP runtime loads, so the CLIs call :func:`prefer_passive_waiting` first. On a
  quiet machine passive waiting costs more than it saves: the demo base's UNet stage took 417 s with it and
  240 s without (2 quiet cores), so there the default (spinning) policy stays;
- uses as many threads as the cores it may run on: the CPU affinity mask, the cgroup CPU quota
  (containers, ``cpu.max`` / ``cpu.cfs_quota_us``) and ``OMP_NUM_THREADS`` when set, the smallest wins;
- caps data-loader workers so that workers and the training process together fit those cores.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

BUSY_LOAD = 0.5
"""Busy cores per usable core from which the machine counts as busy (passive OpenMP waiting)."""


def busy_cores(interval: float = 0.25, stat: Path = Path("/proc/stat")) -> float | None:
    """How many cores other programs keep busy right now: ``(1 - idle share) x cores`` over ``interval`` seconds
    from ``stat`` (Linux); ``None`` where it cannot be read."""
    import time

    first = _cpu_times(stat)
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times(stat)
    return None if second is None else cores_in_use(first, second)


def _cpu_times(stat: Path) -> tuple[list[int], int] | None:
    """The aggregate ``cpu`` line's jiffies and the number of ``cpuN`` lines of a ``/proc/stat`` file."""
    try:
        lines = stat.read_text().splitlines()
        times = [int(value) for value in lines[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    count = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return (times, count) if lines[0].startswith("cpu ") and len(times) >= 4 and count else None


def cores_in_use(first: tuple[list[int], int], second: tuple[list[int], int]) -> float | None:
    """Busy cores between two :func:`_cpu_times` snapshots (idle and iowait count as idle)."""
    (a, cores), (b, _) = first, second
    total = sum(b) - sum(a)
    if total <= 0:
        return None
    idle = sum(b[3:5]) - sum(a[3:5])
    return (1 - idle / total) * cores


def prefer_passive_waiting(load: float | None = None, cores: int | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy (``load``, default the cores in use now
    (:func:`busy_cores`), else the 1-minute load average: at least :data:`BUSY_LOAD` per usable core), unless the
    user chose a policy; call before torch is imported. Returns whether passive waiting is in effect."""
    import sys

    if "OMP_WAIT_POLICY" not in os.environ and (load is not None or "torch" not in sys.modules):
        # with torch imported, OpenMP has read its policy already: nothing to measure (CLIs called in-process)
        if load is None:
            load = busy_cores()
        if load is None:
            try:
                load = os.getloadavg()[0]
            except OSError:  # no load average on this platform: assume busy, the safe side
                load = math.inf
        cores = usable_cores().cores if cores is None else cores
        if load >= BUSY_LOAD * cores:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


@dataclass(frozen=True)
class CoreBudget:
    """The cores this process may use, and what limits them."""

    cores: int
    limits: dict[str, int]  # what each source allows: affinity, cgroup, OMP_NUM_THREADS

    def describe(self) -> str:
        told = ", ".join(f"{name} {value}" for name, value in self.limits.items())
        return f"{self.cores} usable core{'s' if self.cores != 1 else ''} ({told})"


def usable_cores() -> CoreBudget:
    """The CPU cores this process may use: the smallest of affinity, cgroup quota and ``OMP_NUM_THREADS``."""
    limits = {"affinity": _affinity()}
    quota = _cgroup_quota()
    if quota is not None:
        limits["cgroup quota"] = quota
    omp = _positive_int(os.environ.get("OMP_NUM_THREADS", ""))
    if omp is not None:
        limits["OMP_NUM_THREADS"] = omp
    return CoreBudget(max(1, min(limits.values())), limits)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Cores allowed by the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), ``None`` when unlimited."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period or 100000)))
        v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1_quota.is_file() and v1_period.is_file():
            quota = int(v1_quota.read_text())
            return None if quota <= 0 else max(1, math.ceil(quota / int(v1_period.read_text())))
    except (OSError, ValueError):
        return None
    return None


def _positive_int(text: str) -> int | None:
    try:
        value = int(text.split(",")[0])
    except ValueError:
        return None
    return value if value > 0 else None


@dataclass(frozen=True)
class ThreadPlan:
    """What a run uses: torch's intra-op threads, data-loader workers, and the OpenMP wait policy."""

    torch_threads: int
    data_workers: int
    wait_policy: str
    budget: CoreBudget

    def describe(self) -> str:
        return (
            f"CPU: {self.budget.describe()}; torch threads {self.torch_threads}, data workers {self.data_workers}, "
            f"OpenMP waiting {self.wait_policy.lower()}"
        )


def plan_threads(
    *, threads: int | None, data_workers: int, processes: int = 1, budget: CoreBudget | None = None
) -> ThreadPlan:
    """Threads and workers for one of ``processes`` training processes on this machine: ``threads`` (``None``:
    an equal share of the usable cores), and data workers capped so that each process's workers plus itself fit
    its share (at least one core stays with the training process; 0 workers loads in the main process)."""
    budget = budget or usable_cores()
    share = max(1, budget.cores // max(processes, 1))
    torch_threads = threads or share
    workers = min(data_workers, max(share - 1, 0))
    policy = os.environ.get("OMP_WAIT_POLICY", "default (active)")
    return ThreadPlan(torch_threads, workers, policy, budget)


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's intra-op thread count to the plan's."""
    import torch

    if torch.get_num_threads() != plan.torch_threads:
        torch.set_num_threads(plan.torch_threads)
