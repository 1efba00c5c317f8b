"""Data throughput: training clips per second cut from mp4 files, several ways, on the same generated videos.

    python -m benchmarks.data_sampling                      # 8 videos, 240 frames at 30 fps, 256x192 -> 128x128
    python -m benchmarks.data_sampling --repeats 5 --json figures.json
    python -m benchmarks.data_sampling --smoke              # 2 tiny videos, 1 repeat: what the test runs

Methods (each gives ``(f, 3, h, w)`` float clips in [-1, 1] at the training size, one thread each):

- ``dataset``: :class:`lvdm.data.dataset.VideoDataset`, as training loads a sample: caption, probe, clip plan,
  PyAV seek to the keyframe before the clip, decode only up to its last frame, scaled by swscale to the size
  that covers the training size, crop.
- ``full_decode``: the naive loader: decode every frame of the video at its native size (PyAV, one swscale
  context reused for the RGB conversion), then cut the clip's frames and resize/crop them (torch, antialiased
  bilinear). The baseline of the ratios.
- ``full_decode_per_frame``: the same with ``frame.to_ndarray(format="rgb24")`` on every frame, as simple loaders
  write it: a new swscale context per frame, which costs more than decoding the frame.
- ``decord``: a bare ``decord.VideoReader(width, height)`` + ``get_batch`` on the clip's frames, then crop
  (if decord imports).

``full_decode*`` and ``decord`` cut the same seeded clips; ``dataset`` draws its own seeded clips (same
distribution: a uniformly random start). Figures are clips per second and ratios to ``full_decode``;
videos are written with a keyframe every second, so a seek lands at most 1 s before the clip.

Measured on 2 shared CPU cores (defaults, 6 clips per video): dataset 46-55 clips/s, 3.3-3.6x ``full_decode``
(14-15 clips/s) and 17-20x ``full_decode_per_frame``; decord 42-49 clips/s (dataset / decord 1.1x). The gain over
decoding everything grows with video length: these videos are 8 s long.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter


@dataclass(frozen=True)
class Setting:
    """What is measured: the videos, the clips cut from them, and how often."""

    videos: int = 8
    frames: int = 240  # frames per video
    fps: float = 30.0
    size: tuple[int, int] = (256, 192)  # (width, height) of the videos
    num_frames: int = 16  # frames per clip
    stride: int = 2
    resolution: tuple[int, int] = (128, 128)  # (height, width) of the training clips
    repeats: int = 3  # clips per video


SMOKE = Setting(videos=2, frames=40, size=(64, 48), num_frames=4, resolution=(32, 32), repeats=1)


def write_videos(folder: Path, setting: Setting) -> list[Path]:
    """``setting.videos`` captioned H.264 "shapes" mp4s in ``folder`` (kept: rerunning reuses them)."""
    from lvdm.testing.clips import caption_for, write_clip

    paths = []
    for i in range(setting.videos):
        path = folder / f"video_{i:03d}_{setting.frames}f_{setting.size[0]}x{setting.size[1]}.mp4"
        if not path.exists():
            write_clip(path, num_frames=setting.frames, fps=setting.fps, size=setting.size, seed=i)
            path.with_suffix(".txt").write_text(caption_for(i), encoding="utf-8")
        paths.append(path)
    return paths


def clip_plans(setting: Setting) -> list[tuple[int, tuple[int, ...]]]:
    """``(video, frame indices)`` of every clip the baselines cut: ``repeats`` seeded random clips per video."""
    from lvdm.data.sampling import plan_clip

    plans = []
    for repeat in range(setting.repeats):
        for video in range(setting.videos):
            rng = random.Random(f"bench:{repeat}:{video}")
            plan = plan_clip("", setting.frames, setting.fps, setting.num_frames, stride=setting.stride, rng=rng)
            plans.append((video, plan.indices))
    return plans


def _crop_to_tensor(frames: np.ndarray, setting: Setting) -> torch.Tensor:
    """``(f, h, w, 3)`` uint8 frames covering the training size -> centred ``(f, 3, H, W)`` crop in [-1, 1]."""
    from lvdm.data.transforms import to_clip_tensor

    height, width = setting.resolution
    return to_clip_tensor(frames, height, width, crop="center", flip=False, rng=random.Random(0))


def _cover(setting: Setting) -> tuple[int, int]:
    from lvdm.data.transforms import cover_size

    return cover_size(*setting.size, *setting.resolution)


def dataset_method(paths: list[Path], setting: Setting) -> Callable[[int, int], torch.Tensor]:
    """Clip ``draw`` of video ``video`` as training loads it."""
    from lvdm.data.dataset import ClipSettings, VideoDataset
    from lvdm.data.sources import folder_source

    height, width = setting.resolution
    clip = ClipSettings(setting.num_frames, height, width, stride=setting.stride, reader="pyav")
    entries = {str(e.path): e for e in folder_source(paths[0].parent)}
    dataset = VideoDataset([entries[str(p)] for p in paths], clip, seed=0)
    return lambda video, draw: dataset[(video, draw)]["video"]


def full_decode_method(
    paths: list[Path], setting: Setting, plans, *, reuse_scaler: bool = True
) -> Callable[[int, int], torch.Tensor]:
    """Every frame decoded and converted to RGB at native size, then the clip's frames resized and cropped.

    ``reuse_scaler``: one swscale context for the whole video; without it each frame's ``to_ndarray`` makes its
    own (what a simple loader does), which costs more than the decoding.
    """
    cover_w, cover_h = _cover(setting)

    def rgb_frames(path: Path) -> list[np.ndarray]:
        scaler = VideoReformatter()
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            if reuse_scaler:
                return [scaler.reformat(f, format="rgb24").to_ndarray() for f in container.decode(stream)]
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]

    def load(video: int, draw: int) -> torch.Tensor:
        frames = rgb_frames(paths[video])
        clip = torch.from_numpy(np.stack([frames[i] for i in plans[draw][1]]))  # n x (h w 3) -> n h w 3
        # n h w 3 -> n 3 h w, resized (antialiased) to cover the training size, back to n h w 3 uint8
        scaled = torch.nn.functional.interpolate(
            clip.permute(0, 3, 1, 2).float(), size=(cover_h, cover_w), mode="bilinear", antialias=True
        )
        return _crop_to_tensor(scaled.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(), setting)

    return load


def decord_method(paths: list[Path], setting: Setting, plans) -> Callable[[int, int], torch.Tensor]:
    """A bare decord reader at the covering size, ``get_batch`` of the clip's frames, then the crop."""
    import decord

    cover_w, cover_h = _cover(setting)

    def load(video: int, draw: int) -> torch.Tensor:
        reader = decord.VideoReader(str(paths[video]), width=cover_w, height=cover_h, num_threads=1)
        return _crop_to_tensor(reader.get_batch(list(plans[draw][1])).asnumpy(), setting)

    return load


