"""The embedded demo, shortened: its base draws, its samples move like its clips, its motion gain measures motion.

One module-scoped run of each: the demo's clips, a base trained by a shorter recipe (the same code as the demo's,
made once per session), and the temporal layers trained on it in order. The CONTROL, trained on the same clips with
their frames shuffled in time, is in tests/test_demo_control.py (so that another worker can run it): it learns
everything about the frames except their order, so its motion gain must be 1: the metric can fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_root
from PIL import Image, ImageSequence

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


def make_demo_assets(root: Path) -> None:
    made = prepare_demo(_config(root, "run"), recipe=TEST_RECIPE)
    assert len(made) == 3  # the clips, their motion-only captions, then the base


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """The demo's clips and a base trained by the shorter recipe, made once per session (shared with
    tests/test_demo_control.py, which may run on another worker)."""
    return shared_root(tmp_path_factory, "demo", make_demo_assets)


@pytest.fixture(scope="module")
def demo_run(demo_root: Path):
    return train(_config(demo_root, "run", f"train.validation_prompts={PROMPTS}"), progress=False)


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
