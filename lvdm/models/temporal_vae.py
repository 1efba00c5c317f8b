"""The temporal VAE decoder: SD's decoder with temporal layers, so a smooth latent video decodes without flicker.

Video LDM fine-tunes only the VAE's **decoder**, with 3D layers, leaving the encoder, and so the latent space every
UNet of the family uses, untouched. Stable Video Diffusion shipped such a decoder for SD's latent space as diffusers'
:class:`~diffusers.AutoencoderKLTemporalDecoder`, and lvdm uses that class as it is: a decoder lvdm trains is saved
as a diffusers folder that diffusers (and the tools built on it) load, and SVD's own ``vae`` folder loads into lvdm
unchanged.

:func:`video_decoder_from_vae` builds one from a base's ``AutoencoderKL`` as the identity: each
``SpatioTemporalResBlock`` keeps SD's ``ResnetBlock2D`` as its spatial half, its temporal half (two ``(3, 1, 1)``
convs) ends in a zero conv so it returns its input, which makes the ``AlphaBlender`` mix of the two equal to the
spatial result whatever its factor; the final ``(3, 1, 1)`` time conv starts as the identity (centre tap 1, the
others 0). Decoding a video then equals decoding each frame with the image decoder, with one exception the format
imposes: ``AutoencoderKLTemporalDecoder`` has no ``post_quant_conv``, so SD's (a 1x1 conv) is folded into the
decoder's first conv. Its weight folds exactly; its bias folds exactly except in the latent's outermost ring of
pixels, where SD's first conv reads zero padding instead of the bias (:func:`fold_error` measures it; exact for a
VAE whose ``post_quant_conv`` bias is zero). Training removes it with the rest.

Two things SD-shaped VAEs all share are fixed in diffusers' class: 32 groups in every GroupNorm, and as many mid-block
resnets as ``layers_per_block`` (2 for every SD VAE, as in SD's own mid block). A VAE that differs (the demo's tiny
one) gets the same architecture with its own group count and SD's two mid resnets, recorded as ``lvdm_*`` keys in
``config.json``; such a folder is lvdm's only (diffusers would build the 32-group layout), which
:func:`load_video_decoder` knows.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lvdm.errors import CheckpointError
from lvdm.fileio import read_json, unreadable

SD_GROUPS = 32  # the group count diffusers' TemporalDecoder hard-codes
SD_MID_RESNETS = 2  # SD's VAE mid block: resnet, attention, resnet
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PICKLE_FILES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def video_decoder_from_vae(vae: Any) -> Any:
    """An :class:`~diffusers.AutoencoderKLTemporalDecoder` equal to ``vae`` (an SD ``AutoencoderKL``) frame by frame:
    the same encoder and ``quant_conv``, the decoder's weights in the spatial halves, the temporal parts at the
    identity (see the module docstring). float32, on the CPU."""
    from diffusers import AutoencoderKLTemporalDecoder

    config = vae.config
    _check_sd_vae(config)
    model = _build(
        AutoencoderKLTemporalDecoder,
        {
            "in_channels": config.in_channels, "out_channels": config.out_channels,
            "down_block_types": tuple(config.down_block_types), "block_out_channels": tuple(config.block_out_channels),
            "layers_per_block": config.layers_per_block, "latent_channels": config.latent_channels,
            "sample_size": config.sample_size, "scaling_factor": config.scaling_factor,
            "force_upcast": config.force_upcast,
        },
        groups=config.norm_num_groups,
    )  # fmt: skip
    source = {k: v.detach().float().cpu() for k, v in vae.state_dict().items()}
    state = {k: v for k, v in source.items() if k.startswith("encoder.")}
    latent = config.latent_channels
    state["quant_conv.weight"], state["quant_conv.bias"] = _conv_or_identity(source, "quant_conv", 2 * latent)
    for name, value in source.items():
        if name.startswith("decoder."):
            state[_temporal_name(name)] = value
    post_w, post_b = _conv_or_identity(source, "post_quant_conv", latent)
    conv_w, conv_b = state["decoder.conv_in.weight"], state["decoder.conv_in.bias"]
    # o j kh kw, j i -> o i kh kw: the 1x1 post_quant_conv folded into the 3x3 conv_in (bias exact in the interior)
    state["decoder.conv_in.weight"] = torch.einsum("ojhw,ji->oihw", conv_w, post_w[:, :, 0, 0])
    state["decoder.conv_in.bias"] = conv_b + torch.einsum("ojhw,j->o", conv_w, post_b)
    for name, value in model.state_dict().items():
        if name not in state:
            state[name] = _identity_init(name, value)
    model.load_state_dict(state, strict=True)
    return model


def fold_error(vae: Any) -> float:
    """A bound on the change folding ``vae``'s ``post_quant_conv`` into ``conv_in`` makes to the first decoder
    feature, which occurs only in the latent's outermost ring, where taps read padding: the bias's contribution
    ``|W b|`` summed over every tap but the centre. 0 when the bias is zero."""
    source = vae.state_dict()
    if "post_quant_conv.bias" not in source:
        return 0.0
    bias, conv = source["post_quant_conv.bias"].float(), source["decoder.conv_in.weight"].float()
    per_tap = torch.einsum("ojhw,j->ohw", conv, bias).abs()  # o kh kw: what one padded tap misses
    return float((per_tap.sum((1, 2)) - per_tap[:, 1, 1]).max())  # the centre tap never reads padding


def _check_sd_vae(config: Any) -> None:
    problems = []
    if any(kind != "UpDecoderBlock2D" for kind in config.up_block_types):
        problems.append(f"up blocks {list(config.up_block_types)} (SD's VAE: UpDecoderBlock2D)")
    if getattr(config, "act_fn", "silu") != "silu":
        problems.append(f"activation {config.act_fn!r} (SD's: silu)")
    if not getattr(config, "mid_block_add_attention", True):
        problems.append("no mid-block attention (SD's VAE has one)")
    if problems:
        raise CheckpointError("a temporal decoder is built from an SD-shaped VAE; this one has " + "; ".join(problems))


def _build(cls: Any, kwargs: dict[str, Any], *, groups: int) -> Any:
    """``cls(**kwargs)`` with ``groups`` groups in every GroupNorm and SD's two mid-block resnets (recorded in the
    config as ``lvdm_norm_num_groups`` / ``lvdm_mid_block_resnets`` where they differ from diffusers' layout)."""
    from diffusers.models.unets.unet_3d_blocks import MidBlockTemporalDecoder

    with _group_norms_of(groups):
        model = cls(**kwargs)
    if kwargs["layers_per_block"] != SD_MID_RESNETS:  # diffusers makes layers_per_block mid resnets
        width = kwargs["block_out_channels"][-1]
        with _group_norms_of(groups):
            model.decoder.mid_block = MidBlockTemporalDecoder(
                num_layers=SD_MID_RESNETS, in_channels=width, out_channels=width, attention_head_dim=width
            )
        model.register_to_config(lvdm_mid_block_resnets=SD_MID_RESNETS)
    if groups != SD_GROUPS:
        model.register_to_config(lvdm_norm_num_groups=groups)
    return model


