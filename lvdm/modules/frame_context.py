"""How the frame layout reaches the temporal layers.

The spatial blocks of a diffusers UNet only ever see ``(b f) c h w`` tensors. The temporal
layers wrapped around them need to know ``f`` (and which samples are images), so
``VideoUNet.forward`` sets one small :class:`FrameContext` for the duration of the call
(the k-diffusion ``models/flags.py`` pattern). Wrappers read it with :func:`current_frames`.

Gradient checkpointing recomputes blocks during ``backward``, after the context has been
left; the wrappers therefore pass the context they read as an explicit argument to the
checkpointed function, never read it again inside.

The context is kept per thread in a ``threading.local``, which ``torch.compile`` traces (guarding on what is
read), where a ``ContextVar`` ended the graph at every spatial cross-attention and left
``Transformer2DModel.forward`` uncompiled (:mod:`lvdm.models.compile`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class FrameContext:
    """The frame layout of the current video batch.

    Attributes:
        num_frames: frames per video, ``f``.
        image_only_indicator: ``(b, f)`` float, 1 where a sample is an image (its temporal
            layers are bypassed exactly), 0 for video frames.
        frame_positions: ``(b, f)`` float, the position of each frame fed to the sinusoidal
            encoding of the temporal attention (``0, 1, ..., f - 1`` by default; fractional
            positions express interpolated frames).
        extras: what the video model's standalone parts prepared for this call (an FPS embedding,
            context features, ...), by name; see :mod:`lvdm.models.parts`.
    """

    num_frames: int
    image_only_indicator: torch.Tensor
    frame_positions: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.image_only_indicator.shape[0]

    def temporal_input(self, site: str) -> torch.Tensor | None:
        """What the parts add to the input of the temporal layer ``site`` (``(b f) c h w``), summed; ``None`` when
        none adds anything. A part contributes by preparing an object with an ``at(site)`` method (the context
        encoder's features)."""
        return self._sum("at", site)

    def temporal_embedding(self, site: str) -> torch.Tensor | None:
        """What the parts add, per frame, to the normalised hidden state inside the temporal layer ``site``
        (``(b f) c``, beside the timestep embedding or the frame-position encoding), summed; ``None`` when none adds
        anything. A part contributes by preparing an object with an ``embedding_at(site)`` method (the FPS
        embedding)."""
        return self._sum("embedding_at", site)

    def _sum(self, method: str, site: str) -> torch.Tensor | None:
        """The sum of ``extra.<method>(site)`` over the prepared extras that have the method and return a tensor."""
        total = None
        for extra in self.extras.values():
            at = getattr(extra, method, None)
            value = at(site) if at is not None else None
            if value is not None:
                total = value if total is None else total + value
        return total

    def image_tokens(self) -> torch.Tensor | None:
        """The tokens a part prepared for the spatial cross-attentions (``(b, n, d)``, the image part's), or
        ``None``."""
        for extra in self.extras.values():
            tokens = getattr(extra, "tokens", None)
            if tokens is not None:
                return tokens
        return None


_CURRENT = threading.local()  # .context: this thread's FrameContext, while one is active


@contextmanager
def frame_context(context: FrameContext) -> Iterator[FrameContext]:
    """Make ``context`` visible to every temporal layer called inside the ``with`` block (in this thread)."""
    outer = active_frames()
    _CURRENT.context = context
    try:
        yield context
    finally:
        _CURRENT.context = outer


def active_frames() -> FrameContext | None:
    """The active :class:`FrameContext`, or ``None`` outside ``VideoUNet.forward`` (hooks on the 2D UNet's own
    modules, which may also run without one)."""
    return getattr(_CURRENT, "context", None)


def current_frames() -> FrameContext:
    """The active :class:`FrameContext`; a clear error when a temporal layer runs outside one."""
    context = active_frames()
    if context is None:
        raise RuntimeError(
            "a temporal layer ran outside VideoUNet.forward: call the VideoUNet with (b, c, f, h, w) latents "
            "rather than its inner 2D UNet"
        )
    return context
