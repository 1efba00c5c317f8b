"""Writing a demo model folder (the demo base, the demo upscaler) where a stale one of its kind may be.

Such a folder is lvdm's when it holds the recipe file lvdm writes last, and then only the files a new save of it
holds: anything else in it is a user's, and the folder is refused rather than replaced (before any training, and
again just before the replacement).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lvdm.errors import LvdmError


def folder_is_current(path: str | os.PathLike, recipe_file: str, key: str) -> bool:
    """True when ``path`` holds a complete demo model folder (``model_index.json``) whose ``recipe_file`` records
    ``key``."""
    marker = Path(path) / recipe_file
    if not marker.is_file() or not (Path(path) / "model_index.json").is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("key") == key
    except (OSError, ValueError):
        return False


def check_replaceable(path: Path, recipe_file: str, what: str) -> None:
    """Refuse ``path`` unless it is missing, an empty folder, or a folder holding ``recipe_file``."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir() or (any(path.iterdir()) and not (path / recipe_file).is_file()):
        raise LvdmError(f"{path} exists and is not a {what} lvdm made (no {recipe_file}); lvdm never deletes it: "
                        "move it away, or give the demo another folder")  # fmt: skip


def write_demo_folder(pipe: Any, path: Path, recipe_file: str, record_text: str, what: str) -> None:
    """``pipe.save_pretrained`` into a temporary sibling, ``recipe_file`` last, then in place of ``path``: a stale
    folder of the kind is replaced when it holds nothing the new one does not."""
    check_replaceable(path, recipe_file, what)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if temp.exists():
        shutil.rmtree(temp)  # this process's own leftover
    pipe.save_pretrained(temp, safe_serialization=True)
    (temp / recipe_file).write_text(record_text, encoding="utf-8")
    if path.exists():
        ours = set(_files(temp))
        theirs = [name for name in _files(path) if name not in ours]
        if theirs:
            shutil.rmtree(temp)
            shown = ", ".join(theirs[:3]) + (f" and {len(theirs) - 3} more" if len(theirs) > 3 else "")
            raise LvdmError(f"{path} holds files a {what} does not ({shown}); lvdm never deletes them: move them "
                            "away, or give the demo another folder")  # fmt: skip
        shutil.rmtree(path)
    temp.rename(path)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
