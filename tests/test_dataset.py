"""The training dataset end to end: real H.264 clips and every generable bad input, through build_dataset, the
BatchStream loader and the BadSampleGuard; frame sampling by target fps; images, buckets, holdout, manifests."""

from __future__ import annotations

import gc
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvdm.config import DataConfig, config_from_dict
from lvdm.data import readers
from lvdm.data.build import build_dataset, build_split
from lvdm.data.dataset import ClipSettings, VideoDataset
from lvdm.data.loader import BadSampleGuard, BatchStream, make_loader
from lvdm.data.sources import folder_source
from lvdm.errors import DataError
from lvdm.testing import clips

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
BATCH = 4
NUM_FRAMES, STRIDE, SIZE = 4, 2, 16  # a clip needs 7 source frames

# Bad file (name of its video) -> a pattern its skip reason must match. Built by the `mixed` fixture.
BAD = {
    "zero_byte.mp4": "zero-byte",
    "truncated_10.mp4": "truncated",
    "truncated_50.mp4": "truncated",
    "truncated_99.mp4": "truncated",
    "text_as_mp4.mp4": "not a video \\(text",
    "png_as_mp4.mp4": "not a video \\(PNG",
    "audio_only.mp4": "no video stream",
    "one_frame.mp4": "too short",
    "short.mp4": "too short",  # fewer frames than num_frames * stride
    "tiny_8x8.mp4": "too short",  # BAD_INPUTS' 8x8 and 16x4096 clips have 4 and 2 frames; long ones are in GOOD
    "tall_16x4096.mp4": "too short",
    "thin_16x4096.mp4": "16x4096 frames are too far from the 16x16 output's shape: covering it would mean decoding",
    "fps_0.mp4": "frame rate missing",
    "fps_1000.mp4": "frame rate missing",
    "caption_missing.mp4": "caption file missing",
    "caption_empty.mp4": "caption empty",
    "caption_latin1.mp4": "caption is not UTF-8",
    "caption_folder.mp4": "caption file unreadable",
    "vanished.mp4": "file not found",
    **({} if IS_ROOT else {"unreadable.mp4": "permission denied"}),  # root reads a chmod 000 file anyway
}
MAYBE_BAD = {"truncated_webm.webm": "truncated"}  # its first 24 of 64 frames decode: a clip there is fine
GOOD = {
    "alpha.mov", "gray.mkv", "odd_size.webm", "ten_bit.mp4", "rotated.mp4", "vfr.mp4", "vfr_mkv.mkv", "vfr_webm.webm",
    "hevc_open_gop.mp4",
    "vidéo ünï 動画.mp4", "caption_20000.mp4", "small_8x8.mp4", "thin_16x64.mp4",
    *(f"clip_{i:03d}.mp4" for i in range(6)), *({"unreadable.mp4"} if IS_ROOT else set()),
}  # fmt: skip


def data_config(**fields: object) -> DataConfig:
    """A checked ``DataConfig`` (the schema's types, ranges and rules apply) with the tests' clip defaults."""
    defaults = {"num_frames": NUM_FRAMES, "frame_stride": STRIDE, "resolution": [SIZE, SIZE], "num_workers": 0}
    return config_from_dict(defaults | fields, DataConfig)


def loader_for(dataset: VideoDataset, weights: list[float] | None = None, *, seed: int = 0, workers: int = 0):
    stream = BatchStream(dataset, BATCH, weights=weights, seed=seed)
    return stream, make_loader(dataset, stream, num_workers=workers)


