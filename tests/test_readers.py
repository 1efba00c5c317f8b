"""Video readers: exact frames in the asked order (seeking included), decoding at a size, probing, and one clear
VideoReadError (never another exception, never a hang) for every bad input a scraped folder holds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvdm.data import pyav_reader, readers
from lvdm.data.readers import VideoReadError, probe, read_frames, read_image
from lvdm.testing import clips

READER_NAMES = readers.available_readers()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
TIMEOUT = 20.0  # generous bound on every call: a hang fails the test instead of stalling the run
LONG = 300  # frames of the seek clip

MUST_FAIL_REASON = {  # bad input -> a word its reason must contain
    "zero_byte": "zero-byte",
    "truncated_10": "truncated",
    "truncated_50": "truncated",
    "truncated_99": "truncated",
    "truncated_webm": "truncated|too short",  # decord counts the packets that are there: 24 of 64
    "text_as_mp4": "text",
    "png_as_mp4": "PNG",
    "audio_only": "no video stream",
    "unreadable": "permission denied",
}
PROBE_PASSES = {"truncated_webm"}  # header intact and no sample index to check: only decoding finds the cut
DECORD_REFUSES = {"tiny_8x8", "tall_16x4096", "rotated"}  # decord 0.6 gets these wrong; auto falls back to PyAV
NOT_INDEXED = {"tiny_8x8", "tall_16x4096"}  # written with the "shapes" pattern (too small or thin for "index")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Index-pattern clips at 24/30/60 fps, a 300-frame clip for seeking and a WebM, written once."""
    root = tmp_path_factory.mktemp("clips")
    out = {
        f"fps{fps}": clips.write_clip(root / f"index_{fps}.mp4", num_frames=32, fps=fps, pattern="index")
        for fps in (24, 30, 60)
    }
    out["long"] = clips.write_clip(root / "long.mp4", num_frames=LONG, fps=30, size=(64, 32), pattern="index")
    out["webm"] = clips.write_clip(root / "clip.webm", num_frames=20, pattern="index", codec="libvpx-vp9")
    return out


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    return {name: write(root) for name, write in clips.BAD_INPUTS.items()}


def indices_of(frames: np.ndarray) -> list[int]:
    return [clips.decode_index(frame) for frame in frames]


# --- exact frames, order, seeking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READER_NAMES)
@pytest.mark.parametrize("fps", [24, 30, 60])
def test_frames_are_the_requested_ones_in_the_requested_order(media, reader: str, fps: int) -> None:
    wanted = [5, 0, 17, 17, 31, 2, 30]
    frames = read_frames(media[f"fps{fps}"], wanted, reader=reader, timeout=TIMEOUT)
    assert frames.shape == (len(wanted), 48, 64, 3) and frames.dtype == np.uint8
    assert indices_of(frames) == wanted


@pytest.mark.parametrize("reader", READER_NAMES)
@pytest.mark.parametrize("wanted", [list(range(150, 182, 2)), list(range(284, 300)), [299, 151, 150, 299], [298]])
def test_middle_and_end_of_a_long_clip(media, reader: str, wanted: list[int]) -> None:
    assert indices_of(read_frames(media["long"], wanted, reader=reader, timeout=TIMEOUT)) == wanted


