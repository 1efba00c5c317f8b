"""Training target ``distill``: progressive distillation of a video model to few sampling steps.

Salimans & Ho's progressive distillation, guided as Meng et al. and Imagen Video do it. The **teacher** is the base
with the temporal module ``model.temporal_init`` sampled with classifier-free guidance (DDIM, ``train.distill_from``
steps). The **student** starts as the teacher (the same temporal layers, a spatial LoRA of ``model.spatial_lora_rank``
at zero, and a guidance embedding at zero, :mod:`lvdm.modules.guidance_embedding`). Round 1 is Meng et al.'s first
stage, the **guidance round**: the student learns the guided teacher's prediction from one pass, with the guidance
weight ``w`` as its input, so one forward per step serves every ``w`` in ``train.distill_guidance``. Each later
round halves the steps (``distill_from`` -> ... -> ``distill_to``): the student learns to make in one DDIM step what
two steps of the teacher make, and the student of one round is the frozen teacher of the next (one forward, ``w`` an
input). Rounds are ``train.distill_round_steps`` optimizer steps (default ``train.max_steps / rounds``). Each round
trains a new student, as Salimans & Ho's code does: the optimizer's state starts afresh, and ``train.warmup_steps``
and the ``train.lr_schedule`` curve run again (their configs anneal the rate linearly to 0 over each round).

One micro-batch, every draw from the step's generator:

- clean latents ``x``: the **teacher's own samples** (no video data), from a pool of ``train.distill_pool`` slots
  that checkpoints carry. Each clip of a batch draws a slot; a slot met for the first time is filled by the teacher
  of the round it is first met in, from the slot's own noise, at the middle of the guidance range, with that clip's
  caption, and keeps both. So a caption has several samples, not one: keyed by clip (one sample each of the demo's
  10 training clips) the student drifted where the few samples did not hold it (at ``w = 1``, where its starting
  output is the target, the guidance round moved its samples 0.021 MSE from the teacher's; 0.0055 with slots);
- ``w`` uniform in the guidance range; a student step ``i`` uniform over its schedule: from timestep ``t`` to
  ``p = t - T / n`` (diffusers' DDIM on a "trailing" grid, ``ddim_trailing``, the sampler the student is used with:
  SD's default "leading" grid would start 4 steps at timestep 751); the teacher goes ``t -> t - T / N -> p``;
- ``z_t = a_t x + s_t eps`` (the run's noise prior); in the guidance round the target ``x~`` is the guided teacher's
  prediction there; later, the teacher's two DDIM steps from ``z_t`` reach ``z_p``, and the target is what one DDIM
  step from ``z_t`` must predict to land there: ``x~ = (z_p - (s_p / s_t) z_t) / (a_p - (s_p / s_t) a_t)``;
- the loss in x-space, ``|x_student - x~|^2``, the same weight at every step, whatever the base predicts. Salimans
  & Ho weigh it by ``max(SNR, 1)``; on the demo, in short rounds, weighing by ``SNR + 1`` (v-space) let the
  low-noise steps take all of Adam's step and the few-step samples drift (MSE to the 64-step samples 0.134 / 0.217
  at 16 / 8 steps, against 0.031 / 0.068 with equal weights).

Validation measures the **distillation gain** on the held-out captions: with the same initial noises
(``train.distill_eval_noises`` per clip) and ``w`` (the middle of the range), the latent MSE to the teacher's
``distill_from``-step samples of the teacher's own samples at the student's step count, over the student's (above 1:
the student is the better few-step sampler). Each round's is printed when it ends, with two per-sample figures: the
median of the samples' own ratios and the share of samples where the student is closer. The mean is heavy-tailed: on
the demo, the halving student at 8 steps is closer on 51 of 64 held-out samples (median ratio 1.40) while its gain
of means is 1.06, and resampling those 64 gives gains of 0.62-1.90 for 16 samples, 0.80-1.41 for 64 (5-95 %).

``train.distill_latents: data`` noises the clips' own latents instead of the teacher's samples (Salimans & Ho).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call

from lvdm.errors import ConfigError
from lvdm.models.family import downsampling
from lvdm.training.objectives import Objective
from lvdm.training.step import Frozen, batch_latents_and_text, step_generator

if TYPE_CHECKING:
    from lvdm.training.validation import Rendered

SAMPLER = "ddim_trailing"  # the student's sampler: DDIM from the last training timestep (lvdm.diffusion.SAMPLERS)


def distill_rounds(start: int, end: int) -> int:
    """The number of halvings from ``start`` teacher steps to ``end`` student steps (64 -> 8: 3)."""
    rounds = int(round(math.log2(start / end))) if start > end > 0 else 0
    if rounds < 1 or end * 2**rounds != start:
        raise ConfigError(
            f"train.distill_from={start}, train.distill_to={end}: the student's steps must be the teacher's halved "
            "one or more times (e.g. 64 and 8)"
        )
    return rounds


def teacher_steps(distill_from: int, round_index: int) -> int:
    """The teacher's steps in round ``round_index`` (0-based): ``distill_from`` in the guidance round (0) and the
    first halving (1), then halved each round."""
    return distill_from // 2 ** max(round_index - 1, 0)


def student_steps(distill_from: int, round_index: int) -> int:
    """The steps the student samples with after round ``round_index``: the guidance round keeps the teacher's."""
    return teacher_steps(distill_from, round_index) // (2 if round_index > 0 else 1)


