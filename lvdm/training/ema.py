"""An exponential moving average of the trained (temporal) weights, kept in fp32 beside them."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step.

    Only the parameters it is given are tracked (the temporal layers), so it costs one fp32
    copy of the small trainable set, never of the frozen base.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the parameters, for export."""
        return {name: shadow.clone() for name, shadow in self.shadow.items()}
