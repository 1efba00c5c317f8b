"""``python -m lvdm.data.check``: the usable count, bad files grouped by reason, a verdict and its exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvdm.testing import clips

REPO = Path(__file__).resolve().parents[1]
CLIP = ["data.num_frames=4", "data.frame_stride=2", "data.resolution=[16,16]"]
BAD = {  # file -> its reason, as the report writes it
    "zero_byte.mp4": "zero-byte file",
    "text_as_mp4.mp4": "not a video (text file?)",
    "short.mp4": "too short: a 4-frame clip needs 7 frames, the video has 4",
    "audio_only.mp4": "no video stream (audio only)",
    "uncaptioned.mp4": "caption file missing: uncaptioned.txt",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five good captioned clips and five bad files: 50% bad."""
    root = clips.write_captioned_folder(tmp_path_factory.mktemp("check"), 5, num_frames=12, size=(32, 24))
    for name in ("zero_byte", "text_as_mp4", "short", "audio_only"):
        clips.BAD_INPUTS[name](root).with_suffix(".txt").write_text("a caption", encoding="utf-8")
    clips.write_clip(root / "uncaptioned.mp4", num_frames=12, size=(32, 24))
    return root


def check_process(*args: object) -> subprocess.CompletedProcess[str]:
    """``python -m lvdm.data.check ARGS`` in a process of its own, with a timeout: for listings that could block."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lvdm.data.check", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=180)


@pytest.fixture
def check(command):
    """``check(*args)``: ``python -m lvdm.data.check ARGS``, its ``main`` run in this process (conftest's
    ``command``)."""
    return lambda *args: command("-m", "lvdm.data.check", *args)


def test_too_many_bad_files_exit_1_with_reasons_grouped_and_a_report(folder: Path, tmp_path: Path, check) -> None:
    report = tmp_path / "report.jsonl"
    result = check(f"data.root={folder}", *CLIP, "--report", report, "--quiet")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("checked 10 files in ")
    assert lines[1] == "usable: 5 (50.0%)"
    for reason, name in (
        ("zero-byte file", "zero_byte"), ("not a video (text file?)", "text_as_mp4"), ("too short", "short"),
        ("no video stream (audio only)", "audio_only"), ("caption file missing", "uncaptioned"),
    ):  # fmt: skip
        at = lines.index(f"bad, {reason}: 1")
        assert lines[at + 1] == f"    {folder / name}.mp4"
    assert lines[-1] == "verdict: too many bad files (50.0% bad, data.max_bad_fraction 0.05)"
    rows = [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10 and {row["path"] for row in rows} == {str(p) for p in folder.rglob("*.mp4")}
    assert {Path(row["path"]).name: row["reason"] for row in rows if not row["ok"]} == BAD
    assert all("reason" not in row for row in rows if row["ok"])


def test_within_the_allowed_fraction_exits_0_and_a_training_config_is_accepted(folder: Path, check) -> None:
    """The data section of a whole training config (other sections ignored), with the fraction raised."""
    config = REPO / "configs" / "demo.yaml"
    result = check("--config", config, f"data.root={folder}", *CLIP, "data.max_bad_fraction=0.5", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "usable: 5 (50.0%)" in result.stdout
    assert result.stdout.splitlines()[-1] == "verdict: ok (50.0% bad, data.max_bad_fraction 0.5)"


def test_a_shipped_config_is_checked_without_its_base(folder: Path, check) -> None:
    """The shipped configs leave model.base (and other model keys) as '???', required for training: the check ignores
    those sections, so it runs on the config's own clip settings without a base."""
    for name in ("t2v_sd15.yaml", "i2v_sd15.yaml", "animatediff_sd15.yaml"):
        result = check(
            "--config", REPO / "configs" / name, f"data.root={folder}", "data.max_bad_fraction=1", "--quiet"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("checked 10 files in ")


def test_a_typo_exits_2_with_did_you_mean(folder: Path, check) -> None:
    result = check(f"data.root={folder}", "data.num_frame=4")
    assert result.returncode == 2
    assert "did you mean 'data.num_frames'" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_missing_folder_is_one_line_and_exit_1(tmp_path: Path, check) -> None:
    result = check(f"data.root={tmp_path / 'nope'}")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"error: data folder {tmp_path / 'nope'} does not exist or is not a folder"]


def test_the_report_never_replaces_a_file_and_is_checked_before_the_scan(folder: Path, tmp_path: Path) -> None:
    """--report once replaced any file (a user's notes, a caption of the data being checked), and a folder or a
    missing folder as --report was a traceback after the whole scan."""
    from lvdm.config import DataConfig
    from lvdm.data.check import scan
    from lvdm.errors import ConfigError

    caption = folder / "clip_000.txt"
    before = caption.read_bytes()
    data = DataConfig(root=str(folder), num_frames=4, frame_stride=2, resolution=[16, 16])
    for report, message in ((caption, "already exists"), (tmp_path, "not a file"),
                            (tmp_path / "missing" / "r.jsonl", "is not a writable folder"),
                            (Path("/proc/r.jsonl"), "is not a writable folder"),  # root passed os.access there
                            (tmp_path / "r\nx.jsonl", "holds a control character")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            scan(data, report=report, progress=False)
    assert caption.read_bytes() == before
    mine = tmp_path / "report.jsonl"
    mine.write_text("old")
    scan(data, report=mine, progress=False, overwrite=True)  # the control: asked to, it replaces the file
    assert len(mine.read_text().splitlines()) == 10


def test_a_limit_below_one_is_refused_not_a_verdict_of_ok(folder: Path, check) -> None:
    """``--limit 0`` (or -5) checked nothing and said "verdict: ok", exit 0: "training would run"."""
    for limit in ("0", "-5"):
        result = check(f"data.root={folder}", *CLIP, "--limit", limit, "--quiet")
        assert result.returncode == 2 and result.stdout == "", result.stdout
        assert result.stderr == f"error: --limit {limit}: check at least 1 file (leave it out to check them all)\n"
    result = check(f"data.root={folder}", *CLIP, "--limit", "1", "--quiet")  # the control: one file checked
    assert result.returncode == 1 and "verdict: too many bad files (100.0% bad" in result.stdout, result.stderr


def test_a_listing_that_is_a_fifo_or_a_device_is_named_as_such(tmp_path: Path) -> None:
    """It was said not to exist. In processes of their own: opening a FIFO could block."""
    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "zero.csv").symlink_to("/dev/zero")
    for name in ("fifo.jsonl", "zero.csv"):
        result = check_process(f"data.manifest={tmp_path / name}", *CLIP, "--quiet")
        assert result.returncode == 1 and result.stderr == (
            f"error: data listing {tmp_path / name} is not a regular file (a FIFO, device or folder)\n"
        ), result.stderr
    result = check_process(
        f"data.manifest={tmp_path / 'none.csv'}", *CLIP, "--quiet"
    )  # the control: missing is missing
    assert result.stderr == f"error: data listing {tmp_path / 'none.csv'} does not exist\n"


def test_a_file_name_with_a_newline_stays_on_its_line() -> None:
    from lvdm.data.check import CheckResult, summary

    result = CheckResult(usable=["fine.mp4"], bad={"too short": ["two\nlines.mp4", "plain.mp4"]})
    lines = summary(result, 0.5).splitlines()
    assert lines[3:5] == ["    'two\\nlines.mp4'", "    plain.mp4"]  # the control: a plain name is shown as it is
