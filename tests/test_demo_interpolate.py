"""The two interpolation stages on the demo (configs/demo_interpolate.yaml), shortened: trained together, each
makes the frames between its keyframes better with them than without (held-out, same model), and by 16 the
keyframes come back unchanged at 16x the rate. The control, an untrained context encoder with context gains and a
stage flag gain of exactly 1, is in tests/test_context.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_demo import REPO, demo_root  # noqa: F401 - the shared fixture

from lvdm.config import load_config
from lvdm.training.trainer import train

INTERPOLATE_STEPS = 75  # the demo's: 300; here the gains read 1.055 (coarse) and 1.033 (fine)


def test_both_interpolation_stages_use_their_keyframes(demo_root: Path):  # noqa: F811
    cfg = load_config([REPO / "configs" / "demo_interpolate.yaml"], [
        f"model.base={demo_root / 'base'}", f"data.root={demo_root / 'clips'}", f"output_dir={demo_root / 'interp'}",
        f"train.max_steps={INTERPOLATE_STEPS}", "train.checkpoint_every=1000", "train.validate_every=1000",
        "train.validation_prompts=[]",
    ])  # fmt: skip
    result = train(cfg, progress=False)
    g = result.gain
    assert g["context_gain_interpolate"] > 1.0 and g["context_gain_interpolate_fine"] > 1.0, g

    from lvdm import VideoPipeline

    pipe = VideoPipeline.from_pretrained(demo_root / "base", temporal=result.temporal_path)
    keys = pipe("a red disc moving down", num_frames=3, num_inference_steps=10, seed=0, progress=False).frames[0]
    out = pipe.interpolate(keys, factor=16, fps=1.5, num_inference_steps=10, seed=0, progress=False)
    assert out.frames.shape[1] == 33 and out.fps == 24.0 and np.array_equal(out.frames[0, ::16], keys)
    assert out.metadata[0]["interpolate"]["stages"] == ["interpolate", "interpolate_fine"]
