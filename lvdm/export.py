"""Export the temporal module of any training checkpoint, not only the one a run wrote last.

    python -m lvdm.export outputs/run/checkpoints/checkpoint-00000500 step500.safetensors
    python -m lvdm.export CHECKPOINT OUT.safetensors --raw                  # the raw weights, not their EMA
    python -m lvdm.export CHECKPOINT OUT.safetensors --base path/to/sd15    # the base has moved since training
    python -m lvdm.export CHECKPOINT OUT.safetensors --base model.safetensors --base-config path/to/sd15

The checkpoint's metadata holds the run's resolved config: the video model is built from it on the base,
the checkpoint's trained weights are copied in (their EMA when the run kept one, unless ``--raw``), and the
temporal layers are written as training writes ``temporal.safetensors``, with the config in the file. A
spatial LoRA or unfrozen blocks trained with them go beside ``OUT`` (``OUT_spatial_lora.safetensors``,
``OUT_spatial_weights.safetensors``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lvdm.cli import Parser, run_cli
from lvdm.errors import CheckpointError, ConfigError, check_flag


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    raw: bool = False,
    base: str | os.PathLike | None = None,
    base_config: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the temporal module of ``checkpoint`` to ``out`` (``.safetensors``); returns the files written.

    ``raw``: the trained weights even when the checkpoint holds their EMA. ``base``: the SD base to build on
    instead of the config's ``model.base`` (``base_config``: the diffusers folder giving a single-file base's
    architecture, instead of the config's). An existing ``out`` is refused unless ``overwrite``.
    """
    from lvdm.outputs import check_output_file, module_output

    check_flag("overwrite", overwrite)  # "no" is truthy: it replaced the file it was meant to keep
    check_flag("raw", raw)
    paths = {"checkpoint": checkpoint, "out": out, "base": base, "base_config": base_config}
    for name, value in paths.items():
        if not isinstance(value, str | os.PathLike) and (value is not None or name in ("checkpoint", "out")):
            raise ConfigError(f"{name}: expected a path (str or os.PathLike), got {value!r}")
        if name != "out" and value is not None and not os.fspath(value):  # out's own check names the output
            raise ConfigError(f"{name}: an empty path; give a file or folder")
    out = module_output(out)
    from lvdm.training.checkpoint import MARKER, load_checkpoint

    if (out.parent / MARKER).exists():  # lvdm's retention deletes such folders: the module would go with it
        raise ConfigError(f"{out}: inside a checkpoint folder; write the module somewhere else")
    parts, metadata = load_checkpoint(checkpoint)  # every file verified before anything is built
    config = metadata.get("config")
    if not isinstance(config, dict) or not all(isinstance(config.get(key), dict) for key in ("model", "data")):
        raise CheckpointError(f"checkpoint {checkpoint}: its metadata holds no training config (model, data)")
    if isinstance(config.get("train"), dict) and config["train"].get("target") == "decoder":  # no temporal module
        raise ConfigError(  # its diffusers folder was written where OUT goes: an empty OUT and a temporary folder left
            f"checkpoint {checkpoint} is of a temporal VAE decoder run (train.target: decoder), which has no temporal "
            "module: its decoder is the run's decoder/ folder (a diffusers folder, sampled with decoder=)"
        )
    outputs = _outputs(out, config)
    for path in outputs.values():  # the LoRA's too: its name is longer than the module's
        check_output_file(path, overwrite=overwrite)
    weights = parts.get("trainable") if raw or "ema" not in parts else parts["ema"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {checkpoint} holds no trained weights (trainable.safetensors)")
    _check_family(checkpoint, config["model"], base, base_config, metadata.get("base_family"))  # before it loads
    video, trainable = _build(config, base, base_config)
    if weights.keys() != trainable.keys():
        extra, missing = sorted(weights.keys() - trainable.keys()), sorted(trainable.keys() - weights.keys())
        on = f"; is --base {base} (base family {video.family!r}) of the family it trained on?" if base else ""
        raise CheckpointError(
            f"checkpoint {checkpoint}: its weights do not fit the model its config builds "
            f"(unexpected {extra[:3]}, missing {missing[:3]}){on}"
        )
    import torch

    if wrong := [name for name, tensor in weights.items() if tensor.shape != trainable[name].shape]:
        raise CheckpointError(
            f"checkpoint {checkpoint}: {wrong[0]} is {tuple(weights[wrong[0]].shape)}, the model its config builds "
            f"has {tuple(trainable[wrong[0]].shape)}" + (f" ({len(wrong) - 1} more like it)" if len(wrong) > 1 else "")
        )
    if bad := [name for name, tensor in weights.items() if tensor.is_floating_point() and not tensor.isfinite().all()]:
        raise CheckpointError(  # every reader refuses such a module: it is not written
            f"checkpoint {checkpoint}: {bad[0]} holds NaN or infinite values"
            + (f" ({len(bad) - 1} more like it)" if len(bad) > 1 else "")
            + "; export an earlier checkpoint"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            trainable[name].copy_(tensor)
    training_config = config | ({"clip_fps": metadata["clip_fps"]} if metadata.get("clip_fps") else {})
    if config.get("train", {}).get("target") == "distill":  # a checkpoint before the last round: the steps reached
        from lvdm.training.distill import reached_config

        training_config = reached_config(training_config, int(metadata["step"]))
    from lvdm.training.groups import write_module_files

    return write_module_files(video, trainable, outputs, training_config, exclusive=not overwrite)


def _check_family(checkpoint: Any, model: dict[str, Any], base: Any, base_config: Any, recorded: Any) -> None:
    """A ``base`` of another family than the one the checkpoint's model trained on (``recorded`` in its metadata;
    in a checkpoint from before that, read from its ``model.base``), named with both families before anything
    loads; its weights "did not fit the model its config builds", which blamed the checkpoint. Where either family
    cannot be known, the weights check answers (SD1 and SD2 modules have the same shapes: only the record tells)."""
    trained = recorded if isinstance(recorded, str) else _family(model.get("base"), model.get("base_config"))
    given = _family(base, base_config or model.get("base_config"))
    if base is not None and trained is not None and given is not None and given != trained:
        raise ConfigError(
            f"--base {base} is of base family {given!r}, and the module of checkpoint {checkpoint} was trained on "
            f"{trained!r} (model.base {model['base']}); give a base of family {trained!r}"
        )


def _family(base: Any, base_config: Any) -> str | None:
    """The family of a base (a diffusers folder, or a single file with its ``base_config``) read from its UNet's
    config.json, without loading it; ``None`` where that cannot be read."""
    from types import SimpleNamespace

    from lvdm.fileio import read_json
    from lvdm.models.family import base_family

    folder = base if isinstance(base, str | os.PathLike) and Path(base).is_dir() else base_config
    if not isinstance(folder, str | os.PathLike) or not os.fspath(folder):
        return None
    try:
        return base_family(SimpleNamespace(**read_json(Path(folder) / "unet" / "config.json")))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _build(config: dict[str, Any], base: Any, base_config: Any) -> tuple[Any, dict[str, Any]]:
    """The video model of a run's config, on the CPU in fp32, and its trainable parameters by name."""
    import torch

    from lvdm.config import config_from_dict
    from lvdm.training.setup import build_model

    model = config["model"] | {"attention_backend": "sdpa", "gradient_checkpointing": False}  # no effect on weights
    model |= {"base": str(base)} if base is not None else {}
    recorded = str(model.get("base", ""))
    if base is None and recorded and not Path(recorded).exists():  # it said only "does not exist"
        where = "relative to the folder training ran in" if not Path(recorded).is_absolute() else "since moved?"
        raise ConfigError(f"the checkpoint's model.base {recorded} does not exist here ({where}); give the base "
                          "with --base")  # fmt: skip
    model |= {"base_config": str(base_config)} if base_config is not None else {}
    try:
        cfg = config_from_dict(config | {"model": model, "data": config["data"] | {"cache": None}})
    except ConfigError as exc:  # the checkpoint's record, not the command line: one line, as its other faults
        raise CheckpointError(
            f"the checkpoint's config is not one lvdm can build: {' '.join(str(exc).split())}"
        ) from None
    video, _, trainable = build_model(cfg, torch.device("cpu"), "no")
    return video, trainable


def _outputs(out: Path, config: dict[str, Any]) -> dict[str, Path]:
    """The files an export of a run with ``config`` writes, by kind: the ``module`` at ``out``, and beside it the
    spatial parts trained (``OUT_spatial_lora.safetensors``, ``OUT_spatial_weights.safetensors``)."""
    from lvdm.training.groups import module_file_paths

    model = config["model"]
    return module_file_paths(out, model.get("spatial_lora_rank"), model.get("unfreeze"), prefix=f"{out.stem}_")


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="python -m lvdm.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. <output_dir>/checkpoints/checkpoint-00000500")
    parser.add_argument("out", help="the temporal module to write (.safetensors)")
    parser.add_argument("--raw", action="store_true", help="the raw trained weights, not their EMA (default: EMA)")
    parser.add_argument("--base", help="SD base to build on (default: the model.base of the checkpoint's config)")
    parser.add_argument("--base-config", help="diffusers folder with the architecture of a single-file --base")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT (default: refuse)")
    args = parser.parse_args(argv)
    for path in export_checkpoint(args.checkpoint, args.out, raw=args.raw, base=args.base,
                                  base_config=args.base_config, overwrite=args.overwrite):  # fmt: skip
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
