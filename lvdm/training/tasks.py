"""Training tasks of a model with context frames: which frames of each clip are given, and the task flag.

Per clip, a task is drawn by ``train.tasks`` weight (Video LDM trains prediction and interpolation this way, on
top of text-to-video):

- ``text``: no frame given (text-to-video);
- ``predict``: the first ``n`` frames given, ``n`` drawn from ``train.predict_frames`` (0, 1 or 2 by default: the
  0 case is what context guidance compares against);
- ``interpolate``: every ``train.interpolate_every``-th frame given (0, k, 2k, ...), flag 1;
- ``interpolate_fine``: the same frames given, flag 2, on clips cut at ``k`` times the rate: the second stage
  (``T -> 4T`` then ``4T -> 16T`` in the paper). The loader decides which clips are cut that way (a share of them
  by the task's weight, :func:`fine_share`; ``batch["fine"]``), so these clips always get this task and the others
  draw among the rest.

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
    elif task in ("interpolate", "interpolate_fine"):
        mask[::every] = True
    elif task not in ("text", "image"):
        raise ValueError(f"unknown task {task!r}; known: text, predict, interpolate, interpolate_fine")
    return mask


def fine_share(train: Any) -> float:
    """The share of video clips the loader cuts for the fine interpolation stage: its weight among the tasks."""
    total = sum(w for w in train.tasks.values() if w > 0)
    return float(train.tasks.get("interpolate_fine", 0)) / total if total else 0.0


def draw_tasks(
    train: Any,
    batch_size: int,
    num_frames: int,
    generator: torch.Generator,
    *,
    images: torch.Tensor | None = None,
    fine: torch.Tensor | None = None,
) -> Tasks:
    """One task per clip by ``train.tasks`` weight (empty: text only), with its given frames and flag; rows of
    ``images`` (``(b,)``, still images of joint training, which bypass the temporal layers) get the task ``image``
    with nothing given, rows of ``fine`` (``(b,)``, clips cut for the fine stage) ``interpolate_fine``."""
    tasks = train.tasks or {"text": 1.0}
    weights = {name: float(w) for name, w in tasks.items() if w > 0 and name != "interpolate_fine"} or {"text": 1.0}
    names = list(weights)
    picks = torch.multinomial(torch.tensor(list(weights.values())), batch_size, replacement=True, generator=generator)
    counts = torch.randint(0, len(train.predict_frames), (batch_size,), generator=generator)
    chosen, masks, flags = [], [], []
    for i in range(batch_size):
        task = names[int(picks[i])]
        if images is not None and bool(images.reshape(-1)[i]):
            task = "image"
        elif fine is not None and bool(fine.reshape(-1)[i]):
            task = "interpolate_fine"
        chosen.append(task)
        masks.append(
            given_frames(task, num_frames, count=train.predict_frames[int(counts[i])], every=train.interpolate_every)
        )
        flags.append(task_flag(task))
    return Tasks(chosen, torch.stack(masks), torch.tensor(flags, dtype=torch.long))


def task_flag(task: str) -> int:
    """The context encoder's flag for ``task``: 1 and 2 for the two interpolation stages, 0 otherwise."""
    return FLAGS.get(task, FLAGS["none"])


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
    for task in ("interpolate", "interpolate_fine"):
        if train.tasks.get(task, 0) > 0:
            tasks[task] = given_frames(task, num_frames, every=train.interpolate_every)
    return tasks


def context_task_names(train: Any) -> list[str]:
    """The context tasks whose gain a run reports (:func:`gain_tasks`)."""
    return list(gain_tasks(train, 1))


