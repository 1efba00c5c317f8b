"""Training tasks of a model with context frames: which frames of each clip are given, and the task flag.

Per clip, a task is drawn by ``train.tasks`` weight (Video LDM trains prediction and interpolation this way, on
top of text-to-video):

- ``text``: no frame given (text-to-video);
- ``predict``: the first ``n`` frames given, ``n`` drawn from ``train.predict_frames`` (0, 1 or 2 by default: the
  0 case is what context guidance compares against);
- ``interpolate``: every ``train.interpolate_every``-th frame given (0, k, 2k, ...), flag 1.

The loss then counts only the frames to be made (a given frame is in the input already). Everything is drawn from
the micro-batch's generator, so a resumed run draws the same tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lvdm.modules.context_encoder import FLAGS


@dataclass(frozen=True)
class Tasks:
    """The drawn tasks of one micro-batch."""

    names: list[str]  # per clip
    mask: torch.Tensor  # (b, f) bool: the given frames
    flag: torch.Tensor  # (b,) long: the context encoder's task flag

    def conditioning(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The context inputs of ``VideoUNet.forward`` for clean ``latents`` ``(b, c, f, h, w)``."""
        device = latents.device
        return {
            "context_latents": latents,
            "context_mask": self.mask.to(device),
            "context_flag": self.flag.to(device),
        }

    def made(self) -> torch.Tensor:
        """``(b, f)`` float: 1 for the frames to be made (the loss counts these)."""
        return (~self.mask).float()


def given_frames(task: str, num_frames: int, *, count: int = 0, every: int = 4) -> torch.Tensor:
    """``(f,)`` bool: the frames given for ``task`` (``count`` leading ones to predict from; every ``every``-th one to
    interpolate between)."""
    mask = torch.zeros(num_frames, dtype=torch.bool)
    if task == "predict":
        mask[:count] = True
    elif task == "interpolate":
        mask[::every] = True
    elif task not in ("text", "image"):
        raise ValueError(f"unknown task {task!r}; known: text, predict, interpolate")
    return mask


def draw_tasks(
    train: Any, batch_size: int, num_frames: int, generator: torch.Generator, *, images: torch.Tensor | None = None
) -> Tasks:
    """One task per clip by ``train.tasks`` weight (empty: text only), with its given frames and flag; rows of
    ``images`` (``(b,)``, still images of joint training, which bypass the temporal layers) get the task ``image``
    with nothing given."""
    weights = {name: float(w) for name, w in (train.tasks or {"text": 1.0}).items() if w > 0}
    names = list(weights)
    picks = torch.multinomial(torch.tensor(list(weights.values())), batch_size, replacement=True, generator=generator)
    counts = torch.randint(0, len(train.predict_frames), (batch_size,), generator=generator)
    chosen, masks, flags = [], [], []
    for i in range(batch_size):
        task = "image" if images is not None and bool(images.reshape(-1)[i]) else names[int(picks[i])]
        chosen.append(task)
        masks.append(
            given_frames(task, num_frames, count=train.predict_frames[int(counts[i])], every=train.interpolate_every)
        )
        flags.append(FLAGS["interpolate"] if task == "interpolate" else FLAGS["none"])
    return Tasks(chosen, torch.stack(masks), torch.tensor(flags, dtype=torch.long))


def made_frames_loss(prediction: torch.Tensor, target: torch.Tensor, made: torch.Tensor) -> torch.Tensor:
    """``(b,)`` mean squared error over the frames to be made (``made`` ``(b, f)``; all frames where none is
    given)."""
    # b c f h w -> b f
    per_frame = (prediction.float() - target.float()).square().mean(dim=(1, 3, 4))
    made = made.to(per_frame.device)
    return (per_frame * made).sum(1) / made.sum(1).clamp(min=1)


# ------------------------------------------------------------------------------------------------ context gain
def gain_tasks(train: Any, num_frames: int) -> dict[str, torch.Tensor]:
    """The context tasks a run trains, each with the ``(f,)`` given frames its gain is measured with (prediction
    from the most frames ``train.predict_frames`` offers)."""
    tasks = {}
    if train.tasks.get("predict", 0) > 0 and max(train.predict_frames) > 0:
        tasks["predict"] = given_frames("predict", num_frames, count=max(train.predict_frames))
    if train.tasks.get("interpolate", 0) > 0:
        tasks["interpolate"] = given_frames("interpolate", num_frames, every=train.interpolate_every)
    return tasks


@torch.no_grad()
def context_gains(
    model_fn: Any,
    batches: list[dict[str, Any]],
    frozen: Any,
    device: torch.device,
    train: Any,
    *,
    noise_prior: str = "independent",
    mixed_lambda: float = 0.5,
    inputs: Any = None,
) -> dict[str, float]:
    """Per context task the run trains: the held-out loss on the frames to be made without the given frames and
    with them (``loss_<task>_without_context``, ``loss_<task>_with_context``) and ``context_gain_<task>``, their
    ratio; the same model, clips, timesteps and noise, the given frames' information removed (mask zeroed, so they
    are noised to ``t`` like every frame; flag kept). Above 1: the model uses the given frames. ``inputs(batch)``:
    the model inputs each clip carries (its fps), as in training."""
    from lvdm.diffusion import diffusion_loss, sample_noise
    from lvdm.modules.context_encoder import with_clean_context
    from lvdm.training.step import batch_latents_and_text, step_generator
    from lvdm.training.validation import GAIN_TIMESTEPS

    model_fn = with_clean_context(model_fn)  # as in training: given frames clean; without them, all noised
    totals: dict[str, list[float]] = {}
    for number, batch in enumerate(batches):
        generator = step_generator(-2, 0, number)  # the same draws at every validation
        latents, text = batch_latents_and_text(batch, frozen, generator, device)
        b, f = latents.shape[0], latents.shape[2]
        tasks = gain_tasks(train, f)
        extra = inputs(batch) if inputs is not None else {}  # once per batch (an image's CLIP tokens)
        for t in GAIN_TIMESTEPS:
            noise = sample_noise(tuple(latents.shape), prior=noise_prior, mixed_lambda=mixed_lambda,
                                 generator=generator).to(device)  # fmt: skip
            for task, given in tasks.items():
                flag = torch.full((b,), FLAGS["interpolate" if task == "interpolate" else "none"], device=device)
                made = (~given).float()[None].expand(b, f)
                for name, mask in (("with_context", given), ("without_context", torch.zeros_like(given))):
                    terms = diffusion_loss(
                        model_fn, latents, frozen.noise_scheduler, noise=noise,
                        timesteps=torch.full((b,), t, dtype=torch.long, device=device), encoder_hidden_states=text,
                        context_latents=latents, context_mask=mask[None].expand(b, f).to(device), context_flag=flag,
                        **extra,
                    )  # fmt: skip
                    loss = made_frames_loss(terms.prediction, terms.target, made)
                    totals.setdefault(f"loss_{task}_{name}", []).append(float(loss.mean()))
    figures = {key: sum(values) / len(values) for key, values in totals.items()}
    for task in {key.split("_")[1] for key in figures}:
        figures[f"context_gain_{task}"] = figures[f"loss_{task}_without_context"] / max(
            figures[f"loss_{task}_with_context"], 1e-12
        )
    return figures
