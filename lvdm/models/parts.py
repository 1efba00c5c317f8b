"""Standalone parts of a video model: the seam every new kind of trainable module plugs into.

A :class:`~lvdm.models.VideoUNet` owns one registry of everything it adds to the frozen 2D UNet: the
temporal wrappers (described by its layout and sites) and **parts**, standalone modules such as a
context encoder, an FPS embedding, an image projection or a guidance embedding. Parameters, freezing,
the optimizer, EMA, checkpoints and the temporal module file all read that registry, so a new part
trains, saves, loads and resumes without touching the trainer or the wrappers.

A part is an ``nn.Module`` that may define:

- ``inputs``: a tuple of the ``VideoUNet.forward`` keyword arguments it consumes (``("fps",)``);
- ``prepare(context, sample, timestep, **inputs) -> dict``: called inside ``VideoUNet.forward`` before
  the UNet runs; what it returns lands in ``FrameContext.extras`` for the temporal layers (or hooks the
  part installed in the UNet) to read.

A part is rebuilt from a file by its **kind**: :data:`PART_KINDS` maps a kind to a :class:`PartKind`,
whose ``build(video, **config)`` makes (and, where needed, installs) the module, and whose
``from_config(model_config)`` says whether a training config asks for it (and with which settings).
The kind and config are written to the module file's metadata, which is all a loader needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from lvdm.models.video_unet import VideoUNet


@dataclass(frozen=True)
class PartKind:
    """How to make one kind of part.

    Attributes:
        build: ``build(video, **config) -> nn.Module``: a fresh part for ``video`` (zero-initialised output,
            so adding it leaves the model's output unchanged until it trains). It may install hooks or
            attention processors in ``video.unet``; their parameters then belong to the part's registry entry.
        from_config: ``from_config(model_config) -> dict | None``: the ``config`` to build this part with
            when a training run's ``model`` section asks for it, else ``None``.
    """

    build: Callable[..., nn.Module]
    from_config: Callable[[Any], dict[str, Any] | None] = lambda model_config: None


PART_KINDS: dict[str, PartKind] = {}
"""Every kind of part lvdm can rebuild from a temporal module file, by name."""


@dataclass(frozen=True)
class PartSpec:
    """A registered part's kind and settings: what the module file records to rebuild it."""

    kind: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": dict(self.config)}


def build_part(video: VideoUNet, name: str, kind: str, config: dict[str, Any]) -> nn.Module:
    """Build the ``kind`` part with ``config`` for ``video`` and register it under ``name``."""
    if kind not in PART_KINDS:
        known = ", ".join(sorted(PART_KINDS)) or "none"
        raise KeyError(f"unknown part kind {kind!r} (known: {known}); is the lvdm that wrote it newer?")
    module = PART_KINDS[kind].build(video, **config)
    return video.add_part(name, module, kind=kind, config=config)


def add_configured_parts(video: VideoUNet, model_config: Any) -> list[str]:
    """Add every part the ``model`` config section asks for (each kind's ``from_config``); returns their names."""
    added = []
    for kind, spec in PART_KINDS.items():
        config = spec.from_config(model_config)
        if config is not None:
            build_part(video, kind, kind, config)
            added.append(kind)
    return added


# ------------------------------------------------------------------------------------------------ the kinds
def _build_context(video: VideoUNet) -> nn.Module:
    from lvdm.modules.context_encoder import ContextEncoder

    config = video.unet.config
    sites = [(site.name, site.channels) for site in video.sites]
    return ContextEncoder(config.out_channels, config.block_out_channels, sites)


PART_KINDS["context"] = PartKind(
    build=_build_context, from_config=lambda model: {} if getattr(model, "context", False) else None
)


def _build_fps(video: VideoUNet) -> nn.Module:
    from lvdm.modules.fps_embedding import FpsEmbedding

    sites = [(site.name, site.channels) for site in video.sites]
    return FpsEmbedding(sites, video.unet.config.block_out_channels[0])


PART_KINDS["fps"] = PartKind(
    build=_build_fps, from_config=lambda model: {} if getattr(model, "fps_conditioning", False) else None
)


def _build_image(video: VideoUNet, **config: Any) -> nn.Module:
    from lvdm.modules.image_attention import ImageConditioning

    encoder = config.pop("encoder", None)
    part = ImageConditioning(video.unet, **config)
    part.encoder_path = encoder  # the encoder it was trained with: sampling's default
    return part


def _image_from_config(model: Any) -> dict[str, Any] | None:
    """The image part's settings: the encoder's width (its ``config.json``), or an IP-Adapter Plus file's."""
    if not getattr(model, "image_conditioning", False):
        return None
    from lvdm.models.encoders import image_encoder_width

    width = image_encoder_width(model.image_encoder)
    config: dict[str, Any] = {"embed_dims": width}
    if model.image_adapter is not None:
        from lvdm.errors import CheckpointError
        from lvdm.modules.image_attention import ip_adapter_config, read_ip_adapter

        config = ip_adapter_config(read_ip_adapter(model.image_adapter, allow_pickle=model.allow_pickle))
        if config["embed_dims"] != width:
            raise CheckpointError(
                f"the IP-Adapter {model.image_adapter} reads {config['embed_dims']}-wide image tokens, the image "
                f"encoder {model.image_encoder} makes {width}-wide ones: use the encoder it was trained with"
            )
    return config | {"encoder": str(model.image_encoder)}


PART_KINDS["image"] = PartKind(build=_build_image, from_config=_image_from_config)


def _build_guidance(video: VideoUNet) -> nn.Module:
    from lvdm.modules.guidance_embedding import GuidanceEmbedding, add_to_time_embedding, gain_hook, text_attentions

    time_embedding, attentions = video.unet.time_embedding, text_attentions(video.unet)
    widths = [attn.to_out[0].out_features for attn in attentions]
    part = GuidanceEmbedding(time_embedding.linear_2.out_features, widths)
    time_embedding.register_forward_hook(add_to_time_embedding)
    for index, attn in enumerate(attentions):
        attn.register_forward_hook(gain_hook(index))
    return part


PART_KINDS["guidance"] = PartKind(build=_build_guidance)  # added by train.target=distill (lvdm.training.distill)