def split_fine(batches: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Validation batches: ``(others, fine)``, the latter cut for the fine interpolation stage."""
    fine = [batch for batch in batches if "fine" in batch and bool(batch["fine"].all())]
    return [batch for batch in batches if not any(batch is f for f in fine)], fine


@torch.no_grad()
def context_gains(
    model_fn: Any,
    batches: list[dict[str, Any]],
    frozen: Any,
    device: torch.device,
    train: Any,
    *,
    fine_batches: list[dict[str, Any]] = (),
    noise_prior: str = "independent",
    mixed_lambda: float = 0.5,
    inputs: Any = None,
) -> dict[str, float]:
    """Per context task the run trains: the held-out loss on the frames to be made without the given frames and
    with them (``loss_<task>_without_context``, ``loss_<task>_with_context``) and ``context_gain_<task>``, their
    ratio; the same model, clips, timesteps and noise, the given frames' information removed (mask zeroed, so they
    are noised to ``t`` like every frame; flag kept). Above 1: the model uses the given frames. ``inputs(batch)``:
    the model inputs each clip carries (its fps), as in training.

    The fine interpolation stage is measured on ``fine_batches`` (the held-out clips cut at its rate), once more
    with the coarse stage's flag (``loss_interpolate_fine_coarse_flag``): ``stage_flag_gain``, that loss / the
    loss with its own flag, says whether the flag tells the stages apart (1: it does not matter)."""
    from lvdm.modules.context_encoder import with_clean_context

    model_fn = with_clean_context(model_fn)  # as in training: given frames clean; without them, all noised
    names = context_task_names(train)
    runs = [(batches, [name for name in names if name != "interpolate_fine"], -2)]
    if "interpolate_fine" in names:
        runs.append((list(fine_batches), ["interpolate_fine"], -3))
    totals: dict[str, list[float]] = {}
    for held, chosen, stream in runs:
        for key, values in _task_losses(model_fn, held, chosen, stream, frozen, device, train, noise_prior,
                                        mixed_lambda, inputs).items():  # fmt: skip
            totals.setdefault(key, []).extend(values)
    figures = {key: sum(values) / len(values) for key, values in totals.items() if values}
    for task in names:
        if f"loss_{task}_with_context" in figures:
            figures[f"context_gain_{task}"] = figures[f"loss_{task}_without_context"] / max(
                figures[f"loss_{task}_with_context"], 1e-12
            )
    if "loss_interpolate_fine_coarse_flag" in figures:
        figures["stage_flag_gain"] = figures["loss_interpolate_fine_coarse_flag"] / max(
            figures["loss_interpolate_fine_with_context"], 1e-12
        )
    return figures


def _task_losses(
    model_fn: Any,
    batches: list[dict[str, Any]],
    tasks: list[str],
    stream: int,
    frozen: Any,
    device: torch.device,
    train: Any,
    noise_prior: str,
    mixed_lambda: float,
    inputs: Any,
) -> dict[str, list[float]]:
    """The losses behind :func:`context_gains` for ``tasks`` on ``batches``, the draws from generator ``stream``."""
    from lvdm.diffusion import diffusion_loss, sample_noise
    from lvdm.training.step import batch_latents_and_text, step_generator
    from lvdm.training.validation import GAIN_TIMESTEPS

    totals: dict[str, list[float]] = {}
    for number, batch in enumerate(batches):
        generator = step_generator(stream, 0, number)  # the same draws at every validation
        latents, text = batch_latents_and_text(batch, frozen, generator, device)
        b, f = latents.shape[0], latents.shape[2]
        extra = inputs(batch) if inputs is not None else {}  # once per batch (an image's CLIP tokens)
        given_by_task = gain_tasks(train, f)
        for t in GAIN_TIMESTEPS:
            noise = sample_noise(tuple(latents.shape), prior=noise_prior, mixed_lambda=mixed_lambda,
                                 generator=generator).to(device)  # fmt: skip
            for task in tasks:
                given = given_by_task[task]
                flag = task_flag(task)
                passes = [("with_context", given, flag), ("without_context", given & False, flag)]
                if task == "interpolate_fine":
                    passes.append(("coarse_flag", given, task_flag("interpolate")))
                for name, mask, flag in passes:
                    terms = diffusion_loss(
                        model_fn, latents, frozen.noise_scheduler, noise=noise,
                        timesteps=torch.full((b,), t, dtype=torch.long, device=device), encoder_hidden_states=text,
                        context_latents=latents, context_mask=mask[None].expand(b, f).to(device),
                        context_flag=torch.full((b,), flag, device=device), **extra,
                    )  # fmt: skip
                    loss = made_frames_loss(terms.prediction, terms.target, (~given).float()[None].expand(b, f))
                    totals.setdefault(f"loss_{task}_{name}", []).append(float(loss.mean()))
    return totals
