"""The latent cache: a dataset encoded once through the VAE and text encoder, read back instead of video.

Layout of a cache folder:

- ``cache.json``: format, the fingerprint (model weights hashes, clip settings, sources) and the shard size;
- ``shard-00000.safetensors`` ...: per sample ``{i}.latents`` (the VAE's Gaussian parameters
  ``(2c, f, h, w)``: mean and logvar, so every epoch can draw a fresh latent, and a draw with the
  same generator equals on-the-fly encoding) and ``{i}.text`` (``(n, d)``); sample metadata
  (caption, fps, is_image, source, and the stamp of its files: :meth:`~lvdm.data.sources.Entry.stamp`) in the
  shard's metadata; with image conditioning also ``{i}.image``, the CLIP
  tokens ``(k, n, d)`` of the frames that can condition the clip (``k = 1``: the first; ``k = f``: every frame, for
  ``train.image_frame: random``); float32, e.g. 1.3 MB per frame for CLIP ViT-H/14, about what a clip's latents
  take; for the decoder target also ``{i}.frames``, the clip itself as uint8 ``(f, 3, h, w)`` (exact: a clip's
  pixels are uint8 values scaled to [-1, 1]), what the decoder learns to reproduce;
- ``empty_text.safetensors``: the empty caption's embedding, for caption dropout;
- ``skipped.jsonl``: the files that could not be cached, with reasons (each once, also across a resume). Building
  again into a finished cache adds the samples of those files that can be read now (a clip replaced, a caption
  added) to their shards, and drops their rows.

A sample whose files were edited after it was cached (another size or modification time of its clip or caption
file, another inline caption or fps hint) is encoded again by the next build, and refused by training until then. A
file that is gone is not an edit: the clips may be deleted once they are cached.

Each clip is cut once (seeded start, crop and flip), so a cache fixes what random clip sampling
would vary. Shards are written to a temp file and renamed: an interrupted build resumes at the
first missing shard. A cache whose fingerprint differs from the current model or data settings
is refused, naming what differs, and so is an unfinished one (a shard missing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lvdm.data.dataset import VideoDataset
from lvdm.data.skip_log import SkipLog
from lvdm.errors import DataError, VideoReadError
from lvdm.fileio import atomic_path, is_stray_temp, read_json, safetensors_handle, save_safetensors

FORMAT = "lvdm.latent_cache"
FORMAT_VERSION = 1
BUILD_COMMAND = "python -m lvdm.cache --config <your config> data.cache=<folder>"  # the command, named in errors


def weights_digest(module: torch.nn.Module) -> str:
    """A short SHA-256 of a module's weights (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_digests(
    vae: Any, text_encoder: Any, image_encoder: Any = None, image_frame: str = "first"
) -> dict[str, str]:
    """:func:`cache_fingerprint`'s encoder arguments for loaded, un-cast encoders (``image_encoder``: a
    :class:`~lvdm.models.encoders.ImageEncoder` with image conditioning, whose ``train.image_frame`` is
    ``image_frame``: ``"random"`` needs every frame's tokens)."""
    digests = {"vae_digest": weights_digest(vae), "text_encoder_digest": weights_digest(text_encoder)}
    if image_encoder is not None:
        digests["image_encoder_digest"] = weights_digest(image_encoder.model)
        digests["image_frames"] = "every" if image_frame == "random" else "first"
    return digests


def cache_fingerprint(
    dataset: VideoDataset,
    *,
    vae_digest: str,
    text_encoder_digest: str,
    image_encoder_digest: str | None = None,
    image_frames: str | None = None,
    frames: bool = False,
) -> dict[str, Any]:
    """What a cache depends on: the encoders' weights (as :func:`weights_digest` of the loaded, un-cast
    modules), the clip settings and the listed files; with an image encoder, also which frames' tokens it holds
    (``image_frames``: ``"first"`` or ``"every"``), and whether it holds the clips' pixels (``frames``)."""
    listing = hashlib.sha256("\n".join(str(e.path) for e in dataset.entries).encode()).hexdigest()[:16]
    image = {"image_encoder": image_encoder_digest, "image_frames": image_frames} if image_encoder_digest else {}
    image |= {"frames": True} if frames else {}
    return image | {
        "vae": vae_digest,
        "text_encoder": text_encoder_digest,
        "clip": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(dataset.settings).items()},
        "entries": len(dataset.entries),
        "listing": listing,
        "seed": dataset.seed,
    }


