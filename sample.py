"""Sample videos with a trained temporal module on any SD base of its family (without one: image mode).

    python sample.py --base path/to/sd15 --temporal outputs/run/temporal.safetensors --prompt "a red panda" \\
        --out panda.mp4
    python sample.py --base dreambooth.safetensors --base-config path/to/sd15 --lora style.safetensors:0.7 \\
        --temporal outputs/run/temporal.safetensors --prompt "a red panda" --out panda.gif
    python sample.py --base path/to/sd15 --temporal ... --prompts prompts.txt --out samples/ --batch-size 4
    python sample.py --base path/to/sd15 --prompt "a red panda" --out frames/ --format png   # image mode

Options people change: --frames, --height/--width, --steps, --guidance (with --guidance-schedule oscillating
and --guidance-option warmup=0.2), --scheduler (ddim, ddim_trailing, dpmpp, euler, euler_a, ddpm, unipc), --seed,
--noise-prior mixed (with --mixed-lambda, --base-noise-seed), --fps, --device, --dtype fp16. Frames, size and
fps default to the temporal module's training values. --out is a .mp4/.gif file (numbered when there are
several videos) or a folder (000-<prompt words>.mp4 ...). Every output gets a JSON sidecar (<output>.json) with
the prompt, seed and every setting; video k of a run uses seed + k. An output that already exists is refused
before anything loads (--overwrite replaces it). A sidecar re-renders its video exactly:

    python sample.py --from-json panda.mp4.json --out again.mp4   # same model, prompt, seed and settings
    python sample.py --from-json panda.mp4.json --steps 50 --out finer.mp4   # flags given override the sidecar

With a module trained with context frames (model.context, e.g. configs/demo_context.yaml): --context clip.mp4
continues a video (--frames new frames after its last --context-frames), --frames beyond the module's training
length rolls out chunk by chunk, --context-guidance S > 1 follows the given frames more closely, and
--interpolate clip.mp4 --factor 4 (or 16) makes 4 (16) frames per frame of clip.mp4 (its frames kept as they are,
the fps multiplied to match; --prompt optional):

    python sample.py --base ... --temporal ctx.safetensors --prompt "a red disc" --frames 64 --out long.mp4
    python sample.py --base ... --temporal ctx.safetensors --interpolate long.mp4 --factor 4 --out smooth.mp4

--decoder DIR decodes with a temporal VAE decoder (one trained with train.target=decoder, or the vae folder of
Stable Video Diffusion) instead of SD's frame-by-frame decoder.

Image to video, with a module trained with model.image_conditioning (--image-scale weighs the image attention,
--image-guidance guides on the image apart from the text), or an IP-Adapter Plus on any base (image mode with no
--temporal); with a module that also has context frames, --image-as-first-frame continues the video from the image:

    python sample.py --base ... --temporal i2v.safetensors --image cat.jpg --prompt "a cat turning" --out cat.mp4
    python sample.py --base ... --image-adapter ip-adapter-plus_sd15.safetensors --image-encoder image_encoder \\
        --image cat.jpg --prompt "a cat" --out cat.mp4
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lvdm import header_checks
from lvdm.cli import HelpFormatter, Parser, device_and_dtype, run_cli
from lvdm.errors import ConfigError

if TYPE_CHECKING:  # lvdm.sampling_settings imports torch: after run_cli chose the thread settings
    from lvdm.sampling_settings import SamplingSettings

# flag -> (SamplingSettings field, type); each flag's help is the field's own
SETTINGS_FLAGS = {
    "--negative-prompt": ("negative_prompt", str),
    "--frames": ("num_frames", int),
    "--height": ("height", int),
    "--width": ("width", int),
    "--fps": ("fps", float),
    "--steps": ("num_inference_steps", int),
    "--scheduler": ("scheduler", str),
    "--guidance": ("guidance_scale", float),
    "--guidance-schedule": ("guidance_schedule", str),
    "--guidance-rescale": ("guidance_rescale", float),
    "--threshold": ("threshold", str),
    "--noise-prior": ("noise_prior", str),
    "--mixed-lambda": ("mixed_lambda", float),
    "--seed": ("seed", int),
    "--num-videos": ("num_videos_per_prompt", int),
    "--decode-chunk": ("decode_chunk_size", int),
    "--batch-size": ("batch_size", int),
    "--context-frames": ("context_frames", int),
    "--context-guidance": ("context_guidance", float),
    "--image-scale": ("image_scale", float),
    "--image-guidance": ("image_guidance_scale", float),
}


def build_parser() -> argparse.ArgumentParser:
    from lvdm.outputs import FORMATS
    from lvdm.sampling_settings import SamplingSettings

    parser = Parser(prog="sample.py", description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--base", help="SD base: a diffusers folder or a single-file checkpoint (required)")
    model.add_argument("--base-config", help="diffusers folder with the architecture of a single-file --base")
    model.add_argument("--temporal", help="temporal module (.safetensors) from training; none: image mode")
    model.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA to fuse (repeatable)")
    model.add_argument("--spatial-weights", help="spatial UNet weights exported by training (model.unfreeze)")
    model.add_argument(
        "--decoder", metavar="DIR", help="a temporal VAE decoder folder (lvdm-trained, or SVD's vae): less flicker"
    )
    model.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin files, which can run code")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or mps; auto: cuda, else mps, else cpu")
    model.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on cuda")
    model.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet block by block (faster after the first video)"
    )
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--prompt", help="the prompt (this, --prompts or --from-json is required; optional with --interpolate)"
    )
    text.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one per line")
    parser.add_argument(
        "--from-json", metavar="SIDECAR", help="re-render the video of a sidecar (<output>.json); flags given win"
    )
    fields = SamplingSettings.__dataclass_fields__
    settings = parser.add_argument_group("sampling")
    for flag, (name, kind) in SETTINGS_FLAGS.items():
        metavar = {int: "N", float: "X", str: "TEXT"}[kind]
        default = fields[name].default
        shown = "" if default is None else f" (default: {default})"  # argparse's own default stays None: unset
        text = fields[name].metadata["help"].replace("null:", "unset:") + shown
        text = "videos denoised together (default: 1)" if name == "batch_size" else text  # render's default
        settings.add_argument(flag, dest=name, type=kind, metavar=metavar, help=text)
    settings.add_argument("--guidance-option", action="append", default=[], metavar="KEY=VALUE", help="e.g. low=2.0")
    image_help = fields["image_mode"].metadata["help"]
    settings.add_argument("--image-mode", action="store_true", default=None, help=image_help)
    settings.add_argument("--base-noise-seed", type=int, help="mixed prior: one base noise for every video (its seed)")
    context = parser.add_argument_group("context frames (a module trained with model.context)")
    context.add_argument("--context", metavar="VIDEO", help="continue this video: --frames new frames after it")
    context.add_argument("--interpolate", metavar="VIDEO", help="raise this video's frame rate by --factor")
    context.add_argument("--factor", type=int, choices=[4, 16], help="--interpolate: frames per input frame (4)")
    image = parser.add_argument_group(
        "image to video (a module trained with model.image_conditioning, or --image-adapter)"
    )
    image.add_argument(
        "--image", metavar="IMAGE", help="animate this picture (any size; resized and cropped for CLIP)"
    )
    image.add_argument("--image-adapter", metavar="FILE", help="an IP-Adapter Plus checkpoint (diffusers format)")
    image.add_argument(
        "--image-encoder", metavar="DIR", help="the CLIP vision encoder folder the image attention reads"
    )
    image.add_argument(
        "--image-as-first-frame",
        action="store_true",
        default=None,
        help=fields["image_as_first_frame"].metadata["help"],
    )
    cascade = parser.add_argument_group("x4 upscaling after sampling (the cascade; each video also as <name>_x4)")
    cascade.add_argument("--upscaler", metavar="FOLDER", help="x4 upscaler: a StableDiffusionUpscalePipeline folder")
    cascade.add_argument("--upscaler-temporal", metavar="MODULE", help="a temporal module trained on the upscaler")
    from lvdm.upscale import add_upscale_options

    add_upscale_options(parser, prefix="upscale-")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="outputs/samples", help="a .mp4/.gif file, or a folder for many videos")
    output.add_argument(
        "--format", choices=FORMATS, help="file type written into an --out folder (default: mp4, or the sidecar's)"
    )
    output.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse them)")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _guidance_options(items: list[str]) -> dict[str, object]:
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--guidance-option {item!r}: expected KEY=VALUE, e.g. warmup=0.2")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


def _replayed(args: argparse.Namespace, meta: dict[str, Any] | None) -> argparse.Namespace:
    """``args`` with what the command line left unset taken from the sidecar ``meta``. ``--allow-pickle`` is never
    taken from a file: a sidecar can come from anyone."""
    if meta is None:
        return args
    from lvdm.outputs import media_suffix

    model = meta["model"]
    base = args.base or model.get("base")
    folder = isinstance(base, str) and Path(base).is_dir()  # a recorded base_config was for a single-file base
    filled = dict(
        base=base,
        base_config=args.base_config or (None if folder else model.get("base_config")),
        temporal=args.temporal or model.get("temporal"),
        spatial_weights=args.spatial_weights or model.get("spatial_weights"),
        lora=args.lora or list(model.get("loras") or []),
        dtype=model.get("dtype", "auto") if args.dtype == "auto" else args.dtype,
        # the sidecar's format names the files of an --out folder; a .mp4/.gif --out is its own (a GIF's rate
        # limit was applied to an .mp4, and a PNG sidecar's --upscaler refused)
        format=args.format or (None if media_suffix(args.out) else meta.get("format")),
        # the recorded base noise goes with the mixed prior: --noise-prior independent over it was refused, and no
        # flag could unset it
        base_noise_seed=(
            args.base_noise_seed
            if args.base_noise_seed is not None or args.noise_prior not in (None, "mixed")
            else meta.get("base_noise")
        ),
        prompt=meta["prompt"] if args.prompt is None and args.prompts is None else args.prompt,
        context=args.context or _source(meta.get("context")),
        interpolate=args.interpolate or _source(meta.get("interpolate")),
        factor=args.factor or (meta.get("interpolate") or {}).get("factor"),
        image=args.image or _source(meta.get("image")),
        image_adapter=args.image_adapter or model.get("image_adapter"),
        image_encoder=args.image_encoder or model.get("image_encoder"),
        decoder=args.decoder or model.get("decoder"),
    )
    if args.device == "auto" and meta.get("device"):
        filled["device"] = meta["device"] if _available(meta["device"]) else "auto"
    _refuse_lost_inputs(meta, filled)
    return argparse.Namespace(**{**vars(args), **filled})


def _refuse_lost_inputs(meta: dict[str, Any], filled: dict[str, Any]) -> None:
    """A sidecar's video continued, interpolated or animated frames given in Python, which it does not hold, and no
    flag gives them: the replay sampled without them (a text-to-video of other frames, with no word)."""
    first_frame = (meta.get("settings") or {}).get("image_as_first_frame")  # the context is the image
    for key, flag in (("context", "--context"), ("interpolate", "--interpolate"), ("image", "--image")):
        record = meta.get(key)
        if isinstance(record, dict) and filled[key] is None and not (key == "context" and first_frame):
            raise ConfigError(
                f"the sidecar's {key} was given in Python ({key}.source {record.get('source')!r}), and the sidecar "
                f"does not hold it: give it as {flag} FILE"
            )


def _source(record: Any) -> str | None:
    """The video file a sidecar's context or interpolation came from (``None``: none, or frames given in Python)."""
    source = record.get("source") if isinstance(record, dict) else None
    return source if isinstance(source, str) and source not in ("frames", "array", "PIL image") else None


