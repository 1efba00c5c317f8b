"""Temporal module files: only the new weights, with metadata, loadable onto any base of the same layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, video_inputs
from safetensors import safe_open
from safetensors.torch import save_file

from lvdm import testing
from lvdm.errors import TemporalModuleError
from lvdm.models import LAYOUTS, VideoUNet, read_temporal_file


@pytest.fixture
def trained(tmp_path):
    """A VideoUNet on base A (seed 0) with non-trivial temporal weights, saved to a file."""
    video = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=0))
    randomize(video.temporal_parameters())
    path = tmp_path / "motion.safetensors"
    video.save_temporal(path, training_config={"train": {"lr": 1e-4}})
    return video, path


def test_file_holds_only_the_new_parameters_and_metadata(trained):
    video, path = trained
    with safe_open(path, framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == set(video.temporal_state_dict())
    assert all(".temporal." in k or ".mixer." in k for k in keys)
    assert metadata["format"] == "lvdm.temporal" and metadata["format_version"] == "1"
    assert metadata["base_family"] == video.family
    assert json.loads(metadata["layout"]) == video.layout.to_dict()
    assert [s["name"] for s in json.loads(metadata["sites"])] == [s.name for s in video.sites]
    assert json.loads(metadata["training_config"]) == {"train": {"lr": 1e-4}}
    assert not list(path.parent.glob("*.tmp"))


def test_module_moves_to_another_base_of_the_same_layout(trained):
    video, path = trained
    other_base = testing.tiny_unet("sd1", seed=1)
    spatial_b = {k: v.clone() for k, v in other_base.state_dict().items()}
    moved = VideoUNet.from_temporal_file(other_base, path)
    for name, tensor in video.temporal_state_dict().items():
        assert torch.equal(dict(moved.named_temporal_parameters())[name], tensor)
    # the spatial weights are base B's, untouched: compare through the wrapped names
    moved_spatial = {k.replace(".spatial.", "."): v for k, v in moved.unet.state_dict().items()}
    for name, tensor in spatial_b.items():
        assert torch.equal(moved_spatial[name], tensor), name
    sample, timestep, text = video_inputs(moved.unet)
    with torch.no_grad():
        assert not torch.equal(moved(sample, timestep, text), video(sample, timestep, text))


def test_load_temporal_into_a_model_built_with_the_same_layout(trained):
    video, path = trained
    fresh = VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=2)).load_temporal(path)
    sample, timestep, text = video_inputs(fresh.unet)
    with torch.no_grad():
        assert (fresh(sample, timestep, text) - video(sample, timestep, text)).abs().max() > 0  # other base
        for name, tensor in video.temporal_state_dict().items():
            assert torch.equal(dict(fresh.named_temporal_parameters())[name], tensor)


def test_other_family_is_refused_with_what_differs(trained):
    _, path = trained
    sd2 = VideoUNet.from_unet2d(testing.tiny_unet("sd2"))
    before = {k: v.clone() for k, v in sd2.temporal_state_dict().items()}
    with pytest.raises(TemporalModuleError, match="base family") as info:
        sd2.load_temporal(path)
    assert str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in sd2.temporal_state_dict().items())  # untouched


def test_a_base_with_other_groupnorm_groups_is_refused(trained):
    """The temporal GroupNorms take the base's group count, and their weights have the same shape for any count: a
    module trained on a base with 32 groups loaded onto one with 16 and normalised otherwise, without a word. The
    control: the same module loads onto another base with 32 groups."""
    from diffusers import UNet2DConditionModel

    _, path = trained
    config = {**testing.tiny_unet("sd1").config, "norm_num_groups": 16}
    other = UNet2DConditionModel.from_config(config)
    with pytest.raises(TemporalModuleError, match="GroupNorms have 32 groups, this base's 16"):
        VideoUNet.from_temporal_file(other, path)
    VideoUNet.from_temporal_file(testing.tiny_unet("sd1", seed=3), path)


def test_a_refused_module_leaves_the_unet_as_it_was(trained, tmp_path):
    """VideoUNet.from_temporal_file inflated the UNet before checking the file: a refused module (another family, a
    part it cannot rebuild) left the base wrapped, and the right module was then refused as "inflated before". Now
    the checks run first on a copy of the UNet's shape. The control: the fitting module then loads onto it."""
    video, path = trained
    sd2_file = tmp_path / "sd2.safetensors"
    VideoUNet.from_unet2d(testing.tiny_unet("sd2")).save_temporal(sd2_file)
    with safe_open(path, framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    unknown_part = tmp_path / "part.safetensors"
    save_file(tensors, unknown_part, metadata=metadata | {"parts": json.dumps({"x": {"kind": "nope", "config": {}}})})
    unet = testing.tiny_unet("sd1", seed=1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    for bad, match in ((sd2_file, "base family"), (unknown_part, "cannot rebuild part 'x'")):
        with pytest.raises(TemporalModuleError, match=match):
            VideoUNet.from_temporal_file(unet, bad)
        assert unet.state_dict().keys() == before.keys(), bad  # no wrapper, no part
    moved = VideoUNet.from_temporal_file(unet, path)
    for name, tensor in video.temporal_state_dict().items():
        assert torch.equal(dict(moved.named_temporal_parameters())[name], tensor)


def test_other_layout_is_refused_with_what_differs(trained):
    _, path = trained
    attention_only = VideoUNet.from_unet2d(testing.tiny_unet("sd1"), LAYOUTS["attention_only"])
    with pytest.raises(TemporalModuleError, match=r"conv=True vs False"):
        attention_only.load_temporal(path)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path):
    path.write_bytes(b"this is not a safetensors file at all" * 10)


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty])
def test_corrupt_files_are_clear_errors_naming_the_file(trained, damage):
    _, path = trained
    damage(path)
    with pytest.raises(TemporalModuleError, match="safetensors|corrupt") as info:
        VideoUNet.from_temporal_file(testing.tiny_unet("sd1"), path)
    assert str(path) in str(info.value)


