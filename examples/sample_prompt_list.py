"""Sample a list of prompts with the Python API: two seeds per prompt, plus the same noise in image mode to compare.

    python examples/sample_prompt_list.py --base path/to/sd15 --temporal run/temporal.safetensors --out samples/
    python examples/sample_prompt_list.py --base ... --temporal ... --prompts prompts.txt --steps 50
    python examples/sample_prompt_list.py --tiny --out /tmp/samples     # offline, on tiny random models

Each prompt i gives samples/<i>_000.mp4 and <i>_001.mp4 (seeds 1000 i and 1000 i + 1) and <i>-image.gif (the
first seed with the temporal layers bypassed: independent frames), each with a JSON sidecar.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from lvdm.cli import Parser, example_steps, run_cli

PROMPTS = ["a red panda eating bamboo", "waves crashing on a rocky shore", "clouds drifting over mountains"]


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """A tiny SD folder and a temporal module made on it (random temporal weights stand in for training)."""
    import torch

    from lvdm import VideoUNet, load_base, testing

    base = testing.make_tiny_sd(folder / "base", "sd1", seed=0)
    video = VideoUNet.from_unet2d(load_base(base).unet)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in video.temporal_parameters():
            param.add_(0.1 * torch.randn_like(param))
    training = {"data": {"num_frames": 6, "resolution": [16, 16], "target_fps": 8}}
    video.save_temporal(folder / "temporal.safetensors", training_config=training)
    return base, folder / "temporal.safetensors"


def main(argv: list[str]) -> None:
    # imported here, in run_cli: Ctrl-C while torch loads is one line too
    import torch

    from lvdm.outputs import output_folder
    from lvdm.pipeline import VideoPipeline, plan_outputs, read_prompts

    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="SD base: a diffusers folder or a single-file checkpoint")
    parser.add_argument("--temporal", help="temporal module from training")
    parser.add_argument("--prompts", help="a text file, one prompt per line (default: three built-in prompts)")
    parser.add_argument("--steps", type=int, default=None, help="default: 25 (3 with --tiny)")
    parser.add_argument("--out", default="outputs/prompt_list")
    parser.add_argument("--overwrite", action="store_true", help="replace videos already in --out (default: refuse)")
    parser.add_argument("--tiny", action="store_true", help="build tiny random models in a temp folder and use them")
    args = parser.parse_args(argv)
    if args.tiny and (args.base or args.temporal):
        parser.error("--tiny builds its own models: drop --base and --temporal")
    if not args.tiny and not (args.base and args.temporal):
        parser.error("give --base and --temporal, or --tiny")
    steps = example_steps(parser, args.steps, tiny=args.tiny)
    prompts = read_prompts(args.prompts) if args.prompts else PROMPTS
    out = output_folder(args.out)
    for i, prompt in enumerate(prompts):  # before anything loads; a file of yours in --out is never replaced
        # the names save() gives: 00_000.mp4, 00_001.mp4, then 00-image.gif
        plan_outputs(out / f"{i:02d}.mp4", [prompt], num_videos_per_prompt=2, overwrite=args.overwrite)
        plan_outputs(out / f"{i:02d}-image.gif", [prompt], overwrite=args.overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        base, temporal = tiny_models(Path(tmp)) if args.tiny else (args.base, args.temporal)
        device, dtype = ("cuda", "fp16") if torch.cuda.is_available() else (None, None)
        pipe = VideoPipeline.from_pretrained(base, temporal=temporal, device=device, dtype=dtype)
        for i, prompt in enumerate(prompts):
            videos = pipe(prompt, num_videos_per_prompt=2, seed=1000 * i, num_inference_steps=steps)
            written = videos.save(out / f"{i:02d}.mp4", overwrite=args.overwrite)  # two videos: numbered
            image = pipe(prompt, seed=1000 * i, num_inference_steps=steps, image_mode=True)
            written += image.save(out / f"{i:02d}-image.gif", overwrite=args.overwrite)
            print(f"{prompt!r}: " + ", ".join(map(str, written)))


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a mistake, Ctrl-C or a closed pipe: one line and an exit status, as lvdm's commands
