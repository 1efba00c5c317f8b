"""Every global random number generator a training step draws from, captured and restored for exact resume.

:func:`capture_rng` returns plain data that ``torch.load(weights_only=True)`` reads back (tensors, ints, floats,
tuples, dicts; numpy's key as an int64 tensor), so it goes into a checkpoint part as it is. Each process captures
its own generators: with several ranks, save one RNG part per rank. Generators owned by other objects
(``torch.Generator`` instances, DataLoader worker seeds) are not global and are not covered here.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _python_capture() -> Any:
    return random.getstate()  # (version, tuple of 625 ints, gauss_next)


def _python_restore(state: Any) -> None:
    version, internal, gauss_next = state
    random.setstate((version, tuple(internal), gauss_next))


def _numpy_capture() -> dict[str, Any]:
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "bit_generator": name,
        "key": torch.from_numpy(key.astype(np.int64)),  # uint32 key: weights_only reads tensors, not ndarrays
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_restore(state: dict[str, Any]) -> None:
    key = state["key"].numpy().astype(np.uint32)
    np.random.set_state((state["bit_generator"], key, state["pos"], state["has_gauss"], state["cached_gaussian"]))


def _torch_capture() -> torch.Tensor:
    return torch.get_rng_state()


def _torch_restore(state: torch.Tensor) -> None:
    torch.set_rng_state(state)


def _cuda_capture() -> list[torch.Tensor] | None:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _cuda_restore(states: list[torch.Tensor] | None) -> None:
    """One state per visible device; a different device count restores what matches and warns."""
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    saved = len(states) if states else 0
    if saved != here:
        warnings.warn(
            f"RNG state has {saved} CUDA device(s), this process sees {here}: "
            f"restoring {min(saved, here)}; CUDA random draws will differ from the saved run",
            stacklevel=3,
        )
    for device, state in enumerate((states or [])[:here]):
        torch.cuda.set_rng_state(state, device)


GENERATORS: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {
    "python": (_python_capture, _python_restore),
    "numpy": (_numpy_capture, _numpy_restore),
    "torch": (_torch_capture, _torch_restore),
    "cuda": (_cuda_capture, _cuda_restore),
}


def capture_rng() -> dict[str, Any]:
    """The state of Python's ``random``, numpy's global generator, torch's CPU generator and every CUDA device's
    generator (``"cuda"`` is ``None`` without CUDA)."""
    return {name: capture() for name, (capture, _) in GENERATORS.items()}


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` returned; a state missing a generator or with an unknown one is an error."""
    missing, unknown = sorted(set(GENERATORS) - set(state)), sorted(set(state) - set(GENERATORS))
    if missing or unknown:
        raise ValueError(f"RNG state: missing {missing}, unknown {unknown}; expected keys {sorted(GENERATORS)}")
    for name, (_, restore) in GENERATORS.items():
        restore(state[name])
