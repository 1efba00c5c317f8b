"""The training dataset: listed entries in, same-shape clip samples out, bad files replaced.

A sample that fails (unreadable, truncated, too short, no video stream, bad caption) is
replaced by another entry of the same shape group, chosen by a seeded draw, so batches never
change shape and a rerun sees the same replacements. Every failure travels with the sample
that replaced it (``sample["skipped"]``); :class:`BadSampleGuard` in the main process logs
each bad file once and stops the run when too many are bad. ``max_consecutive_bad`` failed
draws in a row end the run at once: an all-bad dataset never loops.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from lvdm.data.sampling import plan_clip
from lvdm.data.sources import Entry
from lvdm.data.transforms import cover_size, nearest_bucket, to_clip_tensor
from lvdm.errors import DataError, VideoReadError


@dataclass(frozen=True)
class ClipSettings:
    """How clips are cut from videos (the data config's clip fields, without file locations)."""

    num_frames: int = 16
    height: int = 256
    width: int = 256
    stride: int | tuple[int, int] | None = None  # a (low, high) range is drawn per clip (lvdm.data.sampling)
    target_fps: float | tuple[float, float] | None = None
    start: str = "random"
    crop: str = "center"
    flip: bool = False
    reader: str = "auto"
    decode_timeout: float | None = 30.0
    buckets: tuple[tuple[int, int], ...] = ()  # (h, w) sizes; empty: every clip is height x width
    alternate_rates: bool = False  # a rate range: even entries at its lowest rate, odd at its highest (held-out)
    fine_share: float = 0.0  # share of video clips cut for the fine interpolation stage (lvdm.training.tasks)
    fine_every: int = 4  # ... at this many times the clip rate (train.interpolate_every)

    def fine(self) -> ClipSettings:
        """The clip rules of the fine interpolation stage: ``fine_every`` times the rate (a stride that many times
        shorter, or a target rate that many times higher)."""
        k = self.fine_every
        stride = self.stride if self.stride is None or isinstance(self.stride, tuple) else self.stride // k
        target = self.target_fps
        if target is not None:
            target = (target[0] * k, target[1] * k) if isinstance(target, tuple) else target * k
        return replace(self, stride=stride, target_fps=target, fine_share=0.0)


class VideoDataset(Dataset):
    """Map-style dataset of clip samples.

    A sample: ``video (f, 3, h, w)`` float in [-1, 1], ``caption``, ``fps`` (the clip's effective
    rate), ``is_image``, ``source`` (the file), ``fine`` (cut for the fine interpolation stage: a
    ``settings.fine_share`` of the video clips, at ``settings.fine_every`` times the rate). Image entries give
    one-frame samples (``is_image`` True, ``fps`` 0).

    With ``settings.buckets``, each entry's ``(width, height)`` picks its bucket: pass ``sizes`` when they
    are known (:func:`lvdm.data.sizes.media_sizes`), otherwise every file is probed here.
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        settings: ClipSettings,
        *,
        seed: int = 0,
        max_consecutive_bad: int = 20,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if not entries:
            raise DataError("the dataset is empty: no clips or images were found in the configured sources")
        self.entries = list(entries)
        self.settings = settings
        self.seed = seed
        self.max_consecutive_bad = max_consecutive_bad
        self.epoch = 0
        if settings.buckets and sizes is None:
            from lvdm.data.sizes import media_sizes

            sizes = media_sizes(self.entries, timeout=settings.decode_timeout or 30.0)
        self.sizes = list(sizes) if settings.buckets else None
        per_entry = self.sizes or [None] * len(self.entries)
        self.shapes = [self._shape_of(entry, size) for entry, size in zip(self.entries, per_entry, strict=True)]
        self.groups: dict[tuple, list[int]] = {}
        for index, shape in enumerate(self.shapes):
            self.groups.setdefault(shape, []).append(index)

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Vary the random clip starts, crops and flips per epoch (still seeded)."""
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """The sample of entry ``key``, or of ``(index, draw)`` as :class:`~lvdm.data.loader.BatchStream` yields.

        The draw number seeds the clip start, crop and flip, so every draw of an entry cuts its own clip
        (reproducibly); a plain index uses the epoch (:meth:`set_epoch`) instead.
        """
        index, draw = key if isinstance(key, tuple) else (key, None)
        salt = str(self.epoch) if draw is None else f"draw{draw}"
        skipped: list[tuple[str, str]] = []
        candidates = self.groups[self.shapes[index]]
        current = index
        for attempt in range(self.max_consecutive_bad):
            rng = random.Random(f"{self.seed}:{salt}:{index}:{attempt}")
            try:
                sample = self.load(current, rng)
            except VideoReadError as exc:
                skipped.append((str(self.entries[current].path), exc.reason))
                current = candidates[rng.randrange(len(candidates))]
                continue
            sample.update(index=index, skipped=skipped)
            return sample
        reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped[-3:])
        raise DataError(
            f"{self.max_consecutive_bad} bad samples in a row (data.max_consecutive_bad): the data is mostly "
            f"unusable. Last ones: {reasons}. Run `python -m lvdm.data.check` on the dataset to see every problem."
        )

    def load(self, index: int, rng: random.Random) -> dict[str, Any]:
        """Load entry ``index`` as a sample, or raise :class:`VideoReadError` saying why it is bad."""
        entry = self.entries[index]
        if entry.problem:
            raise VideoReadError(entry.path, entry.problem)
        caption = entry.read_caption()
        path = entry.media_path()
        height, width = self.shapes[index][1]
        s, fine = self.settings, False
        if entry.is_image:
            frames, fps = self._image(path, height, width), 0.0
        else:
            pick = ("low", "high")[index % 2] if s.alternate_rates else "draw"
            fine = s.fine_share >= 1 or (s.fine_share > 0 and rng.random() < s.fine_share)
            frames, fps = self._clip(path, height, width, rng, fps_hint=entry.fps, pick=pick, fine=fine)
        video = to_clip_tensor(frames, height, width, crop=s.crop, flip=s.flip, rng=rng)
        return {
            "video": video, "caption": caption, "fps": fps, "is_image": entry.is_image, "source": str(path),
            "fine": fine,
        }  # fmt: skip

    def _clip(
        self,
        path,
        height: int,
        width: int,
        rng: random.Random,
        *,
        fps_hint: float | None = None,
        pick: str = "draw",
        fine: bool = False,
    ):
        """Frames of one clip and its fps; a manifest's ``fps_hint`` stands in for a container without a rate."""
        from lvdm.data.readers import MAX_FPS, MIN_FPS, probe, read_frames

        s = self.settings.fine() if fine else self.settings
        info = probe(path, timeout=s.decode_timeout)
        fps = info.fps or (fps_hint if fps_hint is not None and MIN_FPS <= fps_hint <= MAX_FPS else None)
        lowest = s.target_fps[0] if isinstance(s.target_fps, tuple) else s.target_fps
        if fine and fps is not None and lowest is not None and fps < lowest:
            raise VideoReadError(
                path, f"{fps:g} fps is too slow for the fine interpolation stage's {lowest:g} fps clips"
            )  # a shorter step than one frame would repeat frames: not the faster clip the stage learns from
        plan = plan_clip(
            str(path), info.num_frames, fps, s.num_frames,
            stride=s.stride, target_fps=s.target_fps, start=s.start, rng=rng, pick=pick,
        )  # fmt: skip
        size = _cover(path, info.width, info.height, height, width)
        frames = read_frames(path, plan.indices, size=size, reader=s.reader, timeout=s.decode_timeout)
        return frames, plan.fps

    def _image(self, path, height: int, width: int):
        from lvdm.data.readers import read_image
        from lvdm.data.sizes import image_size

        image_width, image_height = image_size(path)
        return read_image(path, size=_cover(path, image_width, image_height, height, width))

    def _shape_of(self, entry: Entry, size: tuple[int, int] | None) -> tuple[bool, tuple[int, int]]:
        """``(is_image, (h, w))``: the samples that may share a batch."""
        s = self.settings
        if size is None:
            return entry.is_image, (s.height, s.width)
        return entry.is_image, nearest_bucket(*size, s.buckets)


def _cover(path: object, width: int, height: int, out_h: int, out_w: int) -> tuple[int, int]:
    """:func:`cover_size`, a bad sample (skipped and logged) when the shape is too far from the output's."""
    try:
        return cover_size(width, height, out_h, out_w)
    except ValueError as exc:
        raise VideoReadError(path, str(exc)) from None


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of one shape group into a batch: ``video (b, f, 3, h, w)``."""
    return {
        "video": torch.stack([s["video"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
        "is_image": torch.tensor([s["is_image"] for s in samples], dtype=torch.bool),
        "fine": torch.tensor([s.get("fine", False) for s in samples], dtype=torch.bool),
        "source": [s["source"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples]),
        "skipped": [item for s in samples for item in s["skipped"]],
    }
