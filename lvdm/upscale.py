"""``python -m lvdm.upscale IN.mp4 --upscaler X4_FOLDER [--temporal MODULE] --out OUT.mp4``: a video you have, by 4.

The x4 upscaler folder is diffusers' ``StableDiffusionUpscalePipeline`` layout (``stabilityai/stable-diffusion-x4-
upscaler``); ``--temporal`` a module trained on it (``train.target: upscale``), without which every frame is
upscaled alone. The output keeps the input's frame count and rate; ``--tile`` runs the model and the VAE over
overlapping tiles when the whole frame does not fit in memory. ``sample.py --upscaler`` runs the same after
sampling (the cascade), through :func:`upscale_files`. ``--from-json OUT.mp4.json`` re-renders an upscale from its
sidecar, the options given overriding it (``sample.py --from-json`` then this replay the cascade).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lvdm.cli import HelpFormatter, Parser, run_cli
from lvdm.errors import ConfigError

DEFAULTS = {"noise_level": 20, "num_inference_steps": 75, "guidance_scale": 9.0}  # diffusers' pipeline defaults

DESCRIPTION = "Upscale a video by 4 with SD's x4 upscaler, frame by frame or with a temporal module trained\non it."


def add_upscale_options(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The sampling options of an upscale (``prefix`` ``"upscale-"`` where they sit beside other sampling)."""
    group = parser.add_argument_group("upscaling")
    group.add_argument("--noise-level", type=int, default=DEFAULTS["noise_level"],
                       help="noise added to the low-res frames, 0 .. 350: more invents more detail")  # fmt: skip
    group.add_argument(f"--{prefix}steps", dest="upscale_steps", type=int, default=DEFAULTS["num_inference_steps"],
                       help="denoising steps of the upscale")  # fmt: skip
    group.add_argument(f"--{prefix}guidance", dest="upscale_guidance", type=float, default=DEFAULTS["guidance_scale"],
                       help="classifier-free guidance of the upscale")  # fmt: skip
    group.add_argument(
        "--tile", type=int, help="tiles of this many low-res pixels (a multiple of the UNet's: 8 for SD)"
    )
    group.add_argument("--tile-overlap", type=int, help="low-res pixels neighbouring tiles share (default: a quarter)")
    group.add_argument("--chunk-frames", type=int, help="run over windows of this many frames (default: all)")
    group.add_argument("--tile-norms", choices=["frame", "pooled", "tile"], default="frame",
                       help="in tiles, GroupNorm by the frame's statistics estimated by one more run at a tile's "
                       "size (frame), by all tiles' own summed, gathered in a first pass at every step (pooled: twice "
                       "the work, closer to the whole frame), or by each tile's own (tiles disagree)")  # fmt: skip
    group.add_argument("--norm-passes", type=int, default=1,
                       help="with --tile-norms pooled: gathering passes at every step, each closer to the whole "
                       "frame's statistics (N: N + 1 times the work; 4 reached them in README's test)")  # fmt: skip


