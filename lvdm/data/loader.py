"""Batches for training: a seeded, resumable stream of same-shape batches, and the bad-sample guard.

Batch ``n`` of the stream is a pure function of ``(seed, n)``: resuming at step ``n`` replays
exactly the batches an uninterrupted run would have seen, with no sampler state beyond ``n``.
Entries are drawn with replacement, weighted so that each source gets its configured share
whatever its size; a batch holds one shape group (image or video, one aspect bucket).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Sampler

from lvdm.data.dataset import VideoDataset, collate
from lvdm.data.skip_log import SkipLog
from lvdm.errors import DataError


class BatchStream(Sampler[list[tuple[int, int]]]):
    """An endless stream of index batches, starting at batch ``start``.

    A DataLoader prefetches, so the stream cannot know how many batches were consumed; the
    training loop does, and resumes with ``start_at(batches_consumed)`` before iterating.
    Works for a :class:`VideoDataset` or a latent cache (anything with ``groups``, a length and
    a ``__getitem__`` that takes the ``(index, draw)`` pairs of :meth:`draws`).
    """

    def __init__(
        self,
        dataset: VideoDataset,
        batch_size: int,
        *,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.start = 0
        weights = list(weights) if weights is not None else [1.0] * len(dataset)
        if len(weights) != len(dataset) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("sample weights must be one non-negative number per entry, not all zero")
        self.groups = [(members, [weights[i] for i in members]) for members in dataset.groups.values()]
        self.group_weights = [sum(w) for _, w in self.groups]

    def batch(self, n: int) -> list[int]:
        """The indices of batch ``n``."""
        rng = random.Random(f"{self.seed}:batch:{n}")
        members, weights = rng.choices(self.groups, weights=self.group_weights)[0]
        return rng.choices(members, weights=weights, k=self.batch_size)

    def draws(self, n: int) -> list[tuple[int, int]]:
        """Batch ``n`` as ``(index, draw)`` pairs: the draw number seeds each sample's clip start, crop and flip,
        so an entry drawn again later gives another clip of its video (a plain index would give the same one)."""
        return [(index, n * self.batch_size + k) for k, index in enumerate(self.batch(n))]

    def start_at(self, n: int) -> None:
        """Begin the next iteration at batch ``n`` (resume)."""
        self.start = n

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """This rank's batches of :meth:`draws`: rank ``r`` of ``w`` takes global batches ``n * w + r``."""
        n = self.start
        while True:
            yield self.draws(n * self.world_size + self.rank)
            n += 1


class BadSampleGuard:
    """Logs each bad file once to ``skipped.jsonl`` and stops the run when the bad fraction is too high.

    The fraction is judged once ``min_samples`` draws have been made, so one early bad file
    does not stop a run; ``VideoDataset`` itself stops a run of consecutive failures. Files already
    in an existing log (a resumed run) are not logged again.
    """

    def __init__(self, log_path: str | Path | None, *, max_fraction: float = 0.05, min_samples: int = 50) -> None:
        self.log_path = Path(log_path) if log_path is not None else None
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.log = SkipLog(self.log_path)
        self.seen: dict[str, str] = self.log.logged
        self.bad = 0
        self.total = 0

    def update(self, batch: dict[str, Any]) -> None:
        """Account for one batch's skipped files; raise :class:`DataError` past the allowed fraction."""
        skipped = batch["skipped"]
        self.bad += len(skipped)
        self.total += len(skipped) + len(batch["caption"])
        for path, reason in skipped:
            self.log.add(path, reason)
        if self.total >= self.min_samples and self.bad > self.max_fraction * self.total:
            raise DataError(
                f"{self.bad} of {self.total} samples drawn were bad ({100 * self.bad / self.total:.1f}% > "
                f"data.max_bad_fraction {100 * self.max_fraction:.1f}%); {len(self.seen)} distinct bad files"
                + (f" are listed in {self.log_path}" if self.log_path else "")
            )


def make_loader(dataset: Any, stream: BatchStream, *, num_workers: int = 0, collate_fn: Any = collate) -> DataLoader:
    """A DataLoader over ``stream``'s batches (endless: the caller decides how many to take)."""
    return DataLoader(
        dataset,
        batch_sampler=stream,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
