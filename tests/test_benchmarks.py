"""The benchmark harness at its smallest setting (tiny models, one repeat, no warm-up), so it cannot rot.

The benchmark itself is not part of the test suite: this checks that every section runs and that the files it
writes hold what the README table and the issue ask for, not how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from benchmarks.__main__ import main

    out = tmp_path_factory.mktemp("results")
    threads = torch.get_num_threads()
    try:
        code = main(
            ["--size", "tiny", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)]
            + ["--peak-tflops", "0.5"]
        )
    finally:
        torch.set_num_threads(threads)
    (json_path,) = out.glob("*-tiny.json")
    (md_path,) = out.glob("*-tiny.md")
    return {"code": code, "json": json.loads(json_path.read_text()), "md": md_path.read_text()}


def test_every_section_runs(tiny_run: dict) -> None:
    sections = tiny_run["json"]["sections"]
    assert {name: result.get("error") for name, result in sections.items()} == dict.fromkeys(
        ("training", "memory", "sampling", "data")
    )
    assert tiny_run["code"] == 0


def test_training_figures(tiny_run: dict) -> None:
    training = tiny_run["json"]["sections"]["training"]
    for name in ("lvdm", "lvdm-attn", "motion"):
        flops = training["flops"][name]
        assert flops["step+ckpt"] > flops["step"] > 2 * flops["forward"] > 0  # backward ~2x, recompute on top
        for mode in ("forward", "step", "step+ckpt"):
            assert len(training["timing"][f"{name}:{mode}"]["samples_s"]) == 1
        assert training["parameters"][name]["trainable"] > 0
    assert training["flops"]["lvdm"]["forward"] > training["flops"]["image"]["forward"]
    estimate = training["memory_estimate_gib"]["lvdm"]
    assert estimate["step+ckpt"] < estimate["step"]
    rows = {(row["model"], row["mode"]): row for row in training["tables"][0]["rows"]}
    for (model, mode), row in rows.items():
        assert row["MFU"] == pytest.approx(row["TFLOP/s"] / 0.5), (model, mode)  # against --peak-tflops
        assert row["it/s"] == (None if mode == "forward" else pytest.approx(1 / row["median s"])), (model, mode)
    assert not any("16x512, ms" in t["target"] for t in training["targets"])  # the GPU target needs sd15 on CUDA


def test_memory_estimates(tiny_run: dict) -> None:
    memory = tiny_run["json"]["sections"]["memory"]
    (point,) = memory["estimates"].values()
    for name, modes in point.items():
        assert set(modes) == {"none", "own", "blocks"}
        assert modes["own"]["peak_gib"] < modes["none"]["peak_gib"], name
        assert modes["none"]["params_gib"] > 0 and modes["none"]["optimizer_gib"] > 0
    options = {row["option"]: row for row in memory["tables"][1]["rows"]}
    default = options["fused AdamW, fp32 moments (default)"]
    eight_bit = options["train.optimizer=adamw8bit (bitsandbytes)"]
    # 8-bit moments: 2 bytes per element instead of 8 (plus absmax and the small tensors kept in fp32)
    assert 0 < eight_bit["optimizer state GiB"] < 0.5 * default["optimizer state GiB"]
    assert eight_bit["saving GiB"] > 0 and eight_bit["peak GiB"] < default["peak GiB"]


def test_sampling_batches_guidance(tiny_run: dict) -> None:
    sampling = tiny_run["json"]["sections"]["sampling"]
    steps = sampling["steps"]
    for name in ("lvdm", "motion"):
        assert sampling["unet_calls"][name] == {"calls": steps, "batch_sizes": [2]}
    assert {"lvdm:loop", "lvdm:pipeline", "motion:loop", "motion:pipeline"} <= set(sampling["timing"])


def test_data_section(tiny_run: dict) -> None:
    data = tiny_run["json"]["sections"]["data"]
    assert set(data["timing"]) == {"cached", "on the fly"}
    if importlib.util.find_spec("benchmarks.data_sampling") is not None:
        assert "error" not in data["clips"], data["clips"].get("error")


def test_markdown_has_header_targets_and_tables(tiny_run: dict) -> None:
    md = tiny_run["md"]
    meta = tiny_run["json"]["meta"]
    assert meta["environment"]["torch"] == torch.__version__
    for text in ("--size tiny", "torch", "diffusers", "## Targets", "## 1. Training step", "## 2. Peak",
                 "## 3. Sampling", "## 4. Data", "time/FLOP lvdm / motion", "UNetMotionModel"):  # fmt: skip
        assert text in md, text


def test_mistakes_are_one_line_before_any_section_runs(tmp_path, command) -> None:
    """``--threads -3`` was torch's traceback, and ``--out`` naming a file one after the sections had run (their
    results lost); the control: a folder that does not exist yet is made at the end, as before."""
    from benchmarks.__main__ import parse_args

    (tmp_path / "a_file").write_text("mine")
    for args, message in ((["--only", "trainig"], "error: --only: unknown section(s) ['trainig']"),
                          (["--threads", "-3"], "error: --threads must be >= 1, got -3"),
                          (["--out", str(tmp_path / "a_file")], "cannot be a results folder"),
                          (["--out", "/proc/results"], "(/proc is not a writable folder")):  # fmt: skip
        refused = command("-m", "benchmarks.__main__", "--size", "tiny", *args)
        err = refused.stderr
        assert refused.returncode == 2, err
        assert message in err and "[benchmarks]" not in err, err  # no section ran
    assert (tmp_path / "a_file").read_text() == "mine"
    assert parse_args(["--out", str(tmp_path / "new" / "results")]).out == tmp_path / "new" / "results"


def test_the_gpu_step_target_and_the_peak_used_for_mfu() -> None:
    from benchmarks import training_step

    names, seconds = ("lvdm", "lvdm-attn", "motion"), {"forward": 0.04, "step": 0.1, "step+ckpt": 0.2}
    result = {
        "flops": dict.fromkeys(names, {"forward": 1e12, "step": 2.4e12, "step+ckpt": 3.3e12}),
        "timing": {f"{name}:{mode}": {"median_s": s} for name in names for mode, s in seconds.items()},
        "gpu_step_target": True,  # set by run() for --size sd15 on CUDA
    }
    gpu = {t["target"]: t for t in training_step.targets(result) if "16x512" in t["target"]}
    assert gpu["lvdm step at SD 1.5 16x512, ms"]["value"] == pytest.approx(100.0)
    assert gpu["lvdm step at SD 1.5 16x512, ms"]["met"] is True  # 100 ms <= 180
    assert gpu["lvdm step+ckpt at SD 1.5 16x512, ms"]["met"] is False  # 200 ms

    assert training_step.peak_tflops(torch.device("cpu")) is None  # no MFU on CPU unless asked
    assert training_step.peak_tflops(torch.device("cpu"), 2.0) == 2.0


def test_the_image_section_times_all_three_steps(tmp_path) -> None:
    from benchmarks.__main__ import main

    threads = torch.get_num_threads()
    try:
        code = main(["--size", "tiny", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path),
                     "--only", "image"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    (json_path,) = tmp_path.glob("*-tiny-image.json")
    section = json.loads(json_path.read_text())["sections"]["image"]
    assert code == 0 and set(section["timing"]) == {"text to video", "fps", "image"}
    assert section["targets"][0]["target"] == "image-to-video step / text-to-video step"
