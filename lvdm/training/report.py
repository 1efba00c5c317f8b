"""The lines a finished run prints: where everything is and what it learned."""

from __future__ import annotations

from lvdm.training.trainer import TrainResult


def format_report(result: TrainResult) -> str:
    out = result.output_dir
    lines = [
        f"{'stopped' if result.stopped_by_signal else 'finished'} at step {result.step}",
        f"temporal module: {result.temporal_path}",
        f"checkpoints:     {out / 'checkpoints'}  (continue with train.resume=auto)",
        f"logs:            {out / 'log.jsonl'}, TensorBoard: tensorboard --logdir {out / 'tensorboard'}",
    ]
    if result.first_loss is not None:
        lines.append(
            f"loss:            {result.first_loss:.4f} at the first step -> {result.last_loss:.4f} at the last"
        )
    if result.gain:
        g = result.gain
        lines.append(
            f"temporal gain:   {g['temporal_gain']:.3f}  (held-out loss {g['loss_image']:.4f} with the temporal "
            f"layers off / {g['loss_video']:.4f} on; above 1: they are using the other frames)"
        )
    if result.samples:
        lines.append(f"samples:         {', '.join(str(p) for p in result.samples)}")
    if result.skipped_steps:
        lines.append(f"skipped steps:   {result.skipped_steps} (non-finite loss or gradient)")
    return "\n".join(lines)


def print_report(result: TrainResult) -> None:
    print(format_report(result))
