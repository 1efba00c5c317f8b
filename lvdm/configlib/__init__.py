"""Config machinery: dataclasses as the schema, YAML files as the format, ``key=value`` on the command line.

Generic over any dataclass schema; lvdm's own schema lives in :mod:`lvdm.config`. See that module for the
rules (safe YAML 1.2 scalars, refused resolvers, all problems reported together). Imports no torch.

Here: the public functions and :func:`option`; :mod:`.yamlio` reads files and overrides into one OmegaConf
node, :mod:`.convert` checks plain data against the dataclasses, :mod:`.common` holds what both use.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml

from lvdm.configlib.common import join_path, plain_data, type_hints
from lvdm.configlib.convert import BOUNDS, build_dataclass, raise_problems, type_name
from lvdm.configlib.yamlio import (
    YamlDumper,
    escape_interpolations,
    merge_layers,
    read_override,
    read_yaml,
    resolve_node,
    schema_defaults,
    whole_mappings,
)

__all__ = ["config_from_dict", "config_to_dict", "describe_config", "load_config", "option", "save_config"]

T = TypeVar("T")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    min: float | None = None,
    max: float | None = None,
    gt: float | None = None,
    multiple_of: int | None = None,
    choices: Sequence[Any] | None = None,
    coerce: Callable[[Any], Any] | None = None,
) -> Any:
    """A config field declared once: its default, one-line help, and the checks :func:`load_config` applies.

    ``min``/``max`` are inclusive bounds, ``gt`` an exclusive lower bound and ``multiple_of`` a step, each
    checked on every element of a list; ``choices`` lists the allowed values where ``Literal`` does not fit;
    ``coerce`` rewrites the raw value before the type check (``256`` -> ``[256, 256]``). Without ``default``
    the field is required; list, dict and dataclass defaults are copied for each instance. The same keys work
    in a plain ``field(default=..., metadata={"help": ..., "min": ...})``.
    """
    if not help:
        raise TypeError("every config field needs a one-line help string")
    checks = {"min": min, "max": max, "gt": gt, "multiple_of": multiple_of, "choices": choices, "coerce": coerce}
    metadata = {"help": help, **{key: value for key, value in checks.items() if value is not None}}
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def load_config(files: Sequence[str | os.PathLike[str]] = (), overrides: Sequence[str] = (), *, schema: type[T]) -> T:
    """Merge YAML ``files`` in order, then ``key=value`` ``overrides``, and check the result against ``schema``.

    The schema's defaults form the bottom layer, so ``${train.checkpoint_every}`` works without setting it.
    Raises one :class:`ConfigError` listing every problem. A file that is missing or unparsable stops the
    check there (with the override problems), since errors about what it would have set would mislead.
    """
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    problems: list[str] = []
    layers = [read_yaml(path, problems) for path in files]
    parsed = [(text, *kv) for text in overrides if (kv := read_override(text, problems)) is not None]
    if any(layer is None for layer in layers):
        raise_problems(problems)
    merged = merge_layers([_escaped(schema_defaults(schema)), *layers], parsed, problems, whole_mappings(schema))
    data = resolve_node(merged, "", problems)
    cfg = build_dataclass(schema, data, "", problems)
    raise_problems(problems)
    return cfg


def config_from_dict(data: Mapping[str, Any], schema: type[T]) -> T:
    """Check plain data (as from :func:`config_to_dict`) against ``schema``; no files, no interpolation."""
    problems: list[str] = []
    cfg = build_dataclass(schema, data, "", problems)
    raise_problems(problems)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dicts, lists and scalars (tuples become lists), in field order."""
    if not is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return plain_data(cfg)


def _escaped(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return escape_interpolations(value) if isinstance(value, str) else value


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as resolved YAML that :func:`load_config` reads back equal; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(_escaped(config_to_dict(cfg)), Dumper=YamlDumper, sort_keys=False, allow_unicode=True)
    header = "# Resolved lvdm config: lvdm.config.load_config([this file]) reads it back.\n"
    from lvdm.fileio import atomic_path  # written whole or not at all: a run folder's config.yaml is rewritten

    with atomic_path(path) as temp:
        temp.write_text(header + text, encoding="utf-8")
    return path


def _flow(value: Any) -> str:
    """A default as one line of YAML: ``[256, 256]``, ``null``, ``videoldm``."""
    text = yaml.dump(plain_data(value), Dumper=YamlDumper, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _field_line(spec: Any, key: str, tp: Any) -> str:
    if spec.default is MISSING and spec.default_factory is MISSING:
        default = " (required)"
    else:
        default = " = " + _flow(spec.default if spec.default is not MISSING else spec.default_factory())
    bounds = [f"{sign} {spec.metadata[name]}" for name, (_, sign) in BOUNDS.items() if name in spec.metadata]
    if "choices" in spec.metadata:
        bounds.append("one of " + ", ".join(repr(choice) for choice in spec.metadata["choices"]))
    return f"{key}: {type_name(tp)}{default}" + (f" ({', '.join(bounds)})" if bounds else "")


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds directly, in a list, or as ``X | None``, if any."""
    if is_dataclass(tp):
        return tp
    inner = [arg for arg in get_args(tp) if is_dataclass(arg)]
    return inner[0] if inner else None


def _describe(cls: type, path: str, lines: list[str]) -> None:
    for spec in fields(cls):
        if not spec.init:
            continue
        tp, key = type_hints(cls)[spec.name], join_path(path, spec.name)
        if not spec.metadata.get("help"):
            raise TypeError(f"config field {cls.__name__}.{spec.name} has no help in its metadata")
        section = _section_type(tp)
        if section is tp:
            lines += ["", f"{key}: {spec.metadata['help']}"]
        else:
            lines += [_field_line(spec, key, tp), f"    {spec.metadata['help']}"]
        if section is not None:
            _describe(section, f"{key}[i]" if get_origin(tp) in (list, tuple) else key, lines)


def describe_config(schema: type) -> str:
    """Every key of ``schema`` with its type, default, range and help, for ``--help`` output."""
    lines: list[str] = []
    _describe(schema, "", lines)
    return "\n".join(lines).strip("\n")
