"""What a training step computes: the objective, chosen by ``train.target``.

The loop (:mod:`lvdm.training.trainer`) exists once: accelerate, the optimizer of the trainable
parameters, checkpoints, exact resume, the non-finite guard, signals, logs and validation. What one
micro-batch's loss is, and what validation measures and renders, belongs to an :class:`Objective`:

- :meth:`Objective.loss`: the per-sample loss of a micro-batch, backpropagated into the trainable
  parameters (the video model's registry plus any LoRA / unfrozen blocks);
- :meth:`Objective.after_step`: runs after each successful optimizer step; an objective that owns
  extra models and optimizers (a discriminator, a teacher) updates them here and returns figures to log;
- :meth:`Objective.state_dict` / :meth:`Objective.load_state_dict`: that extra state, saved in every
  checkpoint (part ``objective``) and restored on resume, so resume stays exact;
- :meth:`Objective.evaluate` and :meth:`Objective.render`: held-out figures, and sample files with the videos
  and figures the log takes (a :class:`~lvdm.training.validation.Rendered`).

:data:`OBJECTIVES` maps ``train.target`` to its class. ``denoise`` (the diffusion loss of the temporal
layers on the frozen base) is the first; ``decoder`` (the temporal VAE decoder, :mod:`lvdm.training.decoder`) the
second; ``upscale`` (an x4 upscaler's temporal layers on patches, :mod:`lvdm.training.upscale`) the third;
``distill`` (progressive distillation to few sampling steps, :mod:`lvdm.training.distill`) the fourth.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from lvdm.models.family import downsampling
from lvdm.training.step import Frozen, batch_inputs, image_inputs, training_loss

if TYPE_CHECKING:
    from lvdm.training.validation import Rendered


class Objective(ABC):
    """The base objective: no extra state, no validation figures, no samples. Subclasses set :attr:`name`
    and implement :meth:`loss`; the rest is optional."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: Any, video: Any, frozen: Frozen, device: torch.device) -> None:
        self.cfg, self.video, self.frozen, self.device = cfg, video, frozen, device

    @abstractmethod
    def loss(self, model_fn: Any, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The per-sample loss ``(b,)`` of one micro-batch; every random draw comes from ``generator``."""

    def after_step(self, step: int) -> dict[str, float]:
        """Update what the objective owns after optimizer step ``step`` succeeded; figures to log."""
        return {}

    def fresh_optimizer(self, step: int) -> bool:
        """Whether the optimizer's state (Adam's moments) starts afresh after optimizer step ``step``."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """Extra models and optimizers to checkpoint (tensors and weights_only-safe containers)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"the {self.name!r} objective keeps no state, but the checkpoint has {sorted(state)}")

    def exported_config(self, config: dict[str, Any], step: int) -> dict[str, Any]:
        """The training config a module file exported after ``step`` optimizer steps records (sampling reads its
        defaults from it): the run's own, unless the objective says otherwise."""
        return config

    def evaluate(self, model_fn: Any, batches: list[dict[str, Any]]) -> dict[str, float] | None:
        """Held-out figures (logged, and printed at the end of a run); ``None`` when there are none."""
        return None

    def render(
        self, model_fn: Any, out_dir: Path, *, fps: float | None = None, batches: list[dict[str, Any]] | None = None
    ) -> Rendered:
        """Sample files for the validation settings, written under ``out_dir``, with their videos and figures for
        the log; videos at ``fps``, the rate the clips were trained at (``None``: unknown, 8); ``batches``: the
        held-out batches (e.g. pictures to animate)."""
        from lvdm.training.validation import Rendered

        return Rendered()


