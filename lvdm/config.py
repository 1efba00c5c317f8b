"""Run configuration: dataclasses are the schema, YAML files the format, ``key=value`` the command line.

Each field is declared once, with its type, default, one-line help and range::

    max_steps: int = option(1000, "optimizer steps to train", min=1)

(``option`` is sugar for ``field(default=1000, metadata={"help": ..., "min": 1})``; both work.)

``load_config(["configs/run.yaml"], ["train.lr=1e-4", "data.resolution=[256,384]"])`` merges the files in
order, then the overrides, and checks the result against :class:`Config`. Unknown keys (with a did-you-mean),
wrong types, out-of-range values, missing required fields and each section's ``validate()`` rules are all
reported together in one :class:`~lvdm.errors.ConfigError`, one problem per line with its key path. This
module imports no torch, so a bad config fails in well under a second.

YAML is read with a safe loader using YAML 1.2 scalars: only ``true``/``false`` are booleans (``no`` is the
string ``"no"``), ``1e-4`` is a float, dates stay strings, and a key given twice is an error. OmegaConf merges
the layers and resolves plain key references such as ``${train.checkpoint_every}``; resolver calls such as
``${oc.env:HOME}`` are refused, so no environment value ever lands in a saved config. ``describe_config()``
lists every key for ``--help``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from lvdm import configlib
from lvdm.configlib import config_to_dict, option, save_config
from lvdm.sampling_settings import MAX_STEPS

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "SourceConfig",
    "TrainConfig",
    "check_machine",
    "config_from_dict",
    "config_to_dict",
    "describe_config",
    "load_config",
    "option",
    "save_config",
]

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------
# The schema. Add a field with `option(default, "help", min=..., max=...)`. Cross-field rules go in a
# `validate(self) -> list[str]` method, run once the section's fields all have valid types; each message starts
# with the field it is about ("frame_stride: ...") and the loader puts the section's path in front
# ("data.frame_stride: ..."); a message starting otherwise is about the section ("data: no data: ...").
# Rules that belong to one training target or task live in lvdm/config_rules.py.
# ---------------------------------------------------------------------------------------------------------------


def _home(value: Any) -> Any:
    """A path's leading ``~`` or ``~user`` expanded, as a shell does on a command line but no YAML reader does:
    ``output_dir: ~/runs/a`` is a folder in the home folder, not one named ``~`` in the working folder."""
    if isinstance(value, list):
        return [_home(item) for item in value]
    return os.path.expanduser(value) if isinstance(value, str) else value


def _square(value: Any) -> Any:
    """``256`` -> ``[256, 256]``: a single number is a square size."""
    return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value


def _size_problems(name: str, size: Sequence[int]) -> list[str]:
    return [] if len(size) == 2 else [f"{name}: expected [height, width], got {list(size)}"]


def _lora_problem(spec: str) -> str | None:
    """What is wrong with a ``"PATH[:SCALE]"`` LoRA spec, read the way ``LoraSpec.parse`` reads it."""
    if not spec:
        return "expected 'PATH[:SCALE]', got an empty string"
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).exists():
        return None
    try:
        float(tail)
    except ValueError:
        return f"{spec!r}: the scale after ':' must be a number, got {tail!r}"
    return None


@dataclass
class ModelConfig:
    """The Stable Diffusion base and the temporal layers added to it."""

    base: str = option(help="SD base: a diffusers folder or a single-file checkpoint", coerce=_home)
    base_config: str | None = option(
        None, "diffusers folder giving the architecture of a single-file base", coerce=_home
    )
    allow_pickle: bool = option(False, "allow pickled checkpoints (.ckpt/.pt/.bin), which can run code")
    loras: list[str] = option(
        [], "LoRAs fused into the base before inflation, each 'PATH[:SCALE]' (scale 1)", coerce=_home
    )
    layout: Literal["videoldm", "attention_only", "conv_only", "animatediff"] = option(
        "videoldm",
        "temporal layers: videoldm (attention and 3D conv), attention_only, conv_only, or animatediff (AnimateDiff's "
        "motion modules, exportable to diffusers; with temporal_init an AnimateDiff module gives its own shape)",
    )
    attention_depth: int = option(1, "transformer layers in each temporal attention block", min=1, max=16)
    attention_heads: int | None = option(
        None, "heads per temporal attention block; null: the spatial count (animatediff: 8)", min=1, max=64
    )
    conv_kernel: list[int] = option([3, 1, 1], "3D conv kernel [frames, height, width], each odd", min=1, max=15)
    mix_factor: float = option(0.5, "initial logit of the learned spatial/temporal mix, alpha = sigmoid(it)")
    spatial_lora_rank: int = option(
        0, "rank of a LoRA trained on the spatial attention too (0: none)", min=0, max=1024
    )
    spatial_lora_alpha: float | None = option(None, "LoRA alpha (null: the rank, i.e. scale 1)", gt=0)
    unfreeze: list[str] = option([], "spatial blocks trained too, by diffusers UNet name (e.g. up_blocks.3)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, slower")
    context: bool = option(
        False, "context frames: an encoder feeding given frames to the temporal layers (prediction, interpolation)"
    )
    fps_conditioning: bool = option(
        False, "motion speed: the clip's frame rate feeds the temporal layers (vary data.frame_stride or target_fps)"
    )
    image_conditioning: bool = option(
        False, "image-to-video: CLIP image tokens through a second cross-attention (needs model.image_encoder)"
    )
    image_encoder: str | None = option(
        None,
        "CLIP vision encoder folder (transformers) for image conditioning, e.g. IP-Adapter's image_encoder",
        coerce=_home,
    )
    image_adapter: str | None = option(
        None,
        "IP-Adapter Plus checkpoint (diffusers format) the image attention starts from (image_conditioning)",
        coerce=_home,
    )
    temporal_init: str | None = option(
        None,
        "start the temporal layers from this module file (e.g. a text-to-video one, adding context frames), or from "
        "an AnimateDiff motion module (.safetensors, .ckpt with allow_pickle, MotionAdapter folder)",
        coerce=_home,
    )
    attention_backend: Literal["sdpa", "xformers"] = option("sdpa", "attention kernel: sdpa (PyTorch) or xformers")

    def validate(self) -> list[str]:
        """Rules across fields or elements, each message starting with the field it is about."""
        problems = []
        if len(self.conv_kernel) != 3 or any(size % 2 == 0 for size in self.conv_kernel):
            problems.append(f"conv_kernel: expected three odd sizes [frames, height, width], got {self.conv_kernel}")
        for i, spec in enumerate(self.loras):
            if problem := _lora_problem(spec):
                problems.append(f"loras[{i}]: {problem}")
        if self.image_conditioning and self.image_encoder is None:
            problems.append("image_encoder: required with image_conditioning (a CLIP vision encoder folder)")
        if self.image_adapter is not None and not self.image_conditioning:
            problems.append("image_adapter: starts the image attention, so it needs image_conditioning=true")
        for name in ("base", "base_config", "image_encoder", "image_adapter", "temporal_init"):
            if getattr(self, name) == "":  # Path("") is the working folder
                problems.append(f"{name}: an empty path; give a file or folder, or null")
        if self.base_config and self.base and Path(self.base).is_dir():  # it was ignored
            problems.append(f"base_config: goes with a single-file base; {self.base} is a diffusers folder, which "
                            "gives its own architecture: leave base_config out")  # fmt: skip
        return problems


@dataclass
class SourceConfig:
    """One data source of a weighted mix."""

    kind: Literal["folder", "webvid", "manifest", "images"] = option(
        help="folder (clips + .txt captions), webvid (WebVid CSV), manifest (CSV/JSONL) or images"
    )
    path: str = option(help="the clip folder, WebVid CSV, manifest file, image folder or image manifest", coerce=_home)
    video_root: str | None = option(
        None, "webvid: folder holding the videos (required); manifest: default the manifest's folder", coerce=_home
    )
    weight: float = option(
        1.0, "relative sampling weight among data.sources (0 leaves the source out)", min=0, max=1e6
    )

    def validate(self) -> list[str]:
        """Rules across fields, each message starting with the field it is about."""
        if self.kind == "webvid" and self.video_root is None:
            return ["video_root: required for kind 'webvid' (the folder holding the videos)"]
        return []


@dataclass
class DataConfig:
    """Training data and how clips are cut from it."""

    root: str | None = option(
        None, "shortcut for one source: a folder of clips with same-name .txt captions", coerce=_home
    )
    manifest: str | None = option(None, "shortcut for one source: a CSV, WebVid CSV or JSONL manifest", coerce=_home)
    sources: list[SourceConfig] = option([], "weighted data sources, each {kind, path, video_root, weight}")
    num_frames: int = option(16, "frames per training clip", min=1, max=1024)
    resolution: list[int] = option(
        [256, 256],
        "clip size [height, width]; one number means square",
        min=8,
        max=8192,
        multiple_of=8,
        coerce=_square,
    )
    frame_stride: int | list[int] | None = option(
        None, "take every n-th frame (null and no target_fps: 1); [low, high]: a stride drawn per clip", min=1
    )
    target_fps: float | list[float] | None = option(
        None, "resample clips to this frame rate instead of a stride; [low, high]: a rate drawn per clip", gt=0
    )
    start: Literal["random", "center"] = option("random", "where in its video a clip starts")
    crop: Literal["center", "random"] = option("center", "where the crop to the training aspect ratio sits")
    flip: bool = option(False, "mirror clips horizontally at random")
    buckets: list[list[int]] = option(
        [], "aspect-ratio buckets [[height, width], ...]; empty: only resolution", min=8, max=8192, multiple_of=8
    )
    size_index: str | None = option(
        None,
        "file remembering each clip's size for buckets (reused while size and mtime match); null: probe all",
        coerce=_home,
    )
    probe_workers: int = option(8, "threads probing clip sizes for buckets", min=1)
    reader: Literal["auto", "decord", "pyav"] = option("auto", "video decoder: auto (PyAV; decord is opt-in), or one")
    decode_timeout: float = option(30.0, "seconds before decoding one video counts as a failure", gt=0, max=86400)
    max_bad_fraction: float = option(0.05, "stop when more than this fraction of samples is unreadable", min=0, max=1)
    max_consecutive_bad: int = option(20, "stop after this many unreadable samples in a row", min=1)
    num_workers: int = option(2, "data-loader worker processes (0: load in the main process)", min=0)
    cache: str | None = option(None, "latent cache folder to read instead of decoding videos", coerce=_home)
    follow_links_outside: bool = option(
        False, "use files in a data folder that are symlinks to places outside it (default: skipped, as escapes)"
    )
    holdout: int = option(0, "entries kept out of training for the validation loss and the motion gain", min=0)

    def validate(self) -> list[str]:
        """Rules across fields, each message starting with the field it is about."""
        problems = []
        if self.root is None and self.manifest is None and not self.sources:
            problems.append("no data: set data.root, data.manifest or data.sources")
        if self.frame_stride is not None and self.target_fps is not None:
            problems.append("frame_stride: set together with target_fps; choose a fixed stride or a frame rate")
        for name in ("frame_stride", "target_fps"):
            value = getattr(self, name)
            if isinstance(value, list) and (len(value) != 2 or value[0] > value[1]):
                problems.append(f"{name}: a range is [low, high] with low <= high, got {value}")
        problems += _size_problems("resolution", self.resolution)
        for i, bucket in enumerate(self.buckets):
            problems += _size_problems(f"buckets[{i}]", bucket)
        if self.sources and sum(source.weight for source in self.sources) <= 0:
            problems.append("sources: every weight is 0; at least one source needs a positive weight")
        return problems

    def folder_holding(self, path: str) -> str | None:
        """The clip or image folder (``root``, or a ``folder`` / ``images`` source) that ``path`` is in or is, or
        None: those are listed afresh at every start, so what a run writes there would be read as data."""
        from lvdm.fileio import resolved_path

        inside = resolved_path(path)
        scanned = [self.root] + [s.path for s in self.sources if s.kind in ("folder", "images")]
        for folder in filter(None, scanned):
            resolved = resolved_path(folder)
            if inside is not None and resolved is not None and resolved.is_dir() and inside.is_relative_to(resolved):
                return folder
        return None


@dataclass
class TrainConfig:
    """Optimization, noise, checkpoints and logging."""

    target: Literal["denoise", "decoder", "upscale", "distill"] = option(
        "denoise",
        "what a step trains (lvdm.training.objectives): denoise (the temporal diffusion loss), decoder (a temporal "
        "VAE decoder, lvdm.models.temporal_vae), upscale (the temporal layers of an x4 upscaler base, on patches) "
        "or distill (model.temporal_init distilled to few steps, lvdm.training.distill)",
    )
    max_steps: int = option(1000, "optimizer steps to train (checkpoint names hold 8 digits)", min=1, max=10**8 - 1)
    batch_size: int = option(1, "clips per device in each micro-batch", min=1, max=4096)
    gradient_accumulation: int = option(1, "micro-batches per optimizer step", min=1)
    lr: float = option(1e-4, "peak learning rate (AdamW)", gt=0, max=10)
    lr_schedule: Literal["constant", "cosine", "linear"] = option(
        "constant", "learning-rate curve after warmup (distill target: both again in every round)"
    )
    warmup_steps: int = option(0, "steps of linear warmup from 0 to lr", min=0)
    weight_decay: float = option(0.01, "AdamW weight decay", min=0)
    optimizer: Literal["adamw", "adamw8bit"] = option("adamw", "adamw (fused on CUDA) or adamw8bit (bitsandbytes)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)", min=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "autocast dtype: no (fp32), fp16 or bf16")
    compile: bool = option(
        False,
        "torch.compile the video UNet, block by block with static shapes (lvdm.models.compile): the first steps "
        "compile, then steps run faster where inductor helps; needs a C++ compiler on CPU, Triton on a GPU",
    )
    threads: int | None = option(
        None,
        "CPU threads of torch per process (null: the usable cores, by affinity, cgroup quota, OMP_NUM_THREADS)",
        min=1,
    )
    seed: int = option(0, "random seed for initialization, data order and noise", min=0, max=2**32 - 1)
    resume: str | None = option(
        None, "resume from 'auto', 'latest' or a checkpoint path; null: start fresh", coerce=_home
    )
    checkpoint_every: int = option(500, "save a checkpoint every n steps", min=1)
    keep_last: int = option(3, "checkpoints kept in output_dir; older ones are deleted", min=1)
    ema_decay: float | None = option(None, "decay of an EMA of the trained weights; null: no EMA", min=0, max=1)
    noise_prior: Literal["independent", "mixed"] = option("independent", "noise per frame, or partly shared")
    mixed_noise_lambda: float = option(0.5, "noise share common to all frames (noise_prior=mixed)", min=0, max=1)
    caption_dropout: float = option(0.1, "probability of an empty caption (enables CFG)", min=0, max=1)
    snr_gamma: float | None = option(None, "min-SNR loss weighting gamma; null: unweighted", gt=0)
    offset_noise: float = option(0.0, "offset-noise strength (0: off)", min=0)
    image_batch_ratio: float | None = option(
        None, "share of batches made of still images (joint training); null: by data.sources weights", min=0, max=1
    )
    tasks: dict[str, float] = option(
        {},
        "tasks drawn per clip by weight: text (no context), predict, interpolate, interpolate_fine (the second "
        "stage, on clips at interpolate_every times the rate); empty: text only",
    )
    predict_frames: list[int] = option([0, 1, 2], "predict: how many leading frames are given (one drawn per clip)")
    interpolate_every: int = option(4, "interpolate: every n-th frame is given (0, n, 2n, ...), the rest made", min=2)
    image_frame: Literal["first", "random"] = option(
        "first", "image conditioning: the clip's frame shown as the image, its first or a random one"
    )
    image_dropout: float = option(
        0.1, "probability of dropping the conditioning image (enables image guidance)", min=0, max=1
    )
    decoder_layers: Literal["temporal", "all"] = option(
        "temporal", "decoder target: train its temporal layers, or the whole decoder (the encoder always stays)"
    )
    decoder_latent_noise: float = option(
        0.0,
        "decoder target: std of Gaussian noise added to each frame's latent (in the UNet's scaled units), in training "
        "and validation: a video model's latents carry such per-frame errors, the image decoder turns them into "
        "flicker, and the temporal layers learn to remove it",
        min=0,
    )
    disc_start: int = option(
        500, "decoder target: the step the 3D patch discriminator's loss starts at (it trains from the start)", min=0
    )
    disc_weight: float = option(0.5, "decoder target: weight of the adversarial loss (0: L1 only)", min=0)
    disc_adaptive: bool = option(
        True, "decoder target: scale the adversarial loss by VQGAN's rule (L1 / adversarial gradient norm ratio)"
    )
    disc_lr: float | None = option(
        None, "decoder target: the discriminator's learning rate; null: train.lr", gt=0, max=10
    )
    perceptual_weight: float = option(
        0.0, "decoder target: weight of the LPIPS perceptual loss (0: off; needs train.perceptual_backbone)", min=0
    )
    perceptual_net: Literal["vgg", "alex", "squeeze"] = option("vgg", "decoder target: the LPIPS backbone")
    perceptual_backbone: str | None = option(
        None,
        "decoder target: torchvision's ImageNet weights of train.perceptual_net (.safetensors, or .pth with "
        "model.allow_pickle), the one download LPIPS needs; lvdm never downloads it",
        coerce=_home,
    )
    upscale_patch: int = option(
        64, "upscale target: high-res patch size in pixels, cut at one place in every frame of a clip", min=8
    )
    upscale_max_noise_level: int | None = option(
        None, "upscale target: low-res noise levels drawn per clip from 0 .. this; null: the upscaler's max", min=0
    )
    upscale_validation_noise_level: int = option(
        20, "upscale target: the low-res noise level of the held-out figures and samples", min=0
    )
    distill_from: int = option(64, "distill target: the teacher's DDIM steps in the first round", min=2)
    distill_to: int = option(8, "distill target: the student's steps after the last round (halved each round)", min=1)
    distill_guidance: list[float] = option(
        [2.0, 8.0],
        "distill target: the guidance weights [low, high] the student learns, drawn per clip",
        min=1,
        max=100,  # sampling's maximum: a student of higher weights could never be sampled
    )
    distill_round_steps: int | None = option(
        None, "distill target: optimizer steps per round; null: train.max_steps / rounds", min=1
    )
    distill_latents: Literal["teacher", "data"] = option(
        "teacher",
        "distill target: the clean latents noised for the student: the teacher's own samples (a pool, "
        "captions only) or the clips' (encoded by the VAE, as Salimans & Ho)",
    )
    distill_weighting: Literal["equal", "truncated_snr"] = option(
        "truncated_snr", "distill target: the loss's weight per noise level: max(SNR, 1) as Salimans & Ho, or equal"
    )
    distill_pool: int = option(
        64, "distill target: teacher samples kept as clean latents (a slot drawn per clip, made on first use)", min=1
    )
    distill_eval_noises: int = option(
        8,
        "distill target: initial noises per held-out clip behind each distillation gain; the errors are heavy-tailed, "
        "so aim for 64 or more samples in all (data.holdout x this)",
        min=1,
    )
    max_nonfinite_steps: int = option(10, "stop after this many skipped steps with a NaN/inf loss", min=1)
    overwrite: bool = option(False, "allow a fresh run in an output_dir that already holds one")
    log_every: int = option(10, "log the loss every n steps", min=1)
    validate_every: int = option(500, "sample the validation prompts every n steps", min=1)
    validation_prompts: list[str] = option([], "prompts sampled at each validation; empty: no sample videos")
    validation_steps: int = option(25, "DDIM steps for validation samples", min=1, max=MAX_STEPS)  # as sample.py
    validation_guidance: float = option(7.5, "classifier-free guidance scale for validation samples", min=1, max=100)


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = option(help="the base model and the temporal layers added to it")
    data: DataConfig = option(help="training data and how clips are cut from it")
    train: TrainConfig = option(TrainConfig(), "optimization, noise, checkpoints and logging")
    output_dir: str = option("outputs/run", "run folder: checkpoints, logs, samples, resolved config", coerce=_home)

    def validate(self) -> list[str]:
        """Rules across sections, each message starting with the key it is about."""
        problems = [
            f"train.validation_prompts[{i}]: {prompt!r} is not valid Unicode text (a lone surrogate)"
            for i, prompt in enumerate(self.train.validation_prompts)
            if any("\ud800" <= ch <= "\udfff" for ch in prompt)
        ]
        from lvdm.config_rules import target_problems
        from lvdm.fileio import special_folder

        problems += target_problems(self)

        if reason := special_folder(self.output_dir):
            problems.append(f"output_dir: {self.output_dir!r} is {reason}; lvdm refuses to write a run there")
        elif folder := self.data.folder_holding(self.output_dir):
            problems.append(
                f"output_dir: {self.output_dir!r} is inside the clip folder {folder!r}, which is listed for clips at "
                "every start: the run's own samples would be read as clips when it resumes; put it outside"
            )
        return problems


def load_config(
    files: Sequence[str | os.PathLike[str]] = (), overrides: Sequence[str] = (), *, schema: type[T] = Config
) -> T:
    """Merge YAML ``files``, then ``key=value`` ``overrides``; check against ``schema`` (default: Config)."""
    return configlib.load_config(files, overrides, schema=schema)


def config_from_dict(data: dict[str, Any], schema: type[T] = Config) -> T:
    """Check plain data (as from :func:`config_to_dict`) against ``schema``."""
    return configlib.config_from_dict(data, schema)


def describe_config(schema: type = Config) -> str:
    """Every key with its type, default, range and help, for ``--help`` output."""
    return configlib.describe_config(schema)


XFORMERS_MISSING = (
    "model.attention_backend: xformers is not installed (pip install 'lvdm[xformers]'); use sdpa, PyTorch's own"
)


def check_machine(cfg: Config) -> None:
    """Settings this machine cannot run, as one :class:`~lvdm.errors.ConfigError` before anything heavy loads:
    fp16 autocast without a CUDA GPU, xformers attention without xformers, compiling without a compiler (torch is
    imported only for fp16 and compiling)."""
    import importlib.util

    from lvdm.errors import ConfigError

    problems = []
    if cfg.train.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            problems.append("train.mixed_precision: fp16 needs a CUDA GPU and there is none here; use bf16 or no")
    if cfg.model.attention_backend == "xformers" and importlib.util.find_spec("xformers") is None:
        problems.append(XFORMERS_MISSING)
    if cfg.train.compile:
        import torch

        from lvdm.models.compile import compile_problem

        if problem := compile_problem(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
            problems.append(f"train.compile: {problem}; set train.compile=false")
    if problems:
        raise ConfigError("; ".join(problems))