def test_a_plain_safetensors_file_is_not_a_temporal_module(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, path)
    with pytest.raises(TemporalModuleError, match="not an lvdm temporal module"):
        read_temporal_file(path)


def test_nan_weights_are_refused_by_name(trained, tmp_path):
    video, path = trained
    with safe_open(path, framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = sorted(tensors)[3]
    tensors[key][...] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(TemporalModuleError, match=key.replace(".", r"\.")):
        read_temporal_file(bad)


def test_missing_file_and_wrong_suffix(trained, tmp_path):
    video, _ = trained
    with pytest.raises(TemporalModuleError, match="does not exist"):
        video.load_temporal(tmp_path / "nope.safetensors")
    with pytest.raises(TemporalModuleError, match=r"\.safetensors"):
        video.save_temporal(tmp_path / "motion.pt")


def test_a_module_of_another_layout_names_the_layout_to_train_with(tmp_path):
    """An AnimateDiff-layout module as a Video LDM run's model.temporal_init (or the reverse) was refused in one
    line of about 1,500 characters, every site listed after the layout, advising a Python API. Now: the layout's
    difference alone and the model.layout that takes the module. The control: the same layout loads."""
    videos = {name: VideoUNet.from_unet2d(testing.tiny_unet("sd1", seed=0), LAYOUTS[name])
              for name in ("animatediff", "videoldm")}  # fmt: skip
    for name, other in (("animatediff", "videoldm"), ("videoldm", "animatediff")):
        videos[name].save_temporal(tmp_path / f"{name}.safetensors")
        module = read_temporal_file(tmp_path / f"{name}.safetensors")
        (problem,) = module.mismatches(videos[other])
        assert problem.startswith("temporal layout differs") and f"use model.layout={name} in training" in problem
        assert len(problem) < 300, problem
        assert module.mismatches(videos[name]) == []