class DenoisingObjective(Objective):
    """Video LDM's temporal stage: the diffusion loss of the video model on the frozen base's latents, with
    the run's noise prior, caption dropout, min-SNR weighting and offset noise (:func:`training_loss`).

    A model with context frames (``model.context``) trains the ``train.tasks`` (:mod:`lvdm.training.tasks`): each
    clip gets a task, its given frames reach the context encoder, and the loss counts the frames to be made; the
    loss of each task is logged (``loss_text``, ``loss_predict``, ...) and validation adds the context gains."""

    name = "denoise"

    def __init__(self, cfg: Any, video: Any, frozen: Frozen, device: torch.device) -> None:
        super().__init__(cfg, video, frozen, device)
        accepted = getattr(video, "conditioning_inputs", set())
        self.context = "context_mask" in accepted
        # what the parts read from a batch (its clips' fps, the image's CLIP tokens); in training drawn by a generator
        self.inputs = functools.partial(batch_inputs, accepted=accepted, device=device, frozen=frozen, train=cfg.train)
        self.task_losses: dict[str, list[float]] = {}  # the steps taken since the last log line (checkpointed)
        self.pending: list[list[tuple[str, float]]] = []  # per micro-batch since the last step taken: a skipped
        # (non-finite) step's are dropped, as its loss is

    def loss(self, model_fn: Any, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        train, inputs = self.cfg.train, self.inputs(batch, generator=generator)
        if not self.context:
            return training_loss(model_fn, batch, self.frozen, train, generator, self.device, inputs=inputs).loss
        from lvdm.modules.context_encoder import with_clean_context
        from lvdm.training.tasks import draw_tasks, made_frames_loss

        drawn = []

        def conditioning(latents: torch.Tensor) -> dict[str, torch.Tensor]:
            tasks = draw_tasks(
                train, latents.shape[0], latents.shape[2], generator, images=batch["is_image"], fine=batch.get("fine")
            )
            drawn.append(tasks)
            return tasks.conditioning(latents)

        model_fn = with_clean_context(model_fn)  # the given frames clean, at timestep 0
        terms = training_loss(
            model_fn, batch, self.frozen, train, generator, self.device, conditioning=conditioning, inputs=inputs
        )
        tasks = drawn[0]
        loss = made_frames_loss(terms.prediction, terms.target, tasks.made()) * terms.weights
        self.pending.append(list(zip(tasks.names, loss.detach().tolist(), strict=True)))
        return loss

    def after_step(self, step: int) -> dict[str, float]:
        for micro_batch in self.pending[-self.cfg.train.gradient_accumulation :]:  # the step just taken
            for name, value in micro_batch:
                self.task_losses.setdefault(name, []).append(value)
        self.pending = []
        if not self.task_losses or (step % self.cfg.train.log_every and step != 1):
            return {}
        figures = {f"loss_{name}": sum(values) / len(values) for name, values in sorted(self.task_losses.items())}
        self.task_losses.clear()
        return figures

    def state_dict(self) -> dict[str, Any]:
        """The per-task losses of the log window so far: a resumed run logs the same means."""
        if not self.task_losses:
            return {}
        return {"task_losses": {name: list(values) for name, values in self.task_losses.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state) - {"task_losses"})
        if unknown:
            raise ValueError(f"the {self.name!r} objective keeps only task_losses, but the checkpoint has {unknown}")
        windows = state.get("task_losses", {})
        self.task_losses = {str(name): [float(value) for value in values] for name, values in windows.items()}

    def evaluate(self, model_fn: Any, batches: list[dict[str, Any]]) -> dict[str, float] | None:
        if not batches:
            return None
        from lvdm.training.tasks import context_gains, split_fine
        from lvdm.training.validation import clip_figures, fps_gains, image_gains, motion_gains

        train = self.cfg.train
        batches, fine = split_fine(batches)  # the fine interpolation stage's own clips count for its gain only
        prior = {"noise_prior": train.noise_prior, "mixed_lambda": train.mixed_noise_lambda, "inputs": self.inputs}
        figures = motion_gains(model_fn, batches, self.frozen, self.device, **prior) | clip_figures(batches)
        if self.context:
            figures |= context_gains(model_fn, batches, self.frozen, self.device, train, fine_batches=fine, **prior)
        if "fps" in self.video.conditioning_inputs:
            figures |= fps_gains(model_fn, batches, self.frozen, self.device, **prior)
        if "image_embeds" in self.video.conditioning_inputs:
            figures |= image_gains(model_fn, batches, self.frozen, self.device, **prior)
        return figures

    def render(
        self, model_fn: Any, out_dir: Path, *, fps: float | None = None, batches: list[dict[str, Any]] | None = None
    ) -> Rendered:
        from lvdm.sampling_settings import DEFAULT_FPS
        from lvdm.training.validation import Rendered, render_validation

        cfg = self.cfg
        if not cfg.train.validation_prompts:
            return Rendered()
        from lvdm.training.tasks import split_fine

        fps = fps or DEFAULT_FPS
        inputs, uncond, pictures = self._render_inputs(fps, split_fine(batches or [])[0], out_dir)
        factor = downsampling(self.frozen.vae.config.block_out_channels)
        height, width = cfg.data.resolution
        rendered = render_validation(
            model_fn, self.frozen, cfg.train.validation_prompts, out_dir,
            num_frames=cfg.data.num_frames, latent_size=(height // factor, width // factor),
            latent_channels=self.video.unet.config.in_channels, steps=cfg.train.validation_steps,
            guidance_scale=cfg.train.validation_guidance, fps=fps, seed=cfg.train.seed,
            noise_prior=cfg.train.noise_prior, mixed_lambda=cfg.train.mixed_noise_lambda, device=self.device,
            inputs=inputs, uncond_inputs=uncond,
        )  # fmt: skip
        rendered.files = pictures + rendered.files
        return rendered

    def _render_inputs(
        self, fps: float, batches: list[dict[str, Any]], out_dir: Path
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor], list[Path]]:
        """What the parts take when validation samples its prompts, per prompt and for the unconditional pass, and
        the pictures written: the clips' rate (FPS conditioning); with image conditioning, prompt ``i`` animates the
        first frame of held-out clip ``i`` (cycling; written as ``out_dir/<i>_image.png``), the unconditional pass
        gets "no image", as ``sample.py --image`` guides by default. Without held-out clips: "no image" (what a
        dropped image was in training)."""
        accepted, common, uncond = self.video.conditioning_inputs, {}, {}
        if "fps" in accepted:
            common["fps"] = torch.tensor([float(fps)])
        prompts = self.cfg.train.validation_prompts
        inputs = [dict(common) for _ in prompts]
        pictures: list[Path] = []
        if "image_embeds" in accepted:
            none = self.frozen.no_image_tokens()
            tokens = torch.cat([image_inputs(b, self.frozen, None, None) for b in batches]) if batches else none
            for i, given in enumerate(inputs):
                given["image_embeds"] = tokens[i % len(tokens)][None]
            uncond["image_embeds"] = none
            pictures = _write_pictures(batches, len(prompts), out_dir) if batches else []
        return inputs, uncond, pictures


def _write_pictures(batches: list[dict[str, Any]], n: int, out_dir: Path) -> list[Path]:
    """``out_dir/<i>_image.png``: the first frame of held-out clip ``i`` (cycling) for ``n`` prompts; none when the
    batches hold no frames (a latent cache)."""
    from PIL import Image

    from lvdm.media import to_uint8_frames

    frames = [to_uint8_frames(clip[:1])[0] for batch in batches if "video" in batch for clip in batch["video"]]
    if not frames:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        path = out_dir / f"{i:02d}_image.png"
        Image.fromarray(frames[i % len(frames)]).save(path)
        written.append(path)
    return written


OBJECTIVES: dict[str, type[Objective]] = {
    DenoisingObjective.name: DenoisingObjective,
}
"""``train.target`` -> the objective class."""


LAZY_OBJECTIVES = {
    "decoder": "lvdm.training.decoder:DecoderObjective",
    "upscale": "lvdm.training.upscale:UpscaleObjective",
    "distill": "lvdm.training.distill:DistillObjective",
}
"""Objectives in modules of their own (which import this one): ``train.target`` -> ``module:class``."""


def make_objective(cfg: Any, video: Any, frozen: Frozen, device: torch.device) -> Objective:
    """The objective ``cfg.train.target`` names, built for this run."""
    name = cfg.train.target
    if name not in OBJECTIVES:
        import importlib

        module, _, cls = LAZY_OBJECTIVES[name].partition(":")
        OBJECTIVES[name] = getattr(importlib.import_module(module), cls)
    return OBJECTIVES[name](cfg, video, frozen, device)
