"""The decoder target's perceptual loss: LPIPS (Zhang et al.) through the ``lpips`` package.

``lpips`` ships its calibrated linear layers inside the package; the backbone's ImageNet weights are torchvision's
download, which lvdm never makes: ``train.perceptual_backbone`` names the file the user has (torchvision's
``vgg16-397923af.pth``, ``alexnet-owt-7be5be79.pth`` or ``squeezenet1_1-b8a52dc0.pth``, or the same state dict saved
as ``.safetensors``). Its ``features.<i>.*`` weights fill the backbone's slices, which ``lpips`` numbers as
torchvision does; anything else in the file (the classifier) is ignored, and a missing or misshapen weight is
refused. The network is frozen: gradients pass through it to the decoder, none are kept.

Install it with ``pip install 'lvdm[lpips]'`` (it needs a torchvision that imports beside the installed torch).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lvdm.errors import CheckpointError, ConfigError

NETS = ("vgg", "alex", "squeeze")
"""The backbones ``lpips`` calibrates (``train.perceptual_net``)."""


def _import_lpips():
    try:
        import lpips
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing to load its operators
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            "train.perceptual_weight > 0 needs the lpips package and a torchvision that works with this torch "
            f"(pip install 'lvdm[lpips]'); importing it failed: {reason}"
        ) from None
    return lpips


def read_backbone(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The backbone's ``features.*`` weights from ``path``: ``.safetensors``, or (``allow_pickle``) torchvision's
    ``.pth``, read with ``torch.load(weights_only=True)``; refused as every weights file lvdm reads is
    (:func:`lvdm.models.loading.check_weights_file`)."""
    from lvdm.models.loading import check_weights_file, load_pickled_weights

    path = Path(path)
    check_weights_file(path, allow_pickle=allow_pickle, what="train.perceptual_backbone:")
    if path.suffix != ".safetensors":
        state = load_pickled_weights(path, "train.perceptual_backbone:")
    else:
        try:
            from safetensors.torch import load_file

            state = load_file(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file, told in one line
            raise CheckpointError(f"train.perceptual_backbone: {path} is not readable: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"train.perceptual_backbone: {path} holds no state dict")
    return {k: v for k, v in state.items() if k.startswith("features.") and isinstance(v, torch.Tensor)}


class Perceptual(nn.Module):
    """LPIPS distance of frames ``(n, 3, h, w)`` in [-1, 1] to targets of the same shape: ``(n,)``."""

    def __init__(self, net: str, backbone: dict[str, torch.Tensor]) -> None:
        super().__init__()
        if net not in NETS:
            raise ConfigError(f"train.perceptual_net={net!r}: not one of {', '.join(NETS)}")
        lpips = _import_lpips()
        # the calibrated linear layers from the package; the backbone random here, then the user's weights
        with warnings.catch_warnings():  # lpips builds the backbone through torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.")
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        slices = self.lpips.net.state_dict()
        wanted = {name: "features." + name.split(".", 1)[1] for name in slices}  # slice3.5.weight <- features.5.weight
        absent = sorted(source for source in wanted.values() if source not in backbone)
        if absent:
            raise CheckpointError(
                f"train.perceptual_backbone lacks {len(absent)} of the {net} backbone's weights (e.g. {absent[0]}): "
                f"it is not torchvision's {net} state dict"
            )
        state = {}
        for name, source in wanted.items():
            if backbone[source].shape != slices[name].shape:
                raise CheckpointError(
                    f"train.perceptual_backbone: {source} has shape {tuple(backbone[source].shape)}, the {net} "
                    f"backbone's is {tuple(slices[name].shape)}"
                )
            state[name] = backbone[source]
        self.lpips.net.load_state_dict(state)
        self.lpips.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Perceptual:  # always in eval mode: no dropout in the loss
        return super().train(False)

    def forward(self, frames: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.lpips(frames.float(), targets.float()).flatten()


def load_perceptual(net: str, backbone: str | Path, *, allow_pickle: bool = False) -> Perceptual:
    """The frozen LPIPS network of ``net`` with the backbone weights at ``backbone`` (module notes)."""
    return Perceptual(net, read_backbone(backbone, allow_pickle=allow_pickle))
