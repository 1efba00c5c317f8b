"""A scripting user's mistakes with the Python API: each a one-line :class:`~lvdm.errors.ConfigError` naming the
argument, where a helper's audit found raw torch, numpy, pathlib or tokenizer errors, a message blaming something
else, or the mistake taken silently. Each refusal has a control beside it: the right form of the same argument."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_sampling_files

from lvdm import UpscalePipeline, VideoPipeline
from lvdm.errors import ConfigError, OutputWriteError
from lvdm.sampling_settings import MAX_SEED

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"num_inference_steps": 2, "num_frames": 2, "height": 16, "width": 16, "progress": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sampling_files(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def pipe(files):
    return VideoPipeline.from_pretrained(files["a"], temporal=files["module"])


@pytest.fixture(scope="module")
def upscaler(tiny_assets):
    return UpscalePipeline.from_pretrained(tiny_assets["upscaler"])


def test_paths_and_loras_of_the_wrong_kind(files, tmp_path):
    for kwargs in ({"base": None}, {"base": 3}, {"base": files["a"], "temporal": 3}):
        with pytest.raises(ConfigError, match=r"expected a path \(str or os.PathLike\), got"):
            VideoPipeline.from_pretrained(**kwargs)
    missing = tmp_path / "style.safetensors"
    for one in (f"{missing}:0.7", missing, str(missing)):  # one LoRA, not in a list: was read a character at a time
        with pytest.raises(Exception, match=f"LoRA {missing} does not exist"):
            VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=one)
    for scale in (float("inf"), float("nan"), "0.7", True):  # an infinite scale blamed the base's weights
        with pytest.raises(ConfigError, match="the scale must be a finite number"):
            VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=[(files["lora"], scale)])
    with pytest.raises(ConfigError, match="expected a path, 'PATH:SCALE' or a"):
        VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=[3])
    for kwargs in ({"base": ""}, {"base": files["a"], "temporal": ""}):  # Path("") is the working folder
        with pytest.raises(ConfigError, match="an empty path; give a file or folder"):
            VideoPipeline.from_pretrained(**kwargs)
    with pytest.raises(ConfigError, match="LoRA '': an empty path"):
        VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=[""])
    with pytest.raises(ConfigError, match="is a diffusers folder, which gives its own architecture"):
        VideoPipeline.from_pretrained(files["a"], base_config=files["a"])  # the folder's own: base_config ignored
    # the control: one LoRA alone loads as the same LoRA in a list does
    alone = VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=(files["lora"], np.float64(0.7)))
    listed = VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=[f"{files['lora']}:0.7"])
    for a, b in zip(alone.base.unet.parameters(), listed.base.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_allow_pickle_must_be_a_bool(files, tmp_path, tiny_assets):
    """``allow_pickle="no"`` was truthy: a pickle-based ``.ckpt`` base loaded, the one thing the user had said no to
    (and its sidecars recorded ``"no"``). Now a ConfigError naming it, in every loader that takes it; numpy's
    ``True`` loads, and its sidecar (a TypeError once its video was written) says ``true``."""
    from safetensors.torch import load_file

    from lvdm import load_base

    ckpt = tmp_path / "b.ckpt"
    torch.save({"state_dict": load_file(files["b"])}, ckpt)
    for value in ("no", "false", 0, None):
        with pytest.raises(ConfigError, match=f"allow_pickle must be True or False, got {value!r}"):
            VideoPipeline.from_pretrained(ckpt, base_config=files["a"], allow_pickle=value)
        with pytest.raises(ConfigError, match="allow_pickle must be True or False"):
            load_base(ckpt, base_config=files["a"], allow_pickle=value)
        with pytest.raises(ConfigError, match="allow_pickle must be True or False"):
            UpscalePipeline.from_pretrained(tiny_assets["upscaler"], allow_pickle=value)
    # the controls: False refuses the pickle, True loads it
    with pytest.raises(Exception, match="pickle-based '.ckpt' file, which can run code"):
        VideoPipeline.from_pretrained(ckpt, base_config=files["a"], allow_pickle=False)
    pickled = VideoPipeline.from_pretrained(ckpt, base_config=files["a"], allow_pickle=np.bool_(True))
    saved = pickled("x", seed=0, **FAST).save(tmp_path / "x.mp4")  # numpy's True was recorded: no JSON for its sidecar
    assert json.loads((tmp_path / "x.mp4.json").read_text())["model"]["allow_pickle"] is True and saved


def test_a_dtype_sidecars_cannot_replay_is_refused(files, tmp_path):
    """``dtype=torch.float64`` sampled, and its sidecar recorded ``"torch.float64"``, which ``from_pretrained`` (and
    ``sample.py --from-json``) then refused: the video could not be replayed; ``torch.int8`` was a CheckpointError
    blaming the base's folder. Only the dtypes a sidecar names are taken, as a string or a torch dtype."""
    for dtype in (torch.float64, torch.int8, "float16", "fp64", 16):
        with pytest.raises(ConfigError, match=r"dtype: expected one of \['bf16', 'fp16', 'fp32'\]"):
            VideoPipeline.from_pretrained(files["a"], temporal=files["module"], dtype=dtype)
    # the control: a torch dtype of the list, recorded by its name, from which the sidecar's replay loads
    pipe = VideoPipeline.from_pretrained(files["a"], temporal=files["module"], dtype=torch.bfloat16)
    model = pipe("x", seed=0, **FAST).metadata[0]["model"]
    assert model["dtype"] == "bf16" and VideoPipeline.from_pretrained(**model).dtype == torch.bfloat16