def _check_context(args: argparse.Namespace, image_mode: bool) -> None:
    """The mistakes of the input options (--context, --interpolate, --factor, --image), before anything loads."""
    if args.factor is not None and args.interpolate is None:
        raise ConfigError("--factor goes with --interpolate VIDEO")
    if args.factor not in (None, 4, 16):  # from a sidecar (the flag's own choices are checked by argparse)
        raise ConfigError(f"interpolate.factor {args.factor!r}: must be 4 or 16")
    if args.interpolate is not None and args.num_videos_per_prompt not in (None, 1):
        raise ConfigError("--interpolate makes one video: it does not take --num-videos")
    if args.interpolate is not None and (args.context is not None or args.prompts is not None):
        raise ConfigError("--interpolate makes one video: it does not take --context or --prompts")
    unused = [flag for flag, given in (("--context-frames", args.context_frames is not None),
                                       ("--image-as-first-frame", args.image_as_first_frame)) if given]  # fmt: skip
    if args.interpolate is not None and unused:  # taken and ignored, after the pipeline had loaded
        raise ConfigError(f"--interpolate gives every frame of its video: it does not take {', '.join(unused)}")
    if args.interpolate is not None and args.num_frames is not None:  # taken and silently ignored
        raise ConfigError(
            f"--interpolate makes {args.factor or 4} (k - 1) + 1 frames of its video's k: it does not take --frames"
        )
    if args.interpolate is not None and args.base_noise_seed is not None:  # taken and silently ignored
        raise ConfigError("--interpolate draws its noise from --seed alone: it does not take --base-noise-seed")
    given = [flag for flag, value in (("--context", args.context), ("--interpolate", args.interpolate),
                                      ("--context-frames", args.context_frames),
                                      ("--context-guidance", args.context_guidance)) if value is not None]  # fmt: skip
    if given and args.temporal is None:  # was "this temporal module has no context support", after loading
        raise ConfigError(f"{given[0]} needs a temporal module trained with context frames (--temporal); none given")
    if given:  # the module file's header says what it takes: refused before loading, not after
        header_checks.check_module_context(args, given[0])
    if (args.context or args.interpolate) and image_mode:
        raise ConfigError("--image-mode has no temporal layers to take context frames; drop --image-mode")
    for flag, path, kind in (("--context", args.context, "video"), ("--interpolate", args.interpolate, "video"),
                             ("--image", args.image, "image")):  # fmt: skip
        if path is not None and not Path(path).is_file():
            what = "not a regular file" if Path(path).exists() else f"no such {kind} file"
            raise ConfigError(f"{flag} {path}: {what}")
    if args.image is not None and args.interpolate is not None:
        raise ConfigError("--interpolate does not take --image")
    if args.interpolate is not None:  # from the video's header: a long one sampled for hours, past the frame limit
        header_checks.check_interpolated_video(args.interpolate, args.factor or 4, fps=args.fps)


