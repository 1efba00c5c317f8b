"""Small frictions a new user hit (issue 19, item 4): each one-line error, message and default, checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvdm.data.cache import LatentCache
from lvdm.errors import DataError


def test_a_missing_latent_cache_names_the_command_that_builds_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        LatentCache(tmp_path / "no-cache")
    assert "python -m lvdm.cache" in str(caught.value) and "lvdm.data.cache" not in str(caught.value)


# ------------------------------------------------------------------------------------------------ train.py
@pytest.fixture
def train_script(monkeypatch, tmp_path):
    """train.py's ``main`` with the demo assets and the training itself stubbed out: what it decides, recorded."""
    import train as script
    from lvdm.training import demo, trainer
    from lvdm.training.trainer import TrainResult

    calls = {"demo": [], "train": []}
    monkeypatch.setattr(demo, "prepare_demo", lambda cfg, *a, **k: calls["demo"].append(cfg) or ["the assets"])
    result = TrainResult(tmp_path, 5, tmp_path / "temporal.safetensors", 1.0, 0.5)
    monkeypatch.setattr(trainer, "train", lambda cfg, **k: calls["train"].append(cfg) or result)
    monkeypatch.delenv("RANK", raising=False)
    return script, calls


@pytest.mark.parametrize(
    ("args", "makes_assets"),
    [
        ([], True),
        (["--config", "{repo}/configs/demo.yaml", "train.max_steps=5"], True),
        (["--config", "{copy}", "train.max_steps=5"], True),
        (["--config", "{repo}/configs/demo.yaml", "model.base={tmp}/mine"], False),
        (["--config", "{repo}/configs/t2v_sd15.yaml", "model.base={tmp}/sd15", "data.root={tmp}/clips"], False),
    ],
)
def test_the_demo_config_makes_its_assets_whatever_the_arguments(train_script, tmp_path, capsys, args, makes_assets):
    from lvdm.cli import run_cli

    script, calls = train_script
    copy = tmp_path / "my_demo.yaml"
    copy.write_text(script.DEMO_CONFIG.read_text())
    args = [a.format(copy=copy, tmp=tmp_path, repo=script.DEMO_CONFIG.parents[1]) for a in args]
    assert run_cli(script.main, ["--quiet", *args]) == 0
    assert bool(calls["demo"]) == makes_assets and len(calls["train"]) == 1
    assert ("demo: made the assets" in capsys.readouterr().out) == makes_assets


@pytest.mark.parametrize(("rank", "prints"), [("0", True), ("1", False)])
def test_only_rank_0_prints_the_summary(train_script, monkeypatch, capsys, rank, prints):
    from lvdm.cli import run_cli

    script, _ = train_script
    monkeypatch.setenv("RANK", rank)
    assert run_cli(script.main, ["--quiet", "train.max_steps=5"]) == 0
    assert ("finished at step 5" in capsys.readouterr().out) == prints


# ------------------------------------------------------------------------------------------------ sampling fps
@pytest.mark.parametrize(
    ("training_config", "fps"),
    [
        ({"data": {"frame_stride": 2, "target_fps": None}, "clip_fps": 12.0}, 12.0),  # 24 fps clips at stride 2
        ({"data": {"target_fps": 10.0}, "clip_fps": 12.0}, 10.0),  # a target rate is what the clips were resampled to
        ({"data": {"frame_stride": 2}}, None),  # a module from before clip_fps was recorded: the sampler's 8
    ],
)
def test_the_sampling_fps_default_is_the_modules_training_rate(tmp_path, training_config, fps):
    from lvdm import testing
    from lvdm.models import VideoUNet
    from lvdm.sampling_settings import temporal_defaults

    path = tmp_path / "module.safetensors"
    VideoUNet.from_unet2d(testing.tiny_unet("sd1")).save_temporal(path, training_config=training_config)
    assert temporal_defaults(path)["fps"] == fps