def test_prompts_seeds_and_noise(pipe, tmp_path):
    for prompt in (None, 5, b"x", {"a", "b"}, frozenset("a"), {"a": "b"}):  # a set was sampled in hash order
        with pytest.raises(ConfigError, match="prompt must be a string or a non-empty list of strings"):
            pipe(prompt, **FAST)
        with pytest.raises(ConfigError, match="prompt must be a string or a non-empty list of strings"):
            pipe.render(prompt, tmp_path / "unordered", **FAST)
    # video k uses seed + k, and its sidecar must replay it: past MAX_SEED it could not
    with pytest.raises(ConfigError, match="the last of 2 videos would use seed"):
        pipe(["a", "b"], seed=MAX_SEED, **FAST)
    with pytest.raises(ConfigError, match="the last of 2 videos would use seed"):  # before the first is written
        pipe.render(["a", "b"], tmp_path / "out", seed=MAX_SEED, **FAST)
    assert not (tmp_path / "out").exists()
    assert len(pipe(iter(["a", "b"]), **FAST)) == 2  # the control: any iterable of strings is a list of prompts
    with pytest.raises(ConfigError, match="more than 1,000,000 prompts in one call"):  # it filled memory, endlessly
        pipe(itertools.cycle(["a", "b"]), **FAST)
    # progress="no" was truthy: it showed the bar
    clip = np.zeros((2, 8, 8, 3), np.uint8)
    for call in (lambda: pipe("a", **{**FAST, "progress": "no"}),
                 lambda: pipe.render(["a"], tmp_path / "bar", **{**FAST, "progress": 0}),
                 lambda: pipe.interpolate(clip, **{**FAST, "progress": None})):  # fmt: skip
        with pytest.raises(ConfigError, match="progress must be True or False"):
            call()
    assert not (tmp_path / "bar").exists()
    # overwrite="no" was truthy too: it replaced the very file it was meant to keep
    taken = tmp_path / "taken.mp4"
    taken.write_bytes(b"the user's video")
    out = pipe("a", **FAST)
    for call in (lambda: out.save(taken, overwrite="no"),
                 lambda: pipe.render(["a"], taken, **{**FAST, "overwrite": "no"})):  # fmt: skip
        with pytest.raises(ConfigError, match="overwrite must be True or False, got 'no'"):
            call()
    for path in (None, b"x.mp4", 5):
        with pytest.raises(ConfigError, match="path must be a file or folder path"):
            out.save(path)
    assert taken.read_bytes() == b"the user's video"
    for keep in ({}, {"overwrite": False}):  # the default kept it too: a user's own file of the same name is theirs
        with pytest.raises(OutputWriteError, match="taken.mp4 exists"):
            out.save(taken, **keep)
        assert taken.read_bytes() == b"the user's video" and not (tmp_path / "taken.mp4.json").exists()
    assert out.save(taken, overwrite=True) == [taken] and taken.read_bytes()[4:8] == b"ftyp"  # the control: replaced
    shape = (1, 4, 2, 8, 8)  # the tiny VAE downsamples by 2
    for latents, message in (
        (np.zeros(shape, np.float32), "a ndarray"),
        (torch.zeros(shape, dtype=torch.int64), "a cpu torch.int64 tensor"),
        (torch.zeros(shape, device="meta"), "not on meta"),
        (torch.full(shape, float("nan")), "latents holds NaN"),
    ):
        with pytest.raises(ConfigError, match=message):  # a NaN came out as "the sampled video holds NaN"
            pipe("x", latents=latents, **FAST)
    mixed = {**FAST, "noise_prior": "mixed"}
    for base_noise, message in (
        (1.5, "an int seed or a tensor"),
        (True, "an int seed or a tensor"),
        (-1, "a seed must be in 0 .. "),
        (2**70, "a seed must be in 0 .. "),
        (np.zeros((1, 4, 1, 8, 8), np.float32), "an int seed or a tensor"),
        (np.float64(3), "an int seed or a tensor"),
        (torch.full((1, 4, 1, 8, 8), float("inf")), "base_noise holds NaN"),
        (torch.zeros(4, 1, 8, 8), r"base_noise must be \(1, 4, 1, 8, 8\)"),
    ):
        with pytest.raises(ConfigError, match=message):
            pipe("x", base_noise=base_noise, **mixed)
    for settings, message in (
        ({"threshold": "clamp:nan"}, "values must be finite"),
        ({"guidance_scale": 10**400}, "guidance_scale: must be <= 100"),  # float() raised OverflowError
        ({"guidance_scale": np.float32("nan")}, "guidance_scale: must be a number in -100 .. 100, got nan"),
        ({"guidance_scale": torch.tensor(3.0)}, r"guidance_scale: expected float or null, got tensor\(3.\)"),
        ({"context_guidance": float("inf")}, "context_guidance: must be <= 100"),
        ({"image_scale": 1e300}, "image_scale: must be <= 100"),
    ):
        with pytest.raises(ConfigError, match=message):
            pipe("x", **FAST, **settings)
    # the controls: the last seed there is for one video, and given noise of the right kind
    seeds = [record["seed"] for record in pipe(["a", "b"], seed=MAX_SEED - 1, **FAST).metadata]
    assert seeds == [MAX_SEED - 1, MAX_SEED]
    given = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(pipe("x", latents=given, **FAST).frames, pipe("x", latents=given.clone(), **FAST).frames)
    assert pipe("x", base_noise=np.int64(3), seed=0, **mixed).metadata[0]["base_noise"] == 3
    # numpy's numbers are numbers, whatever their width: np.float64 was taken and np.float32 or np.int64 refused
    python = {"guidance_scale": 3.0, "num_frames": 2, "seed": 5, "fps": 6.0, "image_mode": False}
    given = {"guidance_scale": np.float32(3), "num_frames": np.int64(2), "seed": np.uint64(5), "fps": np.int32(6),
             "image_mode": np.bool_(False)}  # fmt: skip
    small = {key: value for key, value in FAST.items() if key != "num_frames"}
    a, b = pipe("x", **small, **python), pipe("x", **small, **given)
    assert np.array_equal(a.frames, b.frames) and a.metadata == b.metadata
    assert all(type(b.metadata[0]["settings"][key]) is type(value) for key, value in python.items())