@contextlib.contextmanager
def _group_norms_of(groups: int) -> Iterator[None]:
    """While diffusers builds the model: every ``GroupNorm(32, c)`` it makes gets ``groups`` groups instead (its
    blocks hard-code 32, and a VAE with fewer channels uses fewer). Nothing else changes."""
    if groups == SD_GROUPS:
        yield
        return
    original = torch.nn.GroupNorm

    class _GroupNorm(original):
        def __init__(self, num_groups: int, num_channels: int, *args: Any, **kwargs: Any) -> None:
            super().__init__(groups if num_groups == SD_GROUPS else num_groups, num_channels, *args, **kwargs)

    torch.nn.GroupNorm = _GroupNorm
    try:
        yield
    finally:
        torch.nn.GroupNorm = original


def _conv_or_identity(state: dict[str, torch.Tensor], name: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1x1 conv ``name`` of a VAE's state, or the identity when the VAE has none (``use_*_quant_conv=False``)."""
    if f"{name}.weight" in state:
        return state[f"{name}.weight"], state[f"{name}.bias"]
    return torch.eye(channels)[:, :, None, None], torch.zeros(channels)


def _temporal_name(name: str) -> str:
    """An SD decoder weight's name in diffusers' TemporalDecoder: resnets gain a ``spatial_res_block`` level."""
    parts = name.split(".")
    if "resnets" in parts:
        at = parts.index("resnets") + 2  # decoder.<block>.resnets.<i>.<rest>
        parts.insert(at, "spatial_res_block")
    return ".".join(parts)


def _identity_init(name: str, value: torch.Tensor) -> torch.Tensor:
    """The starting value of a temporal weight that makes it the identity."""
    if name.startswith("decoder.time_conv_out.weight"):  # (c, c, 3, 1, 1): the centre tap is the identity
        out = torch.zeros_like(value)
        out[:, :, 1, 0, 0] = torch.eye(value.shape[0])
        return out
    if ".temporal_res_block.conv2." in name or name == "decoder.time_conv_out.bias":  # the branch adds zero
        return torch.zeros_like(value)
    if ".temporal_res_block.norm" in name:
        return torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value)
    if name.endswith("time_mixer.mix_factor"):
        return torch.zeros_like(value)  # sigmoid(0): an even mix, once the temporal branch has learnt something
    if ".temporal_res_block.conv1." in name:
        return value.detach().clone()  # diffusers' own random init: the branch learns through conv2 first
    raise KeyError(f"no identity start for {name}")