def count_decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``pyav_reader.decode_frames`` count the frames it yields into the returned one-item list."""
    count, decode = [0], pyav_reader.decode_frames

    def counting(*args):
        for frame in decode(*args):
            count[0] += 1
            yield frame

    monkeypatch.setattr(pyav_reader, "decode_frames", counting)
    return count


def test_pyav_seeks_instead_of_decoding_from_the_start(media, monkeypatch: pytest.MonkeyPatch) -> None:
    count = count_decoded(monkeypatch)
    assert indices_of(read_frames(media["long"], [290, 295], reader="pyav")) == [290, 295]
    assert count[0] < 60, f"decoded {count[0]} frames for frames 290-295: the seek did not happen"


def test_pyav_falls_back_to_decoding_from_the_start_when_timestamps_disagree(media, monkeypatch) -> None:
    """A wrong index -> pts mapping (as in a file with lying timestamps) is caught and the file is read in order."""
    step = pyav_reader._seek_step
    monkeypatch.setattr(pyav_reader, "_seek_step", lambda stream: step(stream) * 1.37)
    count = count_decoded(monkeypatch)
    assert indices_of(read_frames(media["long"], [200, 210], reader="pyav")) == [200, 210]
    assert count[0] > 200


def test_open_gop_seeks_return_exactly_the_sequential_frames(bad_inputs, monkeypatch: pytest.MonkeyPatch) -> None:
    """x265 defaults: FFmpeg's seek can land past the frame (leading frames of an open GOP are dropped); the
    reader seeks again further back instead of giving up or returning a later frame."""
    path = bad_inputs["hevc_open_gop"]
    everything = read_frames(path, range(120), reader="pyav")
    monkeypatch.setattr(readers.PyAVReader, "_collect", failing_on_fallback(readers.PyAVReader._collect))
    for start in range(1, 104, 5):
        wanted = list(range(start, start + 16, 3))
        assert np.array_equal(read_frames(path, wanted, reader="pyav"), everything[wanted])


def failing_on_fallback(collect):
    """Wrap ``PyAVReader._collect`` so that falling back to decoding from the start fails the test."""

    def strict(self, path, wanted, size, seek):
        assert seek, "fell back to decoding from the start"
        return collect(self, path, wanted, size, seek)

    return strict


def test_webm_seek(media) -> None:
    assert indices_of(read_frames(media["webm"], [19, 11, 12], reader="pyav")) == [19, 11, 12]


# --- size and probe -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", READER_NAMES)
@pytest.mark.parametrize("size", [(32, 24), (40, 16), (33, 17), (96, 72)])
def test_decodes_at_the_requested_size(media, reader: str, size: tuple[int, int]) -> None:
    frames = read_frames(media["fps24"], [3, 9], size=size, reader=reader, timeout=TIMEOUT)
    assert frames.shape == (2, size[1], size[0], 3)
    assert indices_of(frames) == [3, 9]


@pytest.mark.parametrize("fps", [24, 30, 60])
def test_probe_reads_count_rate_and_size(media, fps: int) -> None:
    assert probe(media[f"fps{fps}"]) == readers.VideoInfo(num_frames=32, fps=float(fps), width=64, height=48)


def test_probe_estimates_the_count_of_a_container_without_one(media) -> None:
    assert probe(media["webm"]) == readers.VideoInfo(num_frames=20, fps=24.0, width=64, height=48)


def test_probe_of_awkward_files(bad_inputs) -> None:
    assert probe(bad_inputs["rotated"]) == readers.VideoInfo(8, 24.0, width=48, height=64)  # display size
    assert probe(bad_inputs["odd_size"]) == readers.VideoInfo(8, 24.0, width=33, height=17)
    assert probe(bad_inputs["fps_0"]).fps is None and probe(bad_inputs["fps_0"]).num_frames == 8
    assert probe(bad_inputs["fps_1000"]).fps is None  # absurd: treated as missing
    vfr = probe(bad_inputs["vfr"])
    assert vfr.num_frames == 24 and 15 < vfr.fps < 25
    # mkv and webm state no count: not duration x rate, which over-counts a variable rate (the clip was "truncated")
    assert probe(bad_inputs["vfr_mkv"]).num_frames == probe(bad_inputs["vfr_webm"]).num_frames == 24


def test_a_header_declaring_a_frame_too_large_for_ffmpeg_is_named_for_it(tmp_path: Path) -> None:
    """FFmpeg refuses a frame over about 16300x16300 px with EBUSY, which PyAV reported as "Device or resource
    busy" (read as a locked file)."""
    for side in (16400, 16000):  # the control: a frame FFmpeg takes is refused for another reason (no frames)
        path = tmp_path / f"{side}.y4m"
        path.write_bytes(f"YUV4MPEG2 W{side} H{side} F25:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(1000))
        with pytest.raises(VideoReadError) as error:
            read_frames(path, [0], reader="pyav", timeout=TIMEOUT)
        assert ("frame too large" in str(error.value)) == (side == 16400), error.value
        assert "busy" not in str(error.value)


# --- bad inputs -----------------------------------------------------------------------------------------------------


def check_content(name: str, frames: np.ndarray) -> None:
    """Index-pattern inputs must come back as frames 0, 1, 2, ... (rotated: turned to its display orientation)."""
    if name in NOT_INDEXED:
        return
    if name == "rotated":  # coded 64x48, shown turned 90 degrees counter-clockwise: undo it to read the index
        frames = np.stack([np.rot90(frame, -1) for frame in frames])
    assert indices_of(frames) == list(range(len(frames)))


@pytest.mark.parametrize("reader", [*READER_NAMES, "auto"])
@pytest.mark.parametrize("name", sorted(n for n, ok in clips.EXPECT_READABLE.items() if ok))
def test_readable_inputs_are_read(bad_inputs, name: str, reader: str) -> None:
    info = probe(bad_inputs[name], timeout=TIMEOUT)
    if reader == "decord" and name in DECORD_REFUSES:
        with pytest.raises(VideoReadError, match="decord"):
            read_frames(bad_inputs[name], range(info.num_frames), reader=reader, timeout=TIMEOUT)
        return
    frames = read_frames(bad_inputs[name], range(info.num_frames), reader=reader, timeout=TIMEOUT)
    assert frames.shape == (info.num_frames, info.height, info.width, 3) and frames.dtype == np.uint8
    check_content(name, frames)


@pytest.mark.parametrize("reader", [*READER_NAMES, "auto"])
@pytest.mark.parametrize("name", sorted(n for n, ok in clips.EXPECT_READABLE.items() if not ok))
def test_bad_inputs_raise_video_read_error_with_a_reason(bad_inputs, name: str, reader: str) -> None:
    if name == "unreadable" and IS_ROOT:
        pytest.skip("running as root: chmod 000 does not stop root (test_vanished_file covers the missing file)")
    path = bad_inputs[name]
    if name not in PROBE_PASSES:
        with pytest.raises(VideoReadError, match=MUST_FAIL_REASON[name]):
            probe(path, timeout=TIMEOUT)
    with pytest.raises(VideoReadError, match=MUST_FAIL_REASON[name]) as error:
        read_frames(path, range(64), reader=reader, timeout=TIMEOUT)
    assert error.value.path == str(path) and str(path) in str(error.value)


@pytest.mark.parametrize("reader", [*READER_NAMES, "auto"])
def test_vanished_file(bad_inputs, tmp_path: Path, reader: str) -> None:
    """Deleted between probe and read (what chmod 000 cannot show when running as root)."""
    path = clips.write_clip(tmp_path / "gone.mp4", num_frames=4)
    probe(path)
    path.unlink()
    with pytest.raises(VideoReadError, match="not found"):
        read_frames(path, [0, 1], reader=reader)


def test_permission_denied_is_named_even_as_root(media, monkeypatch: pytest.MonkeyPatch) -> None:
    """root ignores chmod 000, so the refusal is simulated where the reader first opens the file."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pyav_reader, "open", refuse, raising=False)  # shadows the builtin where files are checked
    for call in (lambda: probe(media["fps24"]), lambda: read_frames(media["fps24"], [0])):
        with pytest.raises(VideoReadError, match="permission denied"):
            call()


@pytest.mark.parametrize("reader", [*READER_NAMES, "auto"])
def test_an_index_past_the_end_is_an_error_not_a_repeat(bad_inputs, reader: str) -> None:
    with pytest.raises(VideoReadError, match="too short: frame 4 requested, the video has 4 frames"):
        read_frames(bad_inputs["short"], [0, 4], reader=reader)


def test_truncated_without_an_index_says_how_far_it_got(bad_inputs) -> None:
    with pytest.raises(VideoReadError, match=r"truncated: decoded \d+ of 64 frames"):
        read_frames(bad_inputs["truncated_webm"], [62, 63], reader="pyav")


# --- timeout and fallback -------------------------------------------------------------------------------------------


def test_a_hung_decoder_times_out_with_the_file_named(media, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers.PyAVReader, "read", lambda self, *args: time.sleep(3))
    start = time.monotonic()
    with pytest.raises(VideoReadError, match="decode timed out after 0.2s") as error:
        read_frames(media["fps24"], [0], reader="pyav", timeout=0.2)
    assert time.monotonic() - start < 1.5
    assert error.value.path == str(media["fps24"])


def test_a_hung_probe_times_out(media, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "_probe", lambda path: time.sleep(3))
    with pytest.raises(VideoReadError, match="probe timed out after 0.2s"):
        probe(media["fps24"], timeout=0.2)


def test_auto_falls_back_to_pyav_when_decord_fails(media, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(self, path, indices, size):
        calls.append(path)
        raise VideoReadError(path, "decord: simulated failure")

    monkeypatch.setattr(readers, "AUTO_ORDER", ("decord", "pyav"))
    monkeypatch.setattr(readers.DecordReader, "available", staticmethod(lambda: True))
    monkeypatch.setattr(readers.DecordReader, "read", failing)
    assert indices_of(read_frames(media["fps24"], [7, 1])) == [7, 1]
    assert calls == [str(media["fps24"])]
    with pytest.raises(VideoReadError, match="simulated"):
        read_frames(media["fps24"], [7, 1], reader="decord")


def test_bad_arguments_are_value_errors(media) -> None:
    for indices, kwargs in (([], {}), ([-1], {}), ([0], {"reader": "opencv"}), ([0], {"size": (0, 4)})):
        with pytest.raises(ValueError):
            read_frames(media["fps24"], indices, **kwargs)


# --- images ---------------------------------------------------------------------------------------------------------

IMAGES = {  # name -> (Pillow image, expected RGB of its top-left pixel)
    "rgb.png": (Image.new("RGB", (20, 10), (10, 200, 30)), (10, 200, 30)),
    "gray.png": (Image.new("L", (20, 10), 128), (128, 128, 128)),
    "gray16.png": (Image.new("I;16", (20, 10), 65535), (255, 255, 255)),
    "alpha.png": (Image.new("RGBA", (20, 10), (200, 100, 50, 0)), (200, 100, 50)),
    "palette.gif": (Image.new("P", (20, 10), 0), (0, 0, 0)),
    "photo.jpg": (Image.new("RGB", (20, 10), (250, 250, 250)), (250, 250, 250)),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_read_image_converts_every_mode_to_rgb(tmp_path: Path, name: str) -> None:
    image, rgb = IMAGES[name]
    image.save(tmp_path / name)
    frames = read_image(tmp_path / name)
    assert frames.shape == (1, 10, 20, 3) and frames.dtype == np.uint8
    assert np.abs(frames[0, 0, 0].astype(int) - rgb).max() <= 3
    assert read_image(tmp_path / name, size=(8, 6)).shape == (1, 6, 8, 3)


def test_read_image_prints_no_warnings_of_pillows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A palette PNG with transparency and an image over Pillow's warning size each printed a warning (two lines on
    stderr) before sampling went on; a 16-bit image is scaled, not clipped."""
    import warnings

    palette = Image.new("P", (20, 10), 1)
    palette.putpalette([0, 0, 0, 40, 80, 120] + [0] * 762)
    palette.save(tmp_path / "clear.png", transparency=bytes([0, 255] + [255] * 254))
    Image.new("I;16", (20, 10), 32896).save(tmp_path / "mid16.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # 200 pixels: over the warning's size, under the error's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "clear.png")[0, 0, 0].tolist() == [40, 80, 120]
        assert read_image(tmp_path / "mid16.png")[0, 0, 0].tolist() == [128, 128, 128]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # the control: the bomb guard still refuses
    with pytest.raises(VideoReadError, match="decompression bomb"):
        read_image(tmp_path / "clear.png")


def test_read_image_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (20, 10)).save(tmp_path / "phone.jpg", exif=exif)
    assert read_image(tmp_path / "phone.jpg").shape == (1, 20, 10, 3)


def test_read_image_failures(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("hello")
    Image.new("RGB", (64, 64)).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:60])
    expected = {"empty.png": "zero-byte", "notes.png": "not an image", "cut.png": "corrupt", "gone.png": "not found"}
    for name, reason in expected.items():
        with pytest.raises(VideoReadError, match=reason):
            read_image(tmp_path / name)


