"""The demo's CONTROL: the demo recipe trained on its clips with their frames shuffled in time.

It learns everything about the frames except their order, so its motion gain must be 1: the metric can fail. Its
own file so that pytest-xdist runs it beside tests/test_demo.py; both train on one base made once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_demo import _config, demo_root  # noqa: F401 - the shared fixture

import lvdm.training.objectives as objectives
from lvdm.training.trainer import train


@pytest.fixture(scope="module")
def control_run(demo_root: Path):  # noqa: F811 - the fixture imported above
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


def test_a_module_trained_on_shuffled_clips_gets_no_motion_gain(control_run):
    """The control: trained without temporal order, its motion gain is 1 +- 0.02, although its temporal layers
    did learn (they beat the frozen image model: at initialisation every ratio is exactly 1)."""
    g = control_run.gain
    assert abs(g["motion_gain"] - 1) <= 0.02, g
    assert g["layers_off_ratio"] > 1.005, g
