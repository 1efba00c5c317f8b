"""The results files: ``benchmarks/results/<date>-<size>.json`` (every figure) and ``.md`` (the tables).

A section's result is a dict; the writer reads three optional keys from it: ``tables`` (a list of
``{"title", "rows"}``, rows being dicts with the same keys), ``targets`` (``{"target", "value", "limit", "met"}``)
and ``notes`` (strings). Everything else goes to the JSON only.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

from lvdm.fileio import atomic_paths

RESULTS = Path(__file__).resolve().parent / "results"
TITLES = {
    "training": "1. Training step",
    "memory": "2. Peak training memory (fake-tensor estimate, no GPU)",
    "sampling": "3. Sampling",
    "data": "4. Data",
    "profile": "Profile: where a training step's time goes",
}


def target(what: str, value: float | None, limit: float) -> dict[str, Any]:
    """One target line: ``value <= limit``; ``met`` is None without a value."""
    met = None if value is None else value <= limit
    return {"target": what, "value": value, "limit": f"<= {limit:.4g}", "met": met}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if magnitude < 0.01 else f"{value:.3f}" if magnitude < 10 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of dicts (the first row's keys are the columns) as a markdown table."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _header(meta: dict[str, Any]) -> list[str]:
    env = meta["environment"]
    machine = f"{env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}"
    if env.get("gpu"):
        machine += f"; GPU {env['gpu']}"
    return [
        f"# lvdm benchmarks: `--size {meta['size']}` ({meta['date']})",
        "",
        f"- command: `{meta['command']}`",
        f"- setting: {meta['setting']}; {meta['warmup']} warm-up and {meta['repeats']} timed repeats per figure, "
        "interleaved; times are medians, spread = (max - min) / median",
        f"- machine: {machine}; {env['platform']}",
        f"- versions: python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, "
        f"transformers {env['transformers']}, lvdm {env['lvdm_commit']}",
        *([f"- note: {meta['note']}"] if meta.get("note") else []),
        "",
    ]


def _targets(sections: dict[str, dict[str, Any]]) -> list[str]:
    rows = [t for result in sections.values() for t in result.get("targets", [])]
    if not rows:
        return []
    return ["## Targets", "", markdown_table(rows), ""]


def _section(name: str, result: dict[str, Any]) -> list[str]:
    lines = [f"## {TITLES.get(name, name)}", ""]
    if "error" in result:
        lines += ["Failed:", "", "```", result["error"].rstrip(), "```", ""]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    if result.get("notes"):
        lines.append("")
    for table in result.get("tables", []):
        lines += [f"### {table['title']}", "", markdown_table(table["rows"]), ""]
    return lines


def render(meta: dict[str, Any], sections: dict[str, dict[str, Any]]) -> str:
    """The whole markdown document: header, targets, then each section's notes and tables."""
    lines = _header(meta) + _targets(sections)
    for name, result in sections.items():
        lines += _section(name, result)
    return "\n".join(lines).rstrip() + "\n"


def write(meta: dict[str, Any], sections: dict[str, dict[str, Any]], folder: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``<file_stem>.json`` and ``.md`` into ``folder`` (default stem ``<date>-<size>``); return both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / meta.get("file_stem", f"{meta['date']}-{meta['size']}")
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    with atomic_paths([json_path, md_path]) as (json_temp, md_temp):  # both or neither, never half a file
        json_temp.write_text(json.dumps({"meta": meta, "sections": sections}, indent=2, default=str) + "\n")
        md_temp.write_text(render(meta, sections))
    return json_path, md_path


def today() -> str:
    return dt.date.today().isoformat()