# --- the synthetic clips themselves ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 16), (64, 48), (33, 17), (200, 20)])
def test_index_pattern_round_trips(size: tuple[int, int]) -> None:
    frames = list(clips.PATTERNS["index"](300, size, 0))
    assert [clips.decode_index(frame) for frame in frames] == list(range(300))
    assert clips.decode_index(clips._index_frame(4095, size)) == 4095


def test_captioned_folder_describes_its_moving_shapes(tmp_path: Path) -> None:
    root = clips.write_captioned_folder(tmp_path / "data", n=4, num_frames=8, seed=3)
    videos = sorted(root.rglob("*.mp4"))
    assert len(videos) == 4 and any(v.parent.name == "nested" for v in videos)
    for i, video in enumerate(sorted(videos, key=lambda v: v.name)):
        caption = video.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption == clips.caption_for(3 + i)
        colour, direction = caption.split()[1], caption.split()[-1]
        frames = read_frames(video, [0, 7]).astype(int)
        mask = np.abs(frames - clips._COLOURS[colour]).sum(-1) < 60  # n h w 3 -> n h w: pixels of the shape
        dy, dx = np.argwhere(mask[1]).mean(axis=0) - np.argwhere(mask[0]).mean(axis=0)  # (y, x) centre moved
        moved = [int(np.sign(d)) if abs(d) > 2 else 0 for d in (dx, dy)]
        assert moved == list(clips._DIRECTIONS[direction]), (caption, dx, dy)


def test_a_video_lvdm_wrote_above_240_fps_keeps_its_rate_when_read_back(tmp_path):
    """sample.py writes up to 1000 fps (a 16x interpolation of 24 fps is 384); read back to upscale, continue or
    interpolate, such a video fell to 8 fps (or the module's rate) without a word, as the reader takes rates above
    240 for a damaged header. Training still does (``fps``); re-rendering takes the stated rate. The control: a
    24 fps video reads 24 both ways."""
    from lvdm.context_sampling import read_context
    from lvdm.media import write_video

    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    for rate in (384.0, 24.0):
        path = write_video(frames, tmp_path / f"at_{rate:g}.mp4", fps=rate)
        info = probe(path)
        assert info.playback_fps() == pytest.approx(rate) and info.stated_fps == pytest.approx(rate)
        assert info.fps == (None if rate > readers.MAX_FPS else pytest.approx(rate))
        assert read_context(path, 16, 16, what="video").fps == pytest.approx(rate)
