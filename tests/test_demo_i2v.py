"""The image-to-video demo (configs/demo_i2v.yaml), shortened, and its CONTROL.

Both train on the demo's clips, captioned by their motion only ("a shape moving down"), on the base tests/test_demo.py
makes once per session. The run conditions each clip on its own first frame, the control on the first frame of
another clip of the batch: a picture that says nothing about the clip. Validation always gives each held-out clip its
own frame, so the run's image gain is above 1 and the control's must be 1: the metric can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_demo import REPO, demo_root  # noqa: F401 - the shared fixture

import lvdm.training.step as step
from lvdm.config import load_config
from lvdm.testing.image_adapters import write_image_encoder
from lvdm.training.trainer import train

I2V_STEPS = 100  # the demo's: 300; here the gain reads 1.214, the control 0.998


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_encoder(tmp_path_factory.mktemp("i2v") / "image_encoder")  # the demo's (seeded) encoder


def _config(root: Path, encoder: Path, out: str):
    return load_config([REPO / "configs" / "demo_i2v.yaml"], [
        f"model.base={root / 'base'}", f"data.manifest={root / 'clips' / 'motion.jsonl'}",
        f"model.image_encoder={encoder}", f"output_dir={root / out}", f"train.max_steps={I2V_STEPS}",
        "train.checkpoint_every=1000", "train.validate_every=1000", "train.validation_prompts=[]",
    ])  # fmt: skip


def test_the_image_gain_shows_the_picture_is_used(demo_root: Path, encoder: Path):  # noqa: F811
    g = train(_config(demo_root, encoder, "i2v"), progress=False).gain
    assert g["image_gain"] > 1.1, g


def test_a_module_trained_on_pictures_of_other_clips_gets_no_image_gain(demo_root: Path, encoder: Path):  # noqa: F811
    real = step.image_inputs

    def another_clips_frame(batch, frozen, train_cfg, generator, **kwargs):
        if generator is not None:  # training; validation (no generator) gives each clip its own frame
            batch = batch | {"video": batch["video"].roll(1, dims=0)}
        return real(batch, frozen, train_cfg, generator, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "image_inputs", another_clips_frame)
        g = train(_config(demo_root, encoder, "i2v_control"), progress=False).gain
    assert abs(g["image_gain"] - 1) <= 0.03, g
