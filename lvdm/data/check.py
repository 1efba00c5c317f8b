"""Scan a dataset before spending GPU hours on it: what is usable, what is not, and why.

    python -m lvdm.data.check data.root=clips/                       # a folder of clips + .txt captions
    python -m lvdm.data.check --config configs/t2v_sd15.yaml         # the data section of a training config
    python -m lvdm.data.check --config run.yaml data.num_frames=24 --report report.jsonl

Every listed file is loaded exactly as training would load it (caption, probe, clip plan,
decode at the training size). Exit status: 0 when the bad fraction is within
``data.max_bad_fraction`` (training would run), 1 when it is not, 2 for a configuration error.
"""

from __future__ import annotations

import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvdm.cli import Parser, run_cli, split_overrides
from lvdm.config import DataConfig, load_config, option
from lvdm.errors import ConfigError, VideoReadError
from lvdm.fileio import atomic_path, control_character, json_text, write_problem


def _ignored(value: Any) -> None:
    """What the check keeps of a section it ignores: nothing, so that a value a training run requires and the config
    leaves to be set (``model.base: ???`` in the shipped configs) is no problem here."""
    return None


@dataclass
class CheckConfig:
    """A training config seen by the check: only ``data`` matters, the other sections are ignored."""

    data: DataConfig = option(help="the dataset to check")
    model: dict[str, Any] | None = option(None, "ignored by the check", coerce=_ignored)
    train: dict[str, Any] | None = option(None, "ignored by the check", coerce=_ignored)
    output_dir: str | None = option(None, "ignored by the check", coerce=_ignored)


@dataclass
class CheckResult:
    """Per-file outcome of a scan."""

    usable: list[str] = field(default_factory=list)
    bad: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason -> files
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return len(self.usable) + sum(len(files) for files in self.bad.values())

    @property
    def bad_fraction(self) -> float:
        return (self.total - len(self.usable)) / max(self.total, 1)


def scan(
    data: DataConfig,
    *,
    limit: int | None = None,
    report: Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> CheckResult:
    """Load every entry as training would; collect the usable ones and the reasons for the rest. ``report``: one
    JSON line per file written there; an existing file is refused (before the scan) unless ``overwrite``."""
    from tqdm.auto import tqdm

    if report is not None:
        _check_report(Path(report), overwrite)

    from lvdm.data.build import build_dataset

    dataset, _ = build_dataset(data)
    indices = range(len(dataset) if limit is None else min(limit, len(dataset)))
    result = CheckResult()
    lines = []
    start = time.perf_counter()
    for index in tqdm(indices, desc="checking", unit="file", disable=not progress):
        path = str(dataset.entries[index].path)
        try:
            dataset.load(index, random.Random(f"check:{index}"))
        except VideoReadError as exc:
            result.bad[_reason_kind(exc.reason)].append(path)
            lines.append({"path": path, "ok": False, "reason": exc.reason})
            continue
        result.usable.append(path)
        lines.append({"path": path, "ok": True})
    result.seconds = time.perf_counter() - start
    if report is not None:
        with atomic_path(report, exclusive=not overwrite) as temp:
            temp.write_text("".join(json_text(line) + "\n" for line in lines), encoding="utf-8")
    return result


def _check_report(report: Path, overwrite: bool) -> None:
    """A report that would replace a file (a user's notes, a caption of the data) or cannot be written at all is
    refused before minutes of scanning."""
    if control := control_character(str(report)):  # a name split over lines: the listing of the folder too
        raise ConfigError(
            f"--report {str(report)!r} holds a control character ({control!r}); choose a name without one"
        )
    if report.is_dir() or (report.exists() and not report.is_file()):
        raise ConfigError(f"--report {report}: not a file")
    if (report.exists() or report.is_symlink()) and not overwrite:
        raise ConfigError(f"--report {report} already exists; choose another file, or replace it (--overwrite)")
    if problem := write_problem(report.parent):
        raise ConfigError(f"--report {report}: its folder {report.parent} is not a writable folder ({problem})")


def _reason_kind(reason: str) -> str:
    """Group reasons by their text before the first ':' (``too short: needs 32 ...`` -> ``too short``)."""
    return reason.split(":")[0].strip()


def _shown(path: object) -> str:
    """A path on one line: quoted as Python writes it when it holds a newline or another control character."""
    text = str(path)
    return repr(text) if control_character(text) else text


def summary(result: CheckResult, max_bad_fraction: float, *, show: int = 5) -> str:
    """The human-readable verdict."""
    rate = result.total / max(result.seconds, 1e-9)
    lines = [
        f"checked {result.total} files in {result.seconds:.1f} s ({rate:.1f} files/s)",
        f"usable: {len(result.usable)} ({100 * (1 - result.bad_fraction):.1f}%)",
    ]
    for reason, files in sorted(result.bad.items(), key=lambda item: -len(item[1])):
        lines.append(f"bad, {reason}: {len(files)}")
        lines += [f"    {_shown(path)}" for path in files[:show]]
        lines += [f"    ... and {len(files) - show} more"] if len(files) > show else []
    verdict = "ok" if result.bad_fraction <= max_bad_fraction else "too many bad files"
    lines.append(
        f"verdict: {verdict} ({100 * result.bad_fraction:.1f}% bad, data.max_bad_fraction {max_bad_fraction})"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = Parser(prog="python -m lvdm.data.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config file(s); later ones win")
    parser.add_argument("--limit", type=int, default=None, help="check only the first N files")
    parser.add_argument("--report", type=Path, default=None, help="write one JSON line per file here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --report file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    overrides, rest = split_overrides(argv, parser)
    args = parser.parse_args(rest)
    if args.limit is not None and args.limit < 1:  # 0 checked nothing and said "verdict: ok", exit 0
        raise ConfigError(f"--limit {args.limit}: check at least 1 file (leave it out to check them all)")
    cfg = load_config(args.config, overrides, schema=CheckConfig)
    result = scan(cfg.data, limit=args.limit, report=args.report, progress=not args.quiet, overwrite=args.overwrite)
    print(summary(result, cfg.data.max_bad_fraction))
    return 0 if result.bad_fraction <= cfg.data.max_bad_fraction else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