def as_uint8(video: torch.Tensor) -> np.ndarray:
    """``(f, 3, h, w)`` in [-1, 1] -> ``(f, h, w, 3)`` uint8, as the reader returned it."""
    return ((video + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def indices_of(video: torch.Tensor) -> list[int]:
    return [clips.decode_index(frame) for frame in as_uint8(video)]


def caption(path: Path, text: str | bytes) -> Path:
    target = path.with_suffix(".txt")
    target.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six good "shapes" clips, every BAD_INPUTS file and clips with bad captions, all in one captioned folder."""
    root = clips.write_captioned_folder(tmp_path_factory.mktemp("mixed"), 6, num_frames=16, size=(32, 24))
    bad = root / "scraped"  # the awkward-but-readable files land here too
    bad.mkdir()
    for write in clips.BAD_INPUTS.values():
        caption(write(bad), "a scraped clip")
    for name, text in (("caption_empty", " \n\t"), ("caption_latin1", b"caf\xe9"), ("caption_20000", "x" * 20000)):
        caption(clips.write_clip(bad / f"{name}.mp4", num_frames=8), text)
    clips.write_clip(bad / "caption_missing.mp4", num_frames=8)
    (bad / "caption_folder.txt").mkdir()  # a folder where the caption file should be
    clips.write_clip(bad / "caption_folder.mp4", num_frames=8)
    caption(clips.write_clip(bad / "small_8x8.mp4", num_frames=8, size=(8, 8)), "a tiny clip")
    caption(clips.write_clip(bad / "thin_16x4096.mp4", num_frames=8, size=(16, 4096)), "a thin clip")  # 1/256 kept
    caption(clips.write_clip(bad / "thin_16x64.mp4", num_frames=8, size=(16, 64)), "a thin clip")  # 1/4: taken
    caption(clips.write_clip(bad / "vanished.mp4", num_frames=8), "deleted after listing")
    return root


@pytest.fixture(scope="module")
def mixed_dataset(mixed: Path) -> tuple[VideoDataset, list[float]]:
    dataset, weights = build_dataset(data_config(root=str(mixed)))
    (mixed / "scraped" / "vanished.mp4").unlink(missing_ok=True)  # gone between listing and loading
    return dataset, weights


def batches_covering(stream: BatchStream, n: int, limit: int = 500) -> int:
    """How many batches from the start it takes for the stream to draw each of ``n`` entries at least once."""
    seen: set[int] = set()
    for count in range(1, limit + 1):
        seen.update(stream.batch(count - 1))
        if len(seen) == n:
            return count
    raise AssertionError(f"{limit} batches do not draw every entry")


# --- a mix of good and bad files ------------------------------------------------------------------------------------


def test_expectations_cover_the_whole_folder(mixed_dataset) -> None:
    dataset, _ = mixed_dataset
    names = {entry.path.name for entry in dataset.entries}
    assert names == set(BAD) | set(MAYBE_BAD) | GOOD
    assert set(clips.BAD_INPUTS) - {"space unicode path"} <= {n.rsplit(".", 1)[0] for n in names}


def test_loader_over_good_and_bad_files_gives_only_good_batches_and_logs_each_bad_file_once(
    mixed_dataset, tmp_path: Path
) -> None:
    dataset, weights = mixed_dataset
    stream, loader = loader_for(dataset, weights)
    guard = BadSampleGuard(tmp_path / "skipped.jsonl", max_fraction=1.0)
    sources: set[str] = set()
    for batch, _ in zip(loader, range(batches_covering(stream, len(dataset))), strict=False):
        guard.update(batch)
        video = batch["video"]
        assert video.shape == (BATCH, NUM_FRAMES, 3, SIZE, SIZE) and video.dtype == torch.float32
        assert video.is_contiguous() and -1 <= video.min() and video.max() <= 1
        assert len(batch["caption"]) == BATCH and all(batch["caption"])
        sources.update(Path(source).name for source in batch["source"])
    assert sources <= GOOD | set(MAYBE_BAD) and len(sources & GOOD) >= 10
    logged = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    reasons = {Path(row["path"]).name: row["reason"] for row in logged}
    assert len(reasons) == len(logged), "a bad file was logged twice"
    assert set(BAD) <= set(reasons) <= set(BAD) | set(MAYBE_BAD)
    for name, reason in reasons.items():
        assert re.search((BAD | MAYBE_BAD)[name], reason), (name, reason)


def test_the_guard_stops_the_run_when_too_many_samples_are_bad(mixed_dataset, tmp_path: Path) -> None:
    dataset, weights = mixed_dataset
    _, loader = loader_for(dataset, weights)
    guard = BadSampleGuard(tmp_path / "skipped.jsonl", max_fraction=0.05, min_samples=20)
    with pytest.raises(
        DataError, match=r"\d+ of \d+ samples drawn were bad \(\d+\.\d% > data.max_bad_fraction 5.0%\)"
    ):
        for batch, _ in zip(loader, range(20), strict=False):
            guard.update(batch)
    assert guard.total >= 20 and guard.bad > 0.05 * guard.total


def test_a_resumed_run_does_not_log_a_bad_file_again(tmp_path: Path) -> None:
    log = tmp_path / "skipped.jsonl"
    batch = {"caption": ["a"], "skipped": [("/data/x.mp4", "zero-byte file")]}
    BadSampleGuard(log).update(batch)
    log.write_text(log.read_text() + '{"path": "/data/cut', encoding="utf-8")  # a line cut by a crash
    resumed = BadSampleGuard(log)
    resumed.update(batch | {"skipped": [("/data/x.mp4", "zero-byte file"), ("/data/y.mp4", "too short")]})
    lines = log.read_text().splitlines()
    assert lines[1] == '{"path": "/data/cut' and len(lines) == 3  # the new entry starts a line of its own
    assert [json.loads(line)["path"] for line in (lines[0], lines[2])] == ["/data/x.mp4", "/data/y.mp4"]


def test_a_skip_log_that_is_not_lvdms_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A link as skipped.jsonl was written through (into the file it named), a FIFO hung the run, a folder was a
    traceback, and a line of JSON nested 100000 deep a RecursionError. The control: a regular log is appended to."""
    batch = {"caption": ["a"], "skipped": [("/data/x.mp4", "zero-byte file")]}
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    makers = {"link": lambda p: p.symlink_to(notes), "fifo": os.mkfifo, "folder": lambda p: p.mkdir()}
    for name, make in makers.items():
        make(tmp_path / name)
        with pytest.raises(DataError, match="is not a regular file"):
            BadSampleGuard(tmp_path / name).update(batch)
    assert notes.read_text() == "mine"
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    BadSampleGuard(deep).update(batch)
    assert deep.read_text().splitlines()[1] == '{"path": "/data/x.mp4", "reason": "zero-byte file"}'
    link = tmp_path / "late"  # a link put there after the log was read: the append does not follow it
    guard = BadSampleGuard(link)
    link.symlink_to(notes)
    with pytest.raises(DataError, match="cannot be written"):
        guard.update(batch)
    assert notes.read_text() == "mine"


@pytest.mark.parametrize("workers", [0, 1])
def test_an_all_bad_dataset_fails_at_once(tmp_path: Path, workers: int) -> None:
    for name in ("zero_byte", "text_as_mp4", "png_as_mp4", "audio_only", "one_frame"):
        caption(clips.BAD_INPUTS[name](tmp_path), "bad")
    dataset, weights = build_dataset(data_config(root=str(tmp_path), max_consecutive_bad=6))
    loads = []
    load = dataset.load
    dataset.load = lambda index, rng: loads.append(index) or load(index, rng)  # counts the attempts (workers=0)
    _, loader = loader_for(dataset, weights, workers=workers)
    started = time.monotonic()
    with pytest.raises(DataError, match="6 bad samples in a row \\(data.max_consecutive_bad\\)"):
        next(iter(loader))
    assert time.monotonic() - started < 10
    assert workers or len(loads) == 6
    gc.collect()  # the traceback's cycle holds the loader's worker: stop it now, not 5 s into another test


# --- determinism and resume -----------------------------------------------------------------------------------------


def take(loader, n: int) -> list[dict]:
    return [batch for batch, _ in zip(loader, range(n), strict=False)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["video"], y["video"])
        assert (x["source"], x["caption"], x["skipped"]) == (y["source"], y["caption"], y["skipped"])
        assert torch.equal(x["fps"], y["fps"]) and torch.equal(x["index"], y["index"])


def test_same_seed_same_batches_and_start_at_replays(mixed_dataset) -> None:
    """Two runs (one with worker processes) see identical batches; a stream started at n gives batch n first."""
    dataset, weights = mixed_dataset
    _, loader = loader_for(dataset, weights, seed=7)
    first = take(loader, 6)
    again = VideoDataset(dataset.entries, dataset.settings, seed=dataset.seed)  # a fresh dataset, nothing shared
    _, loader = loader_for(again, weights, seed=7, workers=2)
    assert_same_batches(take(loader, 6), first)
    stream, loader = loader_for(dataset, weights, seed=7)
    stream.start_at(4)
    assert_same_batches(take(loader, 2), first[4:6])
    _, loader = loader_for(dataset, weights, seed=8)
    assert not torch.equal(take(loader, 1)[0]["video"], first[0]["video"])


def test_every_draw_of_a_video_cuts_its_own_clip(tmp_path: Path) -> None:
    """Drawn again later, a video gives another (seeded) clip: random starts, crops and flips keep varying."""
    caption(clips.write_clip(tmp_path / "long.mp4", num_frames=64, size=(64, 32), pattern="index"), "counting")
    dataset, weights = build_dataset(data_config(root=str(tmp_path), resolution=[32, 64]))
    _, loader = loader_for(dataset, weights)
    starts = [indices_of(video)[0] for batch in take(loader, 4) for video in batch["video"]]
    assert len(set(starts)) >= 8, starts  # 16 draws of the one video, 58 possible starts
    for batch in take(loader, 2):
        for video in batch["video"]:
            first = indices_of(video)[0]
            assert indices_of(video) == list(range(first, first + NUM_FRAMES * STRIDE, STRIDE))
    assert [indices_of(v)[0] for b in take(loader, 4) for v in b["video"]] == starts
    # a plain index (a user's own DataLoader) cuts one clip per epoch: the same again, another after set_epoch
    plain = [indices_of(dataset[0]["video"])[0] for _ in range(2)]
    epochs = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        epochs.append(indices_of(dataset[0]["video"])[0])
    assert plain[0] == plain[1] == epochs[0] and len(set(epochs)) >= 3, (plain, epochs)


def test_clips_of_the_fine_interpolation_stage_are_cut_at_a_multiple_of_the_rate(tmp_path: Path) -> None:
    """A share of the clips (drawn per clip, seeded) is cut at ``fine_every`` times the rate and says so; held-out
    clips recut with ``fine_share=1`` are all fine, with 0 none."""
    from lvdm.data.build import recut

    caption(clips.write_clip(tmp_path / "long.mp4", num_frames=64, size=(64, 32), pattern="index"), "counting")
    config = data_config(root=str(tmp_path), resolution=[32, 64], frame_stride=8)
    train, _, _ = build_split(config, fine_share=0.5, fine_every=4)
    steps = {}
    for draw in range(40):
        sample = train[(0, draw)]
        got = indices_of(sample["video"])
        step = got[1] - got[0]
        assert got == list(range(got[0], got[0] + NUM_FRAMES * step, step))
        assert sample["fps"] == pytest.approx(24.0 / step)
        steps[draw] = (step, sample["fine"])
    assert {step for step, fine in steps.values() if fine} == {2} and {s for s, f in steps.values() if not f} == {8}
    assert 10 <= sum(fine for _, fine in steps.values()) <= 30, steps  # about half
    assert [train[(0, draw)]["fine"] for draw in range(40)] == [fine for _, fine in steps.values()]  # seeded
    assert all(recut(train, fine_share=1.0)[(0, d)]["fine"] for d in range(5))
    assert not any(recut(train, fine_share=0.0)[(0, d)]["fine"] for d in range(5))
    assert not any(build_split(config)[0][(0, d)]["fine"] for d in range(5))  # no fine stage: none


def test_a_video_too_slow_for_the_fine_stage_is_a_bad_sample(counting_clips: Path) -> None:
    """By rate: the fine stage reads ``fine_every`` times the target rate; a source slower than that would repeat
    frames, so its fine clips are bad samples (the dataset replaces them and says why)."""
    import random

    from lvdm.data.build import recut
    from lvdm.errors import VideoReadError

    config = data_config(
        root=str(counting_clips), num_frames=4, frame_stride=None, target_fps=8.0, resolution=[32, 64]
    )
    dataset, _ = build_dataset(config)
    fine = recut(dataset, fine_share=1.0, fine_every=4)  # 32 fps clips

    for index, entry in enumerate(fine.entries):
        fps = int(entry.path.stem.removeprefix("fps"))
        if fps < 32:
            with pytest.raises(VideoReadError, match="too slow for the fine interpolation stage's 32 fps"):
                fine.load(index, random.Random(0))
        else:
            sample = fine.load(index, random.Random(0))
            assert sample["fine"] and sample["fps"] == pytest.approx(32.0)
            got = indices_of(sample["video"])
            assert np.diff(got).tolist() in ([2, 2, 2], [2, 2, 1], [1, 2, 2], [2, 1, 2])  # 60 / 32 per frame


# --- frame sampling by time -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counting_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64-frame "index" clips at 24, 30 and 60 fps; the 60 fps one at twice the size (decoded scaled down)."""
    root = tmp_path_factory.mktemp("fps")
    for fps, size in ((24, (64, 32)), (30, (64, 32)), (60, (128, 64))):
        caption(clips.write_clip(root / f"fps{fps}.mp4", num_frames=64, fps=fps, size=size, pattern="index"), "n")
    return root


@pytest.mark.parametrize("start", ["random", "center"])
def test_target_fps_picks_the_frames_nearest_in_time(counting_clips: Path, start: str) -> None:
    """Through the dataset (probe, plan, decode at the training size, crop): 8 frames at 8 fps from each source."""
    config = data_config(
        root=str(counting_clips), num_frames=8, frame_stride=None, target_fps=8.0, resolution=[32, 64], start=start
    )
    dataset, _ = build_dataset(config)
    for index, entry in enumerate(dataset.entries):
        fps = int(entry.path.stem.removeprefix("fps"))
        offsets = [math.floor(i * fps / 8 + 0.5) for i in range(8)]  # source frame nearest to i / 8 s
        firsts = set()
        for draw in range(4):
            sample = dataset[(index, draw)]
            got = indices_of(sample["video"])
            assert got == [got[0] + offset for offset in offsets], (fps, got)
            assert 0 <= got[0] and got[-1] < 64 and sample["fps"] == pytest.approx(8.0)
            firsts.add(got[0])
        if start == "center":
            assert firsts == {(64 - offsets[-1] - 1) // 2}
        else:
            assert len(firsts) > 1


# --- images, aspect buckets, holdout, manifests ---------------------------------------------------------------------


def write_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int], text: str = "a still") -> Path:
    Image.new("RGB", size, colour).save(path)
    return caption(path, text)


def huge_png(path: Path) -> Path:
    """A PNG whose header claims 30000 x 30000 pixels: Pillow refuses it as a decompression bomb."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib_crc(bytes(data[12:29]))
    path.write_bytes(bytes(data))
    return caption(path, "huge")


def zlib_crc(chunk: bytes) -> bytes:
    import zlib

    return zlib.crc32(chunk).to_bytes(4, "big")


def test_images_are_one_frame_samples_never_batched_with_videos(tmp_path: Path, tiny_clips: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        write_image(images / f"still_{i}.png", (40 + 8 * i, 24), colour)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("not an image")
    for name in ("empty", "notes"):
        caption(images / f"{name}.png", name)
    huge_png(images / "huge.png")
    sources = [{"kind": "images", "path": str(images)}, {"kind": "folder", "path": str(tiny_clips)}]
    dataset, weights = build_dataset(data_config(sources=sources))
    _, loader = loader_for(dataset, weights)
    guard = BadSampleGuard(tmp_path / "skipped.jsonl", max_fraction=1.0)
    kinds = set()
    for batch in take(loader, 24):
        guard.update(batch)
        is_image = bool(batch["is_image"][0])
        assert batch["is_image"].tolist() == [is_image] * BATCH
        assert batch["video"].shape == (BATCH, 1 if is_image else NUM_FRAMES, 3, SIZE, SIZE)
        assert all(Path(s).suffix == (".png" if is_image else ".mp4") for s in batch["source"])
        assert (batch["fps"] == 0).all() if is_image else (batch["fps"] == 12).all()
        kinds.add(is_image)
    assert kinds == {True, False}
    assert guard.seen == {
        str(images / "empty.png"): "zero-byte file",
        str(images / "notes.png"): "not a readable image (UnidentifiedImageError)",
        str(images / "huge.png"): "image too large (decompression bomb guard)",
    }


@pytest.fixture(scope="module")
def tiny_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six good captioned "shapes" clips, 32x24, 12 frames."""
    return clips.write_captioned_folder(tmp_path_factory.mktemp("tiny"), 6, num_frames=12, size=(32, 24))


def test_aspect_buckets_group_clips_by_shape(tmp_path: Path) -> None:
    sizes = {"wide": (64, 32), "tall": (32, 64), "square": (48, 48)}  # (width, height)
    buckets = {"wide": (16, 32), "tall": (32, 16), "square": (24, 24)}  # (height, width)
    for name, size in sizes.items():
        for i in range(2):
            caption(clips.write_clip(tmp_path / f"{name}_{i}.mp4", num_frames=8, size=size, seed=i), name)
    caption(clips.BAD_INPUTS["zero_byte"](tmp_path), "unreadable: falls in a bucket, is replaced within it")
    dataset, weights = build_dataset(data_config(root=str(tmp_path), buckets=[list(b) for b in buckets.values()]))
    for entry, (is_image, shape) in zip(dataset.entries, dataset.shapes, strict=True):
        kind = entry.path.stem.split("_")[0]
        assert not is_image and shape == buckets.get(kind, (24, 24)), entry.path.name
    seen = set()
    for batch in take(loader_for(dataset, weights)[1], 12):
        kinds = {Path(source).stem.split("_")[0] for source in batch["source"]}
        assert len(kinds) == 1, batch["source"]
        kind = kinds.pop()
        assert batch["video"].shape == (BATCH, NUM_FRAMES, 3, *buckets[kind])
        seen.add(kind)
    assert seen == set(buckets)


def test_holdout_entries_never_reach_training(tiny_clips: Path) -> None:
    train, weights, holdout = build_split(data_config(root=str(tiny_clips), holdout=2))
    held = {str(entry.path) for entry in holdout.entries}
    assert len(held) == 2 and len(train) == 4 and len(weights) == 4
    assert held.isdisjoint(str(entry.path) for entry in train.entries)
    for batch in take(loader_for(train, weights)[1], 8):
        assert held.isdisjoint(batch["source"])
    assert torch.equal(holdout[0]["video"], holdout[0]["video"])  # centred, unflipped: the same every validation
    assert holdout.settings.start == "center" and not holdout.settings.flip
    with pytest.raises(DataError, match="leaves nothing to train on"):
        build_split(data_config(root=str(tiny_clips), holdout=6))


def test_manifest_rows_outside_the_root_are_skipped_and_fps_hints_fill_in(tmp_path: Path, tiny_clips: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_clips, root)
    outside = clips.write_clip(tmp_path / "outside.mp4", num_frames=12, size=(32, 24))
    (root / "link.mp4").symlink_to(outside)
    shutil.copy(clips.BAD_INPUTS["fps_0"](tmp_path), root / "no_rate.mp4")
    rows = [{"video": str(p.relative_to(root)), "caption": "good"} for p in sorted(root.rglob("clip_*.mp4"))]
    rows += [
        {"video": "../outside.mp4", "caption": "escapes"},
        {"video": str(outside), "caption": "absolute"},
        {"video": "link.mp4", "caption": "symlink out"},
        {"video": "no_rate.mp4", "caption": "no frame rate, hinted", "fps": 24},
    ]
    manifest = root / "clips.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    dataset, weights = build_dataset(data_config(manifest=str(manifest)))
    guard = BadSampleGuard(None, max_fraction=1.0)
    sources = set()
    for batch in take(loader_for(dataset, weights)[1], 30):
        guard.update(batch)
        sources.update(batch["source"])
    assert str(outside) not in sources and str(root / "link.mp4") not in sources
    assert str(root / "no_rate.mp4") in sources  # the manifest's fps stands in for the container's missing one
    assert set(guard.seen) == {str(root / "../outside.mp4"), str(outside), str(root / "link.mp4")}
    assert all(reason.startswith("path escapes the data root") for reason in guard.seen.values())
    no_rate = dataset.entries.index(next(e for e in dataset.entries if e.path.name == "no_rate.mp4"))
    assert dataset[no_rate]["fps"] == pytest.approx(24 / STRIDE)


def test_a_hung_decoder_becomes_a_named_bad_sample(tiny_clips: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = folder_source(tiny_clips)
    stuck = str(entries[0].path)
    read = readers.PyAVReader.read

    def hanging(self, path, indices, size):
        if path == stuck:
            time.sleep(2)
        return read(self, path, indices, size)

    monkeypatch.setattr(readers.PyAVReader, "read", hanging)
    dataset = VideoDataset(entries, ClipSettings(num_frames=4, height=16, width=16, decode_timeout=0.3))
    started = time.monotonic()
    sample = dataset[0]
    assert time.monotonic() - started < 1.5
    assert sample["source"] != stuck and sample["skipped"] == [(stuck, "decode timed out after 0.3s")]


# --- the data-sampling benchmark cannot rot -------------------------------------------------------------------------


def test_the_data_sampling_benchmark_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    """Its smallest setting, in-process (the command's own argument parsing included)."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.data_sampling import main

    assert main(["--smoke", "--json", str(tmp_path / "figures.json")]) == 0
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["videos"] == 2 and figures["clips"] == 2
    printed = capsys.readouterr().out
    methods = ["dataset", "full_decode", "full_decode_per_frame"]
    methods += ["decord"] if "decord" in readers.available_readers() else []
    for method in methods:
        assert figures[method]["clips_per_s"] > 0 and f"| {method} |" in printed
        ratio = figures[method]["clips_per_s"] / figures["full_decode"]["clips_per_s"]
        assert figures[method]["speedup"] == pytest.approx(ratio)