def _time(methods: dict[str, Callable[[int, int], torch.Tensor]], plans, setting: Setting) -> dict[str, dict]:
    """Seconds and clips/s of each method over every planned clip.

    The methods take turns clip by clip, so a machine whose load changes during the run (shared cores) slows
    them alike; one untimed warm-up clip each first (imports, first open).
    """
    expected = (setting.num_frames, 3, *setting.resolution)
    seconds = dict.fromkeys(methods, 0.0)
    for load in methods.values():
        load(0, 0)
    for draw, (video, _) in enumerate(plans):
        for name, load in methods.items():
            started = time.perf_counter()
            clip = load(video, draw)
            seconds[name] += time.perf_counter() - started
            assert tuple(clip.shape) == expected, (name, tuple(clip.shape), expected)
    return {name: {"seconds": s, "clips_per_s": len(plans) / s} for name, s in seconds.items()}


def run(setting: Setting = Setting(), *, workdir: str | Path | None = None, show: bool = True) -> dict[str, Any]:
    """Measure every method on ``setting``; print a markdown table (``show``) and return the figures."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lvdm-bench-") as scratch:
        paths = write_videos(Path(workdir or scratch), setting)
        plans = clip_plans(setting)
        methods = {
            "dataset": dataset_method(paths, setting),
            "full_decode": full_decode_method(paths, setting, plans),
            "full_decode_per_frame": full_decode_method(paths, setting, plans, reuse_scaler=False),
        }
        from lvdm.data.decord_reader import DecordReader

        if DecordReader.available():
            methods["decord"] = decord_method(paths, setting, plans)
        figures: dict[str, Any] = {"videos": setting.videos, "clips": len(plans), "setting": asdict(setting)}
        figures |= _time(methods, plans, setting)
    baseline = figures["full_decode"]["clips_per_s"]
    for name in methods:
        figures[name]["speedup"] = figures[name]["clips_per_s"] / baseline
    if "decord" in methods:
        figures["dataset_vs_decord"] = figures["dataset"]["clips_per_s"] / figures["decord"]["clips_per_s"]
    if show:
        print(table(figures, list(methods)))
    return figures


def table(figures: dict[str, Any], methods: list[str]) -> str:
    """The figures as a small markdown table."""
    s = figures["setting"]
    lines = [
        f"{figures['videos']} videos x {s['frames']} frames at {s['fps']:g} fps, {s['size'][0]}x{s['size'][1]}; "
        f"{figures['clips']} clips of {s['num_frames']} frames, stride {s['stride']}, "
        f"at {s['resolution'][0]}x{s['resolution'][1]}",
        "",
        "| method | clips/s | seconds | vs full_decode |",
        "|---|---:|---:|---:|",
    ]
    for name in methods:
        f = figures[name]
        lines.append(f"| {name} | {f['clips_per_s']:.1f} | {f['seconds']:.2f} | {f['speedup']:.2f}x |")
    if "dataset_vs_decord" in figures:
        lines += ["", f"dataset / decord: {figures['dataset_vs_decord']:.2f}x"]
    return "\n".join(lines)


def _pair(text: str) -> tuple[int, int]:
    first, second = text.lower().split("x")
    return int(first), int(second)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_sampling", description=__doc__.split("\n")[0])
    default = Setting()
    parser.add_argument("--smoke", action="store_true", help="2 tiny videos, 1 repeat (overrides the rest)")
    parser.add_argument("--videos", type=int, default=default.videos)
    parser.add_argument("--frames", type=int, default=default.frames, help="frames per video")
    parser.add_argument("--fps", type=float, default=default.fps)
    parser.add_argument("--size", type=_pair, default=default.size, help="video WIDTHxHEIGHT")
    parser.add_argument("--num-frames", type=int, default=default.num_frames, help="frames per clip")
    parser.add_argument("--stride", type=int, default=default.stride)
    parser.add_argument("--resolution", type=_pair, default=default.resolution, help="clip HEIGHTxWIDTH")
    parser.add_argument("--repeats", type=int, default=default.repeats, help="clips per video")
    parser.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the generated videos here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k in Setting.__dataclass_fields__}
    setting = SMOKE if args.smoke else replace(default, **fields)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    figures = run(setting, workdir=args.workdir)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
