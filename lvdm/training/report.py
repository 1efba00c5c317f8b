"""The lines a finished run prints: where everything is and what it learned."""

from __future__ import annotations

from lvdm.training.trainer import TrainResult


def format_report(result: TrainResult) -> str:
    out = result.output_dir
    lines = [
        f"{'stopped' if result.stopped_by_signal else 'finished'} at step {result.step}",
        f"{'decoder:        ' if result.temporal_path.name == 'decoder' else 'temporal module:'} "
        f"{result.temporal_path}",
        f"checkpoints:     {out / 'checkpoints'}  (continue with train.resume=auto)",
        f"logs:            {out / 'log.jsonl'}, TensorBoard: tensorboard --logdir {out / 'tensorboard'}",
    ]
    if result.first_loss is not None:
        steps = result.last_loss_steps
        last = "at the last step" if steps == 1 else f"the mean of the last {steps} steps"
        step = result.first_loss_step
        first = "at the first step" if step == 1 else f"at step {step}, the first after resuming"
        lines.append(f"loss:            {result.first_loss:.4f} {first} -> {result.last_loss:.4f}, {last}")
    if result.gain:
        lines += format_validation(result.gain)
        if not result.held_out:
            lines.append("  (data.holdout=0: the 'held-out' figures above are of a batch of training clips)")
    if result.samples:
        lines.append(f"samples:         {', '.join(str(p) for p in result.samples)}")
    if result.skipped_steps:
        lines.append(f"skipped steps:   {result.skipped_steps} (non-finite loss or gradient)")
    return "\n".join(lines)


def format_validation(figures: dict[str, float]) -> list[str]:
    """The motion gains and, where present, the sample metrics beside the clips' (see lvdm.training.validation)."""
    g = figures
    lines = []
    if "motion_gain" in g:
        lines += [
            f"motion gain:     {g['motion_gain']:.3f}  (held-out loss with the frames shuffled in time "
            f"{g['loss_shuffled']:.4f} / in order {g['loss_in_order']:.4f}, same model; above 1: it uses the "
            "order of the frames, i.e. motion)",
            f"  each frame alone: {g['motion_gain_each_frame']:.3f}  (loss {g['loss_each_frame']:.4f} with every "
            "frame a 1-frame video / in order: what the other frames are worth, ordered or not)",
            f"  layers off:       {g['layers_off_ratio']:.3f}  (loss {g['loss_layers_off']:.4f} of the frozen image "
            "model / in order: temporal information plus the layers' extra capacity, a secondary figure)",
        ]
    for task in ("predict", "interpolate", "interpolate_fine"):
        if f"context_gain_{task}" in g:
            lines.append(
                f"context gain:    {task} {g[f'context_gain_{task}']:.3f}  (held-out loss on the frames to make "
                f"without the given frames {g[f'loss_{task}_without_context']:.4f} / with them "
                f"{g[f'loss_{task}_with_context']:.4f}, same model; above 1: it uses the given frames)"
            )
    if "stage_flag_gain" in g:
        lines.append(
            f"stage flag gain: {g['stage_flag_gain']:.3f}  (fine-stage held-out loss told it is the coarse stage "
            f"{g['loss_interpolate_fine_coarse_flag']:.4f} / told the fine stage "
            f"{g['loss_interpolate_fine_with_context']:.4f}, same model; above 1: the flag tells the stages apart)"
        )
    if "fps_gain" in g:
        lines.append(
            f"fps gain:        {g['fps_gain']:.3f}  (held-out loss told the farthest other clip's frame rate "
            f"{g['loss_wrong_fps']:.4f} / its own {g['loss_true_fps']:.4f}, same model; above 1: it reads the rate)"
        )
    if "image_gain" in g:
        lines.append(
            f"image gain:      {g['image_gain']:.3f}  (held-out loss with the image dropped "
            f"{g['loss_without_image']:.4f} / with the clip's first frame {g['loss_with_image']:.4f}, same model; "
            "above 1: it uses the image)"
        )
    if "flicker_gain" in g:
        lines += [
            f"flicker gain:    {g['flicker_gain']:.3f}  (held-out flicker error of the image decoder / the video "
            "decoder; above 1: less flicker)",
            "decoders:        PSNR (dB, per frame)   flicker error (|change of the reconstruction - change of the "
            "clip| between consecutive frames, 0-255)",
            f"  image decoder  {g['psnr_image_decoder']:8.2f}{g['flicker_image_decoder']:24.3f}",
            f"  video decoder  {g['psnr_video_decoder']:8.2f}{g['flicker_video_decoder']:24.3f}",
            f"  each frame     {g['psnr_each_frame']:8.2f}{g['flicker_each_frame']:24.3f}  (the video decoder given "
            f"one frame at a time: temporal flicker gain {g['temporal_flicker_gain']:.3f}, above 1: its temporal "
            "layers remove flicker)",
        ]
    if "upscale_flicker_gain" in g:
        lines += [
            f"upscale flicker gain: {g['upscale_flicker_gain']:.3f}  (held-out flicker error upscaling frame by frame "
            "/ as a video, same weights and noise; above 1: less flicker)",
            "upscaled:        PSNR (dB, per frame)   flicker error (|change of the upscale - change of the original| "
            "between consecutive frames, 0-255)",
            f"  frame by frame {g['psnr_upscaled_image']:8.2f}{g['flicker_upscaled_image']:24.3f}",
            f"  video          {g['psnr_upscaled_video']:8.2f}{g['flicker_upscaled_video']:24.3f}",
        ]
    rows = [(label, key) for label, key in SAMPLE_ROWS if f"{key}_frame_change" in g]
    if rows:
        lines.append("frames:          change (mean |frame i+1 - frame i|, 0-255)   correlation (consecutive frames)")
        lines += [
            f"  {label:<15}{g[f'{key}_frame_change']:8.2f}{g[f'{key}_frame_correlation']:38.3f}" for label, key in rows
        ]
    if "image_mode_shapes" in g:
        lines.append(
            f"  image-mode frames showing one shape on a grey background: {g['image_mode_shapes']:.0%} "
            "(lvdm.testing.demo_base.shows_a_shape)"
        )
    return lines


SAMPLE_ROWS = (("clips", "clips"), ("samples", "samples"), ("image mode", "image_mode"))


def print_report(result: TrainResult) -> None:
    print(format_report(result))
