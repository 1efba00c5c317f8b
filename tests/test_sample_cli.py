"""sample.py: a module trained on base A sampled on single-file base B with a LoRA, prompt lists, output files read
back, every user mistake as one line and a non-zero exit; and the examples, run with --tiny."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import sample_here, write_sampling_files
from diffusers import StableDiffusionPipeline
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def sample(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script(str(REPO / "sample.py"), "--quiet", *args)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The sampling files (conftest), a broken LoRA and a prompts file."""
    root = tmp_path_factory.mktemp("cli")
    files = write_sampling_files(root)
    broken = root / "broken_lora.safetensors"
    broken.write_bytes(b"this is not a safetensors file")
    prompts = root / "prompts.txt"
    prompts.write_text("a red kite\n\na lighthouse at dusk\nA cat, sleeping!\n", encoding="utf-8")
    return {**files, "broken_lora": broken, "prompts": prompts, "root": root}


def on_b(files) -> list[str]:
    return ["--base", str(files["b"]), "--base-config", str(files["a"]), "--lora", f"{files['lora']}:0.7"]


def test_module_from_a_samples_a_prompt_file_on_single_file_b_with_a_lora(files, tmp_path):
    result = sample(*on_b(files), "--temporal", str(files["module"]), "--prompts", str(files["prompts"]),
                    "--frames", "3", "--fps", "5", "--steps", "2", "--seed", "40", "--batch-size", "2",
                    "--out", str(tmp_path / "videos"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in paths] == ["000-a-red-kite.mp4", "001-a-lighthouse-at-dusk.mp4", "002-a-cat-sleeping.mp4"]
    for k, path in enumerate(paths):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            assert stream.average_rate == 5
        assert len(frames) == 3 and frames[0].shape == (16, 24, 3)  # the size: the module's training resolution
        meta = json.loads(path.with_name(path.name + ".json").read_text())
        assert meta["mode"] == "video" and meta["seed"] == 40 + k and meta["settings"]["num_inference_steps"] == 2
        assert meta["model"]["loras"] == [f"{files['lora']}:0.7"] and meta["model"]["temporal"] == str(files["module"])
        assert meta["model"]["base"] == str(files["b"]) and meta["settings"]["scheduler"] == "ddim"


def test_image_mode_frames_from_the_cli_equal_diffusers(files, tmp_path):
    result = sample(*on_b(files), "--prompt", "a lighthouse at dusk", "--frames", "2", "--steps", "3", "--seed", "7",
                    "--out", str(tmp_path / "frames"), "--format", "png")  # fmt: skip
    assert result.returncode == 0, result.stderr
    [folder] = [Path(line) for line in result.stdout.split()]
    assert folder.name == "000-a-lighthouse-at-dusk" and json.loads(folder.with_suffix(".json").read_text())
    frames = np.stack([np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))])
    reference = StableDiffusionPipeline.from_single_file(
        str(files["b"]), config=str(files["a"]), local_files_only=True, safety_checker=None
    )
    reference.load_lora_weights(str(files["lora"]), adapter_name="style")
    reference.set_adapters(["style"], [0.7])
    reference.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 2, 8, 8), generator=torch.Generator().manual_seed(7))  # video 0 of seed 7
    for j in range(2):
        image = reference(
            "a lighthouse at dusk", latents=noise[:, :, j], num_inference_steps=3, guidance_scale=7.5, output_type="np"
        ).images[0]
        assert np.abs(frames[j].astype(np.float64) - image * 255).max() <= 1.01


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("missing_base", 1, "does not exist"),
        ("missing_module", 1, "does not exist"),
        ("module_for_another_family", 1, "base family"),
        ("broken_lora", 1, "not a readable safetensors file"),
        ("size_not_divisible_by_8", 2, "height: must be a multiple of 8"),
        ("guidance_nan", 2, "guidance_scale: must be a number in -100 .. 100, got nan"),  # "expected float, got nan"
        ("fps_zero", 2, "fps: must be >= 0.01, got 0.0"),  # and "fps: must be > 0": two complaints
        ("repeated_option", 2, "argument --negative-prompt: given twice ('a', then 'b'); give it once"),  # b won
        ("unknown_scheduler", 2, "Did you mean 'ddim'"),
        ("no_prompt", 2, "one of the arguments --prompt --prompts is required"),
    ],
)
def test_mistakes_are_one_line_and_a_non_zero_exit(files, tmp_path, command, case, code, message):
    """Run in this process where nothing loads (the interpreter's start-up adds nothing to a message), as a command
    where something does: the libraries' own chatter while loading is part of what must not show."""
    base = ["--base", str(files["a"]), "--out", str(tmp_path / "out.mp4")]
    prompt = ["--prompt", "a kite"]
    args = {
        "missing_base": ["--base", str(tmp_path / "nope"), *prompt],
        "missing_module": [*base, *prompt, "--temporal", str(tmp_path / "nope.safetensors")],
        "module_for_another_family": ["--base", str(files["sd2"]), *prompt, "--temporal", str(files["module"])],
        "broken_lora": [*base, *prompt, "--lora", str(files["broken_lora"])],
        "size_not_divisible_by_8": [*base, *prompt, "--height", "20"],
        "guidance_nan": [*base, *prompt, "--guidance", "nan"],
        "fps_zero": [*base, *prompt, "--fps", "0"],
        "repeated_option": [*base, *prompt, "--negative-prompt", "a", "--negative-prompt", "b"],
        "unknown_scheduler": [*base, *prompt, "--scheduler", "dim"],
        "no_prompt": base,
    }[case]
    if case in ("module_for_another_family", "broken_lora"):
        result = sample(*args)
        returned, err = result.returncode, result.stderr
    else:
        returned, _, err = sample_here(command, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert returned == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert lines[0].count(message.split(":")[0] + ":") <= 1, err  # a setting's problem said once
    assert not list(tmp_path.glob("out*"))  # nothing written


@pytest.mark.parametrize("script", ["sample_prompt_list.py", "temporal_on_two_checkpoints.py", "long_video.py"])
def test_examples_run_offline_on_tiny_models(script, tmp_path, command, monkeypatch):
    """Run again into the same folder, each example replaced its own videos and the user's files of those names
    without a word, and its mistakes were tracebacks: now they refuse, in one line, and leave every file as it is,
    before building the tiny models (two of them built them first). The run is a process as a user starts it; the
    refusal runs the example's ``main`` in this process."""
    from lvdm import testing

    result = run_script(str(REPO / "examples" / script), "--tiny", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    written = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".mp4", ".gif"))
    assert written and all((p.with_name(p.name + ".json")).is_file() for p in written)
    before = {p: p.read_bytes() for p in written}

    def built(*args, **kwargs):
        raise AssertionError("the tiny models were built before --out was checked")

    monkeypatch.setattr(testing, "make_tiny_sd", built)  # the run above shows each example builds through it
    again = command(REPO / "examples" / script, "--tiny", "--out", tmp_path)
    lines = [line for line in again.stderr.splitlines() if line.startswith(("error", "Traceback"))]
    assert again.returncode == 2 and len(lines) == 1 and "already exists" in lines[0], again.stderr[-2000:]
    assert {p: p.read_bytes() for p in written} == before
    # what --out cannot be is refused before the models too, --overwrite or not (two of the examples checked only
    # for existing files, and failed at the end; an empty --out wrote into the working folder)
    (tmp_path / "a_file").write_text("mine")
    for out, message in ((tmp_path / "a_file", "is not a writable folder"), ("", "the output folder is empty"),
                         (tmp_path / "new\nline", "holds a control character")):  # fmt: skip
        for overwrite in ([], ["--overwrite"]):
            refused = command(REPO / "examples" / script, "--tiny", "--out", out, *overwrite, cwd=tmp_path)
            assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-2000:]
            assert message in refused.stderr, refused.stderr
    assert {p: p.read_bytes() for p in written} == before and (tmp_path / "a_file").read_text() == "mine"
    # --tiny took no --steps (0 and 100000 ran 3) and ignored the models given beside it
    for flags, message in ((["--steps", "0"], "--steps must be at least 1"),
                           (["--temporal", "x.safetensors"], "--tiny builds its own")):  # fmt: skip
        refused = command(REPO / "examples" / script, "--tiny", "--out", tmp_path / "new", *flags, cwd=tmp_path)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and message in refused.stderr, (
            refused.stderr
        )