def test_a_negative_prompt_that_is_not_utf8_is_one_line(files, pipe, tmp_path, command):
    """A prompt holding a byte that is not UTF-8 (a shell's ``$'\\xff'``) is refused by name; a negative prompt
    was not: the tokenizer's ``TypeError: TextEncodeInput must be Union[...]``, and ``sample.py --negative-prompt``
    printed its traceback."""
    for negative in ("a \udcff blur", ["fine", "a \udcff blur"]):
        with pytest.raises(ConfigError, match=r"negative_prompt 'a \\udcff blur' is not UTF-8 text"):
            pipe(["x", "y"], negative_prompt=negative, **FAST)
        with pytest.raises(ConfigError, match="is not UTF-8 text"):
            pipe.render(["x", "y"], tmp_path / "out", negative_prompt=negative, **FAST)
    sample = Path(__file__).resolve().parents[1] / "sample.py"
    args = ["--quiet", "--base", files["a"], "--temporal", files["module"], "--steps", "1", "--prompt", "x"]
    refused = command(sample, *args, "--negative-prompt", "a \udcff blur", "--out", tmp_path / "n.mp4")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert refused.stderr.endswith("is not UTF-8 text\n") and refused.stderr.count("\n") == 1, refused.stderr
    assert not list(tmp_path.iterdir())
    # the control: the same negative prompt in UTF-8
    assert pipe(["x", "y"], negative_prompt=["fine", "a \xff blur"], **FAST).metadata[1]["settings"]["negative_prompt"]