# ------------------------------------------------------------------------------------------------ files
DECODER_FILES = ("config.json", WEIGHT_FILES[0])  # what save_video_decoder writes


def save_video_decoder(
    model: Any, folder: str | os.PathLike, *, training_config: dict[str, Any] | None = None
) -> Path:
    """``folder`` as diffusers saves an ``AutoencoderKLTemporalDecoder`` (``config.json``, the weights as
    ``diffusion_pytorch_model.safetensors``), each file written under a temporary name and renamed, so a killed
    save leaves the previous files whole. ``training_config`` (the run that trained it) goes into the weights'
    safetensors metadata as ``training_config``, as in a temporal module file; diffusers ignores it."""
    from lvdm.fileio import atomic_path, save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"}
    if training_config is not None:
        metadata["training_config"] = json.dumps(training_config, default=str)
    with atomic_path(folder / DECODER_FILES[1]) as temp:
        save_safetensors(state, temp, metadata=metadata)
    with atomic_path(folder / DECODER_FILES[0]) as temp:
        Path(temp).write_text(model.to_json_string(), encoding="utf-8")
    return folder


def load_video_decoder(
    path: str | os.PathLike, *, vae: Any = None, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> Any:
    """An ``AutoencoderKLTemporalDecoder`` folder (SVD's ``vae``, or one lvdm trained) as a model in eval mode, frozen.

    ``vae``: the base's VAE; a decoder of another latent space (latent channels, scaling factor or downscaling
    differ) is refused. Pickled weights (``.bin``) need ``allow_pickle``.
    """
    from diffusers import AutoencoderKLTemporalDecoder

    folder = Path(path)
    config_file = folder / "config.json"
    if folder.is_dir() and not config_file.is_file() and (folder / "vae" / "config.json").is_file():
        folder, config_file = folder / "vae", folder / "vae" / "config.json"  # an SVD model folder
    try:
        if not config_file.is_file():  # missing, or not a regular file (a FIFO would block the read)
            raise FileNotFoundError(f"no regular file {config_file}")
        config = read_json(config_file)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"decoder {path}: expected a diffusers AutoencoderKLTemporalDecoder folder with config.json ({exc})"
        ) from None
    if config.get("_class_name") != "AutoencoderKLTemporalDecoder":
        raise CheckpointError(
            f"decoder {path} is a {config.get('_class_name', 'model of unknown class')}, not an "
            "AutoencoderKLTemporalDecoder (SVD's vae folder, or a decoder lvdm trained)"
        )
    if vae is not None:
        _check_latent_space(path, config, vae.config)
    state = _read_weights(folder, path, allow_pickle)
    kwargs = {k: v for k, v in config.items() if not k.startswith(("_", "lvdm_"))}
    try:
        model = _build(AutoencoderKLTemporalDecoder, kwargs, groups=config.get("lvdm_norm_num_groups", SD_GROUPS))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"decoder {path} does not load: {str(exc).splitlines()[0]}") from None
    model.requires_grad_(False).eval()
    return model.to(dtype=dtype) if dtype is not None else model