def round_schedule(distill_from: int, distill_to: int, round_steps: int | None, max_steps: int) -> tuple[int, int]:
    """``(rounds, steps per round)``: the guidance round and the halvings, each ``train.distill_round_steps``
    optimizer steps (default ``train.max_steps / rounds``)."""
    rounds = 1 + distill_rounds(distill_from, distill_to)
    return rounds, round_steps or max_steps // rounds


def round_of_step(step: int, rounds: int, round_steps: int) -> int:
    """The round (0-based) optimizer step ``step`` (0-based) belongs to: ``round_steps`` each, the last round
    taking any steps past them."""
    return min(step // round_steps, rounds - 1)


def round_lr_factor(step: int, train: Any) -> float:
    """The learning rate's factor at optimizer step ``step`` (0-based): ``train.warmup_steps`` and the
    ``train.lr_schedule`` curve run again in every round, each round training a new student (Salimans & Ho anneal
    it linearly to 0 over each round)."""
    rounds, round_steps = round_schedule(
        train.distill_from, train.distill_to, train.distill_round_steps, train.max_steps
    )
    r = round_of_step(step, rounds, round_steps)
    first, length = r * round_steps, round_steps if r < rounds - 1 else train.max_steps - r * round_steps
    return lr_curve(step - first, length, train.warmup_steps, train.lr_schedule)


def lr_curve(step: int, total: int, warmup: int, curve: str) -> float:
    """diffusers' warmup-then-curve factors (``constant_with_warmup``, ``linear``, ``cosine``) at ``step`` of
    ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if curve == "linear":
        return max(0.0, 1.0 - progress)
    if curve == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return 1.0


def reached_config(config: dict[str, Any], step: int) -> dict[str, Any]:
    """A distill run's resolved ``config`` as its module records it after ``step`` optimizer steps: a run stopped
    before its last round (``train.max_steps`` short of the rounds, to be resumed) records the steps of the round
    its student is in as ``distill_to``, which sampling takes: its student was not halved further. The trainer's
    export and ``python -m lvdm.export`` of a checkpoint both write it."""
    train = config["train"]
    rounds, round_steps = round_schedule(
        train["distill_from"], train["distill_to"], train.get("distill_round_steps"), train["max_steps"]
    )
    reached = round_of_step(max(step - 1, 0), rounds, round_steps)  # the round of its last step
    if reached == rounds - 1:
        return config
    return config | {"train": train | {"distill_to": student_steps(train["distill_from"], reached)}}


class DistillObjective(Objective):
    """Progressive, guided distillation of the video model (module notes)."""

    name = "distill"

    def __init__(self, cfg: Any, video: Any, frozen: Frozen, device: torch.device) -> None:
        super().__init__(cfg, video, frozen, device)
        train = cfg.train
        self.rounds, self.round_steps = round_schedule(
            train.distill_from, train.distill_to, train.distill_round_steps, train.max_steps
        )  # the guidance round, then halvings
        self.low, self.high = (float(w) for w in train.distill_guidance)
        self.params = {name: p for name, p in video.named_parameters() if p.requires_grad}
        self.original = {name: p.detach().clone() for name, p in self.params.items()}  # the teacher of round 1
        self.teacher = dict(self.original)
        self.step = 0
        self.pool: dict[str, torch.Tensor] = {}
        self.pool_captions: dict[str, str] = {}
        self.references: dict[tuple[int, int], torch.Tensor] = {}  # (held-out clip, steps) -> the teacher's samples
        self.grids: dict[int, torch.Tensor] = {}  # steps -> the sampler's timesteps
        self.prediction = frozen.noise_scheduler.config.prediction_type
        alphas = frozen.noise_scheduler.alphas_cumprod.float()
        self.alphas = alphas.to(device)
        self.final_alpha = self._sampler_final_alpha()  # DDIM's last step: alphas[0] on SD's schedulers
        self.T = frozen.noise_scheduler.config.num_train_timesteps

    # ------------------------------------------------------------------------------------------ the schedule
    def round_of(self, step: int) -> int:
        """The round (0-based) optimizer step ``step`` (0-based) belongs to (:func:`round_of_step`)."""
        return round_of_step(step, self.rounds, self.round_steps)

    def teacher_steps(self, round_index: int) -> int:
        return teacher_steps(self.cfg.train.distill_from, round_index)

    def student_steps(self, round_index: int) -> int:
        return student_steps(self.cfg.train.distill_from, round_index)

    def exported_config(self, config: dict[str, Any], step: int) -> dict[str, Any]:
        """:func:`reached_config`: the steps of the round a run stopped in, recorded as ``distill_to``."""
        return reached_config(config, step)

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_bar`` of timesteps ``(b,)`` (negative: DDIM's final step), shaped to broadcast over latents."""
        bar = torch.where(t >= 0, self.alphas[t.clamp(min=0)], torch.full_like(self.alphas[:1], self.final_alpha))
        return bar.view(-1, 1, 1, 1, 1)

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_t, s_t`` of timesteps ``(b,)`` (negative: DDIM's final step), shaped to broadcast over latents."""
        bar = self._alpha_bar(t)
        return bar.sqrt(), (1 - bar).sqrt()

    def _to_x(self, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from lvdm.diffusion import predicted_x0

        return predicted_x0(self.prediction, out.float(), z, self._alpha_bar(t))

    def _ddim(self, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step from ``z`` at ``t`` to ``prev`` given the clean prediction ``x``."""
        a, s = self._alpha_sigma(t)
        a_prev, s_prev = self._alpha_sigma(prev)
        return a_prev * x + s_prev * (z - a * x) / s

    def _sampler_final_alpha(self) -> float:
        """The final alpha of the sampler the student is used with; a base whose sampler clips or thresholds the
        predicted clean latents is refused, as the rounds' DDIM steps do neither."""
        from lvdm.diffusion import make_scheduler

        scheduler = make_scheduler(SAMPLER, self.frozen.noise_scheduler.config)
        if scheduler.config.clip_sample or scheduler.config.thresholding:
            raise ConfigError(
                "train.target=distill: the base's scheduler config sets clip_sample or thresholding, "
                "which the rounds' DDIM steps do not do; set both to false in its scheduler config"
            )
        return float(scheduler.final_alpha_cumprod)

    def _grid(self, steps: int) -> torch.Tensor:
        """diffusers' DDIM timesteps for ``steps`` (descending), as the sampler the student is used with has them;
        made once per step count."""
        if steps not in self.grids:
            from lvdm.diffusion import make_scheduler

            scheduler = make_scheduler(SAMPLER, self.frozen.noise_scheduler.config)
            scheduler.set_timesteps(steps)
            self.grids[steps] = scheduler.timesteps.to(self.device)
        return self.grids[steps]

    def _trained_steps(self) -> int:
        """The steps the student samples with after the optimizer steps taken so far: what it last trained for."""
        return self.student_steps(self.round_of(max(self.step - 1, 0)))

    def _middle_weight(self, n: int) -> torch.Tensor:
        """``(n,)`` the middle of the guidance range: the weight of the pool's samples and of validation."""
        return torch.full((n,), (self.low + self.high) / 2, device=self.device)

    def _latent_noise(self, n: int, video_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """``(n, c, f, h', w')`` unit noise in the latent space of clips ``(b, f, 3, h, w)``, drawn on the CPU."""
        factor = downsampling(self.frozen.vae.config.block_out_channels)
        _, f, _, h, w = video_shape
        shape = (n, self.frozen.vae.config.latent_channels, f, h // factor, w // factor)
        return torch.randn(shape, generator=generator).to(self.device)

    # ------------------------------------------------------------------------------------------ the models
    @torch.no_grad()
    def guided_x(self, params: dict[str, torch.Tensor] | None, z, t, text, empty, w, *, cfg: bool) -> torch.Tensor:
        """The clean latents a model predicts at ``(z, t)`` under guidance ``w`` ``(b,)``: ``params`` replace the
        trainable weights (``None``: the current ones); ``cfg``: classifier-free guidance, two passes batched (the
        first round's teacher), else one pass with ``w`` as the model's input (a distilled model)."""

        def call(*args: Any, **kwargs: Any) -> torch.Tensor:
            if params is None:
                return self.video(*args, **kwargs)
            return functional_call(self.video, params, args, kwargs, strict=False)

        if cfg:
            out = call(torch.cat([z, z]), torch.cat([t, t]), torch.cat([text, empty]))
            cond, uncond = out.float().chunk(2)
            out = uncond + w.view(-1, 1, 1, 1, 1) * (cond - uncond)
        else:
            out = call(z, t, text, guidance_scale=w)
        return self._to_x(out, z, t)

    @torch.no_grad()
    def sample(self, params, noise, text, empty, w, steps: int, *, cfg: bool) -> torch.Tensor:
        """DDIM sampling from unit ``noise`` in ``steps`` steps, as :func:`lvdm.diffusion.sample` would run it."""
        z = noise.float()
        for t in self._grid(steps):
            ts = t.expand(z.shape[0])
            x = self.guided_x(params, z, ts, text, empty, w, cfg=cfg)
            z = self._ddim(z, x, ts, ts - self.T // steps)
        return z

    def _text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from lvdm.models.encoders import encode_text

        with torch.no_grad():
            text = encode_text(self.frozen.tokenizer, self.frozen.text_encoder, captions).to(self.device)
        return text, self.frozen.empty_text.to(text).expand_as(text)

    # ------------------------------------------------------------------------------------------ the loss
    def _pool_latents(
        self, batch: dict[str, Any], round_index: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, list[str]]:
        """A pool slot drawn for each clip of the batch, and its entry: clean latents and their caption. A slot
        met for the first time is filled now by this round's teacher, from the slot's own noise, with the clip's
        caption; later draws of it reuse both, so the pool holds several samples of a caption."""
        slots = torch.randint(0, self.cfg.train.distill_pool, (len(batch["caption"]),), generator=generator)
        keys = [str(int(slot)) for slot in slots]
        missing: dict[str, str] = {}
        for key, caption in zip(keys, batch["caption"], strict=True):
            if key not in self.pool:
                missing.setdefault(key, caption)  # a slot drawn twice in one batch gets the first clip's caption
        if missing:
            shape = batch["video"].shape  # b f 3 h w: the clips' size sets the samples'
            noise = torch.cat([self._latent_noise(1, shape, step_generator(-6, 0, int(key))) for key in missing])
            text, empty = self._text(list(missing.values()))
            mid = self._middle_weight(len(missing))
            made = self.sample(self.teacher, noise, text, empty, mid, self.teacher_steps(round_index),
                               cfg=round_index == 0)  # fmt: skip
            for (key, caption), latents in zip(missing.items(), made, strict=True):
                self.pool[key], self.pool_captions[key] = latents.cpu(), caption
        return torch.stack([self.pool[key] for key in keys]).to(self.device), [self.pool_captions[k] for k in keys]

    def loss(self, model_fn: Any, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        from lvdm.diffusion import sample_noise, snr

        r = self.round_of(self.step)
        big, small = self.teacher_steps(r), self.student_steps(r)
        if self.cfg.train.distill_latents == "data":
            with torch.no_grad():
                x0, text = batch_latents_and_text(batch, self.frozen, generator, self.device)
            empty = self.frozen.empty_text.to(text).expand_as(text)
        else:
            x0, captions = self._pool_latents(batch, r, generator)
            text, empty = self._text(captions)
        b = x0.shape[0]
        w = (self.low + (self.high - self.low) * torch.rand(b, generator=generator)).to(self.device)
        grid = self._grid(small)
        t = grid[torch.randint(0, small, (b,), generator=generator).to(self.device)]
        middle, prev = t - self.T // big, t - self.T // small
        train = self.cfg.train
        eps = sample_noise(tuple(x0.shape), prior=train.noise_prior, mixed_lambda=train.mixed_noise_lambda,
                           generator=generator, device=self.device)  # fmt: skip
        a_t, s_t = self._alpha_sigma(t)
        z_t = a_t * x0 + s_t * eps
        x_t = self.guided_x(self.teacher, z_t, t, text, empty, w, cfg=r == 0)
        if r == 0:  # the guidance round: the guided teacher's prediction itself, from one pass
            target = x_t
        else:
            target = self._two_steps(z_t, x_t, t, middle, prev, text, empty, w)
        out = model_fn(z_t, t, encoder_hidden_states=text, guidance_scale=w)
        x_student = self._to_x(out, z_t, t)
        per_sample = ((x_student - target) ** 2).mean(dim=(1, 2, 3, 4))
        if train.distill_weighting == "truncated_snr":  # Salimans & Ho's max(SNR, 1): the low noise weighs more
            per_sample = per_sample * snr(self.frozen.noise_scheduler, t).clamp(min=1)
        return per_sample

    @torch.no_grad()
    def _two_steps(self, z_t, x_t, t, middle, prev, text, empty, w) -> torch.Tensor:
        """The clean latents one DDIM step from ``z_t`` must predict to land where the teacher's two land."""
        z_m = self._ddim(z_t, x_t, t, middle)
        x_m = self.guided_x(self.teacher, z_m, middle, text, empty, w, cfg=False)
        z_p = self._ddim(z_m, x_m, middle, prev)
        (a_t, s_t), (a_p, s_p) = self._alpha_sigma(t), self._alpha_sigma(prev)
        ratio = s_p / s_t
        return (z_p - ratio * z_t) / (a_p - ratio * a_t)

    def after_step(self, step: int) -> dict[str, float]:
        """At the end of a round (not the last), the student becomes the frozen teacher of the next."""
        self.step = step
        if self.starts_round(step):
            self.teacher = {name: p.detach().clone() for name, p in self.params.items()}
        return {"distill_round": float(self.round_of(step - 1) + 1)}

    def starts_round(self, step: int) -> bool:
        """Whether the next optimizer step after ``step`` is the first of a round (not the first round)."""
        return step % self.round_steps == 0 and 0 < step < self.rounds * self.round_steps

    def ended_round(self, step: int) -> int | None:
        """The round (1-based) whose last optimizer step ``step`` is, else ``None``: the last round ends at
        ``train.max_steps`` when it takes the steps past the others' (not at a multiple of the round's length)."""
        if step <= 0:
            return None
        r = self.round_of(step - 1)
        last = max(self.cfg.train.max_steps, self.rounds * self.round_steps)
        end = (r + 1) * self.round_steps if r < self.rounds - 1 else last
        return r + 1 if step == end else None

    def fresh_optimizer(self, step: int) -> bool:
        """Each round trains a new student, from a fresh optimizer state (Salimans & Ho reset it)."""
        return self.starts_round(step)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "original": self.original, "step": torch.tensor(self.step),
                "pool": dict(self.pool), "pool_captions": dict(self.pool_captions)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"teacher", "original", "step", "pool", "pool_captions"} - set(state)
        if missing:
            raise ValueError(f"the distill objective's state lacks {sorted(missing)}")
        if set(state["teacher"]) != set(self.params):
            raise ValueError("its teacher's weights do not match this model's trainable weights")
        self.teacher = {k: v.to(self.device) for k, v in state["teacher"].items()}
        self.original = {k: v.to(self.device) for k, v in state["original"].items()}
        self.step = int(state["step"])
        self.pool, self.pool_captions = dict(state["pool"]), dict(state["pool_captions"])

    # ------------------------------------------------------------------------------------------ validation
    def evaluate(self, model_fn: Any, batches: list[dict[str, Any]]) -> dict[str, float] | None:
        batches = [batch for batch in batches if "video" in batch]
        if not batches:
            return None
        steps = self._trained_steps()
        figures = self.distillation_gain(batches, steps)
        r = self.ended_round(self.step)
        if r is not None:
            from tqdm.auto import tqdm

            keys = ("gain", "error_teacher", "error_student", "gain_median", "closer")
            gain, teacher, student, median, closer = (figures[f"distill_{key}_{steps}"] for key in keys)
            what = "guidance round" if r == 1 else f"{2 * steps} -> {steps} steps"
            per_sample = f"per sample: median ratio {median:.3f}, student closer on {closer:.0%}"
            tqdm.write(
                f"distillation round {r}/{self.rounds} ({what}): at {steps} steps, MSE to the teacher's "
                f"{self.cfg.train.distill_from}-step samples: teacher {teacher:.4g}, student {student:.4g}"
                + (f", distillation gain {gain:.3f} ({per_sample})" if teacher > 0 else " (one pass instead of two)")
            )
        return figures

    def distillation_gain(self, batches: list[dict[str, Any]], steps: int) -> dict[str, float]:
        """MSE to the teacher's ``distill_from``-step samples of the teacher's and the student's ``steps``-step
        samples (:meth:`sample_errors`), and their ratio: the gain. A few far samples can carry a mean, so beside
        it come two per-sample figures: the median of the samples' own ratios, and the share where the student is
        closer."""
        teacher, student = self.sample_errors(batches, steps)
        return {f"distill_error_teacher_{steps}": float(teacher.mean()),
                f"distill_error_student_{steps}": float(student.mean()),
                f"distill_gain_{steps}": float(teacher.mean() / student.mean().clamp_min(1e-12)),
                f"distill_gain_median_{steps}": float((teacher / student.clamp_min(1e-12)).quantile(0.5)),
                f"distill_closer_{steps}": float((student < teacher).double().mean())}  # fmt: skip

    def sample_errors(self, batches: list[dict[str, Any]], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample (``train.distill_eval_noises`` initial noises per held-out clip, ``w`` the middle of the
        range), the MSE to the teacher's ``distill_from``-step sample of the teacher's and of the student's
        ``steps``-step samples, float64."""
        errors: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
        k = self.cfg.train.distill_eval_noises
        for batch in batches:
            b, key = len(batch["video"]), int(batch["index"][0])
            noise = self._latent_noise(b * k, batch["video"].shape, step_generator(-7, 0, key))
            text, empty = (v.repeat_interleave(k, dim=0) for v in self._text(list(batch["caption"])))
            mid = self._middle_weight(b * k)
            for n in {self.cfg.train.distill_from, steps}:  # the teacher is fixed: each made once
                if (key, n) not in self.references:
                    self.references[key, n] = self.sample(self.original, noise, text, empty, mid, n, cfg=True)
            reference, teacher = self.references[key, self.cfg.train.distill_from], self.references[key, steps]
            student = self.sample(None, noise, text, empty, mid, steps, cfg=False)
            errors["teacher"].append(((teacher - reference) ** 2).mean(dim=(1, 2, 3, 4)))
            errors["student"].append(((student - reference) ** 2).mean(dim=(1, 2, 3, 4)))
        teacher, student = (torch.cat(v).double().cpu() for v in (errors["teacher"], errors["student"]))
        return teacher, student

    def render(
        self, model_fn: Any, out_dir: Path, *, fps: float | None = None, batches: list[dict[str, Any]] | None = None
    ) -> Rendered:
        """The student's samples of the validation prompts at its step count, one forward per step."""
        import numpy as np

        from lvdm.media import to_uint8_frames
        from lvdm.models.encoders import decode_latents
        from lvdm.training.validation import Rendered, write_videos

        prompts = self.cfg.train.validation_prompts
        if not prompts or not batches:
            return Rendered()
        noise = self._latent_noise(len(prompts), batches[0]["video"].shape, step_generator(-8, 0, 0))
        text, empty = self._text(list(prompts))
        mid = self._middle_weight(len(prompts))
        latents = self.sample(None, noise, text, empty, mid, self._trained_steps(), cfg=False)
        with torch.no_grad():
            clips = decode_latents(self.frozen.vae, latents.to(self.frozen.vae.dtype)).float().cpu()
        videos = np.stack([to_uint8_frames(clip) for clip in clips])
        files = write_videos(videos, out_dir, fps=fps)
        return Rendered(files=files, videos={"samples": videos})
