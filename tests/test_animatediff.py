"""AnimateDiff motion modules: the animatediff layout equals diffusers' UNetMotionModel; modules imported from a
MotionAdapter folder or an original checkpoint sample as diffusers' AnimateDiffPipeline does; import -> fine-tune ->
export round trip; bad files refused with their reason. Tiny models (16x16 px, 4 frames, 3 steps)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides, whole_and_resumed
from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel
from safetensors.torch import load_file, save_file

from lvdm.errors import CheckpointError, ConfigError, TemporalModuleError
from lvdm.models import VideoUNet
from lvdm.models.animatediff import export_motion_adapter, import_motion_module, is_motion_module
from lvdm.models.layout import LAYOUTS
from lvdm.pipeline import VideoPipeline
from lvdm.testing import tiny_unet
from lvdm.testing.animatediff import original_state_dict, tiny_motion_adapter, write_original_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS, FRAMES, SIZE = 3, 4, 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Tiny MotionAdapters shaped like AnimateDiff v2 (mid-block module, 32-frame table) and v1 (neither, 24), as
    folders and as original checkpoints."""
    root = tmp_path_factory.mktemp("animatediff")
    out = {}
    for mid in (True, False):
        adapter = tiny_motion_adapter(mid_block=mid, max_frames=32 if mid else 24, seed=1 if mid else 2)  # v2, v1
        name = "mid" if mid else "nomid"
        adapter.save_pretrained(root / name)
        write_original_checkpoint(adapter, root / f"{name}_original.safetensors")
        write_original_checkpoint(adapter, root / f"{name}_original.ckpt")
        out[name] = adapter
    out["root"] = root
    return out


def video_inputs(b: int = 2, f: int = 6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 4, f, 8, 8, generator=g), torch.tensor([500, 20]), torch.randn(b, 5, 32, generator=g)


# ------------------------------------------------------------------------------------------------ the layout
def test_animatediff_layout_equals_unet_motion_model(adapters):
    unet = tiny_unet()
    reference = UNetMotionModel.from_unet2d(copy.deepcopy(unet), adapters["mid"]).eval()
    video = VideoUNet.from_temporal_file(unet, adapters["root"] / "mid").eval()
    assert video.layout.style == "animatediff" and video.layout.mid_block and video.layout.max_frames == 32
    assert len(video.sites) == 2 + 2 + 1 + 3 + 3  # a module per layer: down 2 + 2, mid 1, up 3 + 3
    x, t, text = video_inputs()
    with torch.no_grad():
        ours = video(x, t, text)
        theirs = reference(x, t, text.repeat_interleave(x.shape[2], 0)).sample
        image_mode = video(x, t, text, image_only_indicator=torch.ones(2))
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    # the modules move frames (the control): image mode, the same base without them, differs
    assert (ours - image_mode).abs().max() > 1e-2 * theirs.abs().max()


def test_new_animatediff_modules_start_as_the_image_model():
    unet = tiny_unet()
    frames = copy.deepcopy(unet)
    video = VideoUNet.from_unet2d(unet, LAYOUTS["animatediff"]).eval()
    assert video.mix_alphas() == {} and {s.kind for s in video.sites} == {"motion"}
    x, t, text = video_inputs(f=3)
    with torch.no_grad():
        ours = video(x, t, text)
        # b c f h w -> (b f) c h w, frame by frame through the untouched 2D UNet
        flat = x.permute(0, 2, 1, 3, 4).reshape(-1, 4, 8, 8)
        theirs = frames(flat, t.repeat_interleave(3), text.repeat_interleave(3, 0)).sample
    theirs = theirs.reshape(2, 3, 4, 8, 8).permute(0, 2, 1, 3, 4)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_more_frames_than_the_frame_table_is_a_clear_error(adapters):
    video = VideoUNet.from_temporal_file(tiny_unet(), adapters["root"] / "mid")
    x, t, text = video_inputs(b=1, f=33)
    with pytest.raises(ValueError, match="at most 32"):
        video(x, t[:1], text[:1])
    with pytest.raises(ValueError, match=r"whole numbers in \[0, 32\)"):
        video(x[:, :, :2], t[:1], text[:1], frame_positions=torch.tensor([0.0, 0.5]))


