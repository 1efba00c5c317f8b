"""Image conditioning: CLIP image tokens through a second cross-attention beside the text's (IP-Adapter Plus style).

"Animate this picture": the conditioning image goes through a frozen CLIP vision encoder
(:func:`lvdm.models.encoders.encode_image`, the full patch tokens of its penultimate layer, which keep the details
the pooled token loses, as VideoCrafter1 and IP-Adapter Plus find); a trainable projection (diffusers'
:class:`~diffusers.models.embeddings.IPAdapterPlusImageProjection`, IP-Adapter Plus's resampler) turns them into a
few image tokens of the cross-attention width; and every **spatial** cross-attention gets a second attention with
the same query and its own K/V over those tokens, added to the text attention's output times a scale: diffusers'
decoupled :class:`~diffusers.models.attention_processor.IPAdapterAttnProcessor2_0`, exactly.

:class:`ImageConditioning` is a standalone part (kind ``image``) that owns the projection and the processors it
installs in the UNet, so their weights live in the temporal module file (keyed by UNet path) and transfer with it.
Every new value projection starts at zero, and the key projections start as copies of the text's, as IP-Adapter
initialises them: adding image conditioning to a trained module changes nothing until it trains. A call without an
image runs the plain text attention, exactly. Because the processors use diffusers' weight layout, an IP-Adapter
Plus checkpoint in diffusers' format (``image_proj.*``, ``ip_adapter.<n>.to_k_ip.weight``) loads into the part
(:func:`read_ip_adapter`), as a warm start for training or on its own for image mode.

Unlike the temporal parts, these layers do change image mode once trained (they sit in the spatial blocks): image
mode with an image is the base plus the image attention, i.e. IP-Adapter; without one it is the base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn

from lvdm.errors import CheckpointError
from lvdm.fileio import unreadable
from lvdm.modules.video_cross_attention import (
    VideoCrossAttnProcessor,
    attend_once_per_video,
    cross_attentions,
    frames_sharing_context,
    project_out,
)

_TEXT_ONLY = VideoCrossAttnProcessor()  # stateless: the text attention when a call brings no image tokens
HEAD_DIM = 64  # the resampler's attention head width (IP-Adapter Plus's; diffusers' converter assumes it)


class ImageAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' decoupled text + image attention; with no image tokens (a plain ``encoder_hidden_states``), the
    plain text attention."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not isinstance(encoder_hidden_states, tuple):
            return _TEXT_ONLY(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        text, image_tokens = encoder_hidden_states
        frames = None
        if ip_adapter_masks is None:
            frames = frames_sharing_context(attn, hidden_states, text, attention_mask)
        if frames is None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale, ip_adapter_masks
            )
        # text and image tokens projected once per video (lvdm.modules.video_cross_attention)
        query = attn.to_q(hidden_states)
        out = attend_once_per_video(attn, query, text, frames, attn.to_k, attn.to_v)
        for tokens, weight, to_k_ip, to_v_ip in zip(image_tokens, self.scale, self.to_k_ip, self.to_v_ip, strict=True):
            if weight != 0:
                out = out + weight * attend_once_per_video(attn, query, tokens, frames, to_k_ip, to_v_ip)
        return project_out(attn, out)


def _key(name: str) -> str:
    return name.replace(".", "__")


@dataclass(frozen=True)
class ImageTokens:
    """One forward's image tokens ``(b, n, d)``, one set per video: what the cross-attentions read."""

    tokens: torch.Tensor


class ImageConditioning(nn.Module):
    """The image part (see the module notes), installed on ``unet`` (a diffusers 2D UNet, inflated or not).

    Args:
        unet: the UNet whose spatial cross-attentions get the image attention.
        embed_dims: width of the CLIP vision encoder's tokens.
        num_queries: image tokens made per image.
        hidden_dims: the resampler's width (a multiple of 64); default the cross-attention width rounded up.
        depth: resampler blocks.
    """

    inputs = ("image_embeds", "image_scale")

    def __init__(
        self,
        unet: nn.Module,
        *,
        embed_dims: int,
        num_queries: int = 16,
        hidden_dims: int | None = None,
        depth: int = 4,
    ) -> None:
        super().__init__()
        cross = unet.config.cross_attention_dim
        hidden = hidden_dims or -(-cross // HEAD_DIM) * HEAD_DIM
        if hidden % HEAD_DIM:
            raise ValueError(f"image projection: hidden_dims {hidden} must be a multiple of {HEAD_DIM}")
        self.config = {"embed_dims": embed_dims, "num_queries": num_queries, "hidden_dims": hidden, "depth": depth}
        self.projection = IPAdapterPlusImageProjection(
            embed_dims=embed_dims, output_dims=cross, hidden_dims=hidden, depth=depth, dim_head=HEAD_DIM,
            heads=hidden // HEAD_DIM, num_queries=num_queries,
        )  # fmt: skip
        self.processors = nn.ModuleDict()
        param = next(unet.parameters())
        for name, attn in cross_attentions(unet):
            processor = ImageAttnProcessor(attn.to_k.out_features, attn.to_k.in_features, (num_queries,), 1.0)
            with torch.no_grad():
                processor.to_k_ip[0].weight.copy_(attn.to_k.weight)
                nn.init.zeros_(processor.to_v_ip[0].weight)
            attn.set_processor(processor.to(device=param.device, dtype=param.dtype))
            self.processors[_key(name)] = processor
        if not self.processors:
            raise ValueError("this UNet has no cross-attention layers for the image attention")
        self.projection.to(device=param.device, dtype=param.dtype)

    def set_scale(self, scale: float) -> None:
        """The weight of the image attention beside the text's (IP-Adapter's scale; 0: text only)."""
        for processor in self.processors.values():
            processor.scale = [float(scale)]

    def tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP patch tokens ``(b, n, embed_dims)`` -> image tokens ``(b, num_queries, cross_attention_dim)``."""
        weight = self.projection.proj_in.weight
        return self.projection(image_embeds.to(device=weight.device, dtype=weight.dtype))

    def prepare(
        self, context, sample: torch.Tensor, timestep, image_embeds: torch.Tensor | None = None, image_scale=None
    ) -> ImageTokens | None:
        """``image_embeds``: ``(b, n, embed_dims)`` encoder tokens of each video's image, or ``None`` (no image:
        the text attention alone); ``image_scale``: the image attention's weight for this call (default 1)."""
        self.set_scale(1.0 if image_scale is None else float(image_scale))
        if image_embeds is None:
            return None
        if image_embeds.ndim != 3 or image_embeds.shape[0] != sample.shape[0]:
            raise ValueError(
                f"image_embeds must be (b={sample.shape[0]}, tokens, {self.config['embed_dims']}), one image per "
                f"video; got {tuple(image_embeds.shape)}"
            )
        return ImageTokens(self.tokens(image_embeds))


