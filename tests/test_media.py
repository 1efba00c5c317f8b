"""Media writers: exact size, frame count and frame rate read back with PyAV and Pillow; dispatch by suffix."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lvdm import media
from lvdm.media import read_image, save_media, to_uint8_frames, write_frames, write_gif, write_video


def _frames(f: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Distinct flat-coloured frames (video codecs keep flat colours close)."""
    colours = np.random.default_rng(seed).integers(16, 240, size=(f, 1, 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.broadcast_to(colours, (f, h, w, 3)))


def _probe(path: Path) -> dict:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return {
            "frames": len(decoded),
            "size": (stream.codec_context.width, stream.codec_context.height),
            "rate": stream.average_rate,
            "pix_fmt": stream.codec_context.pix_fmt,
            "pixels": np.stack(decoded),
        }


@pytest.mark.parametrize(
    ("size", "fps", "rate", "pix_fmt"),
    [
        ((16, 16), 8.0, Fraction(8), "yuv420p"),
        ((33, 17), 7.5, Fraction(15, 2), "yuv444p"),
        ((32, 18), 29.97, Fraction(2997, 100), "yuv420p"),
        ((16, 15), 30000 / 1001, Fraction(30000, 1001), "yuv444p"),
    ],
)
def test_mp4_exact_size_count_and_rate(tmp_path: Path, size: tuple[int, int], fps: float, rate: Fraction, pix_fmt):
    width, height = size
    frames = _frames(9, height, width)
    path = write_video(frames, tmp_path / "out.mp4", fps=fps)
    probe = _probe(path)
    assert probe["frames"] == 9 and probe["size"] == size
    assert probe["rate"] == rate and probe["pix_fmt"] == pix_fmt
    assert np.abs(probe["pixels"].astype(int) - frames).max() <= 4  # colours right (BT.709 written and tagged)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temp file left


def test_mp4_accepts_torch_and_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "clip.mp4"
    write_video(torch.from_numpy(_frames(3, 16, 16)), path)
    before = path.read_bytes()
    calls = []

    def failing(array, format):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("encoder died")
        return original(array, format=format)

    original = av.VideoFrame.from_ndarray
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(_frames(4, 16, 16, seed=1), path)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["clip.mp4"]


def test_bad_input_is_refused(tmp_path: Path) -> None:
    for frames in (
        np.zeros((2, 8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((0, 8, 8, 3), np.uint8),
    ):
        with pytest.raises(ValueError, match=r"uint8 \(f, h, w, 3\)"):
            write_video(frames, tmp_path / "x.mp4")
    for fps in (0, -1, float("nan"), 5000):
        with pytest.raises(ValueError, match="fps"):
            write_video(_frames(2, 8, 8), tmp_path / "x.mp4", fps=fps)
    with pytest.raises(ValueError, match="crf"):
        write_video(_frames(2, 8, 8), tmp_path / "x.mp4", crf=60)
    assert list(tmp_path.iterdir()) == []


def test_a_numpy_rate_is_a_rate(tmp_path: Path) -> None:
    """``fps=np.float32(7.5)`` (a rate computed with numpy) was refused with "fps must be in 0.01 .. 1000, got 7.5":
    ``Fraction`` takes no numpy float. It is 15/2 as 7.5 is; ``True`` and a tensor are no rate."""
    for fps, rate in ((np.float32(7.5), Fraction(15, 2)), (np.float16(12), Fraction(12)), (np.int64(8), Fraction(8))):
        assert _probe(write_video(_frames(2, 8, 8), tmp_path / "n.mp4", fps=fps))["rate"] == rate
        (tmp_path / "n.mp4").unlink()
        with Image.open(write_gif(_frames(2, 8, 8), tmp_path / "n.gif", fps=fps)) as gif:
            assert gif.info["duration"] == round(1000 / rate, -1)
        (tmp_path / "n.gif").unlink()
    for fps in (True, torch.tensor(8.0), np.float32("nan")):
        with pytest.raises(ValueError, match=r"fps must be a number in 0.01 .. 1000, got"):
            write_video(_frames(2, 8, 8), tmp_path / "x.mp4", fps=fps)
    assert _probe(write_video(_frames(2, 8, 8), tmp_path / "x.mp4", fps=7.5))["rate"] == Fraction(15, 2)  # control


def test_gif_frame_count_and_duration(tmp_path: Path) -> None:
    frames = _frames(8, 12, 10)
    path = write_gif(frames, tmp_path / "out.gif", fps=8.0)
    with Image.open(path) as gif:
        assert gif.n_frames == 8 and gif.size == (10, 12) and gif.info["loop"] == 0
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
            assert np.abs(np.asarray(gif.convert("RGB")).astype(int) - frames[index]).max() <= 8
    assert all(d in (120, 130) for d in durations) and sum(durations) == 1000  # 125 ms in whole centiseconds
    with pytest.raises(ValueError, match="fps"):
        write_gif(frames, tmp_path / "fast.gif", fps=300)


def test_png_frames(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    paths = write_frames(frames, tmp_path / "frames")
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    for path, frame in zip(paths, frames, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), frame)  # lossless
    assert write_frames(frames[:1], tmp_path / "other", prefix="x")[0].name == "x_00000.png"
    (tmp_path / "frames" / "notes.txt").write_text("mine")
    (tmp_path / "frames" / "x_00007.png").write_bytes(b"mine")  # not a name this write uses
    # fewer frames over more: the old frames past the new end went on showing as part of the video
    assert [p.name for p in write_frames(frames[:2], tmp_path / "frames")] == ["frame_00000.png", "frame_00001.png"]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [
        "frame_00000.png", "frame_00001.png", "notes.txt", "x_00007.png"]  # fmt: skip


def test_save_media_dispatch(tmp_path: Path) -> None:
    frames = _frames(2, 8, 8)
    assert _probe(save_media(frames, tmp_path / "a.mp4", fps=12))["rate"] == 12
    assert Image.open(save_media(frames, tmp_path / "b.GIF")).n_frames == 2
    assert [p.name for p in save_media(frames, tmp_path / "c")] == ["frame_00000.png", "frame_00001.png"]
    assert len(save_media(frames, f"{tmp_path / 'd.v2'}/")) == 2  # a trailing slash means a folder
    for bad in ("e.avi", "f.png"):
        with pytest.raises(ValueError, match=r"'\.mp4', '\.gif', or a folder"):
            save_media(frames, tmp_path / bad)
    assert set(media.WRITERS) == {"mp4", "gif", "png"}


def test_to_uint8_frames() -> None:
    video = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0, 0.999]).reshape(1, 1, 1, 8).repeat(2, 3, 1, 1)
    video[1, 2] = 1.0
    out = to_uint8_frames(video.half())
    assert out.shape == (2, 1, 8, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 64, 128, 191, 255, 255, 0, 255]  # round half to even, clamped
    assert out[1, 0, :, 2].tolist() == [255] * 8  # channel order: (f, 3, h, w) -> (f, h, w, 3)
    with pytest.raises(ValueError, match="NaN"):
        to_uint8_frames(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(f, 3, h, w\)"):
        to_uint8_frames(torch.zeros(3, 2, 2))


def test_read_image_modes(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((6, 4), 200, np.uint8)).save(gray)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 4), 65535, np.uint16)).save(deep)
    alpha = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 6), (10, 20, 30, 0)).save(alpha)
    assert read_image(gray)[0, 0].tolist() == [200, 200, 200]
    assert read_image(deep)[0, 0].tolist() == [255, 255, 255]  # 16-bit scaled, not clipped
    assert read_image(alpha).shape == (6, 4, 3)
    assert read_image(gray, size=(8, 3)).shape == (3, 8, 3)  # size is (width, height)


def test_an_exclusive_write_without_hard_links_leaves_no_placeholder_when_it_fails(tmp_path, monkeypatch) -> None:
    """Where the file system has no hard links, an exclusive write claims the name with an empty file and renames
    over it; a rename that then failed left that empty file where the output goes, blocking the retry ("exists").
    The control: the rename succeeding writes the file."""
    import errno

    from lvdm.errors import OutputWriteError
    from lvdm.fileio import atomic_path

    def no_links(*args):
        raise OSError(errno.EPERM, "no hard links here")

    def failing_rename(*args):
        raise OSError(errno.EIO, "input/output error")

    rename = os.replace
    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "replace", failing_rename)
    out = tmp_path / "clip.txt"
    with pytest.raises((OutputWriteError, OSError)):
        with atomic_path(out, exclusive=True) as temp:
            temp.write_text("the video")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "replace", rename)
    with atomic_path(out, exclusive=True) as temp:
        temp.write_text("the video")
    assert out.read_text() == "the video" and sorted(p.name for p in tmp_path.iterdir()) == ["clip.txt"]