def build_cache(
    dataset: VideoDataset,
    out_dir: str | os.PathLike,
    *,
    encode_video: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[list[str]], torch.Tensor],
    fingerprint: dict[str, Any],
    encode_frames: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shard_size: int = 64,
    progress: bool = True,
) -> Path:
    """Encode every good sample of ``dataset`` into ``out_dir``; resumes an interrupted build.

    ``encode_video``: ``(1, f, 3, h, w)`` -> Gaussian parameters ``(1, 2c, f, h', w')``;
    ``encode_text``: captions -> ``(b, n, d)``; ``encode_frames`` (image conditioning): frames ``(k, 3, h, w)`` ->
    CLIP tokens ``(k, n, d)``, of the first frame or every frame as ``fingerprint["image_frames"]`` says.
    """
    chosen = {"first": slice(0, 1), "every": slice(None)}.get(fingerprint.get("image_frames"))
    encode_image = (lambda video: encode_frames(video[chosen])) if encode_frames is not None else None
    keep_frames = bool(fingerprint.get("frames"))
    out = Path(out_dir)
    shards = range(0, len(dataset), shard_size)
    _start_or_resume(out, fingerprint, shard_size, len(shards))
    with atomic_path(out / "empty_text.safetensors") as temp:  # never written through a link someone put there
        save_safetensors({"text": encode_text([""])[0].cpu().contiguous()}, temp)
    skips = SkipLog(out / "skipped.jsonl")
    bar = tqdm(total=len(dataset), desc="caching latents", unit="clip", disable=not progress)
    encode = _SampleEncoder(dataset, skips, encode_video, encode_text, encode_image, keep_frames)
    for number, first in enumerate(shards):
        indices = range(first, min(first + shard_size, len(dataset)))
        path = out / _shard_name(number)
        if not path.exists():
            _save_shard(path, [encoded for index in indices if (encoded := encode(index)) is not None])
        else:
            _mend_shard(path, indices, encode)
        bar.update(len(indices))
    bar.close()
    return out


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _start_or_resume(out: Path, fingerprint: dict[str, Any], shard_size: int, shards: int) -> None:
    manifest = out / "cache.json"
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shard_size": shard_size,
        "shards": shards,
        "fingerprint": fingerprint,
    }
    if manifest.exists() or manifest.is_symlink():
        found = _read_manifest(out)
        if found.get("fingerprint") != fingerprint or found.get("shard_size") != shard_size:
            differences = _differences(found.get("fingerprint", {}), fingerprint)
            raise DataError(
                f"latent cache {out} was started with other settings ({differences}); "
                "delete it or choose another folder"
            )
        return
    if out.is_dir() and any(not is_stray_temp(p.name, ("cache.json",)) for p in out.iterdir()):  # a user's folder
        raise DataError(f"data.cache {out} holds files but no cache.json: not a latent cache; choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache {out} cannot be made: {exc.strerror or exc}") from exc
    with atomic_path(manifest, exclusive=True) as temp:
        temp.write_text(json.dumps(header, indent=2))


def _read_manifest(folder: Path) -> dict[str, Any]:
    """``cache.json`` of a latent cache, or a :class:`DataError` saying the folder is not one (never a wait on a
    FIFO, nor a traceback on JSON that is not a cache's)."""
    try:
        header = read_json(folder / "cache.json")
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder} is not a latent cache: its cache.json cannot be read ({exc})") from exc
    if (
        not isinstance(header, dict)
        or header.get("format") != FORMAT
        or not isinstance(header.get("fingerprint"), dict)
    ):
        raise DataError(f"{folder} is not a latent cache: its cache.json is not lvdm's")
    return header