def _read_weights(folder: Path, shown: Any, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            try:
                return {k: v.float() for k, v in load_file(folder / name).items()}
            except (SafetensorError, OSError) as exc:
                reason = unreadable(folder / name) or exc
                raise CheckpointError(f"decoder {shown} does not load: {name}: {reason}") from None
    for name in PICKLE_FILES:
        if (folder / name).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"decoder {shown}: {name} is a pickle, which can run code when loaded; convert it to "
                    "safetensors, or pass allow_pickle (--allow-pickle) if you trust its source"
                )
            try:
                state = torch.load(folder / name, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a corrupt or hostile pickle: whatever unpickling raises
                raise CheckpointError(f"decoder {shown} does not load: {name}: {exc}") from None
            return {k: v.float() for k, v in state.items()}
    raise CheckpointError(f"decoder {shown}: no weights ({WEIGHT_FILES[0]}) in {folder}")


def _check_latent_space(path: Any, config: dict[str, Any], vae_config: Any) -> None:
    """Refuse a decoder made for another latent space than the base VAE's."""
    ours = (vae_config.latent_channels, float(vae_config.scaling_factor), len(vae_config.block_out_channels))
    theirs = (config.get("latent_channels", 4), float(config.get("scaling_factor", 0.18215)),
              len(config.get("block_out_channels", [64])))  # fmt: skip
    if (ours[0], ours[2]) != (theirs[0], theirs[2]) or abs(ours[1] - theirs[1]) > 1e-6 * abs(ours[1]):
        theirs_up, ours_up = 2 ** (theirs[2] - 1), 2 ** (ours[2] - 1)
        raise CheckpointError(
            f"decoder {path} decodes another latent space: {theirs[0]} channels scaled by {theirs[1]:g}, upsampling "
            f"x{theirs_up}; the base's VAE makes {ours[0]} channels scaled by {ours[1]:g}, x{ours_up}"
        )


# ------------------------------------------------------------------------------------------------ decoding
DEFAULT_CHUNK = 16  # frames per decoder call
DEFAULT_OVERLAP = 4  # frames two neighbouring chunks share, cross-faded


@torch.no_grad()
def decode_video(
    decoder: Any,
    latents: torch.Tensor,
    *,
    scaling_factor: float,
    shift_factor: float = 0.0,
    chunk_frames: int = DEFAULT_CHUNK,
    overlap: int = DEFAULT_OVERLAP,
) -> torch.Tensor:
    """Scaled latents ``(b, c, f, h, w)`` (as the UNet makes them) -> video ``(b, f, 3, H, W)`` in [-1, 1].

    Frames go through ``decoder`` (an ``AutoencoderKLTemporalDecoder``) ``chunk_frames`` at a time; neighbouring
    chunks share ``overlap`` frames, where their outputs are cross-faded linearly, so memory stays that of one chunk
    whatever the length and no seam shows where chunks meet.
    """
    from lvdm.tiles import span_weights, spans

    if overlap >= chunk_frames:
        raise ValueError(f"overlap ({overlap}) must be smaller than chunk_frames ({chunk_frames})")
    b, c, f = latents.shape[:3]
    param = next(decoder.parameters())
    z = latents.to(device=param.device, dtype=param.dtype) / scaling_factor + shift_factor
    chunks = spans(f, chunk_frames, overlap)
    out, total = None, torch.zeros(f)
    for (begin, end), weight in zip(chunks, span_weights(chunks), strict=True):
        n = end - begin
        # b c n h w -> (b n) c h w
        frames = z[:, :, begin:end].permute(0, 2, 1, 3, 4).reshape(b * n, c, *z.shape[3:])
        decoded = decoder.decode(frames, num_frames=n).sample.float()
        decoded = decoded.reshape(b, n, *decoded.shape[1:])  # (b n) 3 H W -> b n 3 H W
        weight = weight.to(decoded.device)  # n: cross-faded where chunks share frames
        if out is None:
            out = torch.zeros(b, f, *decoded.shape[2:], device=decoded.device, dtype=torch.float32)
        out[:, begin:end] += decoded * weight[None, :, None, None, None]
        total[begin:end] += weight.cpu()
    # a frame in three chunks (a short video) has weights summing above 1: normalised
    return (out / total.to(out.device)[None, :, None, None, None]).clamp(-1, 1)
