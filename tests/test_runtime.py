"""Thread and worker defaults from the cores a process may use (lvdm.runtime)."""

from __future__ import annotations

import os

from lvdm.runtime import CoreBudget, _cgroup_quota, plan_threads, prefer_passive_waiting, usable_cores


def test_the_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(tmp_path) == 2  # 1.5 cores -> 2 threads
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert _cgroup_quota(tmp_path) == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert _cgroup_quota(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("garbage")
    assert _cgroup_quota(tmp_path) is None


def test_omp_num_threads_and_affinity_limit_the_cores(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert usable_cores().cores <= affinity
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    budget = usable_cores()
    assert budget.cores == 1 and budget.limits["OMP_NUM_THREADS"] == 1 and "OMP_NUM_THREADS 1" in budget.describe()
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert "OMP_NUM_THREADS" not in usable_cores().limits


def test_workers_and_threads_fit_the_cores():
    two = CoreBudget(2, {"affinity": 2})
    plan = plan_threads(threads=None, data_workers=4, budget=two)
    assert (plan.torch_threads, plan.data_workers) == (2, 1)  # one core stays with the training process
    shared = plan_threads(threads=None, data_workers=4, processes=2, budget=two)
    assert (shared.torch_threads, shared.data_workers) == (1, 0)  # two ranks on two cores: one each, no workers
    assert plan_threads(threads=3, data_workers=0, budget=two).torch_threads == 3  # the user's choice wins
    assert "2 usable cores" in plan.describe() and "data workers 1" in plan.describe()


def test_passive_waiting_on_a_busy_machine_only_and_never_over_the_users_choice(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert not prefer_passive_waiting(load=0.3, cores=2)  # quiet: the default (spinning) waits stay
    assert "OMP_WAIT_POLICY" not in os.environ
    assert prefer_passive_waiting(load=1.0, cores=2)  # one other busy process on two cores
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not prefer_passive_waiting(load=8.0, cores=2)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_busy_cores_come_from_two_proc_stat_snapshots(tmp_path):
    from lvdm.runtime import _cpu_times, busy_cores, cores_in_use

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0\ncpu1 50 0 50 400 0\nintr 1\n")
    first = _cpu_times(stat)
    assert first == ([100, 0, 100, 800, 0, 0, 0, 0, 0, 0], 2)
    # one core fully busy over the interval, the other idle: 100 of 200 jiffies idle -> 1 busy core of 2
    second = ([200, 0, 100, 900, 0, 0, 0, 0, 0, 0], 2)
    assert cores_in_use(first, second) == 1.0
    assert cores_in_use(first, first) is None  # no time passed
    stat.write_text("not a stat file")
    assert busy_cores(interval=0, stat=stat) is None
    assert busy_cores(interval=0, stat=tmp_path / "missing") is None
    live = busy_cores(interval=0.05)
    assert live is None or 0 <= live <= len(os.sched_getaffinity(0)) * 64