# ------------------------------------------------------------------------------------------------ sampling
def diffusers_frames(base: Path, adapter: MotionAdapter, noise: torch.Tensor, prompt: str) -> np.ndarray:
    """diffusers' AnimateDiffPipeline on the same base, adapter, initial latents, steps and guidance (uint8 scale)."""
    pipe = AnimateDiffPipeline.from_pretrained(base, motion_adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        prompt, num_frames=noise.shape[2], height=SIZE, width=SIZE, latents=noise, num_inference_steps=STEPS,
        guidance_scale=7.5, output_type="np",
    ).frames  # fmt: skip
    return frames[0] * 255


@pytest.mark.parametrize(
    "source", ["mid", "nomid", "mid_original.safetensors", "nomid_original.safetensors", "mid_original.ckpt"]
)
def test_imported_module_samples_as_animatediff_pipeline(tiny_assets, adapters, source):
    path = adapters["root"] / source
    pipe = VideoPipeline.from_pretrained(tiny_assets["base"], temporal=path, allow_pickle=source.endswith(".ckpt"))
    assert pipe.video.layout.mid_block == source.startswith("mid")
    assert pipe.video.layout.max_frames == (32 if source.startswith("mid") else 24)  # the table's length, read
    out = pipe("a dog running", num_frames=FRAMES, height=SIZE, width=SIZE, seed=3, scheduler="ddim",
               num_inference_steps=STEPS, progress=False)  # fmt: skip
    adapter = adapters["mid" if source.startswith("mid") else "nomid"]
    expected = diffusers_frames(tiny_assets["base"], adapter, out.noise, "a dog running")
    assert out.frames.shape == (1, FRAMES, SIZE, SIZE, 3)
    assert np.abs(out.frames[0].astype(np.float64) - expected).max() <= 1.01
    image = VideoPipeline.from_pretrained(tiny_assets["base"])("a dog running", latents=out.noise, scheduler="ddim",
                                                                num_inference_steps=STEPS, progress=False)  # fmt: skip
    assert np.abs(out.frames.astype(np.float64) - image.frames).max() > 8  # the control: the modules change frames


def test_pickle_module_needs_allow_pickle(tiny_assets, adapters):
    with pytest.raises(CheckpointError, match="pickle"):
        VideoPipeline.from_pretrained(tiny_assets["base"], temporal=adapters["root"] / "mid_original.ckpt")


# ------------------------------------------------------------------------------------------------ import, export
def test_import_writes_a_module_that_loads_like_any_other(tiny_assets, adapters, tmp_path):
    out = tmp_path / "mm.safetensors"
    module = import_motion_module(adapters["root"] / "mid_original.safetensors", out, base=tiny_assets["base"])
    assert not is_motion_module(out) and is_motion_module(adapters["root"] / "mid")
    assert module.source["format"] == "animatediff" and module.layout.style == "animatediff"
    # the same weights as the folder, whichever way they came in
    folder = import_motion_module(adapters["root"] / "mid", base=tiny_assets["base"])
    assert module.tensors.keys() == folder.tensors.keys()
    assert all(torch.equal(module.tensors[k], folder.tensors[k]) for k in module.tensors)
    # and back: the exported adapter holds the original tensors
    exported = export_motion_adapter(out, tmp_path / "adapter")
    again = MotionAdapter.from_pretrained(exported).state_dict()
    original = adapters["mid"].state_dict()
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_round_trip_fine_tune_export_equals_lvdm(tiny_assets, adapters, tmp_path):
    from lvdm.config import load_config
    from lvdm.training.trainer import train

    overrides = tiny_overrides(tiny_assets, tmp_path / "run", **{
        "model.layout": "animatediff", "model.temporal_init": adapters["root"] / "nomid", "train.max_steps": 3,
        "train.lr": 1e-3, "train.checkpoint_every": 3,
    })  # fmt: skip
    result = train(load_config([], overrides), progress=False)
    exported = export_motion_adapter(result.temporal_path, tmp_path / "tuned_adapter")
    tuned = MotionAdapter.from_pretrained(exported)
    assert not tuned.config.use_motion_mid_block  # the imported module's own shape, kept through training
    before, after = adapters["nomid"].state_dict(), tuned.state_dict()
    assert max((before[k] - after[k]).abs().max() for k in before) > 1e-4  # it did train
    pipe = VideoPipeline.from_pretrained(tiny_assets["base"], temporal=result.temporal_path)
    out = pipe("a red ball", num_frames=FRAMES, height=SIZE, width=SIZE, seed=5, scheduler="ddim",
               num_inference_steps=STEPS, progress=False)  # fmt: skip
    expected = diffusers_frames(tiny_assets["base"], tuned, out.noise, "a red ball")
    assert np.abs(out.frames[0].astype(np.float64) - expected).max() <= 1.01


