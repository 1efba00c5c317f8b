"""The inputs of :meth:`VideoUNet.forward <lvdm.models.VideoUNet.forward>`, checked and laid out per frame: the
latents' shape, per-frame flags, positions and timesteps, and per-video conditioning repeated for each frame."""

from __future__ import annotations

from typing import Any

import torch


def check_sample(sample: torch.Tensor, in_channels: int) -> tuple[int, int, int, int, int]:
    """The latents' shape ``(b, c, f, h, w)``, none of it 0 (an empty one failed in a reshape or a convolution)."""
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"VideoUNet expects latents as a torch.Tensor (b, c={in_channels}, f, h, w), got a "
                        f"{type(sample).__name__}")  # fmt: skip
    if sample.ndim != 5 or sample.shape[1] != in_channels or 0 in sample.shape:
        raise ValueError(
            f"VideoUNet expects latents (b, c={in_channels}, f, h, w) with b, f, h, w >= 1, got shape "
            f"{tuple(sample.shape)}"
        )
    return tuple(sample.shape)


def text_width(config: Any) -> int | None:
    """The width ``d`` of the text embeddings the UNet takes: its ``encoder_hid_proj``'s input (``encoder_hid_dim``)
    where it has one, else its cross-attentions' (``cross_attention_dim``, one or one per block). ``None`` where the
    text is not its input (``image_proj``: image embeddings replace it) or no block attends to it: then unchecked."""
    if getattr(config, "encoder_hid_dim_type", None) == "image_proj":
        return None
    if getattr(config, "encoder_hid_dim", None) is not None:
        return config.encoder_hid_dim
    widths = _cross_attention_widths(config)
    if len(widths) > 1:
        raise ValueError(
            f"this UNet's cross-attentions take text of different widths {sorted(widths)} (its config's "
            f"cross_attention_dim {tuple(config.cross_attention_dim)}): no one encoder_hidden_states fits them all"
        )
    return next(iter(widths), None)


def _cross_attention_widths(config: Any) -> set[int]:
    """The text widths of the blocks with cross-attention, as diffusers gives them out: ``cross_attention_dim[i]`` to
    down block ``i``, the last to the mid block, the reversed list to the up blocks."""
    down = config.down_block_types
    dims = config.cross_attention_dim
    dims = (dims,) * len(down) if isinstance(dims, int) else tuple(dims)
    blocks = [*zip(down, dims, strict=True), *zip(config.up_block_types, dims[::-1], strict=True)]
    blocks.append((config.mid_block_type or "", dims[-1]))
    return {dim for kind, dim in blocks if "CrossAttn" in kind}


def check_text(text: torch.Tensor, b: int, width: int | None) -> None:
    """Text embeddings ``(b, n, d)``: once per video, at least one token, as wide as the cross-attentions take."""
    d = "d" if width is None else f"d={width}"
    if not isinstance(text, torch.Tensor):
        raise TypeError(f"encoder_hidden_states must be a torch.Tensor (b, n, {d}), got a {type(text).__name__}")
    if text.ndim != 3 or text.shape[0] != b or text.shape[1] == 0 or text.shape[2] != (width or text.shape[2]):
        raise ValueError(
            f"encoder_hidden_states must be text embeddings (b={b}, n, {d}) with n >= 1, given once per video, got "
            f"shape {tuple(text.shape)}"
        )


def check_float(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A floating-point input in the weights' ``dtype``, or one autocast casts (training's mixed precision: any float
    but float64): another reached a matmul as "mat1 and mat2 must have the same dtype"."""
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor ({dtype}, the model's), got {tensor.dtype}")
    device = tensor.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if tensor.dtype != dtype and not (autocast and tensor.dtype != torch.float64):
        raise TypeError(
            f"{name} is {tensor.dtype}, the model's weights are {dtype}: cast it (.to({dtype})), or run under "
            "torch.autocast (which casts any float but float64)"
        )


def check_per_video(name: str, value: Any, b: int) -> None:
    """Per-video conditioning (tensors, inside dicts, tuples and lists too) holds one row per video, as it is repeated
    for each frame: another batch broke in a broadcast deep in the UNet, or, where the sizes happened to fit, gave
    frames another video's conditioning."""
    if value is None:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check_per_video(f"{name}[{key!r}]", item, b)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            check_per_video(f"{name}[{i}]", item, b)
    elif not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (b={b}, ...), once per video, got a {type(value).__name__}")
    elif value.ndim == 0 or value.shape[0] != b:
        raise ValueError(f"{name} must be given once per video, shape (b={b}, ...), got shape {tuple(value.shape)}")


