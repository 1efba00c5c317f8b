"""An exponential moving average of the trained (temporal) weights, kept in fp32 beside them."""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def copy_weights(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Copy each of ``values`` into the tensor of ``params`` of the same name, in place (no gradient recorded)."""
    for name, value in values.items():
        params[name].copy_(value)


class EMA:
    """``shadow = d * shadow + (1 - d) * param`` after every optimizer step, with a warm-up:
    ``d = min(decay, (1 + s) / (10 + s))`` at step ``s`` (0-based), as diffusers' ``EMAModel`` does.

    Without the warm-up, decay 0.9999 leaves the average at 90% of the initial (untrained) weights
    after 1,000 steps; with it, the average follows training from the start (``d`` is 0.1 at step 0,
    0.9 at step 80, 0.99 at step 890) and reaches ``decay`` once ``(1 + s) / (10 + s)`` does. The
    step comes from the trainer's own counter, which checkpoints restore, so resume stays exact.

    Only the parameters it is given are tracked (the registry of the video model and any other
    trained group), so it costs one fp32 copy of the small trainable set, never of the frozen base.
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step ``step`` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the current weights; ``step`` is the 0-based number of the optimizer step just taken."""
        weight = 1.0 - self.decay_at(step)
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        copy_weights(self.shadow, state)

    def weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the parameters, for export."""
        return {name: shadow.clone() for name, shadow in self.shadow.items()}
