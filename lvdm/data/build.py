"""From the ``data`` section of a config to a dataset: list every source, weigh them, set the clip rules."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

from lvdm.data.dataset import ClipSettings, VideoDataset
from lvdm.data.sizes import media_sizes
from lvdm.data.sources import SOURCES, Entry, folder_source, manifest_source, webvid_source
from lvdm.errors import DataError


def clip_settings(data: Any) -> ClipSettings:
    """The clip rules of a ``DataConfig``."""
    height, width = data.resolution
    return ClipSettings(
        num_frames=data.num_frames,
        height=height,
        width=width,
        stride=_range(data.frame_stride),
        target_fps=_range(data.target_fps),
        start=data.start,
        crop=data.crop,
        flip=data.flip,
        reader=data.reader,
        decode_timeout=data.decode_timeout,
        buckets=tuple(tuple(b) for b in data.buckets),
    )


def _range(value: Any) -> Any:
    """A config's ``[low, high]`` as the ``(low, high)`` range the clip planner draws from; a single value as is."""
    return tuple(value) if isinstance(value, list) else value


def list_sources(data: Any) -> list[tuple[str, list[Entry], float]]:
    """``(name, entries, weight)`` for ``data.root``, ``data.manifest`` and every ``data.sources`` item."""
    listed = []
    if data.root:
        listed.append((str(data.root), folder_source(data.root, allow_links_outside=data.follow_links_outside), 1.0))
    if data.manifest:
        listed.append((str(data.manifest), read_manifest(data.manifest), 1.0))
    for source in data.sources:
        listed.append((f"{source.kind}:{source.path}", _source_entries(source, data), source.weight))
    for name, entries, _ in listed:
        if not entries:
            raise DataError(f"data source {name} lists no clips or images")
    return listed


def _source_entries(source: Any, data: Any) -> list[Entry]:
    """One ``data.sources`` item's entries; folders follow symlinks out of their root only when allowed."""
    if source.kind in ("folder", "images") and Path(source.path).is_dir():
        images = source.kind == "images"
        return folder_source(source.path, images=images, allow_links_outside=data.follow_links_outside)
    return SOURCES[source.kind](source.path, source.video_root)


def read_manifest(path: str | Path, video_root: str | Path | None = None) -> list[Entry]:
    """A manifest whose kind is told by its columns: WebVid CSV (``videoid``) or a generic CSV/JSONL manifest."""
    path = Path(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:  # a BOM, as _read_rows
            header = next(csv.reader(handle), [])
        if "videoid" in header:
            return webvid_source(path, video_root)
    return manifest_source(path, video_root)


def build_dataset(data: Any, *, seed: int = 0) -> tuple[VideoDataset, list[float]]:
    """The dataset over every configured source, and per-entry sampling weights.

    Each source gets its configured share of the draws whatever its size: an entry's weight is
    the source's weight divided by its number of entries.
    """
    entries: list[Entry] = []
    weights: list[float] = []
    for _, listed, weight in list_sources(data):
        entries += listed
        weights += [weight / len(listed)] * len(listed)
    settings = clip_settings(data)
    sizes = None
    if settings.buckets:
        sizes = media_sizes(entries, index=data.size_index, workers=data.probe_workers, timeout=data.decode_timeout)
    dataset = VideoDataset(
        entries, settings, seed=seed, max_consecutive_bad=data.max_consecutive_bad, sizes=sizes
    )  # fmt: skip
    return dataset, weights


def holdout_indices(n: int, holdout: int) -> set[int]:
    """``holdout`` evenly spaced entry indices out of ``n`` (the same ones for clips and for their cache)."""
    return {round(i * n / holdout) for i in range(holdout)} if holdout else set()


def build_split(
    data: Any, *, seed: int = 0, fine_share: float = 0.0, fine_every: int = 4
) -> tuple[VideoDataset, list[float], VideoDataset | None]:
    """``(train, weights, holdout)``: ``data.holdout`` evenly spaced entries are kept out of training.

    The holdout clips are cut deterministically (centred start and crop, no flip) so every
    validation sees the same frames; with a rate range, alternately at its lowest and highest rate.
    ``fine_share`` of the training clips are cut at ``fine_every`` times the rate, for the fine interpolation
    stage (:func:`recut` the holdout with ``fine_share=1`` for held-out clips cut that way).
    """
    dataset, weights = build_dataset(data, seed=seed)
    if fine_share:
        dataset.settings = replace(dataset.settings, fine_share=fine_share, fine_every=fine_every)
    if not data.holdout:
        return dataset, weights, None
    n = len(dataset.entries)
    if data.holdout >= n:
        raise DataError(f"data.holdout={data.holdout} leaves nothing to train on: the dataset has {n} entries")
    held = sorted(holdout_indices(n, data.holdout))
    keep = sorted(set(range(n)) - set(held))
    fixed = replace(dataset.settings, start="center", crop="center", flip=False, alternate_rates=True, fine_share=0)
    holdout = _subset(dataset, held, fixed)
    train = _subset(dataset, keep, dataset.settings, max_consecutive_bad=dataset.max_consecutive_bad)
    return train, [weights[i] for i in keep], holdout


def recut(dataset: VideoDataset, **changes: Any) -> VideoDataset:
    """The same entries under changed clip rules (``ClipSettings`` fields), no file opened."""
    return _subset(dataset, list(range(len(dataset.entries))), replace(dataset.settings, **changes))


def _subset(dataset: VideoDataset, indices: list[int], settings: ClipSettings, **kwargs: Any) -> VideoDataset:
    """The entries at ``indices`` under ``settings``, with the sizes already probed (no file is opened)."""
    sizes = [dataset.sizes[i] for i in indices] if dataset.sizes is not None else None
    entries = [dataset.entries[i] for i in indices]
    return VideoDataset(entries, settings, seed=dataset.seed, sizes=sizes, **kwargs)