def test_the_long_video_example_refuses_a_module_without_context_before_sampling(files, tmp_path, command):
    """It sampled and wrote long.mp4, printed seam figures of a video made in one pass, then failed to interpolate."""
    refused = command(REPO / "examples" / "long_video.py", "--base", files["a"], "--temporal", files["module"],
                      "--steps", "1", "--out", tmp_path / "out")  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "takes no context frames" in refused.stderr and not (tmp_path / "out").exists()


def test_the_long_video_example_refuses_a_length_it_cannot_interpolate_before_building(tmp_path, command,
                                                                                       monkeypatch):  # fmt: skip
    """--frames 1 sampled and wrote long.mp4, then failed to interpolate it (2 frames are the least); over 1024, its
    interpolation by 4 passes the 4096 frames a video may have."""
    from lvdm import testing

    def built(*args, **kwargs):
        raise AssertionError("the tiny models were built before --frames was checked")

    monkeypatch.setattr(testing, "make_tiny_sd", built)
    for frames in ("1", "1025"):
        refused = command(REPO / "examples" / "long_video.py", "--tiny", "--frames", frames, "--out", tmp_path / "out")
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"--frames must be 2 .. 1024 (long.mp4 is interpolated by 4), got {frames}" in refused.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ in-process CLI
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "--device gpu: not a device; use cpu, cuda, cuda:N or mps"),
        pytest.param(
            "cuda", "--device cuda: this PyTorch has no CUDA support", marks=pytest.mark.skipif(
                torch.cuda.is_available() or torch.version.cuda is not None, reason="needs a CPU-only PyTorch build"
            ),
        ),
        ("cuda:99" if torch.cuda.is_available() else "mps", "is not available" if not torch.cuda.is_available()
         else "only"),
    ],
)  # fmt: skip
def test_an_unusable_device_is_one_line_before_anything_loads(files, tmp_path, command, device, message):
    code, _, err = sample_here(command, "--base", str(files["a"]), "--prompt", "a kite", "--device", device,
                               "--out", str(tmp_path / "out.mp4"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not list(tmp_path.iterdir())


def test_help_shows_the_defaults(capsys):
    import sample as script

    with pytest.raises(SystemExit):
        script.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    shown_defaults = ("denoising steps (unset: a distilled module's own, else 25)", "else ddim)",
                      "distilled for, else 7.5)", "(default: outputs/samples)", "(default: auto)",
                      "--overwrite replace existing outputs (default: refuse them)")  # fmt: skip
    for shown in shown_defaults:
        assert shown in text, shown


def test_an_option_repeated_with_its_own_value_is_taken():
    """Only another value is refused (the control of ``repeated_option`` above): the same value loses nothing; and a
    subcommand's options are checked as a command's."""
    import sample as script
    from lvdm.convert import main as convert
    from lvdm.errors import ConfigError

    args = script.build_parser().parse_args(["--steps", "2", "--steps", "2", "--lora", "a", "--lora", "b"])
    assert args.num_inference_steps == 2 and args.lora == ["a", "b"]  # --lora is repeatable
    with pytest.raises(ConfigError, match="--heads: given twice \\(8, then 4\\)"):
        convert(["motion-module", "a.safetensors", "b.safetensors", "--heads", "8", "--heads", "4"])


def test_an_existing_output_is_refused_unless_overwrite(files, tmp_path, command):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"an earlier video")
    args = ["--base", str(files["a"]), "--prompt", "a kite", "--frames", "2", "--steps", "1", "--out", str(out)]
    code, _, err = sample_here(command, *args)
    assert code == 2 and err.count("\n") == 1 and f"{out} already exists" in err and "--overwrite" in err, err
    assert out.read_bytes() == b"an earlier video"
    code, stdout, err = sample_here(command, *args, "--overwrite")
    assert code == 0 and stdout.split() == [str(out)] and out.read_bytes() != b"an earlier video", err
    folder = tmp_path / "videos"  # a folder --out: the same prompt again would replace 000-a-kite.mp4
    assert sample_here(command, *args[:-1], str(folder))[0] == 0
    code, _, err = sample_here(command, *args[:-1], str(folder))
    assert code == 2 and "000-a-kite.mp4 already exists" in err, err


def test_an_output_name_that_is_not_utf8_is_written(files, tmp_path, command):
    """Linux names are bytes: ``clip<0xff>.mp4`` was "cannot write ...: 'utf-8' codec can't encode", after the
    sampling (the temporary name beside it was cut as UTF-8)."""
    import os

    out = tmp_path / os.fsdecode(b"clip\xff.mp4")
    code, _, err = sample_here(command, "--base", str(files["a"]), "--prompt", "a kite", "--frames", "2", "--steps",
                               "1", "--out", str(out))  # fmt: skip
    assert code == 0 and out.is_file() and out.with_name(out.name + ".json").is_file(), err
    assert sorted(os.listdir(tmp_path)) == sorted([out.name, out.name + ".json"])  # no temporary file left


def test_a_format_or_rate_the_output_file_cannot_take_is_refused_before_sampling(files, tmp_path, command):
    """``--format png --out x.mp4`` wrote an mp4 without a word; they disagree: one line, nothing loaded."""
    out = tmp_path / "x.mp4"
    code, _, err = sample_here(command, "--base", str(files["a"]), "--prompt", "a kite", "--format", "png", "--out",
                               str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "--format png and --out" in err and "disagree" in err, err
    assert not out.exists()
    gif = tmp_path / "x.gif"
    code, _, err = sample_here(command, "--base", str(files["a"]), "--prompt", "a kite", "--fps", "200", "--out",
                               str(gif))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "at most 100 fps" in err, err  # after sampling, before
    assert not gif.exists()


def test_settings_found_wrong_only_after_sampling_are_refused_before_it(files, tmp_path, command):
    """Each of these was refused after the videos were sampled (and some written): now one line, nothing written."""
    from lvdm.testing.upscaler import make_tiny_upscaler

    upscaler = make_tiny_upscaler(tmp_path / "x4", seed=0)
    out = tmp_path / "outs"
    for args, message in (
        (["--fps", "0.001", "--out", str(out / "slow.gif")], "fps: must be >= 0.01, got 0.001"),  # a GIF traceback
        (["--noise-prior", "mixed", "--base-noise-seed", "-1"], "base_noise: a seed must be in 0 .. "),
        (["--upscaler", str(upscaler), "--upscale-guidance", "nan"], "guidance_scale must be a number in -100"),
        (["--upscaler", str(upscaler), "--upscale-steps", "0"], "num_inference_steps must be an integer in 1"),
        (["--context-guidance", "2"], "--context-guidance needs a temporal module trained with context frames"),
        (["--out", str(out / ("L" * 247 + ".mp4"))], "is 256 bytes long; a file name holds at most 255"),
        (["--out", str(out / "two\nlines.mp4")], "holds a control character ('\\n')"),  # the message was two lines
    ):
        argv = ["--base", str(files["a"]), "--prompt", "a kite", "--frames", "2", "--steps", "1"]
        code, _, err = sample_here(
            command, *argv, *(args if "--out" in args else [*args, "--out", str(out / "v.mp4")])
        )
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)  # no "sampling ..." line before
        assert not out.exists()
    code, _, err = sample_here(command, "--base", str(files["a"]), "--prompt", "a kite", "--frames", "2", "--steps",
                               "1", "--fps", "0.01", "--out", str(out / "slow.gif"))  # fmt: skip
    assert code == 0 and (out / "slow.gif").exists(), err  # the control: the slowest rate allowed is written


def test_mistakes_found_only_when_loading_are_refused_before_it(files, tmp_path, command, monkeypatch):
    """Each was refused after loading (the upscaler's module: after sampling) or not at all: a sidecar's empty
    base loaded the working folder, and a --base-config beside a folder base was ignored. Each control, the command
    put right (its flags in place of the wrong ones), reaches the reading of the base's weights."""
    from lvdm.errors import ConfigError
    from lvdm.models import VideoUNet, load_base, loading, single_file
    from lvdm.models.parts import build_part
    from lvdm.testing.upscaler import make_tiny_upscaler

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    x4 = make_tiny_upscaler(tmp_path / "x4", seed=0)
    upscaler, for_x4 = ["--upscaler", str(x4), "--upscaler-temporal"], tmp_path / "x4.safetensors"
    VideoUNet.from_unet2d(load_base(x4).unet).save_temporal(for_x4)  # a module made for the upscaler
    from lvdm.models.temporal_vae import save_video_decoder, video_decoder_from_vae
    from lvdm.testing.animatediff import tiny_motion_adapter

    decoder, adapter = tmp_path / "decoder", tmp_path / "adapter"  # folders with a config.json: both passed for
    save_video_decoder(video_decoder_from_vae(load_base(files["a"]).vae), decoder)  # MotionAdapter folders until
    tiny_motion_adapter().save_pretrained(adapter)  # the upscaler loaded, after the first stage's video was written
    odd = tmp_path / "odd.safetensors"  # trained at a height SD cannot sample: it was refused after loading
    odd_size = {"data": {"resolution": [20, 24]}}
    VideoUNet.from_unet2d(load_base(files["a"]).unet).save_temporal(odd, training_config=odd_size)
    mixed, independent, i2v = (
        tmp_path / "mixed.safetensors",
        tmp_path / "independent.safetensors",
        tmp_path / "i2v.safetensors",
    )
    for path, prior in ((mixed, "mixed"), (independent, "independent")):
        VideoUNet.from_unet2d(load_base(files["a"]).unet).save_temporal(
            path, training_config={"train": {"noise_prior": prior}}
        )
    video = VideoUNet.from_unet2d(load_base(files["a"]).unet)
    build_part(video, "image", "image", {"embed_dims": 32, "num_queries": 4})
    video.save_temporal(i2v)
    Image.new("RGB", (16, 16)).save(picture := tmp_path / "picture.png")
    monkeypatch.setattr(loading, "_load_folder", reached)  # where a base's weights are read
    monkeypatch.setattr(single_file, "load_single_file", reached)
    sidecar = tmp_path / "v.mp4.json"
    fast = ["--prompt", "a kite", "--frames", "2", "--steps", "1", "--out", str(tmp_path / "out.mp4")]
    a, b, config_a = ["--base", str(files["a"])], ["--base", str(files["b"])], ["--base-config", str(files["a"])]
    two = {"negative_prompt": ["blur", "fog"]}
    for model, settings, wrong, right, message in (
        ({"base": ""}, {}, [], a, "base: an empty path"),
        ({"base": str(files["a"])}, two, [], ["--negative-prompt", "blur"], "negative_prompt: got 2 for 1 prompts"),
        ({"base": str(files["a"])}, {}, config_a, [*b, *config_a], "goes with a single-file base"),
        ({"base": str(files["b"]), "base_config": str(files["a"])}, {}, [], a, ""),  # the recorded one is not taken
        ({"base": str(files["a"])}, {}, [*upscaler, str(files["broken_lora"])], [*upscaler, str(for_x4)],
         "not a readable safetensors file"),
        ({"base": str(files["a"])}, {}, [*upscaler, str(files["module"])], [*upscaler, str(for_x4)],
         "made for base family"),  # the text-to-video module: found after the first stage had written its video
        ({"base": str(files["a"])}, {}, [*upscaler, str(decoder)], [*upscaler, str(for_x4)],
         "names 'AutoencoderKLTemporalDecoder', not a MotionAdapter folder"),
        ({"base": str(files["a"])}, {}, [*upscaler, str(adapter)], [*upscaler, str(for_x4)],
         "a motion module of block widths [32, 64], the upscaler's UNet has [32, 32, 64]"),
        ({"base": str(files["a"])}, {}, ["--temporal", str(odd)], ["--temporal", str(odd), "--height", "16"],
         "height: must be a multiple of 8, got 20 (the temporal module's training config gave height=20"),
        ({"base": str(files["a"])}, {}, ["--temporal", str(files["module"]), "--image", str(picture)],
         ["--temporal", str(i2v), "--image", str(picture)], "this temporal module has no image conditioning"),
        ({"base": str(files["a"])}, {}, ["--image", str(picture)],
         ["--image", str(picture), "--image-adapter", str(i2v), "--image-encoder", str(tmp_path)],
         "no temporal module was given"),
        ({"base": str(files["a"])}, {}, ["--temporal", str(files["module"]), "--base-noise-seed", "3"],
         ["--temporal", str(mixed), "--base-noise-seed", "3"],  # the module's own prior is the mixed one
         "--base-noise-seed goes with --noise-prior mixed (the default is 'independent')"),
        ({"base": str(files["a"])}, {}, ["--temporal", str(independent), "--base-noise-seed", "3"],
         ["--temporal", str(independent), "--base-noise-seed", "3", "--noise-prior", "mixed"],
         "(the temporal module was trained with 'independent')"),
        ({"base": str(files["a"])}, {}, ["--mixed-lambda", "0.3"], ["--mixed-lambda", "0.3", "--noise-prior", "mixed"],
         "--mixed-lambda goes with --noise-prior mixed (the default is 'independent')"),  # taken and ignored
    ):  # fmt: skip
        sidecar.write_text(json.dumps({"prompt": "a kite", "settings": settings, "model": model}))
        if message:
            code, _, err = sample_here(command, "--from-json", str(sidecar), *wrong, *fast)
            assert code in (1, 2) and err.count("\n") == 1 and message in err, (wrong, err)
        code, _, err = sample_here(command, "--from-json", str(sidecar), *right, *fast)  # given once: not after wrong
        assert code == 2 and "reached the loading" in err, (right, err)
    assert not (tmp_path / "out.mp4").exists()


def test_a_prompt_that_is_not_utf8_is_refused_before_anything_loads(files, tmp_path, command, monkeypatch):
    """A shell's $'\\xff' reaches Python as a lone surrogate: it was refused only once the models had loaded."""
    from lvdm.errors import ConfigError
    from lvdm.models import loading

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    monkeypatch.setattr(loading, "_load_folder", reached)
    for prompt, message in (("a kite \udcff", "is not UTF-8 text"), ("a kite", "reached the loading")):  # + control
        code, _, err = sample_here(
            command, "--base", str(files["a"]), "--prompt", prompt, "--out", str(tmp_path / "v.mp4")
        )
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_an_inductor_cache_folder_that_cannot_be_one_is_one_line(files, tmp_path, command, monkeypatch):
    """diffusers' import makes PyTorch create it, compiling or not: a file there was a FileExistsError traceback."""
    (tmp_path / "a_file").write_text("not a folder")
    argv = ["--base", str(files["a"]), "--prompt", "a kite", "--frames", "2", "--steps", "1"]
    for cache in (tmp_path / "a_file", tmp_path / "a_file" / "below"):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        code, _, err = sample_here(command, *argv, "--out", str(tmp_path / "v.mp4"))
        assert code == 2 and err.count("\n") == 1 and f"{tmp_path / 'a_file'} is not a folder" in err, err
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "new" / "cache"))  # the control: one to be made
    code, _, err = sample_here(command, *argv, "--out", str(tmp_path / "v.mp4"))
    assert code == 0 and (tmp_path / "v.mp4").exists(), err