def check_class_labels(labels: Any, b: int, unet: Any) -> None:
    """``class_labels`` for the UNet's class embedding (the x4 upscaler's noise level), once per video: one whole
    number each for a table of them (``num_class_embeds``), one number each for a ``timestep`` one. A UNet without a
    class embedding ignored them without a word; one that needs them says so itself."""
    if labels is None:
        return
    if unet.class_embedding is None:
        raise TypeError(
            "class_labels given to a UNet without a class embedding (its config's num_class_embeds and "
            "class_embed_type are None), which would ignore them"
        )
    check_per_video("class_labels", labels, b)
    table = isinstance(unet.class_embedding, torch.nn.Embedding)
    if (table or unet.config.class_embed_type == "timestep") and labels.ndim != 1:
        raise ValueError(f"class_labels must be one per video, shape ({b},), got shape {tuple(labels.shape)}")
    if table and labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"class_labels must be whole numbers (torch.int64), rows of this UNet's table of "
            f"{unet.class_embedding.num_embeddings} class embeddings, got {labels.dtype}"
        )


def per_frame_flags(
    flags: torch.Tensor | None, b: int, f: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``image_only_indicator`` as ``(b, f)`` in ``dtype``: zeros when ``None``, a ``(b,)`` one repeated per frame."""
    if flags is None:
        return torch.zeros(b, f, device=device, dtype=dtype)
    flags = torch.as_tensor(flags, device=device).to(dtype)
    if flags.shape == (b,):
        flags = flags[:, None].expand(b, f)
    if flags.shape != (b, f):
        raise ValueError(f"image_only_indicator must have shape ({b},) or ({b}, {f}), got {tuple(flags.shape)}")
    return flags


def per_frame_positions(positions: torch.Tensor | None, b: int, f: int, device: torch.device) -> torch.Tensor:
    """``frame_positions`` as float32 ``(b, f)``: ``0 .. f-1`` when ``None``, one row ``(f,)`` shared by all videos."""
    if positions is None:
        return torch.arange(f, device=device, dtype=torch.float32)[None].expand(b, f)
    positions = torch.as_tensor(positions, device=device, dtype=torch.float32)
    if positions.shape == (f,):
        positions = positions[None].expand(b, f)
    if positions.shape != (b, f):
        raise ValueError(f"frame_positions must have shape ({f},) or ({b}, {f}), got {tuple(positions.shape)}")
    return positions


def check_table_positions(positions: torch.Tensor, default: bool, max_frames: int) -> None:
    """Motion modules read a table of ``max_frames`` rows: positions must be whole numbers below that."""
    if default:
        if positions.shape[1] > max_frames:
            raise ValueError(
                f"{positions.shape[1]} frames in one forward; this model's motion modules encode at most {max_frames} "
                "(sample fewer frames, or longer videos by rollout with context frames)"
            )
        return
    if not bool(((positions == positions.round()) & (positions >= 0) & (positions < max_frames)).all()):
        raise ValueError(
            f"frame_positions must be whole numbers in [0, {max_frames}) for this model's motion modules, got "
            f"{positions.unique()[:8].tolist()}"
        )


def frame_timesteps(timestep: torch.Tensor | float | int, b: int, f: int, device: torch.device) -> torch.Tensor:
    """One timestep per frame ``(b f,)`` from a number, ``(b,)`` or ``(b, f)``: real numbers (NaN or inf gave a NaN
    output), checked on the host before they move to ``device``. A tensor already on an accelerator is not checked
    for NaN: that would wait for the device at every step, for numbers the schedulers never make NaN."""
    try:
        steps = torch.as_tensor(timestep)  # where it is: a number or an array on the CPU
    except (TypeError, ValueError, RuntimeError):
        steps = None
    if steps is None or steps.dtype == torch.bool or steps.is_complex():
        raise TypeError(f"timestep must be a real number or a tensor of them, got {timestep!r}")
    host = steps.device.type == "cpu" and steps.is_floating_point() and not torch.compiler.is_compiling()
    if host and not bool(torch.isfinite(steps).all()):
        raise ValueError(f"timestep must be finite, got {steps.flatten()[:8].tolist()}")
    timestep = steps.to(device)
    if timestep.ndim == 0:
        timestep = timestep.expand(b)
    if timestep.shape == (b,):
        # one per video -> one per frame: b -> (b f)
        return timestep.repeat_interleave(f)
    if timestep.shape == (b, f):
        return timestep.reshape(b * f)
    raise ValueError(f"timestep must be a scalar, ({b},) or ({b}, {f}), got shape {tuple(timestep.shape)}")


def repeat_frames(value: Any, f: int) -> Any:
    """Per-video conditioning -> per-frame: ``b ... -> (b f) ...`` (tensors, inside dicts, tuples and lists too)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: repeat_frames(item, f) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(repeat_frames(item, f) for item in value)
    return value.repeat_interleave(f, dim=0)
