"""The embedded demo's assets: a tiny SD model and a folder of synthetic captioned clips, made on first use.

``python train.py`` with no arguments trains ``configs/demo.yaml`` on these: real mp4 files of
moving shapes, a seeded tiny SD-shaped model (random weights), a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lvdm.errors import LvdmError

DEMO_CLIPS = 12


def prepare_demo(cfg: Any, *, wait_seconds: float = 300.0) -> list[str]:
    """Create the demo base model and clips where the config expects them, unless they exist; says what it made.

    Under a multi-process launcher only rank 0 writes; the other ranks wait for its ``.ready`` marker.
    """
    base, clips = Path(cfg.model.base), Path(cfg.data.root)
    ready = clips / ".ready"
    if os.environ.get("RANK", "0") != "0":
        deadline = time.monotonic() + wait_seconds
        while not ready.exists():
            if time.monotonic() > deadline:
                raise LvdmError(f"rank 0 did not finish writing the demo assets ({ready}) in {wait_seconds:.0f} s")
            time.sleep(0.5)
        return []
    made = _make_assets(base, clips)
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.touch()
    return made


def _make_assets(base: Path, clips: Path) -> list[str]:
    from lvdm.testing import make_tiny_sd
    from lvdm.testing.clips import write_captioned_folder

    made = []
    if not (base / "model_index.json").is_file():
        make_tiny_sd(base, "sd1", seed=0)
        made.append(f"tiny SD1-shaped base model (random weights) in {base}")
    if not any(clips.rglob("*.mp4")):
        write_captioned_folder(clips, DEMO_CLIPS, num_frames=24, fps=24.0, size=(64, 48), seed=0)
        made.append(f"{DEMO_CLIPS} captioned synthetic clips (moving shapes, H.264 mp4) in {clips}")
    return made
