"""Shared by the diffusion modules: the ``model_fn`` type and name lookup in the preset dicts with a did-you-mean."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from lvdm.errors import closest

_V = TypeVar("_V")

ModelFn = Callable[..., torch.Tensor]
"""``model_fn(x_t: (b, c, f, h, w), t: (b,), **cond) -> (b, c, f, h, w)``; ``cond`` is passed through untouched."""


def lookup(registry: Mapping[str, _V], name: str, what: str) -> _V:
    """``registry[name]``, or a ``ValueError`` naming every choice and the closest one."""
    if name in registry:
        return registry[name]
    close = closest(name, registry)
    hint = f" Did you mean {close!r}?" if close else ""
    raise ValueError(f"Unknown {what} {name!r}; choose one of {sorted(registry)}.{hint}")
