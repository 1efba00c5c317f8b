"""Where training numbers go: a JSONL file (one object per logged step) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class RunLog:
    """Append-only ``log.jsonl`` plus TensorBoard scalars under ``tensorboard/``, main process only."""

    def __init__(self, output_dir: Path, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = output_dir / "log.jsonl"
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every record of a ``log.jsonl``."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
