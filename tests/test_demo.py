"""The embedded demo, shortened: its base draws, its samples move like its clips, its motion gain measures motion.

One module-scoped run of each: the demo's clips, a base trained by a shorter recipe (the same code as the demo's),
the temporal layers trained on it in order, and a CONTROL trained on the same clips with their frames shuffled in
time. The control learns everything about the frames except their order, so its motion gain must be 1: the metric
can fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import lvdm.training.objectives as objectives
from lvdm.config import load_config
from lvdm.testing.demo_base import DemoBaseRecipe, demo_base_is_current, recipe_key, shape_measure, shows_a_shape
from lvdm.training.demo import prepare_demo, training_clips
from lvdm.training.trainer import train

REPO = Path(__file__).resolve().parents[1]
TEST_RECIPE = DemoBaseRecipe(vae_steps=300, unet_steps=400)  # the demo's: 600 and 1000
TEMPORAL_STEPS = 150  # the demo's: 300
CONTEXT_GAIN = 1.0  # "above 1"; the demo's own figures (300 steps) are in the README
PROMPTS = "[a red disc moving down, a cyan square moving right, a yellow square moving up]"


def _config(root: Path, out: str, *extra: str):
    paths = [f"model.base={root / 'base'}", f"data.root={root / 'clips'}", f"output_dir={root / out}"]
    steps = [f"train.max_steps={TEMPORAL_STEPS}", "train.checkpoint_every=1000", "train.validate_every=1000"]
    return load_config([REPO / "configs" / "demo.yaml"], [*paths, *steps, *extra])


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    root = tmp_path_factory.mktemp("demo")
    made = prepare_demo(_config(root, "run"), recipe=TEST_RECIPE)
    assert len(made) == 2  # the clips, then the base
    return root


@pytest.fixture(scope="module")
def demo_run(demo_root: Path):
    return train(_config(demo_root, "run", f"train.validation_prompts={PROMPTS}"), progress=False)


@pytest.fixture(scope="module")
def control_run(demo_root: Path):
    """The same recipe, but every training clip's frames in a random order (the held-out clips stay in order)."""
    real = objectives.training_loss
    generator = torch.Generator().manual_seed(0)

    def shuffled_in_time(model_fn, batch, *args, **kwargs):
        video = batch["video"]  # b f c h w
        orders = torch.stack([torch.randperm(video.shape[1], generator=generator) for _ in range(len(video))])
        # b f -> b f 1 1 1, broadcast over channels and pixels
        shuffled = torch.gather(video, 1, orders[:, :, None, None, None].expand_as(video))
        return real(model_fn, batch | {"video": shuffled}, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(objectives, "training_loss", shuffled_in_time)
        return train(_config(demo_root, "control", "train.validation_prompts=[]"), progress=False)


def _gif_frames(path: Path) -> np.ndarray:
    return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(Image.open(path))])


def test_the_base_is_cached_and_rebuilt_when_the_recipe_changes(demo_root: Path):
    cfg = _config(demo_root, "run")
    assert prepare_demo(cfg, recipe=TEST_RECIPE) == []  # current: nothing made again
    clips, resolution = training_clips(cfg), tuple(cfg.data.resolution)
    assert demo_base_is_current(demo_root / "base", recipe_key(TEST_RECIPE, clips, resolution))
    changed = DemoBaseRecipe(vae_steps=301, unet_steps=400)
    assert not demo_base_is_current(demo_root / "base", recipe_key(changed, clips, resolution))
    assert not demo_base_is_current(demo_root / "base", recipe_key(TEST_RECIPE, clips[1:], resolution))


def test_image_mode_draws_a_shape_on_its_background(demo_run):
    """Image mode (the frozen base, each frame from its own noise): at least 3 frames in 4 show one shape on a grey
    background, as :func:`shows_a_shape` measures it (2-45 % coloured or bright pixels, 70 % of them in one
    connected region, the rest greyish)."""
    gifs = sorted(p for p in demo_run.samples if p.name.startswith("image_mode_") and p.suffix == ".gif")
    assert len(gifs) == 3
    frames = [frame for gif in gifs for frame in _gif_frames(gif)]
    shown = [shows_a_shape(frame) for frame in frames]
    assert np.mean(shown) >= 0.75, [shape_measure(frame) for frame in frames]


def test_the_samples_move_like_the_clips(demo_run):
    """Sampled videos change between consecutive frames within 3x of the clips' change, with correlation > 0.5
    (static samples change by 0, static noise by about 60 with correlation near 0)."""
    g = demo_run.gain
    ratio = g["samples_frame_change"] / g["clips_frame_change"]
    assert 1 / 3 <= ratio <= 3 and g["samples_frame_correlation"] > 0.5, g
    assert g["samples_frame_correlation"] > g["image_mode_frame_correlation"], g  # the temporal layers tie frames


def test_the_motion_gain_sees_the_order_of_the_frames(demo_run):
    g = demo_run.gain
    assert g["motion_gain"] > 1.05, g


def test_a_module_trained_on_shuffled_clips_gets_no_motion_gain(control_run):
    """The control: trained without temporal order, its motion gain is 1 +- 0.02, although its temporal layers
    did learn (they beat the frozen image model: at initialisation every ratio is exactly 1)."""
    g = control_run.gain
    assert abs(g["motion_gain"] - 1) <= 0.02, g
    assert g["layers_off_ratio"] > 1.005, g


# ------------------------------------------------------------------------------------------------ context frames
@pytest.fixture(scope="module")
def context_run(demo_root: Path, demo_run):
    """configs/demo_context.yaml, shortened like the demo run and started from the demo run's text-to-video module
    (``model.temporal_init``, the encoder at zero): prediction and interpolation on the demo's clips."""
    paths = [f"model.base={demo_root / 'base'}", f"data.root={demo_root / 'clips'}", f"output_dir={demo_root / 'ctx'}"]
    steps = [f"train.max_steps={TEMPORAL_STEPS}", "train.checkpoint_every=1000", "train.validate_every=1000"]
    start = [f"model.temporal_init={demo_run.temporal_path}", "train.validation_prompts=[]"]
    cfg = load_config([REPO / "configs" / "demo_context.yaml"], [*paths, *steps, *start])
    return train(cfg, progress=False)


def test_the_context_gains_show_the_given_frames_are_used(context_run):
    """Held-out loss on the frames to make, without the given frames / with them (an untrained encoder gets
    exactly 1: tests/test_context.py)."""
    g = context_run.gain
    assert g["context_gain_predict"] > CONTEXT_GAIN and g["context_gain_interpolate"] > CONTEXT_GAIN, g


def test_rollout_seams_are_no_jumpier_than_the_chunks(context_run, demo_root: Path):
    from lvdm import VideoPipeline
    from lvdm.context_sampling import rollout_chunks, seam_changes

    pipe = VideoPipeline.from_pretrained(demo_root / "base", temporal=context_run.temporal_path)
    length = pipe.defaults["num_frames"]
    out = pipe("a red disc moving down", num_frames=3 * length, num_inference_steps=20, guidance_scale=4.0,
               seed=0, progress=False)  # fmt: skip
    seams, inside = seam_changes(out.frames[0], rollout_chunks(3 * length, length, 0, 2))
    assert len(seams) >= 2 and max(seams) <= max(inside), (seams, inside)
