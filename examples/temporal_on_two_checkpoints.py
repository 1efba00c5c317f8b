"""One temporal module on two DreamBooth-style checkpoints, each with the same style LoRA: one prompt and seed,
two looks, the same kind of motion.

    python examples/temporal_on_two_checkpoints.py --temporal run/temporal.safetensors --base-config path/to/sd15 \\
        --checkpoint dreamshaper.safetensors --checkpoint realistic.safetensors --lora style.safetensors:0.7
    python examples/temporal_on_two_checkpoints.py --tiny --out /tmp/two     # offline, on tiny random models

Writes <out>/<checkpoint name>.gif (and .json) for each checkpoint.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from lvdm.cli import Parser, example_steps, run_cli

TINY_CHECKPOINTS = ("dreambooth_one.safetensors", "dreambooth_two.safetensors")


def tiny_files(folder: Path) -> dict[str, object]:
    """Base A (a diffusers folder), a temporal module made on A, two single-file checkpoints and a kohya LoRA."""
    import torch

    from lvdm import VideoUNet, load_base, testing

    base_a = testing.make_tiny_sd(folder / "base_a", "sd1", seed=0)
    video = VideoUNet.from_unet2d(load_base(base_a).unet)
    torch.manual_seed(0)
    with torch.no_grad():  # random temporal weights stand in for training
        for param in video.temporal_parameters():
            param.add_(0.1 * torch.randn_like(param))
    video.save_temporal(folder / "temporal.safetensors", training_config={"data": {"num_frames": 6}})
    checkpoints = [
        testing.write_single_file_checkpoint(testing.tiny_sd_components("sd1", seed), folder / name)
        for seed, name in enumerate(TINY_CHECKPOINTS, start=1)
    ]
    lora = testing.write_lora(testing.tiny_unet("sd1", seed=1), folder / "style.safetensors", format="kohya", seed=3)
    return {"temporal": folder / "temporal.safetensors", "base_config": base_a, "checkpoints": checkpoints,
            "lora": f"{lora}:0.7"}  # fmt: skip


def main(argv: list[str]) -> None:
    # imported here, in run_cli: Ctrl-C while torch loads is one line too
    import torch

    from lvdm.errors import ConfigError
    from lvdm.outputs import output_folder, plan_outputs
    from lvdm.pipeline import VideoPipeline

    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temporal", help="temporal module from training")
    parser.add_argument("--checkpoint", action="append", default=[], help="single-file checkpoint (give two)")
    parser.add_argument("--base-config", help="diffusers folder of the checkpoints' architecture (e.g. SD 1.5)")
    parser.add_argument("--lora", help="LoRA applied to both, PATH[:SCALE]")
    parser.add_argument("--prompt", default="a lighthouse on a cliff, stormy sea, waves")
    parser.add_argument("--out", default="outputs/two_checkpoints")
    parser.add_argument("--overwrite", action="store_true", help="replace GIFs already in --out (default: refuse)")
    parser.add_argument("--steps", type=int, default=None, help="default: 25 (3 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="build tiny random models in a temp folder and use them")
    args = parser.parse_args(argv)
    if args.tiny and (args.temporal or args.checkpoint or args.base_config or args.lora):
        parser.error("--tiny builds its own models: drop --temporal, --checkpoint, --base-config and --lora")
    if not args.tiny and (not args.temporal or len(args.checkpoint) < 2):
        parser.error("give --temporal and two --checkpoint (with --base-config), or --tiny")
    steps = example_steps(parser, args.steps, tiny=args.tiny)
    out = output_folder(args.out)
    outputs = [out / f"{Path(name).stem}.gif" for name in (TINY_CHECKPOINTS if args.tiny else args.checkpoint)]
    if len(set(outputs)) < len(outputs):  # a/model.safetensors and b/model.safetensors: one GIF for both
        raise ConfigError("two checkpoints have the same file name; each is written as <out>/<name>.gif")
    for output in outputs:  # before anything is built or loaded; a file of yours is never replaced
        plan_outputs(output, [args.prompt], overwrite=args.overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        files = tiny_files(Path(tmp)) if args.tiny else vars(args) | {"checkpoints": args.checkpoint}
        loras = [files["lora"]] if files["lora"] else []
        device, dtype = ("cuda", "fp16") if torch.cuda.is_available() else (None, None)
        for checkpoint, output in zip(files["checkpoints"], outputs, strict=True):
            pipe = VideoPipeline.from_pretrained(
                checkpoint, base_config=files["base_config"], temporal=files["temporal"], loras=loras,
                device=device, dtype=dtype,
            )  # fmt: skip
            video = pipe(args.prompt, seed=0, num_inference_steps=steps)
            [path] = video.save(output, overwrite=args.overwrite)
            print(f"{checkpoint}: {path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a mistake, Ctrl-C or a closed pipe: one line and an exit status, as lvdm's commands
