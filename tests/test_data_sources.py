"""Clip planning, geometry and source listings: pure functions, no decoding."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from lvdm.data.sampling import plan_clip
from lvdm.data.sources import Entry, folder_source, image_source, manifest_source, webvid_source
from lvdm.data.transforms import cover_size, nearest_bucket, to_clip_tensor
from lvdm.errors import DataError, VideoReadError


@pytest.mark.parametrize(
    ("fps", "expected"),
    [
        (24.0, [0, 3, 6, 9, 12, 15, 18, 21]),  # exactly every third frame
        (30.0, [0, 4, 8, 11, 15, 19, 23, 26]),  # 3.75 source frames per clip frame, nearest frame by time
        (60.0, [0, 8, 15, 23, 30, 38, 45, 53]),  # 7.5 per clip frame
    ],
)
def test_target_fps_picks_frames_by_time(fps, expected):
    plan = plan_clip("v.mp4", 300, fps, 8, target_fps=8.0, start="center", rng=None)
    first = plan.indices[0]
    assert [i - first for i in plan.indices] == expected
    assert plan.fps == pytest.approx(8.0)
    # every clip frame is within half a source frame of its ideal time
    for i, index in enumerate(plan.indices):
        assert abs((index - first) / fps - i / 8.0) <= 0.5 / fps + 1e-9


def test_target_fps_above_the_source_rate_never_duplicates_frames():
    plan = plan_clip("v.mp4", 100, 12.0, 8, target_fps=24.0, start="center")
    assert len(set(plan.indices)) == 8 and plan.fps == 12.0


def test_stride_mode_and_starts():
    plan = plan_clip("v.mp4", 40, 30.0, 4, stride=3, start="center")
    assert plan.indices == (15, 18, 21, 24) and plan.fps == 10.0  # span 10, centred in 40
    starts = {plan_clip("v.mp4", 40, 30.0, 4, stride=3, rng=random.Random(s)).indices[0] for s in range(200)}
    assert starts == set(range(0, 40 - 10 + 1))  # every valid start, none past the end


def test_too_short_and_fps_missing_are_bad_samples():
    with pytest.raises(VideoReadError, match="too short"):
        plan_clip("v.mp4", 10, 24.0, 8, stride=2)
    with pytest.raises(VideoReadError, match="frame rate"):
        plan_clip("v.mp4", 100, None, 8, stride=2)


def test_cover_size_and_crop_geometry():
    assert cover_size(640, 360, 256, 256) == (456, 256)  # wide video: height matches
    assert cover_size(360, 640, 256, 256) == (256, 456)  # tall video: width matches
    assert cover_size(64, 48, 32, 32) == (43, 32)
    assert cover_size(4096, 256, 512, 512) == (8192, 512)  # 16 times the output's pixels: the most allowed
    with pytest.raises(ValueError, match="4352x256 frames are too far from the 512x512 output's shape"):
        cover_size(4352, 256, 512, 512)  # 17 times: a 16x4096 video decoded 512x131072 frames to keep 1/256
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    video = to_clip_tensor(frames, 4, 4, crop="center", flip=False, rng=random.Random(0))
    assert video.shape == (2, 3, 4, 4) and video.min() >= -1 and video.max() <= 1
    expected = frames[:, :, 1:5].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(video.numpy(), expected, rtol=0, atol=1e-6)


def test_nearest_bucket():
    buckets = [(256, 256), (192, 320), (320, 192)]
    assert nearest_bucket(1920, 1080, buckets) == (192, 320)
    assert nearest_bucket(1080, 1920, buckets) == (320, 192)
    assert nearest_bucket(500, 480, buckets) == (256, 256)


def test_folder_source_is_recursive_and_reads_captions_lazily(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.mp4", "sub/b.mp4", "notes.txt", "sub/c.mov"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a.txt").write_text("  a red   disc\n")
    (tmp_path / "sub/b.txt").write_bytes(b"\xff\xfe bad bytes")
    entries = folder_source(tmp_path)
    assert [e.path.name for e in entries] == ["a.mp4", "b.mp4", "c.mov"]
    assert entries[0].read_caption() == "a red disc"
    with pytest.raises(VideoReadError, match="not UTF-8"):
        entries[1].read_caption()
    with pytest.raises(VideoReadError, match="caption file missing"):
        entries[2].read_caption()


def test_webvid_csv_nested_or_flat(tmp_path):
    (tmp_path / "videos/0001").mkdir(parents=True)
    (tmp_path / "videos/0001/11.mp4").write_bytes(b"")
    (tmp_path / "videos/12.mp4").write_bytes(b"")
    csv = tmp_path / "results.csv"
    csv.write_text('videoid,name,page_dir\n11,"a dog, running",0001\n12,a cat,0001\n13,,0001\n14,escape,../..\n')
    entries = webvid_source(csv, tmp_path / "videos")
    assert entries[0].media_path() == tmp_path / "videos/0001/11.mp4"
    assert entries[0].read_caption() == "a dog, running"
    assert entries[1].media_path() == tmp_path / "videos/12.mp4"  # flat fallback
    with pytest.raises(VideoReadError, match="file not found"):
        entries[2].media_path()
    with pytest.raises(VideoReadError, match="caption empty"):
        entries[2].read_caption()
    assert entries[3].problem and "escapes the data root" in entries[3].problem


def test_manifest_jsonl_and_csv(tmp_path):
    rows = [
        {"video": "clips/a.mp4", "caption": "x" * 20000, "fps": 30},
        {"path": "b.mp4", "text": "uses ../ in its text"},
        {"video": "../outside.mp4", "caption": "escape"},
        {"video": "/etc/passwd", "caption": "absolute"},
        {"video": "c.mp4", "caption": "fps nan", "fps": "nan"},
        {"video": "d.mp4", "caption": "fps past float's range", "fps": 10**400},  # an OverflowError traceback
        {"video": "e.mp4", "caption": "a \ud800 lone surrogate"},  # passed as a caption, failed in the tokenizer
    ]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    entries = manifest_source(jsonl)
    assert entries[0].path == tmp_path / "clips/a.mp4" and entries[0].fps == 30.0
    assert len(entries[0].read_caption()) == 20000  # truncation happens at the tokenizer
    assert entries[1].read_caption() == "uses ../ in its text" and entries[1].problem is None
    assert "escapes" in entries[2].problem and "escapes" in entries[3].problem
    assert entries[4].fps is None and entries[5].fps is None
    assert entries[5].read_caption() == "fps past float's range"  # the control: the row itself is fine
    with pytest.raises(VideoReadError, match="caption is not UTF-8"):
        entries[6].read_caption()
    csv = tmp_path / "m.csv"
    csv.write_text("path,caption,fps\nclips/a.mp4,hello,\nclips/b.mp4,,24\n")
    entries = manifest_source(csv)
    assert entries[0].read_caption() == "hello" and entries[0].fps is None
    with pytest.raises(VideoReadError, match="caption empty"):
        entries[1].read_caption()


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no rows"), ("file,words\nx,y\n", "no 'video' or 'path' column"), ("{broken\n", "not valid JSON")],
)
def test_broken_listings_fail_at_once(tmp_path, content, message):
    suffix = ".jsonl" if content.startswith("{") else ".csv"
    path = tmp_path / f"m{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        manifest_source(path)


def test_missing_listing_and_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        manifest_source(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        folder_source(tmp_path / "nope")


def test_image_sources(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"")
    (tmp_path / "cat.txt").write_text("a cat")
    (tmp_path / "clip.mp4").write_bytes(b"")
    entries = image_source(tmp_path)
    assert [e.path.name for e in entries] == ["cat.png"] and entries[0].is_image
    manifest = tmp_path / "images.jsonl"
    manifest.write_text(json.dumps({"image": "cat.png", "caption": "a cat"}) + "\n")
    expected = Entry(tmp_path / "cat.png", caption="a cat", is_image=True, source=str(manifest))
    assert image_source(manifest)[0] == expected


def test_caption_files_that_are_not_regular_or_too_large_are_bad_samples_at_once(tmp_path):
    import os

    from lvdm.data.sources import MAX_CAPTION_BYTES

    os.mkfifo(tmp_path / "fifo.txt")  # reading it plainly would block forever
    (tmp_path / "huge.txt").write_bytes(b"x" * (MAX_CAPTION_BYTES + 1))
    (tmp_path / "long.txt").write_text("word " * 4000)  # 20,000 characters: fine
    for name, reason in (("fifo", "not a regular file"), ("huge", "larger than")):
        with pytest.raises(VideoReadError, match=reason):
            Entry(tmp_path / f"{name}.mp4", caption_file=tmp_path / f"{name}.txt").read_caption()
    assert len(Entry(tmp_path / "long.mp4", caption_file=tmp_path / "long.txt").read_caption()) == 4000 * 5 - 1


def test_listing_rows_with_nul_bytes_or_oversized_fields_are_bad_samples_not_crashes(tmp_path):
    (tmp_path / "m.csv").write_text(
        f'video,caption\na.mp4,fine\nb\0c.mp4,nul\nd.mp4,"{"x" * (2 << 20)}"\ne.mp4,after\n', encoding="utf-8"
    )
    entries = manifest_source(tmp_path / "m.csv")
    problems = [entry.problem for entry in entries]
    assert problems[0] is None and problems[-1] is None and entries[-1].path.name == "e.mp4"
    assert "NUL byte" in problems[1] and "unreadable CSV row" in problems[2]
    (tmp_path / "one.csv").write_text(f'video,caption\nd.mp4,"{"x" * (2 << 20)}"\n', encoding="utf-8")
    (only,) = manifest_source(tmp_path / "one.csv")  # said "has no 'video' or 'path' column"
    assert "unreadable CSV row" in only.problem
    (tmp_path / "none.csv").write_text(f'clip,caption\nd.mp4,"{"x" * (2 << 20)}"\ne.mp4,fine\n', encoding="utf-8")
    with pytest.raises(DataError, match="has no 'video' or 'path' column"):  # the control: readable rows still judged
        manifest_source(tmp_path / "none.csv")


def test_listing_fields_that_are_not_text_or_too_long_are_bad_samples(tmp_path):
    """JSON gives lists, objects and numbers where CSV gives text: a caption ["a", "list"] trained as "['a', 'list']"
    and a 2 MiB caption was taken (a CSV field that long is a bad sample); ``"fps": true`` was a 1 fps hint."""
    rows = [{"video": "a.mp4", "caption": ["a", "list"]}, {"video": "b.mp4", "caption": {"a": 1}},
            {"video": "c.mp4", "caption": 12345}, {"video": ["d.mp4"], "caption": "a list of paths"},
            {"video": "e.mp4", "caption": "x" * (2 << 20)}, {"video": "f.mp4", "caption": "fine", "fps": True},
            {"video": "g.mp4", "caption": "x" * 20000, "fps": 12}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    entries = manifest_source(tmp_path / "m.jsonl")
    assert [entry.problem for entry in entries[:5]] == [
        "caption is not text (a JSON list)", "caption is not text (a JSON dict)", "caption is not text (a JSON int)",
        "media path is not text (a JSON list)", "caption over 1048576 characters",
    ]  # fmt: skip
    assert entries[5].problem is None and entries[5].fps is None and entries[5].read_caption() == "fine"
    assert entries[6].problem is None and entries[6].fps == 12.0  # the control: text and a number are taken


def test_an_image_that_is_a_fifo_is_refused_at_once(tmp_path):
    """A FIFO named ``*.png`` among the images hung ``data.check`` and training (Pillow opened it to read the size)."""
    import threading

    from lvdm.data.sizes import UNREADABLE, image_size, probe_size

    os.mkfifo(tmp_path / "still.png")
    (tmp_path / "still.txt").write_text("a still")
    outcome = {}

    def size_of_the_fifo():
        with pytest.raises(VideoReadError, match="not a regular file"):
            image_size(tmp_path / "still.png")
        outcome["probed"] = probe_size(image_source(tmp_path)[0])

    worker = threading.Thread(target=size_of_the_fifo, daemon=True)  # daemon: a hang fails the test, not the run
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive() and outcome == {"probed": UNREADABLE}


def test_folder_symlinks_out_of_the_root_are_skipped_unless_allowed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret.mp4"
    root.mkdir()
    outside.write_bytes(b"not really a video")
    (root / "link.mp4").symlink_to(outside)
    (root / "inside.mp4").write_bytes(b"x")
    (root / "alias.mp4").symlink_to(root / "inside.mp4")
    (root / "loop.mp4").symlink_to(root / "loop.mp4")  # resolving it raised (a traceback in every command)
    (root / "a.mp4").symlink_to(root / "b.mp4")
    (root / "b.mp4").symlink_to(root / "a.mp4")
    problems = {e.path.name: e.problem for e in folder_source(root)}
    assert "escapes the data root" in problems["link.mp4"] and problems["alias.mp4"] is None
    assert all("unresolvable path" in problems[name] for name in ("loop.mp4", "a.mp4", "b.mp4")), problems
    assert len({problems[name] for name in ("loop.mp4", "a.mp4", "b.mp4")}) == 1  # one kind in data.check's groups
    assert all(e.problem is None for e in folder_source(root, allow_links_outside=True))


def test_the_config_opts_in_to_symlinks_out_of_a_folder_source(tmp_path):
    from lvdm.config import load_config
    from lvdm.data.build import list_sources

    root, outside = tmp_path / "root", tmp_path / "elsewhere.mp4"
    root.mkdir()
    outside.write_bytes(b"x")
    (root / "link.mp4").symlink_to(outside)
    for overrides in ([f"data.root={root}"], [f"data.sources=[{{kind: folder, path: '{root}'}}]"]):
        base = ["model.base=b", *overrides]
        ((_, skipped, _),) = list_sources(load_config([], base).data)
        ((_, followed, _),) = list_sources(load_config([], [*base, "data.follow_links_outside=true"]).data)
        assert "escapes the data root" in skipped[0].problem and followed[0].problem is None


def test_json_nested_too_deep_or_with_huge_numbers_is_one_clear_error(tmp_path):
    """A manifest row, a sidecar or a config.json nested 100000 deep was a RecursionError traceback, a number of 5000
    digits a ValueError from int parsing, a FIFO config.json a read that waited forever."""
    from lvdm.errors import ConfigError, DataError
    from lvdm.fileio import read_json
    from lvdm.outputs import read_sidecar

    deep = "[" * 100000 + "]" * 100000  # a number of 5000 digits: a bad row (see the test at the end)
    for number, row in enumerate((f'{{"video": "a.mp4", "caption": {deep}}}',)):
        (tmp_path / f"m{number}.jsonl").write_text(row + "\n", encoding="utf-8")
        with pytest.raises(DataError, match="line 1: not valid JSON"):
            manifest_source(tmp_path / f"m{number}.jsonl")
    (tmp_path / "v.mp4.json").write_text(deep)
    with pytest.raises(ConfigError, match="cannot be read"):
        read_sidecar(tmp_path / "v.mp4.json")
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(OSError, match="not a regular file"):
        read_json(tmp_path / "config.json")
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}  # the control


def test_a_folder_that_cannot_be_listed_is_a_bad_entry_and_an_unlistable_root_an_error(tmp_path, monkeypatch):
    """os.walk skipped a subfolder it could not list (permission denied) without a word: its clips vanished from
    the data. It is one bad entry now, named with the reason; the data root itself is an error."""
    (tmp_path / "locked").mkdir()
    for name in ("a.mp4", "locked/b.mp4"):
        (tmp_path / name).write_bytes(b"")
    real = os.scandir

    def scandir(path="."):  # the sessions run as root, where chmod 000 does not bite: refuse as the kernel would
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match="locked folder cannot be listed"):
        entries = folder_source(tmp_path)
    assert [e.path.name for e in entries] == ["a.mp4", "locked"]
    assert entries[0].problem is None
    assert entries[1].problem == "folder cannot be listed (Permission denied): the clips in it are not read"
    with pytest.raises(DataError, match=r"data folder .*locked cannot be listed: Permission denied"):
        folder_source(tmp_path / "locked")
    monkeypatch.setattr(os, "scandir", real)  # the control: listable, its clip is listed
    assert [e.path.name for e in folder_source(tmp_path)] == ["a.mp4", "b.mp4"]


def test_a_json_row_with_a_number_of_5000_digits_is_that_rows_problem(tmp_path):
    """Valid JSON that Python will not read (an int past its 4300-digit limit, as an ``fps``) made the whole manifest
    fatal, with Python's "use sys.set_int_max_str_digits()" advice; a bad row now, like an oversized CSV field."""
    from lvdm.errors import DataError

    (tmp_path / "m.jsonl").write_text(
        '{"video": "a.mp4", "caption": "fine", "fps": 24}\n'
        f'{{"video": "b.mp4", "caption": "huge", "fps": {"9" * 5000}}}\n'
        '{"video": "c.mp4", "caption": "after", "fps": -12}\n',
        encoding="utf-8",
    )
    problems = [entry.problem for entry in manifest_source(tmp_path / "m.jsonl")]
    assert problems == [None, "unreadable JSON row: line 2, a number of 5000 digits", None], problems
    (tmp_path / "bad.jsonl").write_text('{"video": "a.mp4", "caption": "fine"}\n{"video": \n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: not valid JSON"):  # the control: JSON that is not JSON stays fatal
        manifest_source(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0c", "\x1c", "\x1e"])
def test_listing_lines_end_only_at_line_breaks_not_at_unicode_separators(tmp_path, separator):
    """``str.splitlines()`` split rows at U+2028, U+0085, form feeds...: a JSONL caption holding one raw (as
    ``json.dumps(ensure_ascii=False)`` writes it) refused the whole manifest, a CSV row became two rows (the second
    a bogus sample), and a line break inside a quoted CSV caption was dropped ("first\\nsecond" read "firstsecond")."""
    rows = [{"video": "a.mp4", "caption": f"first{separator}second"}, {"video": "b.mp4", "caption": "dog"}]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    csv = tmp_path / "m.csv"
    csv.write_text(f"video,caption\na.mp4,first{separator}second\nb.mp4,dog\n", encoding="utf-8")
    for listing in (jsonl, csv):
        entries = manifest_source(listing)
        assert [(e.path.name, e.read_caption(), e.problem) for e in entries] == [
            ("a.mp4", "first second", None), ("b.mp4", "dog", None)
        ]  # fmt: skip
    for newline in ("\n", "\r\n"):
        csv.write_bytes(f'video,caption{newline}a.mp4,"first{newline}second"{newline}b.mp4,dog{newline}'.encode())
        assert [e.read_caption() for e in manifest_source(csv)] == ["first second", "dog"]
    jsonl.write_bytes(b'{"video": "a.mp4", "caption": "a"}\r\n{"video": "b.mp4", "caption": "b"}\r{"video": "c.mp4"}')
    assert [e.path.name for e in manifest_source(jsonl)] == ["a.mp4", "b.mp4", "c.mp4"]  # CRLF and CR end lines too


def test_a_webvid_csv_saved_with_a_byte_order_mark_is_still_webvid(tmp_path):
    """The WebVid check read the header with the BOM on its first column ("\\ufeffvideoid"): a results.csv saved by
    Excel (UTF-8 with BOM) was taken for a generic manifest and refused, "has no 'video' or 'path' column"."""
    from lvdm.data.build import read_manifest

    listing = tmp_path / "results.csv"
    listing.write_text("videoid,name,page_dir\n1066,a dog runs,000001_000050\n", encoding="utf-8-sig")
    (entry,) = read_manifest(listing)
    assert entry.path == tmp_path / "000001_000050" / "1066.mp4" and entry.read_caption() == "a dog runs"