class _SampleEncoder:
    """One sample of ``dataset`` encoded for a shard: its tensors (by key) and its metadata row, or ``None`` for a
    file that cannot be read (logged to ``skips`` once)."""

    def __init__(self, dataset, skips: SkipLog, encode_video, encode_text, encode_image, keep_frames: bool) -> None:
        self.dataset, self.skips, self.keep_frames = dataset, skips, keep_frames
        self.encode_video, self.encode_text, self.encode_image = encode_video, encode_text, encode_image

    def __call__(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        rng = random.Random(f"{self.dataset.seed}:cache:{index}")
        stamp = self.dataset.entries[index].stamp()  # before reading: an edit made while it is read shows next time
        try:
            sample = self.dataset.load(index, rng)
        except VideoReadError as exc:
            self.skips.add(self.path_of(index), exc.reason)
            return None
        tensors = {
            f"{index}.latents": self.encode_video(sample["video"][None])[0].cpu().contiguous(),
            f"{index}.text": self.encode_text([sample["caption"]])[0].cpu().contiguous(),
        }
        if self.encode_image is not None:
            tensors[f"{index}.image"] = self.encode_image(sample["video"]).cpu().contiguous()
        if self.keep_frames:  # f 3 h w in [-1, 1], uint8 values scaled: stored as those values
            tensors[f"{index}.frames"] = sample["video"].add(1.0).mul(127.5).round().to(torch.uint8).contiguous()
        row = {k: sample[k] for k in ("caption", "fps", "is_image", "source")} | {"index": index, "stamp": stamp}
        return tensors, row

    def path_of(self, index: int) -> str:
        return str(self.dataset.entries[index].path)


def _save_shard(path: Path, encoded: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> None:
    tensors = {key: tensor for sample, _ in encoded for key, tensor in sample.items()}
    samples = sorted((row for _, row in encoded), key=lambda row: row["index"])
    with atomic_path(path) as temp:
        save_safetensors(tensors, temp, metadata={"samples": json.dumps(samples)})


def _mend_shard(path: Path, indices: range, encode: _SampleEncoder) -> None:
    """Add to a finished shard the samples of its files that could not be read when it was written and can now
    (a clip replaced, a caption added), and encode again those whose files were edited since: the shard is rewritten
    with them, its other samples as they were, and their rows leave the skip log. A file still bad is not logged
    again; an edited sample that can no longer be read leaves the shard (and is logged)."""
    entries = encode.dataset.entries
    with _open_shard(path) as (handle, rows):
        current = [
            row for row in rows if row["index"] in indices and not _edited(row.get("stamp"), entries[row["index"]])
        ]
        present = {row["index"] for row in current}
        mended = [encoded for index in indices if index not in present and (encoded := encode(index)) is not None]
        if not mended and len(current) == len(rows):
            return
        keys = [(key, key.partition(".")[0]) for key in handle.keys()]
        kept = [
            ({key: handle.get_tensor(key) for key, owner in keys if owner == str(row["index"])}, row)
            for row in current
        ]
    _save_shard(path, kept + mended)
    encode.skips.remove([encode.path_of(row["index"]) for _, row in mended])


def _edited(recorded: Any, entry: Any) -> bool:
    """Whether ``entry`` (a listed :class:`~lvdm.data.sources.Entry`) changed since its cached row recorded
    ``recorded`` (its stamp): a file that can be seen with another size or time, another inline caption or fps hint.
    A file gone is not a change. A row without a stamp (an older lvdm's) counts as changed."""
    if not isinstance(recorded, dict):
        return True
    now = entry.stamp()
    files = ("media", "caption_file")
    return any(value != recorded.get(key) for key, value in now.items() if value is not None or key not in files)


@contextlib.contextmanager
def _open_shard(path: Path) -> Iterator[tuple[Any, list[dict[str, Any]]]]:
    """A shard's safetensors handle and its sample rows; a shard that is not a regular file (a FIFO would hang
    the reader) or cannot be read is one :class:`DataError` saying how to rebuild it (it was "ready" to the build,
    and a traceback to training)."""
    again = f"delete it and run {BUILD_COMMAND} again to rebuild it"
    if path.is_symlink() or not path.is_file():
        raise DataError(f"latent cache shard {path} is not a regular file; {again}")
    try:
        handle = safetensors_handle(path)
        rows = json.loads(handle.metadata()["samples"])
        if not isinstance(rows, list) or not all(isinstance(row, dict) and type(row.get("index")) is int
                                                 for row in rows):  # fmt: skip
            raise ValueError("its sample rows are not lvdm's")
    except OSError:
        raise  # one the user may not read, say: its reason and the path, not "rebuild it"
    except (ValueError, KeyError, TypeError, RecursionError, SafetensorError) as exc:
        raise DataError(f"latent cache shard {path} is damaged ({exc}); {again}") from exc
    with handle:
        yield handle, rows


class LatentCache(Dataset):
    """Samples read from a cache folder: ``latents`` (Gaussian parameters), ``text``, caption, fps, is_image.

    ``expected`` is the fingerprint of the current model and data settings; a cache made with
    anything else is a :class:`DataError` naming the differences. ``entries``: the listing as it is now; a sample
    whose files were edited since it was cached is a :class:`DataError` too.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        expected: dict[str, Any] | None = None,
        *,
        only: set[int] | None = None,
        entries: Sequence[Any] | None = None,
    ) -> None:
        """``only``: keep the samples of these listing entries (e.g. the training part of a holdout split)."""
        self.dir = Path(cache_dir)
        manifest = self.dir / "cache.json"
        if not manifest.is_file():
            raise DataError(f"latent cache {self.dir} does not exist (no cache.json); build it with {BUILD_COMMAND}")
        header = _read_manifest(self.dir)
        if not isinstance(version := header.get("format_version", 0), int) or version > FORMAT_VERSION:
            raise DataError(f"{self.dir} is not a latent cache this lvdm can read")
        if expected is not None and header["fingerprint"] != expected:
            raise DataError(
                f"latent cache {self.dir} is stale: it was made with other settings "
                f"({_differences(header['fingerprint'], expected)}); delete it and build it again with {BUILD_COMMAND}"
            )
        missing = [n for n in range(header.get("shards", 0)) if not os.path.lexists(self.dir / _shard_name(n))]
        if missing:
            raise DataError(
                f"latent cache {self.dir} is incomplete: {len(missing)} of {header['shards']} shards missing "
                f"(first: {_shard_name(missing[0])}); run {BUILD_COMMAND} again to finish it"
            )
        self.samples = [s for s in self._listing() if only is None or s["index"] in only]
        if not self.samples:
            raise DataError(f"latent cache {self.dir} holds no samples (incomplete build, or every file was bad)")
        if entries is not None:
            self._check_stamps(entries)
        with safetensors_handle(self.dir / "empty_text.safetensors") as handle:
            self.empty_text = handle.get_tensor("text")
        self.groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(self.samples):
            self.groups.setdefault((sample["is_image"], tuple(sample["shape"])), []).append(i)

    def _check_stamps(self, entries: Sequence[Any]) -> None:
        """Refuse samples whose files were edited since they were cached (the cache would train on the old ones)."""
        again = f"run {BUILD_COMMAND} again: it encodes again only the samples that changed"
        if any(not 0 <= sample["index"] < len(entries) for sample in self.samples):
            raise DataError(f"latent cache {self.dir} is damaged (a sample of no listed file); {again}")
        if any("stamp" not in sample for sample in self.samples):
            raise DataError(
                f"latent cache {self.dir} was built by an older lvdm, which did not note its files' stamps; {again}"
            )
        edited = [sample for sample in self.samples if _edited(sample["stamp"], entries[sample["index"]])]
        if edited:
            raise DataError(
                f"latent cache {self.dir} is stale: {len(edited)} of its samples' files were edited after they were "
                f"cached (first: {entries[edited[0]['index']].path}); {again}"
            )

    def _listing(self) -> list[dict[str, Any]]:
        samples = []
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            with _open_shard(shard) as (handle, rows):
                names = set(handle.keys())
                for sample in rows:
                    shape = handle.get_slice(f"{sample['index']}.latents").get_shape()
                    extra = [n for n in ("image", "frames") if f"{sample['index']}.{n}" in names]
                    tensors = ["latents", "text", *extra]
                    samples.append(sample | {"shard": shard, "shape": shape, "tensors": tensors})
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Sample ``key``, or ``(index, draw)`` as :class:`~lvdm.data.loader.BatchStream` yields (a cached clip
        is the same on every draw)."""
        sample = self.samples[key[0] if isinstance(key, tuple) else key]
        with safetensors_handle(sample["shard"]) as handle:
            tensors = {name: handle.get_tensor(f"{sample['index']}.{name}") for name in sample["tensors"]}
        fields = {k: sample[k] for k in ("caption", "fps", "is_image", "source", "index")}
        return fields | tensors | {"skipped": []}


def collate_cached(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached samples of one shape group: ``latents (b, 2c, f, h, w)``, ``text (b, n, d)``, and with image
    conditioning ``image_tokens (b, k, n, d)``; with the clips' pixels, ``video (b, f, 3, h, w)``."""
    images = {"image_tokens": torch.stack([s["image"] for s in samples])} if "image" in samples[0] else {}
    if "frames" in samples[0]:  # the clips themselves (decoder target), as the clip loader makes them
        images["video"] = torch.stack([s["frames"] for s in samples]).float().div(127.5).sub(1.0)
    return images | {
        "latents": torch.stack([s["latents"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
        "is_image": torch.tensor([s["is_image"] for s in samples], dtype=torch.bool),
        "source": [s["source"] for s in samples],
        "index": torch.tensor([s["index"] for s in samples]),
        "skipped": [],
    }


def _differences(found: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> str:
    diffs = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            diffs += [inner] if inner else []
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} in the cache, {b!r} now")
    return "; ".join(diffs)
