"""VideoPipeline: seeds, batched CFG, equality with diffusers in image mode, samplers, guidance, noise priors,
output files and their sidecars. Tiny models (16x16 px to 16x24 px, 2-4 frames, 2-3 steps)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from conftest import write_sampling_files
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image

from lvdm import pipeline as pipeline_module
from lvdm.diffusion import make_scheduler
from lvdm.errors import ConfigError, OutputWriteError, TemporalModuleError
from lvdm.models.encoders import encode_text
from lvdm.outputs import media_kind, sidecar_path
from lvdm.pipeline import VideoPipeline, plan_outputs, read_prompts, sampling_settings

FAST = {"num_inference_steps": 3, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def close_at_scale(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """``|a - b| <= rel * max|b|``: equal up to float32 rounding at the tensors' own scale. Sampled latents reach
    about 10, so a fixed ``atol=1e-5`` sits near float32's resolution there and fails on another machine's kernels."""
    return bool((a - b).abs().max() <= rel * b.abs().max())


def assert_close_at_scale(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert diff <= rel * scale, f"max difference {diff:.3g} > {rel:g} x max magnitude {scale:.3g}"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_sampling_files(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def pipe(files):
    return VideoPipeline.from_pretrained(files["a"], temporal=files["module"])


@pytest.fixture(scope="module")
def image_pipe_b(files):
    return VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=[f"{files['lora']}:0.7"])


# ------------------------------------------------------------------------------------------------ seeds, batches
def test_same_seed_same_frames_other_seed_other_frames(pipe):
    first = pipe("a fox in the snow", seed=3, **FAST)
    again = pipe("a fox in the snow", seed=3, **FAST)
    other = pipe("a fox in the snow", seed=4, **FAST)
    assert first.frames.dtype == np.uint8 and first.frames.shape == (1, 4, 16, 24, 3)  # the module's training size
    assert first.fps == 12.0
    assert np.array_equal(first.frames, again.frames)
    assert np.abs(first.frames.astype(int) - other.frames).mean() > 5


def test_each_video_depends_on_its_own_seed_only(pipe):
    batch = pipe(["a cat", "a dog"], num_videos_per_prompt=2, seed=10, **FAST)
    alone = pipe("a dog", seed=13, **FAST)  # video 3 of the batch: prompt 1, copy 1, seed 10 + 3
    split = pipe(["a cat", "a dog"], num_videos_per_prompt=2, seed=10, batch_size=1, decode_chunk_size=1, **FAST)
    assert batch.frames.shape[0] == 4 and [m["seed"] for m in batch.metadata] == [10, 11, 12, 13]
    assert [m["prompt"] for m in batch.metadata] == ["a cat", "a cat", "a dog", "a dog"]
    assert_close_at_scale(batch.latents[3:], alone.latents, rel=1e-5)
    assert_close_at_scale(batch.latents, split.latents, rel=1e-5)
    assert np.abs(batch.frames.astype(int) - split.frames).max() <= 1


def test_without_a_module_frames_are_independent_images(files, pipe):
    image = VideoPipeline.from_pretrained(files["a"])
    out = image("a fox in the snow", num_frames=3, seed=3, **FAST)
    assert out.frames.shape == (1, 3, 16, 16, 3) and out.fps == 8.0  # the base's native size, default fps
    assert out.metadata[0]["mode"] == "image" and out.metadata[0]["model"]["temporal"] is None
    bypassed = pipe("a fox in the snow", num_frames=3, height=16, width=16, seed=3, image_mode=True, **FAST)
    video = pipe("a fox in the snow", num_frames=3, height=16, width=16, seed=3, **FAST)
    assert torch.equal(out.noise, video.noise)
    assert_close_at_scale(bypassed.latents, out.latents)  # image_mode: the temporal layers bypassed
    assert (video.latents - out.latents).abs().max() > 1e-2  # and the module does change the video
    first_frame = image("a fox in the snow", latents=out.noise[:, :, :1], seed=3, **FAST)
    assert_close_at_scale(first_frame.latents[:, :, 0], out.latents[:, :, 0])  # frames are independent


# ------------------------------------------------------------------------------------------------ guidance
def test_batched_cfg_equals_two_separate_passes(pipe, monkeypatch):
    calls = []
    model_fn = pipe.model_fn

    def counting(**kwargs):
        fn = model_fn(**kwargs)
        return lambda x, t, **cond: calls.append(x.shape[0]) or fn(x, t, **cond)

    monkeypatch.setattr(pipe, "model_fn", counting)
    out = pipe("a red kite", negative_prompt="blurry", seed=5, guidance_scale=6.0, **FAST)
    assert calls == [2, 2, 2]  # one forward per step, unconditional and conditional batched

    fn = model_fn()
    cond, uncond = (
        encode_text(pipe.base.tokenizer, pipe.base.text_encoder, [text]) for text in ("a red kite", "blurry")
    )
    scheduler = make_scheduler("ddim", pipe.base.scheduler.config)
    scheduler.set_timesteps(3)
    x = out.noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            u = fn(model_input, t.expand(1), encoder_hidden_states=uncond)
            c = fn(model_input, t.expand(1), encoder_hidden_states=cond)
            x = scheduler.step(u + 6.0 * (c - u), t, x).prev_sample
    # fp32 rounding only: CPU conv kernels sum in a different order at batch 1 and batch 2
    assert (x - out.latents).abs().max() < 1e-5 * x.abs().max()


@pytest.mark.parametrize(
    ("schedule", "options", "same_as_constant"),
    [
        ("oscillating", {"low": 6.0}, True),  # never leaves 6: the same as constant 6
        ("linear", {"low": 6.0}, True),
        ("oscillating", {"low": 1.0, "warmup": 0.0}, False),
        ("linear", {"low": 1.0}, False),
    ],
)
def test_guidance_schedules_are_used(pipe, schedule, options, same_as_constant):
    constant = pipe("a boat", seed=1, guidance_scale=6.0, **FAST)
    scheduled = pipe(
        "a boat", seed=1, guidance_scale=6.0, guidance_schedule=schedule, guidance_options=options, **FAST
    )
    assert close_at_scale(constant.latents, scheduled.latents) == same_as_constant
    assert scheduled.metadata[0]["settings"]["guidance_options"] == options


def test_rescale_and_threshold_change_the_sample_and_a_loose_clamp_does_not(pipe):
    plain = pipe("a boat", seed=1, **FAST).latents
    rescaled = pipe("a boat", seed=1, guidance_rescale=0.7, **FAST).latents
    clamped = pipe("a boat", seed=1, threshold="clamp:0.5", **FAST).latents
    loose = pipe("a boat", seed=1, threshold="clamp:1000", **FAST).latents
    percentile = pipe("a boat", seed=1, threshold="percentile:0.9:0.5", **FAST).latents
    for changed in (rescaled, clamped, percentile):
        assert (changed - plain).abs().max() > 1e-3
    assert_close_at_scale(loose, plain)  # the same, up to float32 rounding at the latents' scale (about 10)


# ------------------------------------------------------------------------------------------------ diffusers
def _diffusers_frames(reference: StableDiffusionPipeline, out, prompt: str, steps: int) -> np.ndarray:
    """Each frame rendered by diffusers' own pipeline from that frame's initial noise, as uint8-scale floats."""
    frames = []
    for j in range(out.noise.shape[2]):
        image = reference(
            prompt, latents=out.noise[:, :, j], num_inference_steps=steps, guidance_scale=7.5, output_type="np"
        ).images[0]
        frames.append(image * 255)
    return np.stack(frames)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_image_mode_on_single_file_b_with_lora_equals_diffusers(files, image_pipe_b, scheduler):
    out = image_pipe_b("a lighthouse at dusk", num_frames=2, seed=7, scheduler=scheduler, **FAST)
    reference = StableDiffusionPipeline.from_single_file(
        str(files["b"]), config=str(files["a"]), local_files_only=True, safety_checker=None
    )
    reference.load_lora_weights(str(files["lora"]), adapter_name="style")
    reference.set_adapters(["style"], [0.7])
    if scheduler == "euler":
        reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    expected = _diffusers_frames(reference, out, "a lighthouse at dusk", steps=3)
    assert np.abs(out.frames[0].astype(np.float64) - expected).max() <= 1.01  # uint8 rounding only
    assert np.abs(out.frames[0, 0].astype(int) - out.frames[0, 1]).mean() > 5  # each frame from its own noise


def test_v_prediction_base_samples_as_diffusers_does(files):
    image = VideoPipeline.from_pretrained(files["sd2"])
    out = image("a lighthouse at dusk", num_frames=1, seed=2, **FAST)
    assert out.metadata[0]["prediction_type"] == "v_prediction"
    reference = StableDiffusionPipeline.from_pretrained(files["sd2"], safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    expected = _diffusers_frames(reference, out, "a lighthouse at dusk", steps=3)
    assert np.abs(out.frames[0].astype(np.float64) - expected).max() <= 1.01


def test_a_module_for_another_family_is_refused(files):
    with pytest.raises(TemporalModuleError, match="base family"):
        VideoPipeline.from_pretrained(files["sd2"], temporal=files["module"])


# ------------------------------------------------------------------------------------------------ noise priors
def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_a_fixed_base_noise_keeps_the_content_across_seeds(pipe):
    mixed = {"noise_prior": "mixed", "mixed_lambda": 0.8, "base_noise": 123, **FAST}
    first, second = (pipe("a lighthouse", seed=seed, **mixed) for seed in (1, 2))
    free = [pipe("a lighthouse", seed=seed, **FAST) for seed in (1, 2)]
    shared = _correlation(first.latents, second.latents)
    assert shared > _correlation(free[0].latents, free[1].latents) + 0.2
    videos = [torch.from_numpy(out.frames).float() for out in (first, second, *free)]
    assert _correlation(videos[0], videos[1]) > _correlation(videos[2], videos[3]) + 0.2  # the decoded videos too
    assert 0.7 < _correlation(first.noise, second.noise) < 0.9  # lambda of the noise is shared
    assert first.metadata[0]["base_noise"] == 123 and first.metadata[0]["settings"]["noise_prior"] == "mixed"


def test_mixed_prior_frames_correlate_and_a_base_tensor_is_accepted(pipe):
    base = torch.randn(1, 4, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    out = pipe("x", seed=1, noise_prior="mixed", mixed_lambda=1.0, base_noise=base, num_inference_steps=1)
    assert torch.allclose(out.noise, base.expand(1, 4, 4, 8, 12))  # lambda 1: every frame is the base
    assert out.metadata[0]["base_noise"].startswith("tensor (1, 4, 1, 8, 12) sha256:")


# ------------------------------------------------------------------------------------------------ files
def test_mp4_gif_and_png_outputs_with_sidecars(pipe, tmp_path):
    out = pipe("a windmill", seed=4, fps=7.5, **FAST)
    [mp4] = out.save(tmp_path / "clip.mp4")
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.average_rate == 7.5 and (stream.width, stream.height) == (24, 16)
    assert len(decoded) == 4 and decoded[0].shape == (16, 24, 3)
    [gif] = out.save(tmp_path / "clip.gif")
    with Image.open(gif) as image:
        assert image.n_frames == 4 and image.size == (24, 16)
    [folder] = out.save(tmp_path / "frames")
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 4 and np.array_equal(np.asarray(Image.open(pngs[2]).convert("RGB")), out.frames[0, 2])
    for media in (mp4, gif, folder):
        meta = json.loads(media.with_name(media.name + ".json").read_text())
        assert meta["prompt"] == "a windmill" and meta["seed"] == 4 and meta["file"] == media.name
        settings = meta["settings"]
        assert (settings["num_frames"], settings["height"], settings["width"], settings["fps"]) == (4, 16, 24, 7.5)
        assert settings["scheduler"] == "ddim" and settings["num_inference_steps"] == 3
        assert settings["guidance_scale"] == 7.5 and settings["noise_prior"] == "independent"
        assert meta["model"]["temporal"].endswith("motion.safetensors") and meta["lvdm_version"] == "0.1.0"


def test_a_folder_where_a_sidecar_goes_is_refused_before_any_video_is_written(pipe, tmp_path):
    """``VideoOutput.save`` wrote the video, then failed on a folder at its sidecar's path: a video without its
    sidecar. Now nothing is written; the control: the same call without the folder writes both."""
    out = pipe(["a kite", "a door"], seed=0, **FAST)
    (tmp_path / "clip_001.mp4.json").mkdir()
    with pytest.raises(ConfigError, match=r"clip_001\.mp4\.json is a folder"):
        out.save(tmp_path / "clip.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_001.mp4.json"]  # clip_000 neither
    (tmp_path / "clip_001.mp4.json").rmdir()
    assert [p.name for p in out.save(tmp_path / "clip.mp4")] == ["clip_000.mp4", "clip_001.mp4"]
    assert (tmp_path / "clip_001.mp4.json").is_file()


def test_the_sidecar_reproduces_the_video(files, image_pipe_b, tmp_path):
    out = image_pipe_b(["a red door", "a green door"], num_frames=2, seed=20, guidance_scale=5.0, **FAST)
    paths = out.save(tmp_path / "door.gif")
    assert [p.name for p in paths] == ["door_000.gif", "door_001.gif"]
    meta = json.loads((tmp_path / "door_001.gif.json").read_text())
    assert meta["model"]["loras"] == [f"{files['lora']}:0.7"] and meta["model"]["base_config"] == str(files["a"])
    again = VideoPipeline.from_pretrained(**meta["model"])(meta["prompt"], progress=False, **meta["settings"])
    assert np.array_equal(again.frames[0], out.frames[1])


def test_render_names_files_by_index_and_prompt_with_one_seed_per_video(pipe, tmp_path):
    paths = pipe.render(["A cat!", "a dog"], tmp_path / "out", format="png", num_videos_per_prompt=2, seed=5, **FAST)
    assert [p.name for p in paths] == ["000-a-cat", "001-a-cat", "002-a-dog", "003-a-dog"]
    seeds = [json.loads(p.with_name(p.name + ".json").read_text())["seed"] for p in paths]
    assert seeds == [5, 6, 7, 8]
    alone = pipe("a dog", seed=8, **FAST)
    frames = np.stack([np.asarray(Image.open(f)) for f in sorted(paths[3].glob("*.png"))])
    assert np.abs(frames.astype(int) - alone.frames[0]).max() <= 1


def test_render_denoises_at_most_batch_size_videos_together(pipe, tmp_path, monkeypatch):
    """render's batch_size (sample.py --batch-size, default 1) bounds the videos denoised together: with two videos
    per prompt, both were denoised in one batch whatever batch_size said."""
    sizes, denoise = [], pipeline_module.denoise

    def counted(pipe, s, noise, *args, **kwargs):
        sizes.append(noise.shape[0])
        return denoise(pipe, s, noise, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "denoise", counted)
    pipe.render(["a cat"], tmp_path / "one", num_videos_per_prompt=2, seed=5, **FAST)
    assert sizes == [1, 1]
    sizes.clear()
    pipe.render(["a cat", "a dog"], tmp_path / "three", num_videos_per_prompt=2, batch_size=3, seed=5, **FAST)
    assert max(sizes) <= 3 and sum(sizes) == 4, sizes
    sizes.clear()  # None, as every sidecar's settings say (a replay passes them): all together, as a call does
    paths = pipe.render(["a cat", "a dog"], tmp_path / "all", num_videos_per_prompt=2, batch_size=None, seed=5, **FAST)
    assert sizes == [4] and len(paths) == 4  # None // 2 was a TypeError


def test_decoding_goes_in_chunks_of_frames(pipe, monkeypatch):
    sizes = []
    decode = pipe.base.vae.decode
    monkeypatch.setattr(pipe.base.vae, "decode", lambda z, *a, **k: sizes.append(z.shape[0]) or decode(z, *a, **k))
    pipe("a kite", seed=0, decode_chunk_size=3, **FAST)
    assert sizes == [3, 1]


def test_progress_bar_over_the_steps(pipe, capsys):
    pipe("a kite", seed=0, num_inference_steps=2)
    assert "2/2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ mistakes
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_frame": 4}, "did you mean 'num_frames'"),
        ({"height": 20}, "height: must be a multiple of 8"),
        ({"scheduler": "dim"}, "Did you mean 'ddim'"),
        ({"guidance_schedule": "oscilating"}, "Did you mean 'oscillating'"),
        ({"guidance_schedule": "oscillating", "guidance_options": {"warmpu": 0.2}}, "not options"),
        ({"guidance_schedule": "oscillating", "guidance_options": {"low": "abc"}}, "low must be a number"),
        ({"guidance_schedule": "oscillating", "guidance_options": {"warmup": float("nan")}}, "warmup must be a"),
        ({"guidance_schedule": "linear", "guidance_options": {"increasing": 1}}, "increasing must be true or false"),
        ({"threshold": "clip:3"}, "clamp:VALUE"),
        ({"noise_prior": "mix"}, "Did you mean 'mixed'"),
        ({"mixed_lambda": 1.5}, "mixed_lambda: must be <= 1"),
        ({"fps": 0}, "fps: must be >= 0.01, got 0"),
    ],
)
def test_bad_settings_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError, match="invalid sampling settings") as error:
        sampling_settings(**settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_call_arguments_fail_before_sampling(pipe):
    with pytest.raises(ConfigError, match="only used by noise_prior='mixed'"):
        pipe("x", base_noise=1, **FAST)
    with pytest.raises(ConfigError, match="latents must have shape"):
        pipe("x", num_frames=3, latents=torch.zeros(1, 4, 2, 8, 12), **FAST)
    with pytest.raises(ConfigError, match="one per prompt"):
        pipe(["a", "b"], negative_prompt=["c"], **FAST)
    with pytest.raises(ConfigError, match="non-empty list"):
        pipe([], **FAST)


def test_a_mixed_lambda_without_the_mixed_prior_is_refused_and_a_sidecars_default_replays(pipe):
    """``pipe("x", mixed_lambda=0.3)`` under the independent prior sampled the plain call's frames, the share taken
    and ignored. The controls: with ``noise_prior="mixed"`` it samples other frames than 0.5 does, and a plain call's
    sidecar, which records the default share, replays to the same frames."""
    with pytest.raises(ConfigError, match="mixed_lambda=0.3 is only used by noise_prior='mixed', not 'independent'"):
        pipe("x", mixed_lambda=0.3, **FAST)
    plain = pipe("x", **FAST)
    again = pipe("x", **plain.metadata[0]["settings"])
    assert plain.metadata[0]["settings"]["mixed_lambda"] == 0.5 and np.array_equal(again.frames, plain.frames)
    share = pipe("x", noise_prior="mixed", mixed_lambda=0.3, seed=1, **FAST)
    assert not np.array_equal(share.frames, pipe("x", noise_prior="mixed", seed=1, **FAST).frames)


def test_a_prompt_file_saved_with_a_byte_order_mark_reads_its_first_prompt_as_written(tmp_path):
    """Notepad's "UTF-8 with BOM" kept U+FEFF at the start of the first prompt: three more tokens to the text encoder,
    a different video from the same prompt given with --prompt, and the mark in its sidecar."""
    (tmp_path / "bom.txt").write_bytes("\ufeffa cat\r\na dog\r\n".encode())
    assert read_prompts(tmp_path / "bom.txt") == ["a cat", "a dog"]


def test_prompt_files_and_output_paths_are_checked_before_loading(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\n  a dog  \n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert read_prompts(tmp_path / "prompts.txt") == ["a cat", "a dog"]
    for name, message in (
        ("nope.txt", "cannot be read"),
        ("empty.txt", "no prompts"),
        ("latin1.txt", "cannot be read"),
    ):
        with pytest.raises(ConfigError, match=message):
            read_prompts(tmp_path / name)
    from lvdm.outputs import read_sidecar

    for read, what in ((read_prompts, "prompts file"), (read_sidecar, "sidecar")):  # named the descriptor: "3"
        with pytest.raises(ConfigError, match=f"^{what} {tmp_path} cannot be read: a folder, not a file$"):
            read(tmp_path)
    for empty in ("", " "):  # "" wrote 000-<prompt>.mp4 into the working folder
        with pytest.raises(ConfigError, match="the output is empty"):
            plan_outputs(empty, ["a"])
    assert plan_outputs(tmp_path / "clip.mp4", ["a"]) == [tmp_path / "clip.mp4"]
    assert plan_outputs(tmp_path / "clip.gif", ["a"], num_videos_per_prompt=2) == [
        tmp_path / "clip_000.gif",
        tmp_path / "clip_001.gif",
    ]
    assert plan_outputs(tmp_path / "out", ["A cat!", "ü"], format="png") == [
        tmp_path / "out/000-a-cat",
        tmp_path / "out/001",
    ]
    with pytest.raises(ConfigError, match="unknown output suffix '.avi'") as caught:
        plan_outputs(tmp_path / "clip.avi", ["a"])
    assert "for PNGs" not in str(caught.value)  # a folder holds one output per video in any format
    (tmp_path / "out.v2").mkdir()  # an existing folder with a dot is a folder
    assert plan_outputs(tmp_path / "out.v2", ["a"]) == [tmp_path / "out.v2/000-a.mp4"]
    # a trailing separator names a folder, whatever its suffix (it wrote a file x.mp4)
    assert plan_outputs(f"{tmp_path / 'x.mp4'}/", ["a"]) == [tmp_path / "x.mp4/000-a.mp4"]
    assert media_kind(f"{tmp_path / 'x.gif'}/") == "png" and media_kind(tmp_path / "x.gif") == "gif"
    with pytest.raises(ConfigError, match="format: expected one of"):
        plan_outputs(tmp_path / "out", ["a"], format="webm")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot be created or written"):
        plan_outputs(tmp_path / "a_file" / "clip.mp4", ["a"])
    assert not (tmp_path / "out").exists()  # planning creates nothing


def test_output_names_the_file_system_cannot_hold_and_dangling_links_are_refused_before_sampling(tmp_path):
    from lvdm.fileio import atomic_path
    from lvdm.outputs import write_json

    fits = tmp_path / ("L" * 246 + ".mp4")  # 250 bytes, its sidecar 255: the most a name holds
    assert plan_outputs(fits, ["a"]) == [fits]
    for path in (fits, sidecar_path(fits)):  # the temporary name beside each fits as well
        with atomic_path(path) as temp:
            temp.write_bytes(b"x")
    assert fits.read_bytes() == b"x" and sidecar_path(fits).read_bytes() == b"x"
    with pytest.raises(ConfigError, match=r"is 256 bytes long; a file name holds at most 255"):
        plan_outputs(tmp_path / ("L" * 247 + ".mp4"), ["a"])  # its sidecar would not fit
    (tmp_path / "q.mp4.json").symlink_to(tmp_path / "nowhere")  # a dangling link is there: it is not replaced
    with pytest.raises(ConfigError, match="q.mp4.json already exists"):
        plan_outputs(tmp_path / "q.mp4", ["a"])
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(OutputWriteError, match="notes.txt/x.mp4.json"):  # one error, not the cleanup's own
        write_json({"prompt": "a"}, tmp_path / "notes.txt" / "x.mp4.json")