def refuse_upscale_flags(args: argparse.Namespace, *, prefix: str = "") -> None:
    """Refuse the upscale options (:func:`add_upscale_options`) that ``args`` holds away from their defaults:
    ``sample.py`` without ``--upscaler`` took them and ignored them."""
    parser = argparse.ArgumentParser(add_help=False)
    add_upscale_options(parser, prefix=prefix)
    given = [action.option_strings[0] for action in parser._actions if getattr(args, action.dest) != action.default]
    if given:
        verb = "goes" if len(given) == 1 else "go"
        raise ConfigError(f"{', '.join(given)} {verb} with --upscaler FOLDER (the x4 upscale after sampling)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m lvdm.upscale", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("video", nargs="?",
                        help="the video to upscale (any size; padded to the UNet's multiple and back)")  # fmt: skip
    parser.add_argument("--upscaler", help="x4 upscaler: a StableDiffusionUpscalePipeline folder")
    parser.add_argument(
        "--from-json",
        metavar="SIDECAR",
        help="re-render an upscale from its sidecar (<output>.json); options given win",
    )
    parser.add_argument("--temporal", help="temporal module trained on the upscaler; none: frame by frame")
    parser.add_argument("--out", required=True, help="the output video (.mp4 or .gif)")
    parser.add_argument("--prompt", default="", help="what the video shows")
    parser.add_argument("--negative-prompt", default="", help="what to avoid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--image-mode", action="store_true", help="frame by frame even with --temporal")
    add_upscale_options(parser)
    parser.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin weights, which can run code")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or mps; auto: cuda, else mps, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (default: refuse)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def upscale_settings(args: argparse.Namespace, folder: str | Path | None = None) -> dict[str, Any]:
    """The :class:`~lvdm.UpscalePipeline` call settings the parsed options give, checked before anything loads
    (with an x4 upscaler ``folder``, also against its limits, read from its configs; another folder is left to the
    loader's message): ``sample.py`` asks before it samples, so that a wrong setting is not found after it."""
    from lvdm.models.loading import pipeline_class
    from lvdm.upscale_pipeline import MAX_NORM_PASSES, UpscaleLimits, check_seed_and_guidance, check_upscale_settings

    check_seed_and_guidance(args.seed, args.upscale_guidance)
    if not 1 <= args.norm_passes <= MAX_NORM_PASSES:
        raise ConfigError(f"--norm-passes {args.norm_passes}: give 1 .. {MAX_NORM_PASSES}")
    if args.norm_passes != 1 and (args.tile_norms != "pooled" or args.tile is None):
        raise ConfigError(f"--norm-passes {args.norm_passes} goes with --tile N and --tile-norms pooled (the passes "
                          "gather the tiles' statistics)")  # fmt: skip
    if args.tile_norms != "frame" and args.tile is None:  # taken and ignored: the whole frame has its own
        raise ConfigError(f"--tile-norms {args.tile_norms} goes with --tile N (it chooses the statistics of tiles)")
    settings = {
        "noise_level": args.noise_level, "num_inference_steps": args.upscale_steps,
        "guidance_scale": args.upscale_guidance, "tile": args.tile, "tile_overlap": args.tile_overlap,
        "chunk_frames": args.chunk_frames,
        "frame_norms": {"frame": True, "pooled": "pooled", "tile": False}[args.tile_norms],
        "norm_passes": args.norm_passes,
    }  # fmt: skip
    if folder is not None and pipeline_class(Path(folder)) == "StableDiffusionUpscalePipeline":
        limits = UpscaleLimits.of_folder(folder)
        check_upscale_settings(limits, args.noise_level, args.upscale_steps, args.tile, args.tile_overlap,
                               args.chunk_frames)  # fmt: skip
    return settings


def upscaled_path(video: Path) -> Path:
    """Where :func:`upscale_files` writes the upscale of ``video``: ``clip.mp4`` -> ``clip_x4.mp4``."""
    return video.with_name(f"{video.stem}_x4{video.suffix}")


def upscale_files(
    pipe: Any, videos: Sequence[Path], *, progress: bool, overwrite: bool = False, **settings: Any
) -> list[Path]:
    """Upscale each video ``sample.py`` wrote beside itself (``clip.mp4`` -> ``clip_x4.mp4``) with the prompt,
    negative prompt and seed its sidecar records; the paths."""
    from lvdm.outputs import read_sidecar, sidecar_path

    written = []
    for video in videos:
        record = read_sidecar(sidecar_path(video))
        negative = record["settings"].get("negative_prompt") or ""
        out = pipe(video, record["prompt"], negative_prompt=negative, seed=record["seed"], progress=progress,
                   **settings)  # fmt: skip
        written += out.save(upscaled_path(video), overwrite=overwrite)
    return written


def parse_given(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, set[str]]:
    """The parsed options, and the names of those the command line gave (the others hold their defaults)."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    args = parser.parse_args(argv, namespace=namespace)  # argparse fills a default only where the name is missing
    given = {name for name, value in vars(args).items() if value is not unset and value is not None}
    for name in set(vars(args)) - given:
        setattr(args, name, parser.get_default(name))
    return args, given


_NUMBER, _COUNT, _SOME_COUNT = (int, float), (int,), (int, type(None))
UPSCALE_RECORD = {"source": (str,), "noise_level": _COUNT, "num_inference_steps": _COUNT, "guidance_scale": _NUMBER,
                  "tile": _SOME_COUNT, "tile_overlap": _SOME_COUNT, "chunk_frames": _SOME_COUNT,
                  "frame_norms": (bool, str), "norm_passes": _COUNT}  # fmt: skip
RECORD = {"seed": _COUNT, "mode": (str,)}  # the call's other settings: upscale_pipeline.check_call
NORMS_OPTION = {True: "frame", "pooled": "pooled", False: "tile"}  # frame_norms -> --tile-norms


def read_upscale_sidecar(path: str | Path) -> dict[str, Any]:
    """An upscale's JSON sidecar (``clip_x4.mp4.json``), checked to hold what re-rendering it reads, each of its
    type (a sidecar can come from anyone; the values get the command's own checks)."""
    from lvdm.outputs import read_sidecar_json
    from lvdm.upscale_pipeline import check_call

    record = read_sidecar_json(path)
    if isinstance(record, dict) and isinstance(record.get("settings"), dict):
        raise ConfigError(f"{path} is a sampling sidecar: python sample.py --from-json {path} re-renders it")
    if not isinstance(record, dict) or not isinstance(record.get("upscale"), dict):
        raise ConfigError(f"{path} is not the sidecar of an upscale (it needs an 'upscale' object)")
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    fields = [(f"upscale.{k}", record["upscale"].get(k), kinds) for k, kinds in UPSCALE_RECORD.items()]
    fields += [(k, record.get(k), kinds) for k, kinds in RECORD.items()]
    fields += [
        ("model.upscaler", model.get("upscaler"), (str,)),
        ("model.temporal", model.get("temporal"), (str, type(None))),
    ]
    for name, value, kinds in fields:
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            raise ConfigError(f"sidecar {path}: {name} has the wrong type or is missing: {value!r}")
    if record["upscale"]["frame_norms"] not in NORMS_OPTION:
        raise ConfigError(f"sidecar {path}: upscale.frame_norms must be true, false or 'pooled'")
    try:
        check_call(record.get("prompt"), record.get("negative_prompt"), record["upscale"].get("scheduler"),
                   record["mode"] == "image", record.get("fps"))  # fmt: skip
    except ConfigError as exc:
        raise ConfigError(f"sidecar {path}: {exc}") from exc
    if record["upscale"]["source"] == "frames" or record.get("initial_noise") == "given":
        raise ConfigError(f"sidecar {path}: its video or its noise was given in Python, and the sidecar does not "
                          "hold it")  # fmt: skip
    return record


def _replayed(args: argparse.Namespace, given: set[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """``args`` with what the command line left unset taken from ``--from-json``'s upscale record, and the call's
    settings that have no option (its scheduler and output rate)."""
    record = read_upscale_sidecar(args.from_json)
    upscale, model = record["upscale"], record["model"]
    recorded = {
        "video": upscale["source"], "upscaler": model["upscaler"], "temporal": model.get("temporal"),
        "prompt": record["prompt"], "negative_prompt": record["negative_prompt"], "seed": record["seed"],
        "image_mode": record["mode"] == "image" and model.get("temporal") is not None,  # not: no module, 1 frame
        "noise_level": upscale["noise_level"],
        "upscale_steps": upscale["num_inference_steps"], "upscale_guidance": upscale["guidance_scale"],
        "tile": upscale["tile"], "tile_overlap": upscale["tile_overlap"], "chunk_frames": upscale["chunk_frames"],
        "tile_norms": NORMS_OPTION[upscale["frame_norms"]], "norm_passes": upscale["norm_passes"],
    }  # fmt: skip
    replayed = argparse.Namespace(**{**vars(args), **{k: v for k, v in recorded.items() if k not in given}})
    return replayed, {"scheduler": upscale["scheduler"], "fps": None if "video" in given else record.get("fps")}


def main(argv: list[str]) -> int:
    args, given = parse_given(build_parser(), argv)
    replay: dict[str, Any] = {}
    if args.from_json is not None:
        args, replay = _replayed(args, given)
    for name, option in (("video", "VIDEO"), ("upscaler", "--upscaler")):
        if getattr(args, name) is None:
            raise ConfigError(f"the following arguments are required: {option} (or --from-json SIDECAR)")
    from lvdm.cli import device_and_dtype
    from lvdm.media import gif_rate_problem
    from lvdm.outputs import media_suffix, plan_outputs
    from lvdm.upscale_pipeline import UpscalePipeline, probe_low_res

    info = probe_low_res(args.video)  # missing, not a video or too large: one line, before anything loads
    settings = upscale_settings(args, args.upscaler)  # its checks, against the upscaler's limits, before it loads
    if (suffix := media_suffix(args.out)) is None:
        raise ConfigError(f"--out {args.out}: give a .mp4 or .gif file")
    rate = replay.get("fps") or info.playback_fps()  # what the output plays at
    if suffix == ".gif" and (problem := gif_rate_problem(rate)):  # found after, before
        raise ConfigError(f"{args.video} runs at {rate:g} fps, and {problem}: write a .mp4")
    path = plan_outputs(args.out, [args.prompt], overwrite=args.overwrite)[0]
    if path.exists() and path.samefile(args.video):  # --overwrite: it would be replaced by its own upscale
        raise ConfigError(f"--out {args.out} is the input video {args.video}; write the upscale to another file")
    device, dtype = device_and_dtype(args.device, args.dtype)
    pipe = UpscalePipeline.from_pretrained(
        args.upscaler, temporal=args.temporal, allow_pickle=args.allow_pickle, device=device, dtype=dtype
    )
    mode = "frame by frame" if args.temporal is None or args.image_mode else "as a video"
    print(f"upscaling {args.video} by {pipe.scale}, {mode}, on {device}", file=sys.stderr)
    out = pipe(
        args.video, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, image_mode=args.image_mode,
        progress=not args.quiet, **replay, **settings,
    )  # fmt: skip
    for written in out.save(path, overwrite=args.overwrite):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
