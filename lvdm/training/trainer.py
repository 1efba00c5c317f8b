"""The training loop: accelerate underneath, temporal layers trained, everything resumable and guarded.

The loop exists once; what a step computes is an objective chosen by ``train.target``
(:mod:`lvdm.training.objectives`), which may own extra models and optimizers that checkpoints carry. One optimizer
step = ``train.gradient_accumulation`` micro-batches per process. What the loop promises (each one tested):

- only the trained parameters (the temporal layers, plus a spatial LoRA or unfrozen blocks where configured) get
  gradients and optimizer state; the rest is frozen (bf16/fp16 under mixed precision, the trained weights stay fp32);
- a step whose loss (or, outside fp16, gradient) is not finite on any rank is skipped on every rank: weights,
  optimizer moments, EMA, LR schedule and step count unchanged; counted, logged, and
  ``train.max_nonfinite_steps`` in a row stop the run;
- checkpoints hold weights, optimizer, LR schedule, EMA, grad scaler, RNG, the data position and the base's family;
  a resumed run continues exactly as an uninterrupted one (all training randomness is drawn from generators seeded
  by (seed, rank, micro-batch number));
- SIGTERM/SIGINT finish the current step, save, and stop, every rank at the same step.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import Counter, deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lvdm.cli import raise_outside_finalizers
from lvdm.config import Config, check_machine, config_to_dict, save_config
from lvdm.errors import CheckpointError, DataError, LvdmError
from lvdm.models.family import family_record
from lvdm.sampling_settings import training_fps
from lvdm.training import run_dir, run_lock
from lvdm.training.checkpoint import load_checkpoint, save_checkpoint
from lvdm.training.ema import EMA, copy_weights
from lvdm.training.logs import RunLog
from lvdm.training.objectives import make_objective
from lvdm.training.rng import capture_rng, restore_rng
from lvdm.training.step import step_generator


@dataclass
class TrainResult:
    """What a finished (or stopped) run left behind."""

    output_dir: Path
    step: int
    temporal_path: Path
    first_loss: float | None = None
    last_loss: float | None = None
    gain: dict[str, float] | None = None
    samples: list[Path] = field(default_factory=list)
    skipped_steps: int = 0
    stopped_by_signal: bool = False
    last_loss_steps: int = 1  # last_loss is the mean over this many final steps (train.log_every at most)
    first_loss_step: int = 1  # the step of first_loss: the first of this start (after the checkpoint it resumed)
    held_out: bool = True  # whether gain was measured on held-out clips (data.holdout), not on training clips


class Trainer:
    """Builds everything from a :class:`Config` and runs the loop; see the module docstring."""

    def __init__(self, cfg: Config, *, progress: bool = True) -> None:
        from accelerate import Accelerator

        check_machine(cfg)  # before the output folder or any model is touched
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.output_dir)
        # without cpu=True, accelerate runs a CPU-only torchrun/mpirun job as N unrelated single processes
        self.acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
        _check_world_size(self.acc.num_processes)
        self.resume_from = self._prepare_output_dir()
        self.cfg_dict = config_to_dict(cfg)
        self.step = self.micro_batches = self.skipped_total = self.skipped_in_row = 0
        self.saved_step: int | None = None  # the step of the checkpoint this process last saved
        self.objective_figures: dict[str, float] = {}
        self.losses: list[float] = []  # the steps since the last log line: the logged loss is their mean
        self.clip_rates: Counter[float] = Counter()  # the training clips' frame rates: the sampling default
        self.stop_requested = self.interrupted = False
        self._build()

    # ---------------------------------------------------------------------------------------------- set-up
    def _prepare_output_dir(self) -> Path | None:
        resume, overwrite = self.cfg.train.resume, self.cfg.train.overwrite
        if self.acc.is_main_process:
            run = config_to_dict(self.cfg) | {"world_size": self.acc.num_processes}
            # a checkpoint of another config is refused before the run folder or any model is touched
            run_dir.prepare_output_dir(self.out, resume=resume, overwrite=overwrite, config=run)
        self.acc.wait_for_everyone()
        return run_dir.resolve_resume(self.out, resume)

    def _build(self) -> None:
        from accelerate.utils import set_seed

        from lvdm.training.setup import build_data, build_model, build_optimizer

        self.device = self.acc.device
        from lvdm.runtime import apply_threads, plan_threads

        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.acc.num_processes))
        self.threads = plan_threads(
            threads=self.cfg.train.threads, data_workers=self.cfg.data.num_workers, processes=local_processes
        )
        apply_threads(self.threads)
        set_seed(self.cfg.train.seed)  # the temporal layers' initialisation
        self.video, self.frozen, self.trainable = build_model(self.cfg, self.device, self.acc.mixed_precision)
        self.objective = make_objective(self.cfg, self.video, self.frozen, self.device)
        self.data = build_data(
            self.cfg, self.frozen, rank=self.acc.process_index, world=self.acc.num_processes,
            num_workers=self.threads.data_workers,
        )  # fmt: skip
        optimizer, self.lr_schedule = build_optimizer(self.cfg, list(self.trainable.values()), self.device)
        decay = self.cfg.train.ema_decay
        self.ema = EMA(self.trainable.items(), decay) if decay else None
        self.model, self.optimizer = self.acc.prepare(self.video, optimizer)
        if self.resume_from is not None:
            self._restore(self.resume_from)
        again = self.step if self.step >= self.cfg.train.max_steps else None  # _finish validates it again
        self.log = RunLog(self.out, enabled=self.acc.is_main_process, validated_again=again)
        if self.acc.is_main_process:  # the resolved config of the latest start or resume
            save_config(self.cfg, self.out / "config.yaml")
        self.data.stream.start_at(self.micro_batches)
        self.batches = iter(self.data.loader)

    def model_fn(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The trained model (as accelerate wraps it): the video UNet ``(x, t, **cond)``, or what the target trains."""
        return self.model(*args, **kwargs)

    # ---------------------------------------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        """Train to ``train.max_steps`` (or a stop signal); returns where everything is."""
        train = self.cfg.train
        first = None  # (loss, step) of this start's first step
        recent: deque[float] = deque(maxlen=train.log_every)  # the summary's last loss: their mean
        self._announce()
        bar = tqdm(total=train.max_steps, initial=self.step, desc="training", disable=not self._show_progress())
        with self._signals():
            while self.step < train.max_steps and not self._stop_agreed():
                started = time.perf_counter()
                loss, grad_norm, stepped = self._optimizer_step()
                if not stepped:
                    continue
                first = first or (loss, self.step)
                recent.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr_schedule.get_last_lr()[0]:.2e}")
                self._after_step(loss, grad_norm, time.perf_counter() - started)
        bar.close()
        result = self._finish(first and first[0], sum(recent) / len(recent) if recent else None)
        return replace(result, last_loss_steps=max(1, len(recent)), first_loss_step=first[1] if first else 1)

    def _announce(self) -> None:
        if not self.acc.is_main_process:
            return
        extra = sum(p.numel() for p in self.trainable.values()) - sum(
            p.numel() for p in self.video.temporal_parameters()
        )
        lines = [self.video.parameter_summary()]
        if extra:
            lines.append(f"also training {extra:,} spatial parameters (LoRA / unfrozen blocks)")
        if self.resume_from is not None:
            lines.append(f"resuming from {self.resume_from} at step {self.step}")
        lines.append(
            f"{self.acc.num_processes} process(es) on {self.device}, mixed precision: {self.acc.mixed_precision}"
        )
        lines.append(self.threads.describe())
        for line in lines:
            tqdm.write(line)

    def _show_progress(self) -> bool:
        return self.progress and self.acc.is_main_process

    def _optimizer_step(self) -> tuple[float, float, bool]:
        """One optimizer step over the micro-batches; ``stepped`` is False when it was skipped."""
        accumulation = self.cfg.train.gradient_accumulation
        losses = []
        for micro in range(accumulation):
            batch = self._next_batch()
            generator = step_generator(self.cfg.train.seed, self.acc.process_index, self.micro_batches)
            sync = self.acc.no_sync(self.model) if micro < accumulation - 1 else nullcontext()
            with sync, self.acc.autocast():
                loss = self.objective.loss(self.model_fn, batch, generator).mean()
                self.acc.backward(loss / accumulation)
            losses.append(loss.detach().float())
        loss = torch.stack(losses).mean()
        max_norm = self.cfg.train.max_grad_norm or math.inf
        grad_norm = self.acc.clip_grad_norm_(list(self.trainable.values()), max_norm)
        finite = bool(torch.isfinite(loss)) and (self.acc.mixed_precision == "fp16" or bool(torch.isfinite(grad_norm)))
        if self._any_rank(not finite):
            discard_gradients(self.optimizer, self.acc.scaler)
            self._skip_nonfinite(float(loss))
            return float(loss), float(grad_norm), False
        self.skipped_in_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.acc.optimizer_step_was_skipped:  # fp16 loss scale overflow: the scaler lowered its scale
            return float(loss), float(grad_norm), False
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update(self.step)
        self.step += 1
        self.objective_figures = self.objective.after_step(self.step)
        if self.objective.fresh_optimizer(self.step):
            self.optimizer.state.clear()  # filled again, at zero, by the next step
        return float(self.acc.reduce(loss.to(self.device), reduction="mean")), float(grad_norm), True

    def _next_batch(self) -> dict[str, Any]:
        batch = next(self.batches)
        self.micro_batches += 1
        videos = ~batch["is_image"] if "is_image" in batch else torch.ones(len(batch["fps"]), dtype=torch.bool)
        if "fine" in batch:
            videos &= ~batch["fine"]  # clips of the fine interpolation stage play at a multiple of the clip rate
        self.clip_rates.update(round(float(rate), 3) for rate in batch["fps"][videos] if rate > 0)
        failed = None
        try:
            self.data.guard.update(batch)
        except DataError as exc:
            failed = exc
        if self._any_rank(failed is not None):
            raise failed or DataError("another process stopped on bad data (see its skipped.jsonl)")
        return batch

    def _skip_nonfinite(self, loss: float) -> None:
        self.skipped_total += 1
        self.skipped_in_row += 1
        self.log.write(self.step, {"skipped_nonfinite": self.skipped_total, "loss": loss})
        limit = self.cfg.train.max_nonfinite_steps
        if self.skipped_in_row >= limit:
            raise LvdmError(
                f"{limit} steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps) at step "
                f"{self.step}; the weights are those of the last good step. Lower train.lr, use bf16 instead of "
                "fp16, or check the data."
            )

    def _stop_agreed(self) -> bool:
        """Whether a signal reached any rank; asked before every step, skipped ones too, so that all ranks leave the
        loop together (a signal lands on one rank at any moment, and the others are in the step's collectives)."""
        self.stop_requested = self._any_rank(self.stop_requested)
        return self.stop_requested

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        if self.acc.num_processes == 1:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.acc.reduce(value, reduction="sum").item() > 0)

    def _after_step(self, loss: float, grad_norm: float, seconds: float) -> None:
        train = self.cfg.train
        self.losses.append(loss)
        if self.step % train.log_every == 0 or self.step == 1:
            mean_loss = sum(self.losses) / len(self.losses)  # over the steps since the last log line
            self.losses.clear()
            values = {"loss": mean_loss, "lr": self.lr_schedule.get_last_lr()[0], "grad_norm": grad_norm}
            values |= {
                "step_seconds": seconds,
                "skipped_nonfinite": self.skipped_total,
                "bad_samples": self.data.guard.bad,
            }
            values |= self.objective_figures
            self.log.write(self.step, values)
        checkpoint = self.step % train.checkpoint_every == 0 and self.step < train.max_steps
        # validation first: a run killed in it resumes from an earlier checkpoint and validates this step again; a
        # validation that fails (out of memory, a full disk) still saves the step, checkpoint step or not (a resume
        # from an earlier one would fail there again), and a stop saves it at once
        if self.step % train.validate_every == 0 and self.step < train.max_steps and not self._stop_agreed():
            try:
                self.validate()
            except Exception:
                self.save()
                raise
        if checkpoint:
            self.save()

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Write a full checkpoint and export the temporal module (main process; all ranks wait)."""
        self.acc.wait_for_everyone()
        root = run_dir.checkpoint_root(self.out)
        path = root / f"checkpoint-{self.step:08d}"
        if self.acc.is_main_process:
            parts = {
                "trainable": {k: v.detach().float().cpu() for k, v in self.trainable.items()},
                "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(),
                "rng": capture_rng(),
                "trainer": {
                    "step": self.step,
                    "micro_batches": self.micro_batches,
                    "skipped": self.skipped_total,
                    "skipped_in_row": self.skipped_in_row,
                    "clip_rates": sorted(self.clip_rates.items()),  # the module's clip_fps counts every batch
                    "losses": list(self.losses),  # the log window so far: a resumed run logs the same means
                },
            }
            if self.ema is not None:
                parts["ema"] = self.ema.state_dict()
            if objective_state := self.objective.state_dict():
                parts["objective"] = objective_state
            if self.acc.scaler is not None:
                parts["scaler"] = self.acc.scaler.state_dict()
            metadata = {"config": self.cfg_dict, "world_size": self.acc.num_processes} | self._clip_fps()
            metadata |= family_record(self.video)  # lvdm.export checks a --base against it (SD1, SD2: same shapes)
            path = save_checkpoint(root, self.step, parts, keep_last=self.cfg.train.keep_last, metadata=metadata)
            self.export()
        self.acc.wait_for_everyone()
        self.saved_step = self.step
        return path

    @property
    def export_path(self) -> Path:
        """``<output_dir>/temporal.safetensors``, or what the trained model exports to (``decoder/``)."""
        return self.out / getattr(self.video, "export_name", "temporal.safetensors")

    def export(self) -> Path:
        """Write ``<output_dir>/temporal.safetensors`` (the EMA weights when EMA is on) with the resolved config,
        plus ``spatial_lora.safetensors`` / ``spatial_weights.safetensors`` when those groups train; for the decoder
        target, the ``<output_dir>/decoder/`` folder."""
        from lvdm.training import groups

        target = self.export_path
        model = self.cfg.model
        config = self.objective.exported_config(self.cfg_dict, self.step) | self._clip_fps()
        paths = groups.module_file_paths(target, model.spatial_lora_rank, model.unfreeze, prefix="")
        with self._ema_weights():
            if target.suffix != ".safetensors":  # the decoder target's folder, written by its own means
                self.video.save_temporal(target, training_config=config)
            else:
                groups.write_module_files(self.video, self.trainable, paths, config)
        return target

    def _clip_fps(self) -> dict[str, float]:
        """``{"clip_fps": the commonest frame rate of the training clips}`` (source fps / stride), or ``{}``:
        recorded in module files, where sampling takes its default fps from it (without ``data.target_fps``).
        With a stride drawn per clip (``data.frame_stride: [low, high]``) it is their median rate, the middle speed."""
        if not self.clip_rates:
            return {}
        if isinstance(self.cfg.data.frame_stride, list):
            rates = sorted(self.clip_rates.elements())
            return {"clip_fps": rates[len(rates) // 2]}
        return {"clip_fps": self.clip_rates.most_common(1)[0][0]}

    @contextmanager
    def _ema_weights(self):
        if self.ema is None:
            yield
            return
        params = self.trainable
        saved = {name: p.detach().clone() for name, p in params.items()}
        copy_weights(params, self.ema.weights())
        try:
            yield
        finally:
            copy_weights(params, saved)

    def _restore(self, path: Path) -> None:
        parts, metadata = load_checkpoint(path)  # its config was compared with this run's (prepare_output_dir)
        needed = ["trainable", "optimizer", "lr_schedule", "rng", "trainer"] + (["ema"] if self.ema else [])
        needed += ["scaler"] if self.acc.scaler is not None else []
        missing = [name for name in needed if name not in parts]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: cannot resume exactly")
        params = self.trainable
        if parts["trainable"].keys() != params.keys():
            raise CheckpointError(f"checkpoint {path}: its trained weights do not match this model's trainable layers")
        copy_weights(params, parts["trainable"])
        try:
            self._apply_states(parts, path)
        except CheckpointError:
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:  # written with matching checksums
            raise CheckpointError(f"checkpoint {path} is damaged: its states cannot be restored ({exc})") from exc

    def _apply_states(self, parts: dict[str, Any], path: Path) -> None:
        """The optimizer's, schedule's, EMA's, scaler's, objective's, RNG's and trainer's states of a checkpoint."""
        from lvdm.training.setup import apply_rates

        self.optimizer.load_state_dict(parts["optimizer"])
        self.lr_schedule.load_state_dict(parts["lr_schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(parts["ema"])
        if self.acc.scaler is not None:
            self.acc.scaler.load_state_dict(parts["scaler"])
        try:
            self.objective.load_state_dict(parts.get("objective", {}))
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"checkpoint {path}: the {self.cfg.train.target!r} objective's state: {exc}"
            ) from exc
        restore_rng(parts["rng"])
        trainer = parts["trainer"]
        self.losses = [float(loss) for loss in trainer.get("losses", [])]
        self.step, self.micro_batches = trainer["step"], trainer["micro_batches"]
        self.skipped_total = trainer["skipped"]
        self.skipped_in_row = int(trainer.get("skipped_in_row", 0))  # both absent from checkpoints before 2026-12-04
        self.clip_rates = Counter({float(rate): int(count) for rate, count in trainer.get("clip_rates", [])})
        for group in self.optimizer.param_groups:  # before the first step, which would fail inside
            if any(not isinstance(group.get(key, 0.0), float | int) for key in ("lr", "weight_decay", "eps")):
                raise ValueError(f"the optimizer's settings are not numbers: lr {group.get('lr')!r}")
            for param in group["params"]:
                for name, value in self.optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                        raise ValueError(
                            f"the optimizer's {name} is {tuple(value.shape)} for a {tuple(param.shape)} weight"
                        )
        apply_rates(self.optimizer, self.lr_schedule, self.cfg.train)  # this run's lr and weight decay, once checked

    # ---------------------------------------------------------------------------------------------- validation

    def validate(self) -> tuple[dict[str, float] | None, list[Path]]:
        """The objective's held-out figures and sample files (main process), both of the weights that are exported:
        the EMA ones when EMA is on."""
        figures, samples = None, []
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.model)
            with self.acc.autocast(), self._ema_weights():
                figures = self.objective.evaluate(model, self.data.validation)
                if figures:
                    self.log.write(self.step, figures)
                fps = training_fps(self.cfg_dict | self._clip_fps())  # the rate the clips were trained at
                out = self.out / "samples" / f"step-{self.step:08d}"
                rendered = self.objective.render(model, out, fps=fps, batches=self.data.validation)
                samples = rendered.files  # with the samples' frame metrics, and the videos for TensorBoard
                if samples:
                    figures = (figures or {}) | rendered.figures
                    self.log.write(self.step, rendered.figures)
                    self.log.add_videos(rendered.videos, self.step, fps=fps)
        self.acc.wait_for_everyone()
        return figures, samples

    def _finish(self, first_loss: float | None, last_loss: float | None) -> TrainResult:
        if self.saved_step != self.step:  # a stop at a checkpoint step saved it already
            self.save()
        # a signal stop stays quick; agreed, as a signal after the last step may have reached one rank only
        gain, samples = (None, []) if self._stop_agreed() else self.validate()
        self.log.close()
        return TrainResult(
            self.out, self.step, self.export_path, first_loss, last_loss, gain, samples,
            self.skipped_total, self.stop_requested, held_out=self.cfg.data.holdout > 0,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------------- signals
    @contextmanager
    def _signals(self):
        """SIGTERM/SIGINT ask the loop to stop after the current step (then it saves), and say so at once; a second
        Ctrl-C quits at once (KeyboardInterrupt: one line and exit 130 through the CLI), without saving."""

        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.interrupted:
                raise_outside_finalizers(signum, frame, KeyboardInterrupt)  # in a __del__ it would be dropped
                return
            self.interrupted |= signum == signal.SIGINT
            if not self.stop_requested and self.acc.is_main_process:
                again = "Ctrl-C again to quit" if signum == signal.SIGINT else "SIGTERM"
                os.write(2, f"\nstopping after this step ({again})\n".encode())  # unbuffered: safe in a handler
            self.stop_requested = True

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def discard_gradients(optimizer: torch.optim.Optimizer, scaler: Any | None) -> None:
    """Drop a skipped step's gradients. Under fp16, ``clip_grad_norm_`` has unscaled them and the loss scaler waits
    for its ``update()``: without it the next step's unscale fails. ``update()`` reads the non-finite gradients and
    lowers the scale, as when the scaler skips a step itself."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()


def _check_world_size(num_processes: int) -> None:
    """Refuse to run as N processes that each believe they are alone (they would race on one output folder)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise LvdmError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {num_processes}: "
            "check the launcher and the distributed backend (gloo on CPU, nccl on GPUs)"
        )


def train(cfg: Config, *, progress: bool = True) -> TrainResult:
    """Run a training job described by ``cfg``; the run folder's lock is released however it ends, and a run that
    fails before writing anything (a data check, a model that does not load) leaves no folder it made."""
    try:
        return Trainer(cfg, progress=progress).run()
    except BaseException:
        run_lock.release_run(Path(cfg.output_dir), failed=True)
        raise
    finally:
        run_lock.release_run(Path(cfg.output_dir))