def test_an_output_another_run_writes_meanwhile_is_not_replaced(files, tmp_path, command, monkeypatch):
    """Two runs to one --out both pass the check before loading; the one that finishes second must not replace the
    first's video (it did, both exiting 0): its write is exclusive, so it stops in one line."""
    from lvdm.pipeline import VideoPipeline

    out = tmp_path / "race.mp4"
    real = VideoPipeline.__call__

    def the_other_run_finishes_first(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        out.write_bytes(b"the other run's video")
        return result

    monkeypatch.setattr(VideoPipeline, "__call__", the_other_run_finishes_first)
    args = ["--base", str(files["a"]), "--prompt", "a kite", "--frames", "2", "--steps", "1", "--out", str(out)]
    code, stdout, err = sample_here(command, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "or another run wrote it while lvdm was writing" in errors[0], err
    assert "Traceback" not in err
    assert out.read_bytes() == b"the other run's video" and not stdout
    assert [p.name for p in tmp_path.iterdir()] == ["race.mp4"]  # no temporary file left
    code, stdout, err = sample_here(command, *args, "--overwrite")  # the control: asked to, it replaces
    assert code == 0 and out.read_bytes() != b"the other run's video", err


def test_from_json_re_renders_a_video_exactly(files, tmp_path, command):
    first = tmp_path / "first"
    code, stdout, err = sample_here(
        command, *on_b(files), "--temporal", str(files["module"]), "--prompt", "a red kite", "--frames", "3",
        "--steps", "2", "--scheduler", "euler_a", "--guidance-schedule", "oscillating", "--guidance-option",
        "low=2.0", "--noise-prior", "mixed", "--mixed-lambda", "0.3", "--base-noise-seed", "5", "--negative-prompt",
        "blur", "--out", str(first), "--format", "png",
    )  # fmt: skip
    assert code == 0, err
    [made] = [Path(line) for line in stdout.split()]
    sidecar = made.with_name(made.name + ".json")
    again = tmp_path / "again"
    code, stdout, err = sample_here(command, "--from-json", str(sidecar), "--out", str(again))
    assert code == 0, err
    [remade] = [Path(line) for line in stdout.split()]
    assert remade.name == made.name  # the sidecar's format (png frames) and prompt
    frames = sorted(made.glob("*.png"))
    assert len(frames) == 3 and [p.name for p in sorted(remade.glob("*.png"))] == [p.name for p in frames]
    for a, b in zip(frames, sorted(remade.glob("*.png")), strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    meta, replayed = (json.loads(p.with_name(p.name + ".json").read_text()) for p in (made, remade))
    assert replayed["settings"] == meta["settings"] and replayed["model"] == meta["model"]
    assert replayed["base_noise"] == 5 and meta["settings"]["negative_prompt"] == "blur"
    code, stdout, err = sample_here(command, "--from-json", str(sidecar), "--steps", "3", "--out", str(tmp_path / "b"))
    [changed] = [Path(line) for line in stdout.split()]
    assert code == 0 and json.loads(changed.with_name(changed.name + ".json").read_text())["settings"][
        "num_inference_steps"] == 3  # fmt: skip
    # the recorded share and base noise go with the recorded prior: --noise-prior independent drops both
    code, stdout, err = sample_here(command, "--from-json", str(sidecar), "--noise-prior", "independent", "--out",
                                    str(tmp_path / "c"))  # fmt: skip
    [plain] = [Path(line) for line in stdout.split()]
    meta = json.loads(plain.with_name(plain.name + ".json").read_text())
    assert code == 0 and meta["settings"]["mixed_lambda"] == 0.5 and meta.get("base_noise") is None, err


def test_a_replay_takes_the_kind_of_its_out_file_and_the_noise_prior_its_flags_give(files, tmp_path, command,
                                                                                    monkeypatch):  # fmt: skip
    """A GIF's sidecar replayed into an .mp4 was held to a GIF's rate limit, a PNG sidecar's into an .mp4 refused
    --upscaler, and a mixed-prior sidecar's base noise refused --noise-prior independent (no flag could unset it):
    each was refused before loading. Now each reaches the loading; the controls, where the sidecar's format or base
    noise does apply, are still refused."""
    from lvdm.errors import ConfigError
    from lvdm.models import loading
    from lvdm.testing.upscaler import make_tiny_upscaler

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    monkeypatch.setattr(loading, "_load_folder", reached)
    x4 = make_tiny_upscaler(tmp_path / "x4", seed=0)
    sidecar = tmp_path / "v.json"
    model = {"base": str(files["a"])}
    fast = ["--prompt", "a kite", "--frames", "2", "--steps", "1"]
    mixed = {"settings": {"noise_prior": "mixed"}, "base_noise": 5}
    share = {"settings": {"noise_prior": "mixed", "mixed_lambda": 0.3}}  # the recorded share went with the prior
    for meta, flags, message in (
        ({"format": "gif"}, ["--fps", "200", "--out", str(tmp_path / "a.mp4")], "reached the loading"),
        ({"format": "gif"}, ["--fps", "200", "--out", str(tmp_path / "gifs")], "a GIF stores delays"),
        ({"format": "png"}, ["--upscaler", str(x4), "--out", str(tmp_path / "b.mp4")], "reached the loading"),
        ({"format": "png"}, ["--upscaler", str(x4), "--out", str(tmp_path / "pngs")], "--upscaler upscales"),
        (mixed, ["--noise-prior", "independent", "--out", str(tmp_path / "c.mp4")], "reached the loading"),
        (mixed, ["--out", str(tmp_path / "d.mp4")], "reached the loading"),  # the recorded base noise taken
        (share, ["--noise-prior", "independent", "--out", str(tmp_path / "f.mp4")], "reached the loading"),
        ({}, ["--noise-prior", "independent", "--mixed-lambda", "0.3", "--out", str(tmp_path / "g.mp4")],
         "--mixed-lambda is only used by --noise-prior mixed, not 'independent'"),
        ({**mixed, "settings": {}}, ["--noise-prior", "independent", "--base-noise-seed", "5", "--out",
                                     str(tmp_path / "e.mp4")], "only used by noise_prior='mixed'"),
    ):  # fmt: skip
        sidecar.write_text(json.dumps({"prompt": "a kite", "settings": {}, "model": model} | meta))
        code, _, err = sample_here(command, "--from-json", str(sidecar), *fast, *flags)
        assert code == 2 and err.count("\n") == 1 and message in err, (meta, flags, err)


def test_from_json_refuses_what_is_not_a_sidecar(tmp_path, command):
    bad = tmp_path / "notes.json"
    bad.write_text('{"prompt": "a kite"}')
    code, _, err = sample_here(command, "--from-json", str(bad), "--out", str(tmp_path / "x.mp4"))
    assert code == 2 and err.count("\n") == 1 and "is not an lvdm sidecar" in err, err
    base = {"prompt": "a kite", "settings": {}, "model": {"base": "b"}}
    for change, message in (({"model": {"base": 5}}, "model.base must be a path"),
                            ({"model": {"base": "b", "loras": [1]}}, "model.loras must be a list"),
                            ({"interpolate": "x"}, "interpolate must be an object"),
                            ({"interpolate": {"factor": "4"}}, "interpolate.factor must be a whole number"),
                            ({"base_noise": [1]}, "base_noise has the wrong type")):  # fmt: skip
        bad.write_text(json.dumps(base | change))  # each a TypeError or AttributeError traceback before
        code, _, err = sample_here(command, "--from-json", str(bad), "--out", str(tmp_path / "x.mp4"))
        assert code == 2 and err.count("\n") == 1 and message in err, err
    bad.write_text(json.dumps(base | {"interpolate": {"factor": 3, "source": str(bad)}}))
    code, _, err = sample_here(command, "--from-json", str(bad), "--out", str(tmp_path / "x.mp4"))
    assert code == 2 and "interpolate.factor 3: must be 4 or 16" in err, err  # was refused only after loading


# ------------------------------------------------------------------------------------------------ context frames
@pytest.fixture(scope="module")
def context_files(files):
    """A context module on base A (random weights, trained for every task) and a 60-frame 16x16 video."""
    from conftest import randomize

    from lvdm.media import write_video
    from lvdm.models import VideoUNet, load_base
    from lvdm.models.parts import build_part

    video = VideoUNet.from_unet2d(load_base(files["a"]).unet)
    build_part(video, "context", "context", {})
    randomize(video.temporal_parameters(), seed=1, std=0.1)
    module = files["root"] / "context.safetensors"
    training = {"data": {"num_frames": 5, "resolution": [16, 16], "target_fps": 8.0},
                "train": {"tasks": {"text": 1, "predict": 1, "interpolate": 1}}}  # fmt: skip
    video.save_temporal(module, training_config=training)
    frames = np.zeros((60, 16, 16, 3), np.uint8)
    frames[..., 0] = np.arange(60)[:, None, None] * 4
    clip = files["root"] / "sixty.mp4"
    write_video(frames, clip, fps=8.0)
    return {"module": module, "clip": clip}


def test_continuing_a_video_reads_only_the_frames_it_continues_from(files, context_files, tmp_path, command,
                                                                    monkeypatch):  # fmt: skip
    """--context decoded every frame of the video at the sampling size, to use its last --context-frames: a 1.6 MB
    mp4 of 60000 small frames filled 5.5 GB in 30 s at 128 px, then said "decode timed out"."""
    from lvdm.data import readers

    asked, read = [], readers.read_frames

    def counted(path, indices, **kwargs):
        asked.append(len(indices))
        return read(path, indices, **kwargs)

    monkeypatch.setattr(readers, "read_frames", counted)
    code, _, err = sample_here(command, "--base", str(files["a"]), "--temporal", str(context_files["module"]),
                               "--context", str(context_files["clip"]), "--context-frames", "2", "--prompt", "a",
                               "--frames", "3", "--steps", "1", "--out", str(tmp_path / "next.mp4"))  # fmt: skip
    assert code == 0, err
    assert asked == [2], asked
    meta = json.loads((tmp_path / "next.mp4.json").read_text())
    assert meta["context"]["frames"] == 2


def test_an_interpolation_past_the_frame_limit_is_refused_before_anything_loads(files, context_files, tmp_path,
                                                                                command, monkeypatch):  # fmt: skip
    """A video is at most 4096 frames: --interpolate of a 300-frame clip by 16 sampled 4785 of them (minutes on the
    tiny model; a long clip, hours and all the memory). Now refused from the video's header, before loading; in
    Python, before sampling (the control: the longest clip allowed reaches the loading)."""
    from lvdm import VideoPipeline, context_sampling
    from lvdm.errors import ConfigError
    from lvdm.media import write_video
    from lvdm.models import loading

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    long = tmp_path / "long.mp4"
    write_video(np.zeros((257, 16, 16, 3), np.uint8), long, fps=1.0)
    pipe = VideoPipeline.from_pretrained(files["a"], temporal=context_files["module"])
    monkeypatch.setattr(loading, "_load_folder", reached)
    argv = ["--base", str(files["a"]), "--temporal", str(context_files["module"]), "--steps", "1"]
    for video, factor, message in ((long, "16", "interpolating 257 frames by 16 would make 4097, past the 4096"),
                                   (context_files["clip"], "16", "reached the loading")):  # fmt: skip
        code, _, err = sample_here(command, *argv, "--interpolate", str(video), "--factor", factor,
                                   "--out", str(tmp_path / "smooth.mp4"))  # fmt: skip
        assert code == 2 and err.count("\n") == 1 and message in err, err

    def sampled(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(context_sampling, "denoise", sampled)
    for frames, factor in ((np.zeros((257, 16, 16, 3), np.uint8), 16), (np.zeros((1025, 16, 16, 3), np.uint8), 4)):
        with pytest.raises(ConfigError, match=f"interpolating {len(frames)} frames by {factor}"):
            pipe.interpolate(frames, factor=factor, num_inference_steps=1, progress=False)
    with pytest.raises(ConfigError, match="interpolating 257 frames by 16"):
        pipe.interpolate(long, factor=16, num_inference_steps=1, progress=False)
    with pytest.raises(AssertionError, match="sampled"):  # the control: 1024 frames by 4 make 4093
        pipe.interpolate(np.zeros((1024, 16, 16, 3), np.uint8), factor=4, num_inference_steps=1, progress=False)


def test_interpolation_refuses_the_settings_it_would_ignore_before_anything_loads(files, context_files, tmp_path,
                                                                                  command, monkeypatch):  # fmt: skip
    """--interpolate took --base-noise-seed, --fps and --frames and ignored them (the same video at any base noise
    seed, written at the clip's rate times the factor whatever --fps said, 4 (k - 1) + 1 frames whatever --frames
    said). Now they are refused before loading; the control, without them, reaches the loading."""
    from lvdm.errors import ConfigError
    from lvdm.models import loading

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    monkeypatch.setattr(loading, "_load_folder", reached)
    argv = ["--base", str(files["a"]), "--temporal", str(context_files["module"]), "--steps", "1", "--interpolate",
            str(context_files["clip"]), "--out", str(tmp_path / "smooth.mp4")]  # fmt: skip
    for extra, message in ((["--noise-prior", "mixed", "--base-noise-seed", "3"], "does not take --base-noise-seed"),
                           (["--fps", "3"], "at its own 8 fps times 4 (32 fps): it does not take --fps"),
                           (["--frames", "9"], "4 (k - 1) + 1 frames of its video's k: it does not take --frames"),
                           ([], "reached the loading")):  # fmt: skip
        code, _, err = sample_here(command, *argv, *extra)
        assert code == 2 and err.count("\n") == 1 and message in err, (extra, err)


def test_a_replay_refuses_the_frames_given_in_python_that_its_sidecar_does_not_hold(files, context_files, tmp_path,
                                                                                   command, monkeypatch):  # fmt: skip
    """A video continued from frames given in Python (``context=`` an array; its sidecar: ``"source": "frames"``)
    was replayed by ``--from-json`` as a text-to-video, other frames with no word (an interpolation's said "--factor
    goes with --interpolate VIDEO", never given). Now refused, naming the flag that gives them; the control, the
    flag given, reaches the loading."""
    from lvdm import VideoPipeline
    from lvdm.errors import ConfigError
    from lvdm.models import loading

    pipe = VideoPipeline.from_pretrained(files["a"], temporal=context_files["module"])
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    continued = pipe.render("a", tmp_path / "next.mp4", context=frames, num_frames=2, num_inference_steps=1,
                            seed=0, progress=False)[0]  # fmt: skip
    smooth = tmp_path / "smooth.mp4"
    pipe.interpolate(frames[:2], num_inference_steps=1, seed=0, progress=False).save(smooth)

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    monkeypatch.setattr(loading, "_load_folder", reached)
    for sidecar, flag in ((f"{continued}.json", "--context"), (f"{smooth}.json", "--interpolate")):
        lost = (
            f"given in Python ({flag[2:]}.source 'frames'), and the sidecar does not hold it: give it as {flag} FILE"
        )
        for given, message in (([], lost), ([flag, str(context_files["clip"])], "reached the loading")):
            code, _, err = sample_here(command, "--from-json", sidecar, *given, "--out", str(tmp_path / "again.mp4"))
            assert code == 2 and err.count("\n") == 1 and message in err, err


def test_an_input_given_as_the_output_is_not_replaced_by_overwrite(files, context_files, tmp_path, command,
                                                                   monkeypatch):  # fmt: skip
    """--overwrite replaced the video --context continued (or --interpolate interpolated, or the GIF --image
    animated) with the new one, as python -m lvdm.upscale refuses to. The control: another output reaches the
    loading."""
    import shutil

    from lvdm.errors import ConfigError
    from lvdm.models import loading

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    monkeypatch.setattr(loading, "_load_folder", reached)
    clip = tmp_path / "clip.mp4"
    shutil.copy(context_files["clip"], clip)
    picture = tmp_path / "picture.gif"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(picture)
    before = {path: path.read_bytes() for path in (clip, picture)}
    module = ["--base", str(files["a"]), "--temporal", str(context_files["module"]), "--steps", "1", "--prompt", "a"]
    adapter = ["--image-adapter", str(files["module"]), "--image-encoder", str(tmp_path)]  # the module takes no image
    for options, out, flag in ((["--context", str(clip), "--frames", "3"], clip, "--context"),
                               (["--interpolate", str(clip)], clip, "--interpolate"),
                               (["--image", str(picture), *adapter], picture, "--image")):  # fmt: skip
        code, _, err = sample_here(command, *module, *options, "--out", str(out), "--overwrite")
        assert code == 2 and err.count("\n") == 1 and f"is the {flag} file" in err, err
        code, _, err = sample_here(command, *module, *options, "--out", str(tmp_path / "new.gif"), "--overwrite")
        assert code == 2 and "reached the loading" in err, err
    assert {path: path.read_bytes() for path in (clip, picture)} == before


def test_a_folder_where_a_sidecar_or_an_upscale_goes_is_refused_before_loading(files, tmp_path, command,
                                                                               monkeypatch):  # fmt: skip
    """With --overwrite, a folder named as the sidecar (or as the cascade's <name>_x4.mp4) was found when it was
    written: after the sampling (and the upscale), the video left without its sidecar, and the message gave the
    free space as if the disk were full; and a name whose _x4 sidecar is too long, with or without --overwrite. The
    control: without the folder, the command reaches the loading."""
    from lvdm.errors import ConfigError
    from lvdm.models import loading
    from lvdm.testing.upscaler import make_tiny_upscaler

    def reached(*args, **kwargs):
        raise ConfigError("reached the loading")

    upscaler = make_tiny_upscaler(tmp_path / "x4", seed=0)
    monkeypatch.setattr(loading, "_load_folder", reached)
    argv = ["--base", str(files["a"]), "--prompt", "a kite", "--frames", "2", "--steps", "1", "--overwrite"]
    cascade = ["--upscaler", str(upscaler), "--upscale-steps", "1"]
    for folder, options in ((tmp_path / "v.mp4.json", []), (tmp_path / "v_x4.mp4", cascade),
                            (tmp_path / "v_x4.mp4.json", cascade)):  # fmt: skip
        folder.mkdir()
        code, _, err = sample_here(command, *argv, *options, "--out", str(tmp_path / "v.mp4"))
        assert code == 2 and err.count("\n") == 1 and f"{folder} is a folder" in err, err
        folder.rmdir()
        code, _, err = sample_here(command, *argv, *options, "--out", str(tmp_path / "v.mp4"))
        assert code == 2 and "reached the loading" in err, err
    fits = str(tmp_path / ("L" * 246 + ".mp4"))  # its sidecar fits, its upscale's (_x4.mp4.json) does not
    code, _, err = sample_here(command, *argv[:-1], *cascade, "--out", fits)
    assert code == 2 and err.count("\n") == 1 and "is 258 bytes long" in err, err
    assert not (tmp_path / "v.mp4").exists()