def test_fine_tuning_starts_from_the_imported_module(tiny_assets, adapters, tmp_path):
    """No re-initialisation: the training model is diffusers' UNetMotionModel with the adapter, and the first loss is
    the same whichever file the module came from, and not the loss of fresh modules."""
    from lvdm.config import load_config
    from lvdm.training.setup import build_model
    from lvdm.training.trainer import train

    def overrides(name, **extra):
        return tiny_overrides(tiny_assets, tmp_path / name, **{
            "model.layout": "animatediff", "train.max_steps": 1, "train.checkpoint_every": 1, **extra
        })  # fmt: skip

    cfg = load_config([], overrides("model", **{"model.temporal_init": adapters["root"] / "mid_original.safetensors"}))
    video, _, _ = build_model(cfg, torch.device("cpu"), "no")
    reference = UNetMotionModel.from_unet2d(tiny_unet(), adapters["mid"]).eval()
    x, t, text = video_inputs()
    with torch.no_grad():
        ours, theirs = video.eval()(x, t, text), reference(x, t, text.repeat_interleave(6, 0)).sample
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    losses = {}
    for name, init in (("folder", adapters["root"] / "mid"), ("ckpt", adapters["root"] / "mid_original.safetensors"),
                       ("fresh", None)):  # fmt: skip
        extra = {"model.temporal_init": init} if init is not None else {}
        losses[name] = train(load_config([], overrides(name, **extra)), progress=False).first_loss
    assert losses["folder"] == losses["ckpt"]
    assert abs(losses["folder"] - losses["fresh"]) > 1e-4


def test_animatediff_layout_resumes_exactly(tiny_assets, tmp_path):
    def overrides(output_dir, **extra):
        return tiny_overrides(tiny_assets, output_dir, **{"model.layout": "animatediff", **extra})

    _, whole, resumed = whole_and_resumed(overrides, tmp_path)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