def test_base_noise_with_given_latents_is_refused(pipe):
    """``latents`` are the whole initial noise, so a ``base_noise`` beside them was taken and ignored: seeds 3 and 4
    gave the same video, and its sidecar said ``base_noise: 3``. Now a ConfigError before sampling."""
    given = torch.randn((1, 4, 2, 8, 8), generator=torch.Generator().manual_seed(0))
    mixed = {**FAST, "noise_prior": "mixed", "seed": 0}
    for base_noise in (3, torch.zeros(1, 4, 1, 8, 8)):
        with pytest.raises(ConfigError, match="base_noise is the shared part of the initial noise, which latents"):
            pipe("x", latents=given, base_noise=base_noise, **mixed)
    # the controls: either alone
    assert pipe("x", latents=given, **mixed).metadata[0]["initial_noise"] == "given"
    assert pipe("x", base_noise=3, **mixed).metadata[0]["base_noise"] == 3


def test_decoding_and_interpolating(pipe, command):
    latents = pipe("x", seed=0, **FAST).latents
    for value in (0, -1, 2.5, "2", None, True):
        with pytest.raises(ConfigError, match="chunk_frames must be an integer >= 1"):
            pipe.decode(latents, chunk_frames=value)
    for bad in (latents[:, :, :0], latents[:0], latents.numpy(), latents[0]):
        with pytest.raises(ConfigError, match=r"latents must be|latents must be a floating-point"):
            pipe.decode(bad)
    assert pipe.decode(latents, chunk_frames=np.int64(1)).shape == (1, 2, 16, 16, 3)  # the control
    keys = np.zeros((2, 16, 16, 3), np.uint8)
    for kwargs, message in (
        ({"factor": 4.0}, "factor must be 4 or 16"),
        ({"prompt": None}, "prompt must be a string"),
        ({"prompt": ["a", "b"]}, "prompt must be a string"),
        ({"num_frames": 9}, r"drop \['num_frames'\]"),
        ({"num_videos_per_prompt": 3}, r"drop \['num_videos_per_prompt'\]"),
        ({"context_frames": 3}, r"drop \['context_frames'\]"),  # taken and ignored: every frame given is used
        ({"image_as_first_frame": True}, r"drop \['image_as_first_frame'\]"),
    ):  # each checked before the module is asked whether it can interpolate (this one cannot)
        with pytest.raises(ConfigError, match=message):
            pipe.interpolate(keys, **kwargs)
    for factor in (4, np.int64(16), np.int32(4)):  # the control: past the argument checks (numpy's were refused)
        with pytest.raises(ConfigError, match="has no context support"):
            pipe.interpolate(keys, factor=factor, num_videos_per_prompt=1, context_frames=2)
    from pathlib import Path

    for flags, message in (
        (["--num-videos", "2"], "--interpolate makes one video: it does not take --num-videos"),
        (["--context-frames", "3"], "--interpolate gives every frame of its video: it does not take --context-frames"),
        (["--image-as-first-frame"], "it does not take --image-as-first-frame"),
    ):
        args = ["--base", "nowhere", "--interpolate", "nothing.mp4", "--out", "x.mp4", *flags]
        refused = command(Path(__file__).resolve().parents[1] / "sample.py", *args)
        assert refused.returncode == 2  # refused before anything loads (it was after the pipeline had loaded)
        assert message in refused.stderr and refused.stderr.count("\n") == 1, refused.stderr


def test_a_chunk_larger_than_the_video_decodes_it_in_one_call(pipe):
    """``decode_chunk_size=2**63`` (a "no chunking" any integer >= 1 allows) sampled every step, then failed in
    torch's split with "ValueError: Overflow when unpacking long long"; ``decode(chunk_frames=10**30)`` too."""
    small = pipe(["x", "y"], seed=0, **FAST)
    for chunk in (2**63, 10**30):
        assert np.array_equal(pipe(["x", "y"], seed=0, decode_chunk_size=chunk, **FAST).frames, small.frames)
        assert np.array_equal(pipe.decode(small.latents, chunk_frames=chunk), small.frames)
    assert np.array_equal(pipe.decode(small.latents, chunk_frames=4), small.frames)  # the control: all 4 frames


