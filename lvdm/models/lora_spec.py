"""What a LoRA to fuse is: a file and its scale, as the command line, a sidecar and Python give them."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvdm.errors import ConfigError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file (kohya/A1111 or diffusers/peft format) and the scale it is fused at."""

    path: Path
    scale: float = 1.0

    def text(self, path: str | os.PathLike | None = None) -> str:
        """The command-line form ``PATH:SCALE`` (``path`` in place of the spec's), for a sidecar: the scale short
        where that is exact, else in full, so that a replay fuses the same weights."""
        short = f"{self.scale:g}"
        scale = short if float(short) == self.scale else repr(self.scale)
        return f"{os.fspath(path if path is not None else self.path)}:{scale}"

    @classmethod
    def parse_all(cls, loras: Any) -> list[LoraSpec]:
        """Every item :meth:`parse` takes, in order; or one alone (a path, a ``(path, scale)`` pair, a
        ``LoraSpec``), or a mapping of paths to scales. ``None``: none."""
        if loras is None:
            return []
        one = (isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[0], str | os.PathLike)
               and not isinstance(loras[1], str | os.PathLike | tuple | LoraSpec))  # fmt: skip
        if one or isinstance(loras, (str, os.PathLike, LoraSpec)):  # a string was read a character at a time
            return [cls.parse(loras)]  # a (path, scale) pair: its scale is checked where every scale is
        if isinstance(loras, Mapping):  # iterated, a mapping gave its paths and dropped their scales
            return [cls.parse((path, scale)) for path, scale in loras.items()]
        if isinstance(loras, bytes | Set) or not isinstance(loras, Iterable):  # a set fuses in no stable order
            raise ConfigError(f"loras: expected a list of LoRAs (paths, 'PATH:SCALE', (path, scale) pairs), "
                              f"got {type(loras).__name__}")  # fmt: skip
        return [cls.parse(spec) for spec in loras]

    @classmethod
    def parse(cls, spec: str | os.PathLike | tuple[Any, float] | LoraSpec) -> LoraSpec:
        """``LoraSpec``, ``(path, scale)``, a path, or the command-line form ``"PATH[:SCALE]"``."""
        if isinstance(spec, LoraSpec):
            return cls(spec.path, _lora_scale(spec.path, spec.scale))
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (str, os.PathLike)):
            return cls(Path(spec[0]), _lora_scale(spec[0], spec[1]))
        if not isinstance(spec, (str, os.PathLike)):
            raise ConfigError(f"LoRA {spec!r}: expected a path, 'PATH:SCALE' or a (path, scale) pair")
        text = os.fspath(spec)
        if not text:  # Path("") is the working folder
            raise ConfigError("LoRA '': an empty path; expected a LoRA file, 'PATH:SCALE' or a (path, scale) pair")
        head, sep, tail = text.rpartition(":")
        if sep and head and not Path(text).exists():
            try:
                scale = float(tail) if "_" not in tail else float("x")  # float() reads '0_5' as 5
            except ValueError:
                if any(c in tail for c in "/\\") or Path(tail).suffix in (".safetensors", *PICKLE_SUFFIXES):
                    raise ConfigError(f"LoRA {text!r} does not exist") from None  # 'C:\\x.safetensors', a path
                raise ConfigError(f"LoRA {text!r}: the scale after ':' must be a number, got {tail!r}") from None
            return cls(Path(head), _lora_scale(head, scale))
        return cls(Path(text))


def _lora_scale(path: Any, scale: Any) -> float:
    """A LoRA's scale as a finite float: fused, a NaN or infinite one made the base's weights NaN, and the error
    blamed the base."""
    try:  # a float, numpy or torch scalar; not a string or a bool
        value = None if isinstance(scale, str | bytes | bool) else float(scale)
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is None or not math.isfinite(value):
        raise ConfigError(f"LoRA {os.fspath(path)!r}: the scale must be a finite number, got {scale!r}")
    return value
