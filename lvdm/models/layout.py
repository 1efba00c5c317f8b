"""Which temporal layers a VideoUNet gets, and where they sit.

:class:`TemporalLayout` is the one place the layer configuration is defined: typed,
defaulted, documented and validated. ``LAYOUTS`` names the presets.

Two styles exist. ``videoldm``: a temporal attention block after every spatial transformer and a 3D-conv block after
every ResNet block, each merged with the spatial output by a learned alpha. ``animatediff``: AnimateDiff's motion
modules, one per UNet layer where diffusers' ``UNetMotionModel`` puts them (after the layer's transformer, or after
its ResNet where the block has no transformer; after each mid-block transformer when ``mid_block``), added
residually with no alpha, with a sinusoidal frame encoding ``max_frames`` long. The second is what lets modules move
between lvdm and the AnimateDiff tools (:mod:`lvdm.models.animatediff`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class TemporalLayout:
    """The temporal layers inserted into a 2D UNet.

    Attributes:
        attention: a temporal attention block after every spatial transformer (mid block included).
        conv: a 3D-conv residual block after every ResNet block (down, mid and up paths).
        attention_depth: transformer layers in each temporal attention block.
        attention_heads: heads of each temporal attention block; ``None`` uses the spatial
            self-attention's head count at that resolution.
        conv_kernel: the 3D conv kernel ``(frames, height, width)``, each odd.
        mix_factor: initial logit of the learned alpha, ``a = sigmoid(mix_factor)`` weighs the
            spatial output. Every temporal branch starts as the identity, so this value does not
            change the initial output, only how fast each branch starts to matter. ``videoldm`` style only.
        style: ``"videoldm"`` or ``"animatediff"`` (see the module's docstring).
        mid_block: whether the mid block gets temporal layers (AnimateDiff v1 and v3 modules have none there).
        max_frames: ``animatediff`` only: the length of the frame-position table, the most frames one forward
            takes (24 for AnimateDiff v1, 32 for v2 and v3).
    """

    attention: bool = True
    conv: bool = True
    attention_depth: int = 1
    attention_heads: int | None = None
    conv_kernel: tuple[int, int, int] = (3, 1, 1)
    mix_factor: float = 0.5
    style: str = "videoldm"
    mid_block: bool = True
    max_frames: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_kernel", tuple(self.conv_kernel))
        problems = self.problems()
        if problems:
            raise ValueError("invalid temporal layout: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every invalid field, described with its value and what is allowed."""
        out = []
        if not (self.attention or self.conv):
            out.append("attention and conv are both false: a video UNet needs at least one kind of temporal layer")
        if type(self.attention_depth) is not int or not 1 <= self.attention_depth <= MAX_DEPTH:
            out.append(f"attention_depth={self.attention_depth}: must be 1 .. {MAX_DEPTH}")
        if self.attention_heads is not None and (type(self.attention_heads) is not int
                                                 or not 1 <= self.attention_heads <= MAX_HEADS):  # fmt: skip
            out.append(
                f"attention_heads={self.attention_heads}: must be 1 .. {MAX_HEADS} or null (spatial head count)"
            )
        kernel = self.conv_kernel
        if len(kernel) != 3 or any(not isinstance(k, int) or not 1 <= k <= MAX_KERNEL or k % 2 == 0 for k in kernel):
            out.append(f"conv_kernel={list(kernel)}: must be three odd integers in 1 .. {MAX_KERNEL} (frames, height, "
                       "width)")  # fmt: skip
        if self.style not in STYLES:
            out.append(f"style={self.style!r}: must be one of {list(STYLES)}")
        elif self.style == "animatediff":
            if self.conv or not self.attention:
                out.append("style=animatediff has motion modules (attention) only: set attention=true, conv=false")
            if self.attention_heads is None:
                out.append("style=animatediff needs attention_heads (AnimateDiff's modules use 8)")
            if type(self.max_frames) is not int or not 1 <= self.max_frames <= MAX_TABLE:
                out.append(f"max_frames={self.max_frames}: style=animatediff needs a frame table of 1 to {MAX_TABLE}")
        elif self.max_frames is not None:
            out.append(f"max_frames={self.max_frames}: only style=animatediff has a frame-position table")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; the style fields only where they differ from their defaults, so a file of the
        ``videoldm`` style reads the same as one written before there were styles."""
        data = asdict(self)
        data["conv_kernel"] = list(self.conv_kernel)
        for name, default in _STYLE_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TemporalLayout:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown temporal layout keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


STYLES = ("videoldm", "animatediff")
MAX_DEPTH = 16  # transformer layers per temporal attention block (Video LDM: 1, AnimateDiff: 2)
MAX_HEADS = 64
MAX_KERNEL = 15
MAX_TABLE = 4096  # frame-table rows: AnimateDiff's have 24 or 32; more than this is not a real module
_STYLE_DEFAULTS = {"style": "videoldm", "mid_block": True, "max_frames": None}

LAYOUTS: dict[str, TemporalLayout] = {
    # Video LDM: temporal attention after every spatial transformer, 3D conv after every ResNet block.
    "videoldm": TemporalLayout(),
    # Temporal attention only, comparable to AnimateDiff's motion modules.
    "attention_only": TemporalLayout(conv=False),
    # 3D convs only (cheap, local motion).
    "conv_only": TemporalLayout(attention=False),
    # AnimateDiff v2's motion modules (8 heads, mid block, 32 frames): what imported modules and diffusers'
    # UNetMotionModel use.
    "animatediff": TemporalLayout(conv=False, attention_heads=8, style="animatediff", max_frames=32),
}