def with_image_tokens(text: torch.Tensor, tokens: torch.Tensor | None) -> Any:
    """What the cross-attentions are called with: the text alone, or ``(text, [tokens])`` (diffusers' IP-Adapter
    convention) when there are image tokens."""
    return text if tokens is None else (text, [tokens])


# ------------------------------------------------------------------------------------------------ IP-Adapter files
def read_ip_adapter(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter checkpoint in diffusers' format as ``{"image_proj": {...}, "ip_adapter": {...}}``: a
    ``.safetensors`` file with ``image_proj.`` / ``ip_adapter.`` keys, or (``allow_pickle``) a ``.bin`` holding that
    dict. Only IP-Adapter **Plus** (the resampler) is supported: its patch tokens are what lvdm's image part reads."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"IP-Adapter {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            flat = load_file(path)
        except Exception as exc:  # noqa: BLE001 - a damaged file, told in one line
            reason = unreadable(path)
            problem = f"cannot be read: {reason}" if reason else f"is not a readable safetensors file: {exc}"
            raise CheckpointError(f"IP-Adapter {path} {problem}") from None
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if head in state:
                state[head][rest] = value
    elif allow_pickle:
        from lvdm.models.loading import load_pickled_weights

        state = load_pickled_weights(path, "IP-Adapter")
    else:
        raise CheckpointError(
            f"IP-Adapter {path} is not a .safetensors file; pickled checkpoints can run code, so pass allow_pickle "
            "(--allow-pickle) to read it"
        )
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise CheckpointError(f"{path} is not an IP-Adapter checkpoint (no image_proj / ip_adapter weights)")
    if "latents" not in state["image_proj"]:
        raise CheckpointError(
            f"{path} is not an IP-Adapter Plus checkpoint (its image projection has no resampler 'latents'); lvdm "
            "reads the CLIP patch tokens, which only the Plus adapters take"
        )
    return state


def ip_adapter_config(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, int]:
    """The :class:`ImageConditioning` settings an IP-Adapter Plus checkpoint was made with."""
    proj = state["image_proj"]
    depth = len({key.split(".")[1] for key in proj if key.startswith("layers.")})
    return {
        "embed_dims": int(proj["proj_in.weight"].shape[1]),
        "num_queries": int(proj["latents"].shape[1]),
        "hidden_dims": int(proj["latents"].shape[2]),
        "depth": depth,
    }


def load_ip_adapter(part: ImageConditioning, unet: nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy an IP-Adapter Plus checkpoint (:func:`read_ip_adapter`) into ``part``: the resampler through diffusers'
    own key conversion, each cross-attention's ``to_k_ip`` / ``to_v_ip`` by diffusers' numbering. A checkpoint for
    another base family (other widths or layer count) is a :class:`CheckpointError`."""
    from diffusers import UNet2DConditionModel

    attn = state["ip_adapter"]
    names = [name for name, _ in cross_attentions(unet)]
    expected = {f"{2 * i + 1}.{kind}.weight" for i in range(len(names)) for kind in ("to_k_ip", "to_v_ip")}
    if set(attn) != expected:
        raise CheckpointError(
            f"the IP-Adapter has {len(attn) // 2} image attention layers, this base has {len(names)}: it was made for "
            "another base family"
        )
    try:
        converted = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
            unet, state["image_proj"], low_cpu_mem_usage=False
        )
        part.projection.load_state_dict(converted.state_dict())
        for i, name in enumerate(names):
            processor = part.processors[_key(name)]
            processor.to_k_ip[0].weight.data.copy_(attn[f"{2 * i + 1}.to_k_ip.weight"])
            processor.to_v_ip[0].weight.data.copy_(attn[f"{2 * i + 1}.to_v_ip.weight"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"the IP-Adapter does not fit this base: {str(exc).splitlines()[0]}") from None
