"""Sizes for aspect buckets: each file probed once per build, and not at all when ``data.size_index`` knows it."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
from PIL import Image

from lvdm.config import DataConfig, config_from_dict
from lvdm.data import readers
from lvdm.data.build import build_split
from lvdm.data.sizes import UNREADABLE, _read_index, media_sizes
from lvdm.data.sources import folder_source
from lvdm.testing import clips

SIZES = [(64, 32), (32, 64), (48, 48), (64, 32), (40, 24)]  # (width, height) of clip i


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    for i, size in enumerate(SIZES):
        clips.write_clip(root / f"clip_{i}.mp4", num_frames=4, size=size, seed=i)
        (root / f"clip_{i}.txt").write_text(f"clip {i}", encoding="utf-8")
    Image.new("RGB", (30, 20)).save(root / "still.png")  # an image in a video folder is skipped by the lister
    return root


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files ``readers.probe`` opens, in call order."""
    calls: list[str] = []
    probe = readers.probe

    def counting(path, **kwargs):
        calls.append(Path(path).name)
        return probe(path, **kwargs)

    monkeypatch.setattr(readers, "probe", counting)
    return calls


def test_sizes_come_from_the_index_until_a_file_changes(folder: Path, tmp_path: Path, probes: list[str]) -> None:
    entries = folder_source(folder)
    index = tmp_path / "cache" / "sizes.jsonl"
    assert media_sizes(entries, index=index, workers=3) == SIZES
    assert sorted(probes) == [f"clip_{i}.mp4" for i in range(len(SIZES))]
    rows = [json.loads(line) for line in index.read_text(encoding="utf-8").splitlines()]
    assert {row["path"] for row in rows} == {str(entry.path.absolute()) for entry in entries}

    probes.clear()
    assert media_sizes(entries, index=index) == SIZES
    assert probes == []  # every size reused: nothing opened

    clips.write_clip(folder / "clip_2.mp4", num_frames=6, size=(16, 40), seed=9)  # a new file under the old name
    stat = (folder / "clip_2.mp4").stat()
    os.utime(folder / "clip_2.mp4", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert media_sizes(entries, index=index) == [*SIZES[:2], (16, 40), *SIZES[3:]]
    assert probes == ["clip_2.mp4"]


def test_a_damaged_index_is_only_a_cache(folder: Path, tmp_path: Path, probes: list[str]) -> None:
    entries = folder_source(folder)
    index = tmp_path / "sizes.jsonl"
    media_sizes(entries, index=index)
    lines = index.read_text(encoding="utf-8").splitlines()
    garbage = ["{not json", json.dumps({"path": "x", "stamp": [1], "size": [1, 2]}), '{"size": [0, 0]}', "[]",
               '{"path": "x", "stamp": [1e400, 1], "size": [1, 1]}', "[" * 100_000 + "]" * 100_000]  # fmt: skip
    index.write_text("\n".join([*garbage, *lines[1:]]) + "\n", encoding="utf-8")  # line 0 lost, junk added
    damaged = index.read_bytes()
    probes.clear()  # an infinity (1e400) and JSON nested 100000 deep were tracebacks
    with pytest.warns(UserWarning, match="6 lines lvdm did not write; it is read, not replaced"):
        assert media_sizes(entries, index=index) == SIZES
    assert len(probes) == 1  # the clip whose line was lost
    assert index.read_bytes() == damaged  # lines lvdm did not write: perhaps a file of the user's, kept

    (tmp_path / "folder_index").mkdir()
    fifo = tmp_path / "fifo_index"
    os.mkfifo(fifo)  # opened as a file, it would block
    for bad in (tmp_path / "folder_index", fifo):
        with pytest.warns(UserWarning) as caught:
            assert media_sizes(entries, index=bad) == SIZES
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and re.match(rf"data.size_index '.*{bad.name}' cannot be read", messages[0])
    assert fifo.exists() and not fifo.is_file()  # not replaced


def test_an_index_that_cannot_be_written_warns_and_the_sizes_still_come(folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not be written"):
        assert media_sizes(folder_source(folder), index=blocker / "sizes.jsonl") == SIZES


def test_unreadable_and_vanished_files_get_the_placeholder_size(folder: Path, tmp_path: Path) -> None:
    clips.BAD_INPUTS["zero_byte"](folder)
    entries = folder_source(folder)
    (folder / "clip_4.mp4").unlink()
    sizes = dict(zip([e.path.name for e in entries], media_sizes(entries, index=tmp_path / "i.jsonl"), strict=True))
    assert sizes["clip_4.mp4"] == UNREADABLE and sizes["zero_byte.mp4"] == UNREADABLE
    assert sizes["clip_0.mp4"] == SIZES[0]


def test_a_split_with_buckets_probes_each_file_once(folder: Path, tmp_path: Path, probes: list[str]) -> None:
    data = config_from_dict(
        {
            "root": str(folder), "num_frames": 2, "resolution": [16, 16], "holdout": 2, "num_workers": 0,
            "buckets": [[16, 32], [32, 16], [24, 24]], "size_index": str(tmp_path / "sizes.jsonl"),
        },
        DataConfig,
    )  # fmt: skip
    train, _, holdout = build_split(data)
    assert sorted(probes) == [f"clip_{i}.mp4" for i in range(len(SIZES))]  # not again for the train/holdout parts
    assert len(train) + len(holdout) == len(SIZES)
    shapes = {
        entry.path.name: shape
        for part in (train, holdout)
        for entry, shape in zip(part.entries, part.shapes, strict=True)
    }
    assert shapes["clip_0.mp4"] == (False, (16, 32)) and shapes["clip_1.mp4"] == (False, (32, 16))

    probes.clear()
    build_split(data)  # a restart: the index answers
    assert probes == []


def test_an_index_naming_a_file_with_a_unicode_line_separator_stays_lvdms(tmp_path: Path) -> None:
    """Index lines are written as UTF-8 (U+2028 and U+0085 raw): read back with ``splitlines()`` such a path split its
    line in two, the index was "not lvdm's", warned at every start and was never written again."""
    root = tmp_path / "clips"
    for i, name in enumerate(("a\u2028b.mp4", "c\x85d.mp4", "plain.mp4")):
        clips.write_clip(root / name, num_frames=4, size=(32, 16), seed=i)
    entries, index = folder_source(root), tmp_path / "sizes.jsonl"
    assert media_sizes(entries, index=index) == [(32, 16)] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lines lvdm did not write"
        known, ours = _read_index(index)
    assert ours and set(known) == {str(entry.path.absolute()) for entry in entries}
