"""The decoder target's perceptual (LPIPS) loss (issue 13): the ``lpips`` package's network with the backbone
weights read from the user's file (never downloaded), its settings, and its place in the decoder's loss.

The tests that run the network need ``lpips`` and a torchvision that imports beside the installed torch; the CPU
torch this project tests on has none (PyPI's torchvision fails to load its operators beside it), so there they are
skipped, and they run wherever ``pip install 'lvdm[lpips]'`` works. The refusals run everywhere."""

from __future__ import annotations

import pickle
import sys

import pytest
import torch

from tests.conftest import tiny_overrides


def _lpips():
    """The lpips package, or a skip saying why it cannot be imported here."""
    try:
        import lpips
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's operators failing to load
        pytest.skip(f"lpips does not import here: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return lpips


def _backbone(tmp_path, net="vgg", seed=0):
    """torchvision's ``net`` with random weights, saved as its state dict (what torchvision's download holds)."""
    from safetensors.torch import save_file
    from torchvision import models

    torch.manual_seed(seed)
    model = {"vgg": models.vgg16, "alex": models.alexnet, "squeeze": models.squeezenet1_1}[net]()
    path = tmp_path / f"{net}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path, model


def _decoder_run(assets, out, **extra):
    values = {"train.target": "decoder", "data.holdout": 2, "train.disc_start": 1, "train.decoder_latent_noise": 0.2}
    return tiny_overrides(assets, out, **(values | extra))


# ------------------------------------------------------------------------------------------------ everywhere
def test_without_lpips_the_setting_is_refused_in_one_line(monkeypatch, tmp_path):
    from lvdm.errors import ConfigError
    from lvdm.modules.perceptual import Perceptual

    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError, as where it is not installed
    with pytest.raises(ConfigError, match=r"lpips package .*pip install 'lvdm\[lpips\]'") as caught:
        Perceptual("vgg", {})
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train.perceptual_weight": 1.0}, "train.perceptual_backbone: required"),
        ({"train.perceptual_weight": 1.0, "train.target": "denoise"}, "train.perceptual_weight: the decoder"),
        ({"train.perceptual_net": "resnet"}, "train.perceptual_net"),
        ({"train.perceptual_weight": -1.0}, "train.perceptual_weight"),
    ],
)
def test_perceptual_settings_are_checked(tiny_assets, tmp_path, override, message):
    from lvdm.config import load_config
    from lvdm.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config([], _decoder_run(tiny_assets, tmp_path, **override))


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def test_backbone_files_are_read_safely(tmp_path, capsys):
    from lvdm.errors import CheckpointError
    from lvdm.modules.perceptual import read_backbone

    with pytest.raises(CheckpointError, match="does not exist"):
        read_backbone(tmp_path / "missing.pth")
    weights = {"features.0.weight": torch.ones(2, 3, 1, 1), "classifier.1.weight": torch.ones(2)}
    torch.save(weights, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        read_backbone(tmp_path / "tv.pth")
    assert list(read_backbone(tmp_path / "tv.pth", allow_pickle=True)) == ["features.0.weight"]  # classifier dropped
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"features.0.weight": _Payload()}))
    with pytest.raises(CheckpointError, match="weights_only=True. refuses it"):
        read_backbone(tmp_path / "evil.pth", allow_pickle=True)  # weights_only: the payload never runs
    assert "a pickle ran code" not in capsys.readouterr().out
    (tmp_path / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_backbone(tmp_path / "torn.safetensors")


# ------------------------------------------------------------------------------------------------ with lpips
@pytest.mark.parametrize("net", ["vgg", "alex", "squeeze"])
def test_the_backbone_file_gives_the_network_lpips_builds_from_torchvision(tmp_path, monkeypatch, net):
    """The file's weights land where lpips itself puts torchvision's model (lpips given the same model through
    torchvision's constructor gives the same distances), and the distance is 0 between equal frames only."""
    lpips = _lpips()
    from lvdm.modules.perceptual import load_perceptual

    path, model = _backbone(tmp_path, net)
    ours = load_perceptual(net, path)
    name = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}[net]
    monkeypatch.setattr(lpips.pretrained_networks.tv, name, lambda *args, **kwargs: model)
    theirs = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
    a, b = torch.rand(3, 3, 40, 40) * 2 - 1, torch.rand(3, 3, 40, 40) * 2 - 1
    torch.testing.assert_close(ours(a, b), theirs(a, b).flatten())
    assert torch.all(ours(a, b) > 0) and torch.all(ours(a, a) == 0)
    assert not any(p.requires_grad for p in ours.parameters())
    ours.train()
    assert not ours.lpips.training  # no dropout in a loss


def test_a_backbone_of_another_network_is_refused(tmp_path):
    _lpips()
    from lvdm.errors import CheckpointError
    from lvdm.modules.perceptual import load_perceptual

    alex, _ = _backbone(tmp_path, "alex")
    with pytest.raises(CheckpointError, match=r"features\.\d+\.weight has shape .* the vgg backbone's|lacks"):
        load_perceptual("vgg", alex)


def test_the_perceptual_term_trains_the_decoder_and_is_reported(tiny_assets, tmp_path):
    """With the term on, the decoder's loss grows by weight x LPIPS and its gradient changes; both decoders' LPIPS
    distances are logged; a run stopped and resumed ends as the whole one."""
    _lpips()
    import json

    from lvdm.config import load_config
    from lvdm.training.step import step_generator
    from lvdm.training.trainer import Trainer
    from tests.conftest import whole_and_resumed

    path, _ = _backbone(tmp_path, "alex")  # alexnet needs 32 px frames: at 16 its pooling runs out of pixels
    settings = {"data.resolution": "[32,32]", "train.perceptual_net": "alex", "train.perceptual_backbone": str(path)}

    def run(out, **extra):
        return _decoder_run(tiny_assets, out, **(settings | {"train.perceptual_weight": 2.0} | extra))

    def loss_and_grads(weight: float):
        off = {} if weight else {"train.perceptual_net": "vgg", "train.perceptual_backbone": "null"}  # refused unused
        cfg = load_config([], run(tmp_path / str(weight), **{"train.perceptual_weight": weight} | off))
        trainer = Trainer(cfg, progress=False)
        loss = trainer.objective.loss(trainer.model_fn, next(trainer.batches), step_generator(0, 0, 0)).mean()
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten() for p in trainer.trainable.values()])

    l1, l1_grads = loss_and_grads(0.0)
    both, both_grads = loss_and_grads(2.0)
    assert both > l1 and not torch.allclose(both_grads, l1_grads)
    whole, a, b = whole_and_resumed(lambda out, **extra: run(out, **{"train.validate_every": 2} | extra), tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    figures = [line for line in lines if "lpips_video_decoder" in line]
    assert figures and all(line["lpips_image_decoder"] > 0 for line in figures)