def test_saving(pipe, tmp_path):
    out = pipe("x", seed=0, **FAST)
    taken = tmp_path / "taken.mp4"
    taken.write_bytes(b"the user's")
    with pytest.raises(OutputWriteError, match="it was there before, or another run wrote it"):  # it said only
        out.save(taken, overwrite=False)  # "appeared while lvdm was writing it (another run?)"
    assert taken.read_bytes() == b"the user's"
    for index in (5, -2, "0", True, 0.0):
        with pytest.raises(ConfigError, match=r"index must be an integer in -1 .. 0"):
            out.save(tmp_path / "i.mp4", index=index)
    assert out.save(tmp_path / "last.mp4", index=np.int64(-1)) == [tmp_path / "last.mp4"]  # numpy and negative
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="it exists and is not a folder"):
        out.save(tmp_path / "fifo")
    assert out.save(tmp_path / "new.mp4", index=0, overwrite=False) == [tmp_path / "new.mp4"]  # the control


def test_saving_to_a_path_with_no_name_is_refused_by_name(pipe, tmp_path, monkeypatch):
    """``out.save("")``, ``save(".")`` and ``save("/")`` were pathlib's ``ValueError: PosixPath('.') has an empty
    name`` (the PNG folder's sidecar has no name to take); now a ConfigError naming the output."""
    monkeypatch.chdir(tmp_path)
    out = pipe("x", seed=0, **FAST)
    for path in ("", "  ", ".", Path("."), "/"):
        with pytest.raises(ConfigError, match=f"the output {str(path)!r} names no file or folder of its own"):
            out.save(path)
    assert not list(tmp_path.iterdir())
    assert out.save("frames") == [Path("frames")] and (tmp_path / "frames.json").is_file()  # the control


def test_saving_refuses_an_existing_output_before_writing_any(pipe, tmp_path):
    """An existing file met part-way left what was written before it: ``save("clip.mp4")`` of three videos with
    ``clip_002.mp4`` there wrote ``clip_000`` and ``clip_001`` (which then blocked a retry), a video whose sidecar's
    name was taken was written without one, and PNG frames went into a folder until one of its files was met."""
    out = pipe(["a", "b", "c"], seed=0, **FAST)
    (tmp_path / "clip_002.mp4").write_bytes(b"the user's")
    (tmp_path / "one.mp4.json").write_text("the user's notes")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "frame_00001.png").write_bytes(b"the user's")
    theirs = sorted(tmp_path.rglob("*"))
    for path, index, taken in (("clip.mp4", None, "clip_002.mp4"), ("one.mp4", 0, "one.mp4.json"),
                               ("frames", 1, "frames/frame_00001.png")):  # fmt: skip
        with pytest.raises(OutputWriteError, match=f"{tmp_path / taken} exists"):
            out.save(tmp_path / path, index=index)
        assert sorted(tmp_path.rglob("*")) == theirs, path
    assert (tmp_path / "clip_002.mp4").read_bytes() == b"the user's"
    # the controls: a free name and an empty folder are written, and overwrite replaces
    (tmp_path / "empty").mkdir()
    assert len(out.save(tmp_path / "free.mp4")) == 3 and len(out.save(tmp_path / "empty", index=0)) == 1
    assert len(list((tmp_path / "empty").iterdir())) == 2 and (tmp_path / "empty.json").is_file()
    assert out.save(tmp_path / "clip.mp4", overwrite=True)[2].read_bytes()[4:8] == b"ftyp"


