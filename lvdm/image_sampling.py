"""Image-to-video at sampling: the conditioning image, its CLIP tokens (once per call), and IP-Adapters.

:class:`~lvdm.VideoPipeline` takes ``image=`` (a file, a PIL image or uint8 ``(h, w, 3)``) with a temporal module
trained with ``model.image_conditioning``, or with an IP-Adapter Plus given at load time
(``from_pretrained(base, image_adapter=..., image_encoder=...)``, with or without a temporal module: alone, that is
image mode with IP-Adapter, which must match diffusers' ``StableDiffusionPipeline`` + ``load_ip_adapter``).

The image is read like training images (EXIF orientation applied, 16-bit scaled, alpha and CMYK converted), then
resized and centre-cropped by the encoder's own CLIP preprocessing, so any size or aspect works. The encoder runs
once per call: the image's tokens and the "no image" tokens (the encoder's all-zero input, IP-Adapter's dropped
image, which the unconditional pass gets) are reused by every step and every video.

Guidance: with ``image_guidance_scale`` equal to ``guidance_scale`` (the default) one guidance on text and image
together (the unconditional pass has neither), a ``2b`` batch; otherwise InstructPix2Pix's two scales,
``u + s_i (i - u) + s_t (c - i)``, a ``3b`` batch, still one forward per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from lvdm.errors import ConfigError, VideoReadError

if TYPE_CHECKING:
    from lvdm.sampling_settings import SamplingSettings


def read_conditioning_image(source: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """``source`` (a path, a PIL image or uint8 ``(h, w, 3)``) as uint8 RGB ``(h, w, 3)`` and what a sidecar records
    of it (the file's absolute path, or ``"array"``, and the sha256 of its pixels). A missing, unreadable or truncated
    file, or an array of another shape, is a :class:`~lvdm.errors.ConfigError`."""
    from PIL import Image

    if isinstance(source, (str, os.PathLike)):
        from lvdm.data.readers import read_image

        path = Path(source)
        if not path.exists():
            raise ConfigError(f"image {source}: no such file")
        if not path.is_file():
            raise ConfigError(f"image {source}: not a regular file")
        try:
            pixels = read_image(path)[0]
        except VideoReadError as exc:
            raise ConfigError(f"image {source}: {exc.reason}") from None
        origin = str(path.absolute())
    elif isinstance(source, Image.Image):
        from lvdm.data.readers import image_to_rgb

        pixels, origin = np.asarray(image_to_rgb(source), dtype=np.uint8), "PIL image"
    else:
        pixels, origin = np.asarray(source), "array"
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ConfigError(
                f"image must be a file, a PIL image or uint8 (h, w, 3), got {pixels.dtype} {pixels.shape}"
            )
    digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()[:16]
    return pixels, {"source": origin, "size": [int(pixels.shape[1]), int(pixels.shape[0])], "sha256": digest}


def attach_image_adapter(unet: Any, video: Any, path: str | os.PathLike, encoder: Any, *, allow_pickle: bool) -> Any:
    """Build the image part from an IP-Adapter Plus file on ``unet`` (registered on ``video`` when there is one, so
    the video model's forward feeds it); returns the part."""
    from lvdm.errors import CheckpointError
    from lvdm.modules.image_attention import ImageConditioning, ip_adapter_config, load_ip_adapter, read_ip_adapter

    if video is not None and "image" in video.parts:
        raise ConfigError("the temporal module has its own image attention; drop image_adapter")
    state = read_ip_adapter(path, allow_pickle=allow_pickle)
    config = ip_adapter_config(state)
    if config["embed_dims"] != encoder.width:
        raise CheckpointError(
            f"the IP-Adapter {path} reads {config['embed_dims']}-wide image tokens, the image encoder makes "
            f"{encoder.width}-wide ones: use the encoder it was trained with"
        )
    part = ImageConditioning(unet, **config)
    load_ip_adapter(part, unet, state)
    if video is not None:
        video.add_part("image", part, kind="image", config=config)
    return part.requires_grad_(False).eval()  # sampling only (add_part marks a part trainable)


@torch.no_grad()
def image_conditions(pipe: Any, image: Any, n: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The image's model inputs for ``n`` videos: ``(cond, uncond, record)``. ``cond`` holds the image's tokens,
    ``uncond`` the "no image" tokens (both ``(n, tokens, width)``); without ``image`` both hold "no image" (a module
    trained with image conditioning saw that for its dropped images) and the record is ``None``. The encoder runs
    once here."""
    from lvdm.models.encoders import encode_image, image_pixels, no_image_pixels

    encoder = pipe.image_encoder
    if encoder is None:
        raise ConfigError(
            f"image conditioning needs its CLIP image encoder, and {pipe.image_encoder_path or 'none'} is not there: "
            "pass image_encoder= (--image-encoder) with the encoder folder it was trained with"
        )
    record, pixels = None, no_image_pixels(encoder)
    if image is not None:
        frame, record = read_conditioning_image(image)
        pixels = torch.cat([pixels, image_pixels(encoder, [frame])])
    tokens = encode_image(encoder, pixels).to(pipe.device)  # one encoder call: "no image" first, the image second
    # 1 n d -> b n d: the same image for every video of the call
    empty = tokens[:1].expand(n, -1, -1)
    given = tokens[-1:].expand(n, -1, -1)
    return {"image_embeds": given}, {"image_embeds": empty}, record


def require_image(pipe: Any) -> None:
    """A clear error when ``pipe`` cannot condition on an image."""
    if pipe.image_part is None:
        raise ConfigError(_takes_no_image(pipe.video is not None))


def check_image_source(temporal: str | None, image_adapter: str | None) -> None:
    """:func:`require_image`'s refusal read from the temporal module file's header, before anything loads (what
    ``sample.py --image`` asks; a module that cannot be read is its one-line error, as loading it would be)."""
    from lvdm.sampling_settings import temporal_defaults

    if image_adapter is None and not (temporal is not None and temporal_defaults(temporal)["has_image"]):
        raise ConfigError(_takes_no_image(temporal is not None))


def _takes_no_image(has_module: bool) -> str:
    what = (
        "this temporal module has no image conditioning (trained without model.image_conditioning)"
        if has_module
        else "no temporal module was given (temporal=, --temporal), and the base alone takes no image"
    )
    return (
        f"image: {what}; train one, or load an IP-Adapter Plus with image_adapter= (--image-adapter) and "
        "image_encoder="
    )


def check_image_weights(s: SamplingSettings) -> None:
    """Refuse ``image_scale`` / ``image_guidance_scale`` for a call without an image: they would weigh the "no
    image" tokens instead (the defaults, as a sidecar records them, pass)."""
    weights = {"image_scale": None if s.image_scale == 1.0 else s.image_scale,
               "image_guidance_scale": s.image_guidance_scale}  # fmt: skip
    asked = [f"{name}={value:g}" for name, value in weights.items() if value is not None]
    if asked:
        raise ConfigError(f"{' and '.join(asked)} weigh an image, and none was given: pass image= (--image), or leave "
                          "them out")  # fmt: skip


def image_as_first_frame(
    pipe: Any, s: SamplingSettings, image: Any, context: Any, *, explicit: dict[str, Any]
) -> tuple[SamplingSettings, Any]:
    """A call's settings ``s`` and context video once its ``image`` is taken: checked against ``pipe`` and, with
    ``image_as_first_frame``, the one-frame video to continue (``context_frames`` 1 unless set in ``explicit``)."""
    if image is not None:
        require_image(pipe)
    else:
        check_image_weights(s)
    if s.image_as_first_frame:
        if image is None:
            raise ConfigError("image_as_first_frame needs an image")
        if context is not None:
            raise ConfigError("image_as_first_frame makes the image the context: drop context")
        context = read_conditioning_image(image)[0][None]  # h w 3 -> 1 h w 3: a 1-frame video
        if "context_frames" not in explicit:
            s = dataclasses.replace(s, context_frames=1)  # the one frame there is
    return s, context


class ImageConditioning(NamedTuple):
    """What a pipeline conditions on an image with (each ``None`` without image conditioning)."""

    part: Any  # the module's own image attention or an IP-Adapter's (an image part)
    encoder: Any  # the CLIP image encoder it reads (a models.encoders.ImageEncoder)
    encoder_path: str | None  # that encoder's folder


def load_image_conditioning(
    model: Any,
    video: Any,
    adapter: str | os.PathLike | None,
    encoder_path: str | os.PathLike | None,
    *,
    allow_pickle: bool,
    device: Any,
) -> ImageConditioning:
    """The image part (the module's own image attention or an IP-Adapter's) and the CLIP encoder it reads (the given
    folder, else the module's, when it exists here; ``None`` otherwise: an image call then says so)."""
    from lvdm.models.encoders import load_image_encoder

    part = video.parts["image"] if video is not None and "image" in video.parts else None
    if part is None and adapter is None:
        if encoder_path is not None:
            raise ConfigError(
                "image_encoder is read by image conditioning: give image_adapter too, or a module with it"
            )
        return ImageConditioning(None, None, None)
    if adapter is not None and encoder_path is None:
        raise ConfigError("image_adapter needs image_encoder: the CLIP vision encoder folder the IP-Adapter reads")
    path = str(encoder_path) if encoder_path is not None else getattr(part, "encoder_path", None)
    encoder = None
    if path is not None and (encoder_path is not None or Path(path).is_dir()):
        encoder = load_image_encoder(path, device=device, dtype=next(model.unet.parameters()).dtype)
    if adapter is not None:
        part = attach_image_adapter(model.unet, video, adapter, encoder, allow_pickle=allow_pickle)
    return ImageConditioning(part, encoder, path)