def _check_upscaler(args: argparse.Namespace) -> None:
    """The mistakes of --upscaler and --upscaler-temporal, before anything is sampled."""
    if args.upscaler_temporal is not None and args.upscaler is None:
        raise ConfigError("--upscaler-temporal goes with --upscaler FOLDER")
    if args.upscaler is None:  # the upscale's options were taken and ignored
        from lvdm.upscale import refuse_upscale_flags

        refuse_upscale_flags(args, prefix="upscale-")
    if args.upscaler_temporal is not None:  # a missing or broken file, found before sampling rather than after
        from lvdm.sampling_settings import temporal_defaults

        temporal_defaults(args.upscaler_temporal)
    if args.upscaler is not None:
        if args.interpolate is not None or args.format == "png":
            raise ConfigError(
                "--upscaler upscales the sampled .mp4/.gif videos; for others run python -m lvdm.upscale VIDEO"
            )
        from lvdm.models.loading import pipeline_class

        if pipeline_class(Path(args.upscaler)) != "StableDiffusionUpscalePipeline":  # before anything is sampled
            raise ConfigError(
                f"--upscaler {args.upscaler}: not an x4 upscaler folder (a diffusers StableDiffusionUpscalePipeline)"
            )
        if args.upscaler_temporal is not None:
            header_checks.check_upscaler_module_family(args.upscaler_temporal, Path(args.upscaler))