def test_upscale_arguments(upscaler, tmp_path):
    video = np.zeros((2, 8, 8, 3), np.uint8)
    quick = {"num_inference_steps": 2, "progress": False, "seed": 0}
    for kwargs, message in (
        ({"fps": float("nan")}, r"fps must be a number in 0.01 .. 1000"),
        ({"fps": -5}, r"fps must be a number in 0.01 .. 1000"),
        ({"fps": 0}, r"fps must be a number in 0.01 .. 1000"),  # became 8, silently
        ({"fps": "8"}, r"fps must be a number in 0.01 .. 1000"),
        ({"fps": 0.001}, r"fps must be a number in 0.01 .. 1000"),  # an mp4's rate of 0, a GIF's delay overflowed
        ({"prompt": None}, "prompt must be a string"),
        ({"prompt": ["a", "b"]}, "prompt must be a string"),  # it was taken as a prompt and its negative
        ({"negative_prompt": ["x"]}, "negative_prompt must be a string"),
        ({"scheduler": "ddimm"}, "scheduler must be one of"),  # a plain ValueError
        ({"image_mode": "x"}, "image_mode must be True or False"),
        ({"progress": "no"}, "progress must be True or False"),
        ({"frame_norms": 1}, "frame_norms must be True, False or 'pooled'"),
        ({"norm_passes": 0}, r"norm_passes must be an integer in 1 \.\. 8"),
        ({"norm_passes": 2.0, "frame_norms": "pooled"}, "norm_passes must be an integer"),
        ({"norm_passes": 2}, "norm_passes=2 goes with frame_norms='pooled'"),
        ({"norm_passes": 2, "frame_norms": "pooled"}, "norm_passes=2 goes with tile"),  # nothing to pass over
        ({"latents": np.zeros((1, 4, 2, 8, 8), np.float32)}, "latents must be a floating-point torch.Tensor"),
        ({"latents": torch.full((1, 4, 2, 8, 8), float("nan"))}, "latents holds NaN"),
    ):
        with pytest.raises(ConfigError, match=message):
            upscaler(video, **{**quick, **kwargs})
    latents = upscaler(video, "a disc", fps=np.float32(12.5), frame_norms=np.bool_(True), **quick).latents  # control
    with pytest.raises(ConfigError, match=r"latents must be \(b, 4, f, h, w\)"):
        upscaler.decode(latents[0])
    with pytest.raises(ConfigError, match="tile_overlap must be"):
        upscaler.decode(latents, tile=8, tile_overlap=2.5)
    with pytest.raises(ConfigError, match="frame_norms=False goes with tile"):  # it decoded whole, as with True
        upscaler.decode(latents, frame_norms=False)
    assert upscaler.decode(latents).shape == (1, 2, 32, 32, 3)
    with pytest.raises(ConfigError, match="norm_passes=3 goes with frame_norms='pooled'"):
        upscaler.decode(latents, tile=8, norm_passes=3)
    with pytest.raises(ConfigError, match="norm_passes=3 goes with tile"):  # decode too: nothing to pass over
        upscaler.decode(latents, frame_norms="pooled", norm_passes=3)
    passes = upscaler(video, "a disc", tile=8, frame_norms="pooled", norm_passes=np.int64(3), **quick)  # control
    assert passes.metadata[0]["upscale"]["norm_passes"] == 3
    assert passes.save(tmp_path / "passes.mp4")  # a numpy count is recorded as a number JSON takes
    flagged = upscaler(video, "a disc", tile=8, frame_norms=np.bool_(True), **quick)  # np.bool_ was not JSON either
    assert flagged.save(tmp_path / "flagged.mp4") and flagged.metadata[0]["upscale"]["frame_norms"] is True
    decoder, upscaler.base.vae.decoder = upscaler.base.vae.decoder, torch.nn.Identity()
    try:  # a decoder whose middle cannot run apart: refused before any work, not after the sampling
        with pytest.raises(ConfigError, match="tile needs a VAE with diffusers' Decoder layout"):
            upscaler(video, "a disc", tile=8, **quick)
    finally:
        upscaler.base.vae.decoder = decoder


def test_a_misspelt_keyword_names_the_close_one_and_the_allowed(files, pipe, upscaler, tiny_assets):
    """Python's own TypeError names only the wrong keyword; the pipelines' entry points also say which one was
    meant and which they take, as a ConfigError that is still a TypeError. Each has its control: the right
    spelling runs."""
    from lvdm.errors import KeywordError

    video = np.zeros((2, 8, 8, 3), np.uint8)
    latents = torch.zeros((1, 4, 2, 8, 8))
    for call, message in (
        (
            lambda: VideoPipeline.from_pretrained(files["a"], temporl=files["module"]),
            "'temporl' .did you mean 'temporal'",
        ),
        (
            lambda: UpscalePipeline.from_pretrained(tiny_assets["upscaler"], dype="fp32"),
            "'dype' .did you mean 'dtype'",
        ),
        (lambda: upscaler(video, noise_levl=10, progress=False), "'noise_levl' .did you mean 'noise_level'"),
        (lambda: upscaler.decode(latents, tiles=8), "'tiles' .did you mean 'tile'"),
        (lambda: pipe.decode(latents, chunk_frame=2), "'chunk_frame' .did you mean 'chunk_frames'"),
        # the sampling calls' **settings: each was a ConfigError naming an "unknown key", not a TypeError
        (lambda: pipe("a kite", guidance_scal=3), "'guidance_scal' .did you mean 'guidance_scale'"),
        (lambda: pipe.render(["a kite"], "x.mp4", num_inference_step=2), "'num_inference_step' .did you mean"),
        (lambda: pipe.interpolate(video, facter=4), "'facter' .did you mean 'factor'"),
    ):
        with pytest.raises(KeywordError, match=message) as caught:
            call()
        assert isinstance(caught.value, TypeError) and isinstance(caught.value, ConfigError)
        assert "; it takes " in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(
        KeywordError, match=r"UpscalePipeline\(\) got unknown keyword 'zzz'; it takes video, prompt, negative"
    ):
        upscaler(video, zzz=1)  # nothing close: no guess
    # the controls: the same calls spelt right
    assert VideoPipeline.from_pretrained(files["a"], temporal=files["module"]).video is not None
    assert UpscalePipeline.from_pretrained(tiny_assets["upscaler"], dtype="fp32").dtype == torch.float32
    assert upscaler(video, noise_level=10, num_inference_steps=2, seed=0, progress=False).frames.shape[1] == 2
    small = {"num_frames": 2, "height": 16, "width": 16, "num_inference_steps": 1, "progress": False}
    assert pipe("a kite", guidance_scale=3, **small).frames.shape[:2] == (1, 2)
    assert upscaler.decode(latents, tile=8).shape == (1, 2, 32, 32, 3)
    assert pipe.decode(latents, chunk_frames=2).shape[:2] == (1, 2)