# ------------------------------------------------------------------------------------------------ bad files
def test_truncated_and_inconsistent_modules_are_named(tiny_assets, adapters, tmp_path):
    base = tiny_assets["base"]
    data = (adapters["root"] / "mid_original.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        import_motion_module(tmp_path / "cut.safetensors", base=base)
    ckpt = (adapters["root"] / "mid_original.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(ckpt[: len(ckpt) // 2])
    with pytest.raises(TemporalModuleError, match="truncated or corrupt"):
        import_motion_module(tmp_path / "cut.ckpt", base=base, allow_pickle=True)
    tensors = original_state_dict(adapters["mid"])
    extra = tensors | {"down_blocks.0.motion_modules.0.temporal_transformer.lora_up.weight": torch.zeros(2, 2)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(TemporalModuleError, match=r"unexpected keys: down_blocks\.0\.motion_modules\.0\.lora_up"):
        import_motion_module(tmp_path / "extra.safetensors", base=base)
    missing = {k: v for k, v in tensors.items() if "up_blocks.1.motion_modules.2" not in k}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(TemporalModuleError, match=r"up_blocks\.1\.motion_modules\.2"):
        import_motion_module(tmp_path / "missing.safetensors", base=base)


def test_hostile_adapter_folders_are_refused_in_one_line(tiny_assets, adapters, tmp_path):
    import shutil

    for name, change in (
        ("huge_table", {"motion_max_seq_length": 10**9}),
        ("widths", {"block_out_channels": 32}),
        ("class", {"_class_name": "UNet2DConditionModel"}),
        ("heads", {"motion_num_attention_heads": [8, 4]}),
        ("uneven_heads", {"motion_num_attention_heads": 3}),
    ):
        folder = tmp_path / name
        shutil.copytree(adapters["root"] / "mid", folder)
        config = json.loads((folder / "config.json").read_text()) | change
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(TemporalModuleError) as caught:
            import_motion_module(folder, base=tiny_assets["base"])
        assert str(folder) in str(caught.value), name
        if name == "uneven_heads":  # its count is the folder's own: --heads cannot change it
            assert "config.json's motion_num_attention_heads" in str(caught.value)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TemporalModuleError, match="not valid JSON"):
        import_motion_module(tmp_path / "nested", base=tiny_assets["base"])


def test_module_for_another_base_is_refused(tiny_assets, adapters, tmp_path):
    with pytest.raises(TemporalModuleError, match="block widths"):
        import_motion_module(adapters["root"] / "mid", base=tiny_assets["base_sd2"])
    with pytest.raises(TemporalModuleError, match="not SD 1.5's"):
        import_motion_module(adapters["root"] / "mid")  # no base, and not SD 1.5's widths
    # SDXL's widths: refused as such, before the rest of the file is looked at
    sdxl = {f"down_blocks.{i}.motion_modules.0.norm.weight": torch.ones(w) for i, w in enumerate((320, 640, 1280))}
    sdxl |= {f"down_blocks.{i}.motion_modules.0.transformer_blocks.0.norm1.weight": torch.ones(1) for i in range(3)}
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(TemporalModuleError, match="SDXL module"):
        import_motion_module(tmp_path / "sdxl.safetensors")


def test_sd15_widths_make_an_sd1_module_refused_elsewhere(tiny_assets, adapters, monkeypatch):
    """A module of SD's widths is an SD 1.5 module whatever base it is imported for, and only SD 1.x bases take it
    (an SD2 base has the same widths). Shown at toy size by taking the tiny widths for SD's."""
    from lvdm.models import animatediff

    plain = import_motion_module(adapters["root"] / "mid", base=tiny_assets["base"])
    assert plain.family.startswith("custom-")  # the base's own family: nothing is known of other widths
    monkeypatch.setattr(animatediff, "SD_WIDTHS", (32, 64))
    assert import_motion_module(adapters["root"] / "mid", base=tiny_assets["base"]).family == "sd1"
    with pytest.raises(TemporalModuleError, match="made for base family 'sd1', this base is 'custom-"):
        VideoUNet.from_temporal_file(tiny_unet(), adapters["root"] / "mid")


def test_gradient_checkpointing_gives_the_same_gradients(adapters):
    grads = []
    for checkpointing in (False, True):
        video = VideoUNet.from_temporal_file(tiny_unet(), adapters["root"] / "mid").freeze_base()
        video.enable_gradient_checkpointing(checkpointing)
        x, t, text = video_inputs(f=3)
        video(x, t, text).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in video.named_temporal_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def test_export_refuses_what_a_motion_adapter_cannot_hold(tiny_assets, adapters, tmp_path):
    video = VideoUNet.from_unet2d(tiny_unet(), LAYOUTS["videoldm"])
    video.save_temporal(tmp_path / "videoldm.safetensors")
    with pytest.raises(TemporalModuleError, match="'videoldm' layout"):
        export_motion_adapter(tmp_path / "videoldm.safetensors", tmp_path / "out")
    module = tmp_path / "mm.safetensors"
    import_motion_module(adapters["root"] / "mid", module, base=tiny_assets["base"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="not an empty folder"):  # exit 2, as every existing output
        export_motion_adapter(module, tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "mm.safetensors", "videoldm.safetensors"]


def test_too_many_frames_for_the_module_is_one_config_error(tiny_assets, adapters):
    pipe = VideoPipeline.from_pretrained(tiny_assets["base"], temporal=adapters["root"] / "nomid")
    with pytest.raises(ConfigError, match="at most 24 frames"):
        pipe("a cat", num_frames=25, height=SIZE, width=SIZE, num_inference_steps=1, progress=False)


# ------------------------------------------------------------------------------------------------ the CLI
def convert(*args: object, command=None) -> subprocess.CompletedProcess[str]:
    """``python -m lvdm.convert ARGS``; with conftest's ``command``, its ``main`` in this process (no interpreter
    start-up)."""
    if command is None:
        return subprocess.run([sys.executable, "-m", "lvdm.convert", *map(str, args)], capture_output=True, text=True,
                              cwd=REPO, timeout=300)  # fmt: skip
    return command("-m", "lvdm.convert", *args)


def test_convert_cli_round_trip_and_one_line_errors(tiny_assets, adapters, tmp_path, command):
    source = adapters["root"] / "mid_original.ckpt"
    refused = convert("motion-module", source, tmp_path / "mm.safetensors", "--base", tiny_assets["base"])
    assert refused.returncode == 1 and "allow-pickle" in refused.stderr and "Traceback" not in refused.stderr
    done = convert("motion-module", source, tmp_path / "mm.safetensors", "--base", tiny_assets["base"],
                   "--allow-pickle", command=command)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "11 motion modules (with mid block, 32 frames at most)" in done.stdout
    again = convert("motion-module", source, tmp_path / "mm.safetensors", "--allow-pickle", command=command)
    assert again.returncode == 2 and "already exists" in again.stderr
    back = convert("to-diffusers", tmp_path / "mm.safetensors", tmp_path / "adapter", command=command)
    assert back.returncode == 0, back.stderr
    again = convert("to-diffusers", tmp_path / "mm.safetensors", tmp_path / "adapter", command=command)
    assert again.returncode == 2 and "not an empty folder" in again.stderr  # as motion-module's existing output
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["_class_name"] == "MotionAdapter"
    tensors = load_file(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(tensors["mid_block.motion_modules.0.proj_out.weight"],
                       adapters["mid"].mid_block.motion_modules[0].proj_out.weight)  # fmt: skip
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "missing.safetensors")  # passed, then failed at the end
    early = convert("motion-module", source, tmp_path / "gone.safetensors", "--base", tiny_assets["base"],
                    "--allow-pickle", command=command)  # fmt: skip
    assert early.returncode == 2 and "gone.safetensors already exists" in early.stderr, early.stderr
    newline = convert("to-diffusers", tmp_path / "mm.safetensors", tmp_path / "n\nl", command=command)
    assert newline.returncode == 2 and "holds a control character" in newline.stderr, newline.stderr
    assert not (tmp_path / "n\nl").exists()
    for args, message in (  # "" was the working folder: both said "." exists / is not .safetensors
        (("to-diffusers", tmp_path / "mm.safetensors", ""), "the output folder is empty ('')"),
        (("motion-module", source, ""), "the output is empty ('')"),
    ):
        empty = convert(*args, command=command)
        assert empty.returncode == 2 and empty.stderr.count("\n") == 1 and message in empty.stderr, empty.stderr
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")  # os.replace onto it was a NotADirectoryError
    for args in (("to-diffusers", tmp_path / "nothing.safetensors", tmp_path / "x"),
                 ("to-diffusers", tmp_path / "mm.safetensors", tmp_path / "dangling"),
                 ("motion-module", tmp_path / "adapter" / "config.json", tmp_path / "y.safetensors")):  # fmt: skip
        bad = convert(*args, command=command)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_sample_cli_takes_a_motion_adapter_folder(tiny_assets, adapters, tmp_path, command):
    out = tmp_path / "dog.mp4"
    done = command(
        REPO / "sample.py", "--quiet", "--base", tiny_assets["base"], "--temporal", adapters["root"] / "mid",
        "--prompt", "a dog", "--frames", "4", "--height", "16", "--width", "16", "--steps", "2", "--out", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.is_file() and json.loads(Path(f"{out}.json").read_text())["model"]["temporal"].endswith("mid")


# ------------------------------------------------------------------------------------------------ with every feature
def test_the_layout_trains_with_context_and_fps_and_samples_them_on_another_base(tiny_assets, adapters, tmp_path):
    """An imported module fine-tuned with context frames and the frame rate, then moved to a single-file base with a
    LoRA: continuing a video, rollout past the training length, interpolation, a guidance schedule, the mixed noise
    prior and an fps setting all run on it."""
    from conftest import write_sampling_files

    from lvdm.config import load_config
    from lvdm.training.trainer import train

    overrides = tiny_overrides(tiny_assets, tmp_path / "run", **{
        "model.layout": "animatediff", "model.temporal_init": adapters["root"] / "mid", "model.context": "true",
        "model.fps_conditioning": "true", "train.tasks": "{text: 1, predict: 1, interpolate: 1}",
        "train.interpolate_every": 4, "data.num_frames": 5, "data.frame_stride": "[1,2]", "data.holdout": 1,
        "train.max_steps": 2,
        "train.checkpoint_every": 2, "train.noise_prior": "mixed",
    })  # fmt: skip
    result = train(load_config([], overrides), progress=False)
    assert {"context_gain_predict", "context_gain_interpolate"} <= set(result.gain)
    files = write_sampling_files(tmp_path / "bases")
    pipe = VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=[f"{files['lora']}:0.7"],
                                         temporal=result.temporal_path)  # fmt: skip
    assert pipe.has_context and pipe.has_fps and pipe.video.layout.style == "animatediff"
    fast = {"num_inference_steps": 2, "seed": 1, "progress": False}
    clip = pipe("a red disc", fps=6, guidance_schedule="oscillating", **fast)
    assert clip.frames.shape == (1, 5, 16, 16, 3) and clip.metadata[0]["settings"]["noise_prior"] == "mixed"
    assert pipe("a red disc", context=clip.frames[0], num_frames=4, **fast).frames.shape[1] == 4
    assert pipe("a red disc", num_frames=11, **fast).frames.shape[1] == 11  # rollout in windows of 5
    smooth = pipe.interpolate(clip.frames[0, :3], factor=4, **fast)
    assert smooth.frames.shape[1] == 9 and np.array_equal(smooth.frames[0, ::4], clip.frames[0, :3])
    image = VideoPipeline.from_pretrained(files["b"], base_config=files["a"], loras=[f"{files['lora']}:0.7"])
    plain = image("a red disc", latents=clip.noise, fps=6, guidance_schedule="oscillating", **fast)
    assert np.abs(plain.frames.astype(int) - clip.frames).max() > 8  # the module is at work on the second base


def test_hostile_motion_modules_and_bases_are_one_clear_error(tiny_assets, adapters, tmp_path):
    """Each was a hang (a FIFO as a config.json: the read waited for a writer forever) or a traceback."""
    import os

    good = adapters["root"] / "mid_original.safetensors"
    fifo_adapter, fifo_base, no_config = tmp_path / "fifo_adapter", tmp_path / "fifo_base", tmp_path / "x.safetensors"
    for folder in (fifo_adapter, fifo_base / "unet", no_config):
        folder.mkdir(parents=True)
    os.mkfifo(fifo_adapter / "config.json")
    os.mkfifo(fifo_base / "unet" / "config.json")
    listed = tmp_path / "listed" / "unet"
    listed.mkdir(parents=True)
    (listed / "config.json").write_text("[1]")
    tensors = load_file(good)
    table = next(key for key in tensors if key.endswith("pos_encoder.pe"))
    odd, empty, evil = tmp_path / "odd.safetensors", tmp_path / "empty_table.safetensors", tmp_path / "evil.ckpt"
    save_file({k: v[..., :3].contiguous() if k.endswith("pos_encoder.pe") else v for k, v in tensors.items()}, odd)
    save_file({k: v[..., :0].contiguous() if k.endswith("pos_encoder.pe") else v for k, v in tensors.items()}, empty)
    assert tensors[table].shape[-1] > 3
    cases = [
        (fifo_adapter, {}, "its config.json cannot be read"),
        (good, {"base": fifo_base}, "cannot read a UNet config"),
        (no_config, {}, "its config.json cannot be read"),
        (good, {"base": tmp_path / "listed"}, "is not a UNet config"),
        (odd, {}, "not a frame table"),
        (empty, {}, "not a frame table"),
        (good, {"heads": 3}, "3 attention heads do not divide its widths"),
        (good, {"heads": 10**6}, "attention heads do not divide"),
        (evil, {"allow_pickle": True}, r"refuses it \(.*\); lvdm never unpickles code"),  # not torch's advice
        (tmp_path / "empty.ckpt", {"allow_pickle": True}, r"\(truncated or corrupt\?\): EOFError"),  # ended in a colon
    ]
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    evil.write_bytes(pickle.dumps({"a": Payload()}, protocol=4))  # torch also warned of the protocol, a 2nd line
    (tmp_path / "empty.ckpt").write_bytes(b"")
    import warnings

    for source, options, message in cases:
        with pytest.raises((TemporalModuleError, CheckpointError), match=message), warnings.catch_warnings():
            warnings.simplefilter("error")
            import_motion_module(source, **options)
    assert import_motion_module(good, base=tiny_assets["base"]) is not None  # the control: the good file imports


def test_a_file_that_appears_during_the_conversion_is_kept(tiny_assets, adapters, tmp_path, command, monkeypatch):
    """OUT was checked before the conversion and replaced when written; without --overwrite the rename is now
    exclusive (the control: with --overwrite the file is replaced)."""
    from lvdm import fileio

    out, place = tmp_path / "mm.safetensors", fileio._place

    def someone_writes_first(temp, path):
        out.write_bytes(b"written meanwhile")
        place(temp, path)

    monkeypatch.setattr(fileio, "_place", someone_writes_first)
    source = adapters["root"] / "mid_original.safetensors"
    refused = convert("motion-module", source, out, "--base", tiny_assets["base"], command=command)
    assert refused.returncode == 1 and "another run wrote it while" in refused.stderr, refused.stderr
    assert out.read_bytes() == b"written meanwhile"
    done = convert("motion-module", source, out, "--base", tiny_assets["base"], "--overwrite", command=command)
    assert done.returncode == 0, done.stderr
    assert load_file(out)


def test_a_motion_adapter_folder_that_cannot_be_placed_is_one_line(tiny_assets, adapters, tmp_path, command,
                                                                   monkeypatch):  # fmt: skip
    """to-diffusers' output under a file, on a full disk, or filled by another program while it wrote were
    tracebacks; its folder and files were 0700/0600 whatever the umask (the control: they follow it)."""
    import os

    from diffusers import MotionAdapter

    module = tmp_path / "mm.safetensors"
    source = adapters["root"] / "mid_original.safetensors"
    assert convert("motion-module", source, module, "--base", tiny_assets["base"], command=command).returncode == 0
    (tmp_path / "a_file").write_text("mine")
    full = MotionAdapter.save_pretrained

    def full_disk(self, folder, **kwargs):
        full(self, folder, **kwargs)
        raise OSError(28, "No space left on device", str(folder))

    def someone_writes(self, folder, **kwargs):
        full(self, folder, **kwargs)
        (tmp_path / "empty" / "notes.txt").write_text("mine")

    (tmp_path / "empty").mkdir()
    for out, writer, message in ((tmp_path / "a_file" / "adapter", full, "a_file is not a folder"),
                                 (tmp_path / "adapter", full_disk, "No space left on device"),
                                 (tmp_path / "empty", someone_writes, "another run wrote it")):  # fmt: skip
        monkeypatch.setattr(MotionAdapter, "save_pretrained", writer)
        bad = convert("to-diffusers", module, out, command=command)
        assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty", "mm.safetensors"]  # no temporary folder
    assert (tmp_path / "a_file").read_text() == (tmp_path / "empty" / "notes.txt").read_text() == "mine"
    monkeypatch.setattr(MotionAdapter, "save_pretrained", full)
    mask = os.umask(0o022)
    try:
        assert convert("to-diffusers", module, tmp_path / "adapter", command=command).returncode == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "adapter").iterdir()} == {0o644}