def _settings(args: argparse.Namespace, meta: dict[str, Any] | None) -> dict[str, Any]:
    """The sampling settings given on the command line, over a sidecar's (which are all resolved)."""
    recorded = {k: v for k, v in meta["settings"].items() if v is not None and k != "batch_size"} if meta else {}
    if args.noise_prior not in (None, "mixed"):  # the recorded share goes with the recorded mixed prior
        recorded.pop("mixed_lambda", None)
    given = {name: getattr(args, name) for name, _ in SETTINGS_FLAGS.values() if getattr(args, name) is not None}
    given |= {"image_mode": True} if args.image_mode else {}
    given |= {"image_as_first_frame": True} if args.image_as_first_frame else {}
    given |= {"guidance_options": _guidance_options(args.guidance_option)} if args.guidance_option else {}
    return recorded | given


def _available(device: str) -> bool:
    from lvdm.pipeline import device_problem

    return device_problem(device) is None


def _upscale_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of ``--upscaler``'s pass (none without it), checked against the upscaler's limits."""
    if args.upscaler is None:
        return {}
    from lvdm.upscale import upscale_settings

    return upscale_settings(args, args.upscaler)


def _plan(
    args: argparse.Namespace, meta: dict[str, Any] | None
) -> tuple[list[str], dict[str, Any], SamplingSettings, list[Path]]:
    """The prompts, the settings given and checked, and the output paths: every mistake found before loading."""
    from lvdm.image_sampling import check_image_source, check_image_weights
    from lvdm.media import gif_rate_problem
    from lvdm.outputs import media_suffix
    from lvdm.pipeline import plan_outputs, read_prompts, sampling_settings
    from lvdm.pipeline_sampling import as_prompts, negatives_for
    from lvdm.sampling_settings import MAX_SIDE

    prompts = as_prompts([args.prompt or ""] if args.prompts is None else read_prompts(args.prompts))  # UTF-8
    settings = _settings(args, meta)
    checked = sampling_settings(**settings)
    negatives_for(checked.negative_prompt, prompts)  # a sidecar's list need not fit the prompts given
    header_checks.check_module_size(args, settings)
    side = max(checked.height or 0, checked.width or 0)
    if args.upscaler is not None and 4 * side > MAX_SIDE:  # refused before the sampling, not by the upscale after it
        raise ConfigError(f"--upscaler: a {side} px side would upscale to {4 * side} px; at most {MAX_SIDE // 4} px a "
                          f"side ({MAX_SIDE} out): sample smaller, or leave out --upscaler")  # fmt: skip
    _check_context(args, checked.image_mode)
    if args.image is None:  # refused by the pipeline too, after loading
        check_image_weights(checked)
        if checked.image_as_first_frame:
            raise ConfigError("--image-as-first-frame needs --image")
    else:  # the module's header says whether it takes one (refused after loading, before)
        check_image_source(args.temporal, args.image_adapter)
    _check_upscaler(args)
    header_checks.check_mixed_only(args, checked.noise_prior)
    gif = media_suffix(args.out) == ".gif" or args.format == "gif"
    if gif and (problem := gif_rate_problem(checked.fps)):  # refused by the writer, after the sampling, before
        raise ConfigError(f"--fps {checked.fps:g}: {problem}")
    paths = plan_outputs(
        args.out, prompts, num_videos_per_prompt=checked.num_videos_per_prompt, format=args.format or "mp4",
        overwrite=args.overwrite,
    )  # fmt: skip
    if args.upscaler is not None:  # a folder or a name too long there was found after the sampling and the upscale
        from lvdm.outputs import check_outputs
        from lvdm.upscale import upscaled_path

        check_outputs([upscaled_path(path) for path in paths], overwrite=args.overwrite)
    _refuse_inputs_as_outputs(args, paths)
    return prompts, settings, checked, paths


def _refuse_inputs_as_outputs(args: argparse.Namespace, paths: list[Path]) -> None:
    """With --overwrite, an output that is the video continued or interpolated, or the image animated, replaced it
    (python -m lvdm.upscale refuses its input as --out likewise)."""
    from lvdm.outputs import sidecar_path
    from lvdm.upscale import upscaled_path

    outputs = [*paths, *(upscaled_path(path) for path in paths if args.upscaler is not None)]
    for flag, given in (("--context", args.context), ("--interpolate", args.interpolate), ("--image", args.image)):
        if given is None or not Path(given).is_file():
            continue
        for out in (p for path in outputs for p in (path, sidecar_path(path))):
            if out.is_file() and out.samefile(given):
                raise ConfigError(f"the output {out} is the {flag} file {given}; write to another file")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from lvdm.outputs import media_suffix  # clip.mp4/ is a folder

    suffix = (media_suffix(args.out) or "").lstrip(".")
    if args.format is not None and suffix and suffix != args.format:  # it wrote the suffix's kind
        raise ConfigError(f"--format {args.format} and --out {args.out} disagree: --format names the files written "
                          "into an --out folder; give a folder, or drop --format")  # fmt: skip
    from lvdm.outputs import read_sidecar  # imports torch: after run_cli chose the thread settings

    meta = read_sidecar(args.from_json) if args.from_json else None
    args = _replayed(args, meta)
    if args.base is None:
        raise ConfigError("the following arguments are required: --base (or --from-json SIDECAR)")
    if args.prompt is None and args.prompts is None and args.interpolate is None:
        raise ConfigError("one of the arguments --prompt --prompts is required (or --from-json SIDECAR)")
    import torch

    from lvdm.models.compile import compile_problem
    from lvdm.pipeline import VideoPipeline

    prompts, settings, checked, paths = _plan(args, meta)  # every mistake reported before anything is loaded
    upscale = _upscale_settings(args)  # checked before the sampling, not found after it
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.compile and (problem := compile_problem(torch.device(device))):
        raise ConfigError(f"--compile: {problem}; sample without it")
    pipe = VideoPipeline.from_pretrained(
        args.base, temporal=args.temporal, base_config=args.base_config, loras=args.lora,
        spatial_weights=args.spatial_weights, allow_pickle=args.allow_pickle, image_adapter=args.image_adapter,
        image_encoder=args.image_encoder, decoder=args.decoder, device=device, dtype=dtype,
    )  # fmt: skip
    if args.compile:
        pipe.compile()
    if args.interpolate is not None:
        factor = args.factor or 4
        print(f"interpolating {args.interpolate} by {factor} on {device}", file=sys.stderr)
        settings.pop("num_frames", None)  # the output length follows from the video and the factor
        output = pipe.interpolate(
            args.interpolate, factor=factor, prompt=prompts[0], progress=not args.quiet, **settings
        )
        for path in output.save(paths[0], overwrite=args.overwrite):
            print(path)
        return 0
    mode = "video" if args.temporal and not checked.image_mode else "image mode (no temporal layers)"
    print(f"sampling {len(paths)} video(s), {mode}, on {device}", file=sys.stderr)
    written = pipe.render(
        prompts, paths, base_noise=args.base_noise_seed, context=args.context, image=args.image,
        progress=not args.quiet, overwrite=args.overwrite, **settings,
    )  # fmt: skip
    for path in written:
        print(path)
    if args.upscaler is not None:
        from lvdm.upscale import upscale_files
        from lvdm.upscale_pipeline import UpscalePipeline

        del pipe  # the first stage's models, on the device beside the upscaler's through the whole upscale
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        upscaler = UpscalePipeline.from_pretrained(
            args.upscaler, temporal=args.upscaler_temporal, allow_pickle=args.allow_pickle, device=device, dtype=dtype
        )
        print(f"upscaling {len(written)} video(s) by {upscaler.scale}", file=sys.stderr)
        for path in upscale_files(upscaler, written, progress=not args.quiet, overwrite=args.overwrite, **upscale):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