def test_render_checks_each_of_its_outputs_before_sampling(pipe, tmp_path, monkeypatch):
    """``out`` as one path per video: None, an int or bytes were raw TypeErrors from pathlib, a dict wrote into the
    working folder under its key, and a path given twice was refused only once the first video had been sampled
    and written. Each is now a ConfigError before any denoising."""
    monkeypatch.chdir(tmp_path)
    for out, message in (
        ([None], "each output must be a file or folder path"),
        ([b"x.mp4"], "each output must be a file or folder path"),
        ([""], "each output must be a file or folder path"),
        (5, "out must be a file or folder path, or a list"),
        (b"x.mp4", "out must be a file or folder path, or a list"),
        ({"x": 1}, "out must be a file or folder path, or a list"),
        ([tmp_path / "x.avi"], "unknown output suffix"),
        ([tmp_path / "same.mp4", tmp_path / "same.mp4"], "same.mp4 is given twice"),
    ):
        prompts = ["a", "b"] if isinstance(out, list) and len(out) == 2 else ["a"]
        with pytest.raises(ConfigError, match=message):
            pipe.render(prompts, out, **FAST)
    assert not list(tmp_path.iterdir())  # nothing sampled, nothing written
    # each path of the list is checked as a single out is (it was checked only for existing): a folder where a video
    # or its sidecar goes, or a file where PNG frames go, failed to be written after sampling, with overwrite; a name
    # too long was a raw OSError, a control character or a blank name was written, an unknown format ignored
    taken = tmp_path / "taken"
    (taken / "folder.mp4").mkdir(parents=True)
    (taken / "side.mp4.json").mkdir()
    (taken / "file").write_bytes(b"")
    for out, message, extra in (
        ([taken / "folder.mp4"], "folder.mp4 is a folder, which a file cannot replace", {"overwrite": True}),
        ([taken / "side.mp4"], "side.mp4.json is a folder, which a file cannot replace", {"overwrite": True}),
        ([taken / "file"], "cannot write PNG frames into .*file: it exists and is not a folder", {"overwrite": True}),
        ([tmp_path / f"{'x' * 300}.mp4"], "is 304 bytes long", {}),
        ([tmp_path / "a\nb.mp4"], "holds a control character", {}),
        (["  "], r"the output is empty \('  '\)", {}),
        ([taken / "file" / "x.mp4"], "output folder .*file cannot be created or written", {}),
        ([tmp_path / "x.mp4"], r"format: expected one of \['mp4', 'gif', 'png'\], got 'avi'", {"format": "avi"}),
    ):
        with pytest.raises(ConfigError, match=message):
            pipe.render(["a"], out, **FAST, **extra)
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["file", "folder.mp4", "side.mp4.json", "taken"]
    # the control: a tuple of distinct paths
    assert pipe.render(["a", "b"], (tmp_path / "1.mp4", str(tmp_path / "2.gif")), **FAST) == [
        tmp_path / "1.mp4",
        tmp_path / "2.gif",
    ]


