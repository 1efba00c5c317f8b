"""What ``sample.py`` refuses from the headers of the files it is given (the temporal module's training config, a
video's frame count and rate, the upscaler's UNet config), before anything loads: each was refused after the models
had loaded, or after the first stage had sampled."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lvdm.errors import ConfigError


def check_interpolated_video(video: str, factor: int, *, fps: float | None = None) -> None:
    """That ``--interpolate VIDEO`` by ``factor`` makes no more frames than a video may have, and that an ``--fps``
    given is not ignored (the output plays at the video's own rate times ``factor``), from its header (one that
    cannot be read is named when it is read)."""
    from lvdm.context_sampling import check_keyframes
    from lvdm.data.readers import probe
    from lvdm.errors import LvdmError

    try:
        info = probe(video)
    except LvdmError:
        return
    check_keyframes(info.num_frames, factor)
    if fps is not None and (rate := info.playback_fps()) is not None:  # it was taken and silently ignored
        raise ConfigError(f"--interpolate writes {video} at its own {rate:g} fps times {factor} ({rate * factor:g} "
                          "fps): it does not take --fps")  # fmt: skip


def check_upscaler_module_family(module: str, upscaler: Path) -> None:
    """A module made for another base than the upscaler was refused only when the upscaler loaded, after the first
    stage had sampled and written its video; the two families are read from the module's header and the upscaler's
    UNet config (what cannot be read here, the loading names)."""
    from types import SimpleNamespace

    from lvdm.fileio import read_json
    from lvdm.models.animatediff import is_motion_module
    from lvdm.models.family import base_family
    from lvdm.models.temporal_file import read_temporal_metadata

    try:
        unet = read_json(upscaler / "unet" / "config.json")
        family = base_family(SimpleNamespace(**unet))
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if Path(module).is_dir():  # any folder with a config.json passes for a MotionAdapter until it loads
        _check_adapter_folder(Path(module), unet)
        return
    made_for = None if is_motion_module(module) else read_temporal_metadata(module).get("base_family")
    if made_for is not None and made_for != family:
        raise ConfigError(f"--upscaler-temporal {module}: made for base family {made_for!r}, the upscaler's is "
                          f"{family!r}; give a module trained on the upscaler (train.target: upscale)")  # fmt: skip


def _check_adapter_folder(folder: Path, unet: dict[str, Any]) -> None:
    """That ``--upscaler-temporal FOLDER`` is a ``MotionAdapter`` folder of the upscaler UNet's widths (``unet``: its
    config), from its config.json (one that cannot be read is named when it loads)."""
    from lvdm.fileio import read_json

    try:
        config = read_json(folder / "config.json")
    except (OSError, ValueError):
        return
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != "MotionAdapter":
        hint = "; a temporal VAE decoder goes to --decoder" if name == "AutoencoderKLTemporalDecoder" else ""
        raise ConfigError(f"--upscaler-temporal {folder}: its config.json names {name!r}, not a MotionAdapter folder "
                          f"nor a module file trained on the upscaler (train.target: upscale){hint}")  # fmt: skip
    widths, upscaler_widths = config.get("block_out_channels"), unet.get("block_out_channels")
    if widths != upscaler_widths:
        raise ConfigError(f"--upscaler-temporal {folder}: a motion module of block widths {widths}, the upscaler's "
                          f"UNet has {upscaler_widths}; give a module trained on the upscaler (train.target: "
                          "upscale)")  # fmt: skip


def check_module_context(args: argparse.Namespace, flag: str) -> None:
    """Whether ``--temporal`` takes the context options given (``flag`` the first), from its file's header."""
    from lvdm.context_sampling import check_context_count, check_support
    from lvdm.sampling_settings import temporal_defaults

    defaults = temporal_defaults(args.temporal)
    what = "interpolate" if args.interpolate else "continue a video" if args.context else f"take {flag}"
    check_support(defaults["has_context"], defaults["tasks"], what, task="interpolate" if args.interpolate else None,
                  every=defaults["interpolate_every"])  # fmt: skip
    if args.context_frames is not None:
        check_context_count(args.context_frames, defaults["max_context_frames"])


def check_module_size(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """The frame size an unset --height or --width takes from the --temporal module's training config, checked from
    the module's header before anything loads (a height of 20 there was refused after the models had loaded)."""
    if args.temporal is None:
        return
    from lvdm.pipeline_sampling import from_the_module
    from lvdm.sampling_settings import sampling_settings, temporal_defaults

    defaults = temporal_defaults(args.temporal)
    unset = [key for key in ("height", "width") if settings.get(key) is None and defaults[key] is not None]
    taken = {key: defaults[key] for key in unset}
    try:
        sampling_settings(**settings | taken)
    except ConfigError as exc:
        raise ConfigError(from_the_module(str(exc), taken)) from None


def check_mixed_only(args: argparse.Namespace, noise_prior: str | None) -> None:
    """--base-noise-seed and --mixed-lambda go with the mixed prior: ``noise_prior`` given, else the module's, else
    the default (an unset one was refused after loading, and a lambda taken and ignored)."""
    from lvdm.pipeline_sampling import check_base_noise_seed
    from lvdm.sampling_settings import DEFAULT_NOISE_PRIOR, temporal_defaults

    given = {"--base-noise-seed": args.base_noise_seed, "--mixed-lambda": args.mixed_lambda}
    flags = [flag for flag, value in given.items() if value is not None]
    if not flags:
        return
    module = temporal_defaults(args.temporal)["noise_prior"] if args.temporal and noise_prior is None else None
    if noise_prior is None and (module or DEFAULT_NOISE_PRIOR) != "mixed":
        whose = (
            f"the temporal module was trained with {module!r}" if module else f"the default is {DEFAULT_NOISE_PRIOR!r}"
        )
        named = " and ".join(flags)
        raise ConfigError(
            f"{named} go{'es' if len(flags) == 1 else ''} with --noise-prior mixed ({whose}); add it or drop {named}"
        )
    if args.mixed_lambda is not None and noise_prior not in (None, "mixed"):
        raise ConfigError(f"--mixed-lambda is only used by --noise-prior mixed, not {noise_prior!r}")
    check_base_noise_seed(args.base_noise_seed, noise_prior)
