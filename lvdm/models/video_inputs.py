"""The inputs of :meth:`VideoUNet.forward <lvdm.models.VideoUNet.forward>`, checked and laid out per frame: the
latents' shape, per-frame flags, positions and timesteps, and per-video conditioning repeated for each frame."""

from __future__ import annotations

from typing import Any

import torch


def _check_sample(sample: torch.Tensor, in_channels: int) -> tuple[int, int, int, int, int]:
    if sample.ndim != 5 or sample.shape[1] != in_channels:
        raise ValueError(f"VideoUNet expects latents (b, c={in_channels}, f, h, w), got shape {tuple(sample.shape)}")
    return tuple(sample.shape)


def _per_frame_flags(flags: torch.Tensor | None, b: int, f: int, device: torch.device, dtype: torch.dtype):
    if flags is None:
        return torch.zeros(b, f, device=device, dtype=dtype)
    flags = torch.as_tensor(flags, device=device).to(dtype)
    if flags.shape == (b,):
        flags = flags[:, None].expand(b, f)
    if flags.shape != (b, f):
        raise ValueError(f"image_only_indicator must have shape ({b},) or ({b}, {f}), got {tuple(flags.shape)}")
    return flags


def _frame_positions(positions: torch.Tensor | None, b: int, f: int, device: torch.device) -> torch.Tensor:
    if positions is None:
        return torch.arange(f, device=device, dtype=torch.float32)[None].expand(b, f)
    positions = torch.as_tensor(positions, device=device, dtype=torch.float32)
    if positions.shape == (f,):
        positions = positions[None].expand(b, f)
    if positions.shape != (b, f):
        raise ValueError(f"frame_positions must have shape ({f},) or ({b}, {f}), got {tuple(positions.shape)}")
    return positions


def _check_table_positions(positions: torch.Tensor, default: bool, max_frames: int) -> None:
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


def _timesteps(timestep: torch.Tensor | float | int, b: int, f: int, device: torch.device) -> torch.Tensor:
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0:
        timestep = timestep.expand(b)
    if timestep.shape == (b,):
        # one per video -> one per frame: b -> (b f)
        return timestep.repeat_interleave(f)
    if timestep.shape == (b, f):
        return timestep.reshape(b * f)
    raise ValueError(f"timestep must be a scalar, ({b},) or ({b}, {f}), got shape {tuple(timestep.shape)}")


def _repeat_frames(value: Any, f: int) -> Any:
    """Per-video conditioning -> per-frame: ``b ... -> (b f) ...`` (tensors, inside dicts, tuples and lists too)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {key: _repeat_frames(item, f) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat_frames(item, f) for item in value)
    return value.repeat_interleave(f, dim=0)