def test_render_refuses_a_format_its_files_are_not(pipe, tmp_path):
    """``render(prompts, "clip.mp4", format="gif")`` wrote an mp4 (the suffix won, ``format`` was taken and ignored),
    and so did a list of ``.mp4`` paths with ``format="gif"``; ``sample.py --format gif --out clip.mp4`` refuses it.
    Now a ``format`` given with files of another kind is a ConfigError before sampling."""
    for out, format in (
        (tmp_path / "clip.mp4", "gif"),
        (tmp_path / "clip.gif", "mp4"),
        (tmp_path / "clip.mp4", "png"),
        ([tmp_path / "1.mp4", tmp_path / "2.mp4"], "gif"),
        ([tmp_path / "1.gif", tmp_path / "frames"], "gif"),
    ):
        with pytest.raises(ConfigError, match=f"format='{format}' and the output .* disagree"):
            pipe.render(["a", "b"], out, format=format, **FAST)
    assert not list(tmp_path.iterdir())  # nothing sampled, nothing written
    # the controls: a file's own suffix with no format or the same one, and a folder of the format's files
    assert pipe.render(["a"], tmp_path / "clip.gif", **FAST) == [tmp_path / "clip.gif"]
    assert pipe.render(["a"], tmp_path / "same.mp4", format="mp4", **FAST) == [tmp_path / "same.mp4"]
    assert pipe.render(["a"], [tmp_path / "1.gif"], format="gif", **FAST) == [tmp_path / "1.gif"]
    assert pipe.render(["a"], tmp_path / "folder", format="gif", **FAST) == [tmp_path / "folder" / "000-a.gif"]
    assert pipe.render(["a"], tmp_path / "frames", format="png", **FAST) == [tmp_path / "frames" / "000-a"]


def test_render_refuses_a_gif_rate_before_sampling(pipe, tmp_path, monkeypatch):
    """``render(prompts, "clip.gif", fps=200)`` denoised the first video, then its writer refused the rate (a GIF's
    delays are whole centiseconds); ``sample.py`` refuses it before loading. Now render refuses it before sampling."""
    from lvdm import pipeline

    def sampled(*args, **kwargs):
        raise AssertionError("sampled")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "denoise", sampled)
        for out, format in ((tmp_path / "clip.gif", None), (tmp_path / "folder", "gif"), ([tmp_path / "1.gif"], None)):
            with pytest.raises(ConfigError, match="fps=200: a GIF stores delays in whole centiseconds"):
                pipe.render(["a"], out, format=format, **{**FAST, "fps": 200})
    assert not list(tmp_path.iterdir())
    # the controls: the same rate in an mp4, and a GIF at 100 fps
    assert pipe.render(["a"], tmp_path / "fast.mp4", **{**FAST, "fps": 200}) == [tmp_path / "fast.mp4"]
    assert pipe.render(["a"], tmp_path / "ok.gif", **{**FAST, "fps": 100}) == [tmp_path / "ok.gif"]


def test_upscaling_frames_of_no_pixels_is_refused_by_name(upscaler):
    """Frames ``(f, 0, w, 3)`` or ``(f, h, 0, 3)`` reached a convolution: torch's "Kernel size can't be greater
    than actual input size", not a word about the video."""
    quick = {"num_inference_steps": 2, "progress": False, "seed": 0}
    for shape in ((2, 0, 8, 3), (2, 8, 0, 3)):
        with pytest.raises(ConfigError, match=r"frames to upscale must be uint8 \(f, h, w, 3\) with f, h, w >= 1"):
            upscaler(np.zeros(shape, np.uint8), **quick)
    assert upscaler(np.zeros((2, 1, 1, 3), np.uint8), **quick).frames.shape == (1, 2, 4, 4, 3)  # the control


def test_an_output_folder_that_takes_no_file_is_refused_before_sampling(tmp_path):
    """``os.access`` says yes to root in /proc too, so ``sample.py --out /proc/x.mp4`` sampled, then failed to write.
    Now a probe file is written (and deleted) where the output goes. The control: a writable folder passes, and the
    probe leaves nothing behind."""
    from lvdm.outputs import check_output_file, plan_outputs

    for call in (lambda: plan_outputs("/proc/lvdm-out/clip.mp4", ["a"]),
                 lambda: check_output_file(Path("/proc/module.safetensors"), overwrite=False)):  # fmt: skip
        with pytest.raises(ConfigError, match=r"/proc is not a writable folder"):
            call()
    assert plan_outputs(tmp_path / "new" / "clip.mp4", ["a"]) == [tmp_path / "new" / "clip.mp4"]
    assert list(tmp_path.iterdir()) == []
    # a probe a kill -9 left in the user's folder goes at the next check; a file of theirs of that name stays
    (tmp_path / ".write-probe-a1b2c3d4").write_bytes(b"lvdm write probe\n")
    (tmp_path / ".write-probe-e5f6g7h8").write_bytes(b"the user's own\n")
    plan_outputs(tmp_path / "clip.mp4", ["a"])
    assert [p.name for p in tmp_path.iterdir()] == [".write-probe-e5f6g7h8"]
