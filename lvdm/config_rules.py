"""Rules across a run's config sections that belong to one training target or task: what each needs and what it
cannot be combined with (:meth:`lvdm.config.Config.validate` reports them all at once, each message starting with
the key it is about)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lvdm.config import Config


def target_problems(cfg: Config) -> list[str]:
    """Every rule below, in order."""
    return (
        _image_problems(cfg) + _task_problems(cfg) + _decoder_problems(cfg) + _upscale_problems(cfg)
        + _motion_module_problems(cfg) + _distill_problems(cfg) + _student_problems(cfg) + _other_target_problems(cfg)
        + _unused_option_problems(cfg) + _environment_path_problems(cfg, "")
    )  # fmt: skip


def _image_problems(cfg: Config) -> list[str]:
    """Joint image-video training needs spatial weights to train: an image batch runs in image mode (alpha = 1),
    so the temporal layers get exactly zero gradient, yet AdamW would still step (momentum, weight decay) and the
    LR, EMA and step count would advance."""
    ratio = cfg.train.image_batch_ratio
    image_sources = any(source.kind == "images" and source.weight > 0 for source in cfg.data.sources)
    draws_images = ratio > 0 if ratio is not None else image_sources
    if draws_images and cfg.train.target in ("decoder", "upscale"):  # neither takes spatial weights to train
        return [f"train.image_batch_ratio: train.target={cfg.train.target} trains on video clips only: drop the "
                "images source (train.image_batch_ratio=0)"]  # fmt: skip
    if not draws_images or cfg.model.spatial_lora_rank or cfg.model.unfreeze:
        return []
    return ["train.image_batch_ratio: still images train only spatial weights (they bypass the temporal layers), "
            "and none train here: set model.spatial_lora_rank or model.unfreeze, or drop the images source "
            "(train.image_batch_ratio=0)"]  # fmt: skip


def _other_target_problems(cfg: Config) -> list[str]:
    """An option of another target's (its help says "decoder target: ...") set away from its default: it was
    ignored without a word (``train.distill_from=16`` on a text-to-video run)."""
    problems = []
    for field in dataclasses.fields(cfg.train):
        owner = field.metadata.get("help", "").partition(" target: ")[0]
        if owner not in ("decoder", "upscale", "distill") or owner == cfg.train.target:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if getattr(cfg.train, field.name) != default:
            problems.append(f"train.{field.name}: the {owner} target's option; train.target={cfg.train.target} has "
                            "no use for it: drop it")  # fmt: skip
    return problems


def _unused_option_problems(cfg: Config) -> list[str]:
    """An option that nothing reads under the rest of the config, set away from its default: it was ignored without
    a word (``model.spatial_lora_alpha=8`` with no spatial LoRA, ``model.conv_kernel`` with no 3D convs)."""
    m, t = cfg.model, cfg.train
    unused = {  # key: (why nothing reads it, whether that is so here)
        "model.spatial_lora_alpha": ("model.spatial_lora_rank=0 adds no spatial LoRA", not m.spatial_lora_rank),
        "model.conv_kernel": ("model.layout=attention_only has no 3D convs", m.layout == "attention_only"),
        "model.attention_depth": ("model.layout=conv_only has no temporal attention", m.layout == "conv_only"),
        "model.attention_heads": ("model.layout=conv_only has no temporal attention", m.layout == "conv_only"),
        "train.mixed_noise_lambda": ("train.noise_prior=independent shares no noise", t.noise_prior == "independent"),
        "train.image_frame": ("model.image_conditioning is off", not m.image_conditioning),
        "train.image_dropout": ("model.image_conditioning is off", not m.image_conditioning),
    }
    problems = []
    for key, (why, unread) in unused.items():
        section, name = key.split(".")
        if unread and not _is_default(getattr(cfg, section), name):
            problems.append(f"{key}: {why}, so nothing reads it: drop it")
    return problems


def _is_default(section: object, name: str) -> bool:
    field = next(field for field in dataclasses.fields(section) if field.name == name)
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return getattr(section, name) == default


_VARIABLE = re.compile(r"(?:^|(?<=/))\$[A-Za-z_]\w*")  # at the start of a path's part


def _environment_path_problems(section: object, path: str) -> list[str]:
    """A path holding ``$NAME`` (``output_dir: $SCRATCH/runs/a``), which no YAML reader expands: the run wrote into a
    folder named ``$SCRATCH`` in the working folder. lvdm puts no environment value in a config, so it is refused."""
    from lvdm.config import _home  # the coerce of every path field

    problems = []
    for field in dataclasses.fields(section):
        value, key = getattr(section, field.name), f"{path}{field.name}"
        items = value if isinstance(value, list) else [value]
        if dataclasses.is_dataclass(value):
            problems += _environment_path_problems(value, f"{key}.")
        elif items and all(dataclasses.is_dataclass(item) for item in items):
            problems += [p for i, item in enumerate(items) for p in _environment_path_problems(item, f"{key}[{i}].")]
        elif field.metadata.get("coerce") is _home:
            for i, text in enumerate(items):
                if isinstance(text, str) and (found := _VARIABLE.search(text)):
                    name = f"{key}[{i}]" if isinstance(value, list) else key
                    problems.append(f"{name}: {text!r} holds {found.group()}, which lvdm does not expand (no "
                                    "environment value goes into a config): write the path out")  # fmt: skip
    return problems


TASKS = ("text", "predict", "interpolate", "interpolate_fine")
"""The training tasks ``train.tasks`` weighs (lvdm.training.tasks)."""


def _motion_module_problems(cfg: Config) -> list[str]:
    """The Video LDM options the animatediff layout has no use for are refused rather than ignored (its frame
    table's length is checked when the model is built: an imported module brings its own)."""
    m = cfg.model
    if m.layout == "animatediff" and (m.conv_kernel != [3, 1, 1] or m.mix_factor != 0.5):
        return ["model.conv_kernel / model.mix_factor: the animatediff layout has no 3D convs and no alpha blend"]
    return []


def _decoder_problems(cfg: Config) -> list[str]:
    """What the decoder target cannot combine with: it trains the VAE decoder on clips, and nothing of the UNet."""
    if cfg.train.target != "decoder":
        return []
    m = cfg.model
    unet_parts = {
        "model.context": m.context, "model.fps_conditioning": m.fps_conditioning,
        "model.image_conditioning": m.image_conditioning, "model.spatial_lora_rank": m.spatial_lora_rank,
        "model.unfreeze": m.unfreeze, "model.temporal_init": m.temporal_init, "train.tasks": cfg.train.tasks,
        "train.compile": cfg.train.compile, "train.noise_prior": cfg.train.noise_prior != "independent",
        "train.snr_gamma": cfg.train.snr_gamma, "train.offset_noise": cfg.train.offset_noise,  # the diffusion loss's
        "model.loras": m.loras, "train.validation_prompts": cfg.train.validation_prompts,  # and its samples
        **{f"model.{name}": not _is_default(m, name) for name in  # the UNet's temporal layers' shape
           ("layout", "attention_heads", "attention_depth", "conv_kernel", "mix_factor", "attention_backend")},
    }  # fmt: skip
    problems = [
        f"{key}: belongs to the UNet, which train.target=decoder does not train; drop it"
        for key, value in unet_parts.items()
        if value
    ]
    if cfg.data.num_frames < 2:
        problems.append("data.num_frames: a temporal decoder learns from at least 2 frames per clip")
    lpips = ("perceptual_net", "perceptual_backbone")
    unused = [f"train.{name}" for name in lpips if not _is_default(cfg.train, name)]
    if unused and not cfg.train.perceptual_weight:  # it was ignored without a word: no LPIPS loss
        problems.append(f"{' / '.join(unused)}: the LPIPS loss's, which train.perceptual_weight=0 turns off; set "
                        "train.perceptual_weight > 0 (1.0 as SD's VAE had it) or drop it")  # fmt: skip
    if cfg.train.perceptual_weight and not cfg.train.perceptual_backbone:
        problems.append(
            "train.perceptual_backbone: required with train.perceptual_weight > 0 (torchvision's ImageNet weights "
            f"of the {cfg.train.perceptual_net} backbone, which lvdm does not download)"
        )
    return problems


def _distill_problems(cfg: Config) -> list[str]:
    """What the distill target needs (a teacher module) and what it cannot combine with."""
    t, m = cfg.train, cfg.model
    if t.target != "distill":
        return []
    problems = []
    if m.temporal_init is None:
        problems.append("model.temporal_init: train.target=distill needs the teacher's temporal module")
    for key, value in {"model.context": m.context, "model.fps_conditioning": m.fps_conditioning,
                       "model.image_conditioning": m.image_conditioning, "train.tasks": t.tasks,
                       "data.cache": cfg.data.cache, "train.ema_decay": t.ema_decay,
                       "train.image_batch_ratio": t.image_batch_ratio}.items():  # fmt: skip
        if value:
            problems.append(f"{key}: not part of train.target=distill (text-to-video modules, no EMA); drop it")
    low_high = t.distill_guidance
    if len(low_high) != 2 or low_high[0] > low_high[1]:
        problems.append(f"train.distill_guidance: expected [low, high] with low <= high, got {low_high}")
    from lvdm.errors import ConfigError
    from lvdm.training.distill import distill_rounds

    try:
        rounds = 1 + distill_rounds(t.distill_from, t.distill_to)  # the guidance round, then the halvings
        if t.max_steps < rounds and t.distill_round_steps is None:  # rounds of train.max_steps / rounds steps
            problems.append(f"train.max_steps: {t.max_steps} steps cannot hold {rounds} distillation rounds")
    except ConfigError as exc:
        problems.append(str(exc))
    return problems


def _student_problems(cfg: Config) -> list[str]:
    """A distilled student as ``model.temporal_init``: its spatial LoRA (beside it) was left out without a word, and
    its guidance input read as a plain module's, so the run started from another model than the one sampled."""
    path = cfg.model.temporal_init
    if path is None or not os.path.isfile(path):
        return []  # a missing or unreadable module is named when it loads
    from lvdm.errors import LvdmError
    from lvdm.sampling_settings import temporal_defaults

    try:
        distilled = temporal_defaults(path).get("distilled_lora") is not None
    except LvdmError:
        return []
    if not distilled:
        return []
    fewer = " (for fewer steps, distil it to a smaller train.distill_to)" if cfg.train.target == "distill" else ""
    return [f"model.temporal_init: {path} is a distilled student, which goes with its spatial LoRA and takes the "
            f"guidance weight as an input; start from the module it was distilled from{fewer}"]  # fmt: skip


def _upscale_problems(cfg: Config) -> list[str]:
    """What the upscale target cannot combine with: context frames, image conditioning, FPS conditioning (its steps
    never pass the clips' rate: the part stayed untrained, without a word), the latent cache (its patches are cut
    from the clips' pixels), spatial weights (no upscaler loads the LoRA or blocks exported beside the module, so
    upscales were made without them) and validation prompts (its samples are the held-out clips upscaled)."""
    if cfg.train.target != "upscale":
        return []
    m, problems = cfg.model, []
    for key, value in {"model.context": m.context, "model.image_conditioning": m.image_conditioning,
                       "model.fps_conditioning": m.fps_conditioning, "train.tasks": cfg.train.tasks,
                       "data.cache": cfg.data.cache, "model.spatial_lora_rank": m.spatial_lora_rank,
                       "model.unfreeze": m.unfreeze,
                       "train.validation_prompts": cfg.train.validation_prompts}.items():  # fmt: skip
        if value:
            problems.append(f"{key}: not part of train.target=upscale (an x4 upscaler's temporal layers); drop it")
    if cfg.data.num_frames < 2:  # and a 1-frame video is upscaled frame by frame
        problems.append("data.num_frames: an upscaler's temporal layers learn from at least 2 frames per clip")
    for where, (height, width) in [("data.resolution", cfg.data.resolution)] + [
        (f"data.buckets[{i}]", bucket) for i, bucket in enumerate(cfg.data.buckets)
    ]:
        if cfg.train.upscale_patch > min(height, width):
            problems.append(
                f"train.upscale_patch: {cfg.train.upscale_patch} px does not fit in the {height}x{width} clips "
                f"({where}); use a smaller patch or larger clips"
            )
    return problems


def _task_problems(cfg: Config) -> list[str]:
    train, frames = cfg.train, cfg.data.num_frames
    problems = []
    unknown = sorted(set(train.tasks) - set(TASKS))
    if unknown:
        problems.append(f"train.tasks: unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w <= 1e6 for w in train.tasks.values()):
        problems.append(f"train.tasks: weights must be numbers in 0 .. 1e6 (relative), got {dict(train.tasks)}")
    elif train.tasks and sum(train.tasks.values()) <= 0:
        problems.append(f"train.tasks: every weight is 0 ({dict(train.tasks)}); give at least one task a weight")
    context_tasks = sorted(name for name in TASKS[1:] if train.tasks.get(name, 0) > 0)
    if context_tasks and not cfg.model.context:
        problems.append(f"train.tasks: {', '.join(context_tasks)} need(s) context frames: set model.context=true")
    predicts = train.tasks.get("predict", 0) > 0  # the counts are drawn for every clip, but used only by predict
    bad = [n for n in train.predict_frames if not 0 <= n < frames] if predicts else []
    if not train.predict_frames or bad:
        problems.append(
            f"train.predict_frames: each must be 0 .. {frames - 1} (fewer than data.num_frames), got "
            f"{train.predict_frames}"
        )
    interpolates = any(train.tasks.get(name, 0) > 0 for name in ("interpolate", "interpolate_fine"))
    if interpolates and train.interpolate_every >= frames:
        problems.append(
            f"train.interpolate_every: {train.interpolate_every} leaves one given frame in a {frames}-frame clip; "
            f"use less than data.num_frames ({frames})"
        )
    if train.tasks.get("interpolate_fine", 0) > 0:
        problems += _fine_stage_problems(cfg)
    return problems


def _fine_stage_problems(cfg: Config) -> list[str]:
    """The fine interpolation stage cuts its clips at ``interpolate_every`` times the clip rate of the others."""
    data, every = cfg.data, cfg.train.interpolate_every
    if data.cache:
        return [
            "train.tasks: interpolate_fine needs clips at two frame rates, and the latent cache holds one cut per "
            "clip; train it from the clips (drop data.cache)"
        ]
    if data.target_fps is not None:
        return []
    stride = data.frame_stride or 1
    if isinstance(stride, list) or stride % every:
        return [
            f"train.tasks: interpolate_fine cuts its clips at 1/{every} of data.frame_stride (interpolate_every="
            f"{every} times the rate), so data.frame_stride must be one number divisible by {every}, got "
            f"{data.frame_stride}; or set data.target_fps (the fine stage then reads {every}x that rate)"
        ]
    return []


def overwrite_stays_with_its_folder(
    cfg: Config, overrides: Sequence[str], files: Sequence[str | os.PathLike[str]] = ()
) -> Config:
    """A config file's ``train.overwrite: true`` (the demo configs': rerunning a demo starts over) covers the file's
    own ``output_dir``: with ``output_dir`` set on the command line or in a later file of ``files``, the run
    overwrites only if that layer says ``train.overwrite: true`` too (``python train.py output_dir=my_run`` once
    started over a previous run, and so did ``--config configs/demo.yaml --config mine.yaml`` naming its folder)."""
    from lvdm.configlib.yamlio import read_override, read_yaml

    layers = [read_yaml(path, []) or {} for path in files]  # each file, then the command line
    layers.append({"output_dir": 0} if any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides) else {})
    for key, value in filter(None, (read_override(text, []) for text in overrides)):
        if key == "train.overwrite" or (key == "train" and isinstance(value, dict) and "overwrite" in value):
            layers[-1]["train"] = {"overwrite": True}
    sets_folder = [i for i, layer in enumerate(layers) if "output_dir" in layer]
    sets_overwrite = [i for i, layer in enumerate(layers) if "overwrite" in (layer.get("train") or {})]
    if not cfg.train.overwrite or not sets_folder or (sets_overwrite and sets_overwrite[-1] >= sets_folder[-1]):
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, overwrite=False))
