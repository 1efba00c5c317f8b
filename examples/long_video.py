"""A long video by rollout, then 4x smoother by interpolation, with a module trained with context frames.

    python train.py --config configs/demo_context.yaml            # trains outputs/demo/context/temporal.safetensors
    python examples/long_video.py                                  # the demo module: 3x its length, then 4x fps
    python examples/long_video.py --base path/to/sd15 --temporal ctx.safetensors --prompt "a kite" --frames 64
    python examples/long_video.py --tiny --out /tmp/long      # offline, on tiny random models

It writes <out>/long.mp4 (``--frames`` frames: a first chunk from text, then chunk after chunk conditioned on the
last ``--context-frames`` frames made, no model call seeing more frames than the module trained on) and
<out>/smooth.mp4 (every frame of long.mp4 kept, three made between each pair, at 4x the frame rate), each with a
JSON sidecar, and prints how much the frames change at the seams between chunks next to inside them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lvdm.cli import Parser, example_steps, run_cli


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """A tiny SD folder and a context module made on it (random weights stand in for training)."""
    import torch

    from lvdm import VideoUNet, load_base, testing
    from lvdm.models.parts import build_part

    base = testing.make_tiny_sd(folder / "base", "sd1", seed=0)
    video = VideoUNet.from_unet2d(load_base(base).unet)
    build_part(video, "context", "context", {})
    torch.manual_seed(0)
    with torch.no_grad():
        for param in video.temporal_parameters():
            param.add_(0.05 * torch.randn_like(param))
    training = {"data": {"num_frames": 5, "resolution": [16, 16], "target_fps": 8},
                "train": {"tasks": {"text": 1, "predict": 1, "interpolate": 1}}}  # fmt: skip
    video.save_temporal(folder / "context.safetensors", training_config=training)
    return base, folder / "context.safetensors"


def main(argv: list[str]) -> None:
    from lvdm.outputs import output_folder, plan_outputs

    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="default: outputs/demo/base")
    parser.add_argument(
        "--temporal", help="a module with context frames; default: outputs/demo/context/temporal.safetensors"
    )
    parser.add_argument("--prompt", default="a red disc moving down")
    parser.add_argument("--frames", type=int, default=None, help="default: 3x the module's training length")
    parser.add_argument("--context-frames", type=int, default=2)
    parser.add_argument("--context-guidance", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None, help="default: 25 (3 with --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/long_video")
    parser.add_argument("--overwrite", action="store_true", help="replace long.mp4 and smooth.mp4 (default: refuse)")
    parser.add_argument("--tiny", action="store_true", help="build tiny random models in a temp folder and use them")
    args = parser.parse_args(argv)
    if args.tiny and (args.base or args.temporal):
        parser.error("--tiny builds its own models: drop --base and --temporal")
    args.steps = example_steps(parser, args.steps, tiny=args.tiny)
    from lvdm.context_sampling import most_keyframes

    most = most_keyframes(4)  # long.mp4 is interpolated by 4
    if args.frames is not None and not 2 <= args.frames <= most:  # refused after long.mp4 was sampled and written
        parser.error(f"--frames must be 2 .. {most} (long.mp4 is interpolated by 4), got {args.frames}")
    for name in ("long.mp4", "smooth.mp4"):  # before anything is built or loaded; a file of yours is never replaced
        plan_outputs(output_folder(args.out) / name, [args.prompt], overwrite=args.overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.base, args.temporal = tiny_models(Path(tmp))
        run(args)


def run(args: argparse.Namespace) -> None:
    # imported here, in run_cli: Ctrl-C while torch loads is one line too
    import numpy as np

    from lvdm import VideoPipeline
    from lvdm.context_sampling import rollout_chunks, seam_changes
    from lvdm.errors import ConfigError
    from lvdm.sampling_settings import temporal_defaults

    args.base = args.base or "outputs/demo/base"
    args.temporal = args.temporal or "outputs/demo/context/temporal.safetensors"
    hint = "train the demo module: python train.py --config configs/demo_context.yaml"
    for path in (args.base, args.temporal):
        if not Path(path).exists():
            raise ConfigError(f"{path} does not exist ({hint})")
    if not temporal_defaults(args.temporal)["has_context"]:  # found after the long video was written, then
        raise ConfigError(f"{args.temporal} takes no context frames, which the rollout and the interpolation need "
                          f"({hint})")  # fmt: skip
    out = Path(args.out)
    pipe = VideoPipeline.from_pretrained(args.base, temporal=args.temporal)
    length = pipe.defaults["num_frames"]
    frames = 3 * length if args.frames is None else args.frames  # --frames 0 was read as the default
    settings = {"num_inference_steps": args.steps, "seed": args.seed, "context_frames": args.context_frames}
    long = pipe(args.prompt, num_frames=frames, context_guidance=args.context_guidance, **settings)
    long_path = long.save(out / "long.mp4", overwrite=args.overwrite)[0]
    seams, inside = seam_changes(long.frames[0], rollout_chunks(frames, length, 0, args.context_frames))
    if seams:  # one chunk has no seam (its mean was nan, with numpy's warnings)
        seam, within = float(np.mean(seams)), float(np.mean(inside))
        print(f"{long_path}: {frames} frames in chunks of {length}; change at the seams {seam:.2f}, inside "
              f"{within:.2f}")  # fmt: skip
    else:
        print(f"{long_path}: {frames} frames, one chunk (the module makes {length} at once): no seam")
    smooth = pipe.interpolate(long_path, factor=4, prompt=args.prompt, num_inference_steps=args.steps, seed=args.seed)
    smooth_path = smooth.save(out / "smooth.mp4", overwrite=args.overwrite)[0]
    print(f"{smooth_path}: {smooth.frames.shape[1]} frames at {smooth.fps:g} fps")


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a mistake, Ctrl-C or a closed pipe: one line and an exit status, as lvdm's commands
