"""Config machinery: dataclasses as the schema, YAML files as the format, ``key=value`` on the command line.

Generic over any dataclass schema; lvdm's own schema lives in :mod:`lvdm.config`. See that module for the
rules (safe YAML 1.2 scalars, refused resolvers, all problems reported together). Imports no torch.
"""

from __future__ import annotations

import copy
import difflib
import functools
import operator
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lvdm.errors import ConfigError

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


# ---------------------------------------------------------------------------------------------------------------
# YAML: safe, YAML 1.2 scalars, no duplicate keys; OmegaConf interpolation limited to plain key references.
# ---------------------------------------------------------------------------------------------------------------

_TAG = "tag:yaml.org,2002:"
_YAML12_SCALARS = [
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$", "-+0123456789"),
    (
        "float",
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+0123456789.",
    ),
]


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no object construction) with YAML 1.2 scalars and no repeated keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _TAG + "merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} given twice", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 or 1.2 would read as something else (``no``, ``1e-4``)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in (_TAG + "null", _TAG + "merge")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _name, _regexp, _first in _YAML12_SCALARS:
    _Loader.add_implicit_resolver(_TAG + _name, re.compile(_regexp), list(_first))
    _Dumper.add_implicit_resolver(_TAG + _name, re.compile(_regexp), list(_first))

_UNESCAPED_INTERPOLATION = re.compile(r"(?<!\\)(?:\\\\)*\$\{")
_KEY_REFERENCE = re.compile(r"[\w.\[\]-]+\}")
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*")


def _calls_resolver(text: str) -> bool:
    """Whether ``text`` holds an interpolation other than a plain key reference such as ``${train.lr}``."""
    return any(not _KEY_REFERENCE.match(text, m.end()) for m in _UNESCAPED_INTERPOLATION.finditer(text))


def _escape_interpolations(text: str) -> str:
    """``text`` written so that OmegaConf reads it back literally: ``${x}`` -> ``\\${x}``."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def _refuse_resolvers(value: Any, path: str, source: str, problems: list[str]) -> Any:
    """``value`` with each resolver call reported and turned into literal text, so it is never evaluated."""
    if isinstance(value, Mapping):
        return {key: _refuse_resolvers(item, _join(path, key), source, problems) for key, item in value.items()}
    if isinstance(value, list):
        return [_refuse_resolvers(item, f"{path}[{i}]", source, problems) for i, item in enumerate(value)]
    if isinstance(value, str) and _calls_resolver(value):
        problems.append(
            f"{path}: {value!r} ({source}): only plain key references like ${{train.lr}} are interpolated;"
            " resolvers such as ${oc.env:...} are refused so that no environment value lands in a saved config"
        )
        return _escape_interpolations(value)
    return value


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join((where + (getattr(exc, "problem", None) or str(exc))).split())


def _read_yaml(path: str | os.PathLike[str], problems: list[str]) -> dict[str, Any] | None:
    """The mapping in a YAML file, or ``None`` (and a problem) when it cannot be read."""
    name = os.fspath(path)
    try:
        data = yaml.load(Path(name).read_text(encoding="utf-8"), Loader=_Loader)  # a SafeLoader: builds no objects
    except FileNotFoundError:
        problems.append(f"config file {name!r}: not found")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"config file {name!r}: cannot read: {exc}")
        return None
    except yaml.YAMLError as exc:
        problems.append(f"config file {name!r}: not valid YAML: {_yaml_reason(exc)}")
        return None
    if data is not None and not isinstance(data, dict):
        problems.append(f"config file {name!r}: expected a mapping of keys at the top level, got {_show(data)}")
        return None
    return _refuse_resolvers(data or {}, "", f"in {name}", problems)


def _read_override(text: str, problems: list[str]) -> tuple[str, Any] | None:
    """``"train.lr=1e-4"`` -> ``("train.lr", 0.0001)``: the value parsed as YAML; ``None`` if malformed."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        problems.append(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
        return None
    try:
        value = yaml.load(raw, Loader=_Loader)  # a SafeLoader: builds no objects
    except yaml.YAMLError as exc:
        problems.append(f"override {text!r}: the value is not valid YAML: {_yaml_reason(exc)}")
        return None
    return key, _refuse_resolvers(value, key, "on the command line", problems)


def _defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls`` as plain data (required sections recursed): interpolations can refer to them."""
    out = {}
    for spec in fields(cls):
        tp = _hints(cls)[spec.name]
        if spec.default is not MISSING:
            out[spec.name] = _plain(spec.default)
        elif spec.default_factory is not MISSING:
            out[spec.name] = _plain(spec.default_factory())
        elif is_dataclass(tp):
            out[spec.name] = _defaults(tp)
    return out


def _deep_merge(base: Any, update: Any) -> Any:
    """``update`` laid over ``base``: mappings merge key by key; anything else, lists included, replaces."""
    if isinstance(base, dict) and isinstance(update, dict):
        return {**base, **{key: _deep_merge(base.get(key), value) for key, value in update.items()}}
    return copy.deepcopy(update)


def _set_key(data: dict[str, Any], key: str, value: Any) -> str | None:
    """Lay ``value`` over dotted ``key`` (``a.b[0].c`` or ``a.b.0.c``) in ``data``; why it cannot be, if so."""
    parts = re.findall(r"[^.\[\]]+", key)
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            slot: Any = part
            if not last and node.get(part) is None:
                node[part] = {}
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            slot = int(part)
        else:
            return f"{'.'.join(parts[:depth])} is {_show(node)}, which has no item {part!r}"
        if last:
            node[slot] = _deep_merge(node[slot] if isinstance(node, list) else node.get(slot), value)
        node = node[slot]
    return None


def _merge(layers: list[dict[str, Any]], overrides: list[tuple[str, str, Any]], problems: list[str]) -> Any:
    """The layers merged in order, each override laid over its key, then as an OmegaConf node to resolve."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer)
    for text, key, value in overrides:
        if (reason := _set_key(merged, key, value)) is not None:
            problems.append(f"override {text!r}: cannot set {key}: {reason}")
    try:
        return OmegaConf.create(merged)
    except OmegaConfBaseException as exc:
        problems.append(f"config: {_first_line(exc)}")
        return OmegaConf.create()


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_INVALID = _Sentinel("<invalid>")  # a value that failed its checks (the problem is already recorded)
_UNSET = _Sentinel("???")  # OmegaConf's mandatory-value marker: "required, not set"
_BROKEN = _Sentinel("<unresolvable>")  # an interpolation that could not be resolved (already recorded)
_DEFAULT = _Sentinel("<default>")  # a field left out: its dataclass default applies


def _resolve(node: Any, path: str, problems: list[str]) -> Any:
    """Plain Python data from an OmegaConf node, resolving each interpolation on its own key."""
    if isinstance(node, DictConfig):
        keys, out = list(node.keys()), {}
    elif isinstance(node, ListConfig):
        keys, out = list(range(len(node))), {}
    else:
        return node
    for key in keys:
        sub = f"{path}[{key}]" if isinstance(node, ListConfig) else _join(path, key)
        try:
            value = _resolve(node[key], sub, problems)
        except MissingMandatoryValue:
            value = _UNSET
        except OmegaConfBaseException as exc:
            problems.append(f"{sub}: cannot resolve: {_first_line(exc)}")
            value = _BROKEN
        out[key] = value
    return list(out.values()) if isinstance(node, ListConfig) else out


# ---------------------------------------------------------------------------------------------------------------
# Checking plain data against the dataclasses.
# ---------------------------------------------------------------------------------------------------------------


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _show(value: Any) -> str:
    """``'ten' (str)``: a value and its type, as problems quote it."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp: Any) -> str:
    """How a type reads in a problem or in ``describe_config``: ``int or null``, ``list of int``."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return "[" + ", ".join(_type_name(arg) for arg in args) + "]"
    if origin in (list, tuple):
        return f"list of {_type_name(args[0] if args else Any)}"
    if origin is dict:
        key, value = args or (Any, Any)
        return f"mapping of {_type_name(key)} to {_type_name(value)}"
    return getattr(tp, "__name__", repr(tp))


def _mismatch(tp: Any, value: Any, path: str, problems: list[str]) -> _Sentinel:
    problems.append(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    return _INVALID


def _to_bool(value: Any) -> Any:
    return value if isinstance(value, bool) else _INVALID


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):
        return _INVALID
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else _INVALID


def _to_float(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # value != value: NaN
        return _INVALID
    return float(value)


def _to_str(value: Any) -> Any:
    return value if isinstance(value, str) else _INVALID


_SCALARS: dict[type, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _to_literal(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    choices = get_args(tp)
    if any(value == choice and type(value) is type(choice) for choice in choices):
        return value
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    problems.append(f"{path}: expected {_type_name(tp)}, got {_show(value)}{hint}")
    return _INVALID


def _same_shape(tp: Any, value: Any) -> bool:
    """Whether ``value`` is the right kind of container for ``tp``, so its inner problems are the useful ones."""
    origin = get_origin(tp) or tp
    if is_dataclass(tp) or origin is dict:
        return isinstance(value, Mapping)
    return origin in (list, tuple) and isinstance(value, (list, tuple))


def _to_union(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    arms = [arg for arg in args if arg is not type(None)]
    scratch: list[str] = []
    for arm in arms:
        scratch = []
        out = _convert(arm, value, path, scratch)
        if out is not _INVALID:
            problems.extend(scratch)
            return out
    if len(arms) == 1 and _same_shape(arms[0], value):
        problems.extend(scratch)
        return _INVALID
    return _mismatch(tp, value, path, problems)


def _to_sequence(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """``list[X]``, ``tuple[X, ...]`` or a fixed ``tuple[X, Y]``, each given as a YAML list."""
    origin, args = get_origin(tp) or tp, get_args(tp)
    fixed = origin is tuple and args and args[-1] is not Ellipsis
    if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(args)):
        return _mismatch(tp, value, path, problems)
    item_types = args if fixed else [args[0] if args else Any] * len(value)
    pairs = enumerate(zip(item_types, value, strict=True))
    items = [_convert(item_type, item, f"{path}[{i}]", problems) for i, (item_type, item) in pairs]
    if any(item is _INVALID for item in items):
        return _INVALID
    return tuple(items) if origin is tuple else items


def _to_dict(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    key_type, value_type = get_args(tp) or (Any, Any)
    if not isinstance(value, Mapping):
        return _mismatch(tp, value, path, problems)
    out = {}
    for key, item in value.items():
        out[_convert(key_type, key, f"{path} (key {key!r})", problems)] = _convert(
            value_type, item, _join(path, key), problems
        )
    return _INVALID if _INVALID in out or _INVALID in out.values() else out


_GENERICS: dict[Any, Callable[[Any, Any, str, list[str]], Any]] = {
    Literal: _to_literal,
    Union: _to_union,
    types.UnionType: _to_union,
    list: _to_sequence,
    tuple: _to_sequence,
    dict: _to_dict,
}


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """``value`` checked against type ``tp`` (and converted: int -> float, list -> tuple), or ``_INVALID``."""
    if value is _BROKEN:
        return _INVALID
    if value is _UNSET:
        problems.append(f"{path}: required, not set (still '???')")
        return _INVALID
    if tp is Any:
        return value
    if is_dataclass(tp):
        return _build(tp, value, path, problems)
    origin = get_origin(tp) or tp
    if origin in _GENERICS:
        return _GENERICS[origin](tp, value, path, problems)
    if tp in _SCALARS:
        out = _SCALARS[tp](value)
        return _mismatch(tp, value, path, problems) if out is _INVALID else out
    raise TypeError(f"{path}: config fields of type {tp!r} are not supported")


_BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "min": (operator.ge, ">="),
    "max": (operator.le, "<="),
    "gt": (operator.gt, ">"),
    "multiple_of": (lambda value, step: value % step == 0, "a multiple of"),
}


def _range_problems(value: Any, metadata: Mapping[str, Any], path: str) -> list[str]:
    """The field's declared bounds and ``choices`` checked on ``value`` (or each list element)."""
    if isinstance(value, (list, tuple)):
        return [p for i, item in enumerate(value) for p in _range_problems(item, metadata, f"{path}[{i}]")]
    problems = []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, (within, sign) in _BOUNDS.items():
            if key in metadata and not within(value, metadata[key]):
                problems.append(f"{path}: must be {sign} {metadata[key]}, got {value!r}")
    if value is not None and "choices" in metadata and value not in metadata["choices"]:
        allowed = ", ".join(repr(choice) for choice in metadata["choices"])
        problems.append(f"{path}: expected one of {allowed}, got {_show(value)}")
    return problems


def _field_value(spec: Any, tp: Any, data: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    """One dataclass field's checked value from ``data``; ``_DEFAULT`` if left out and defaulted."""
    if spec.name not in data:
        if spec.default is not MISSING or spec.default_factory is not MISSING:
            return _DEFAULT
        if is_dataclass(tp):  # a missing section: report the fields it needs, not the section
            return _build(tp, {}, path, problems)
        problems.append(f"{path}: required, not set")
        return _INVALID
    raw = data[spec.name]
    coerce = spec.metadata.get("coerce")
    value = _convert(tp, coerce(raw) if coerce and not isinstance(raw, _Sentinel) else raw, path, problems)
    if value is not _INVALID:
        problems.extend(_range_problems(value, spec.metadata, path))
    return value


def _unknown_key(path: str, key: Any, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean '{_join(path, close[0])}'?)" if close else ""
    return f"unknown key '{_join(path, key)}'{hint}"


def _run_validate(instance: Any, path: str, known: list[str], problems: list[str]) -> None:
    """The dataclass's own ``validate()`` rules, each message put under the section's key path."""
    validate = getattr(instance, "validate", None)
    for message in validate() if callable(validate) else ():
        head = re.match(r"[A-Za-z_]\w*", message)
        if not path:
            problems.append(message)
        elif head and head.group() in known:
            problems.append(f"{path}.{message}")
        else:
            problems.append(f"{path}: {message}")


def _build(cls: type[T], data: Any, path: str, problems: list[str]) -> T | _Sentinel:
    """``data`` checked against dataclass ``cls``: the instance, or ``_INVALID`` with its problems recorded."""
    if not isinstance(data, Mapping):
        return _mismatch(cls, data, path or "config", problems)
    specs = [spec for spec in fields(cls) if spec.init]
    known = [spec.name for spec in specs]
    problems.extend(_unknown_key(path, key, known) for key in data if key not in known)
    values, complete = {}, True
    for spec in specs:
        value = _field_value(spec, _hints(cls)[spec.name], data, _join(path, spec.name), problems)
        if value is _INVALID:
            complete = False
        elif value is not _DEFAULT:
            values[spec.name] = value
    if not complete:
        return _INVALID
    instance = cls(**values)
    _run_validate(instance, path, known, problems)
    return instance


def _raise_problems(problems: list[str]) -> None:
    """One :class:`ConfigError` listing every problem, one per line (also kept as ``error.problems``)."""
    if not problems:
        return
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    error = ConfigError(f"invalid config ({count}):\n" + "\n".join(f"  {problem}" for problem in problems))
    error.problems = list(problems)
    raise error


# ---------------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------------


def load_config(files: Sequence[str | os.PathLike[str]] = (), overrides: Sequence[str] = (), *, schema: type[T]) -> T:
    """Merge YAML ``files`` in order, then ``key=value`` ``overrides``, and check the result against ``schema``.

    The schema's defaults form the bottom layer, so ``${train.checkpoint_every}`` works without setting it.
    Raises one :class:`ConfigError` listing every problem. A file that is missing or unparsable stops the
    check there (with the override problems), since errors about what it would have set would mislead.
    """
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    problems: list[str] = []
    layers = [_read_yaml(path, problems) for path in files]
    parsed = [(text, *kv) for text in overrides if (kv := _read_override(text, problems)) is not None]
    if any(layer is None for layer in layers):
        _raise_problems(problems)
    data = _resolve(_merge([_escaped(_defaults(schema)), *layers], parsed, problems), "", problems)
    cfg = _build(schema, data, "", problems)
    _raise_problems(problems)
    return cfg


def config_from_dict(data: Mapping[str, Any], schema: type[T]) -> T:
    """Check plain data (as from :func:`config_to_dict`) against ``schema``; no files, no interpolation."""
    problems: list[str] = []
    cfg = _build(schema, data, "", problems)
    _raise_problems(problems)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dicts, lists and scalars (tuples become lists), in field order."""
    if not is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {spec.name: _plain(getattr(value, spec.name)) for spec in fields(value) if spec.init}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _escaped(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return _escape_interpolations(value) if isinstance(value, str) else value


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as resolved YAML that :func:`load_config` reads back equal; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(_escaped(config_to_dict(cfg)), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    header = "# Resolved lvdm config: lvdm.config.load_config([this file]) reads it back.\n"
    path.write_text(header + text, encoding="utf-8")
    return path


def _flow(value: Any) -> str:
    """A default as one line of YAML: ``[256, 256]``, ``null``, ``videoldm``."""
    text = yaml.dump(_plain(value), Dumper=_Dumper, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def _field_line(spec: Any, key: str, tp: Any) -> str:
    if spec.default is MISSING and spec.default_factory is MISSING:
        default = " (required)"
    else:
        default = " = " + _flow(spec.default if spec.default is not MISSING else spec.default_factory())
    bounds = [f"{sign} {spec.metadata[name]}" for name, (_, sign) in _BOUNDS.items() if name in spec.metadata]
    if "choices" in spec.metadata:
        bounds.append("one of " + ", ".join(repr(choice) for choice in spec.metadata["choices"]))
    return f"{key}: {_type_name(tp)}{default}" + (f" ({', '.join(bounds)})" if bounds else "")


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
        tp, key = _hints(cls)[spec.name], _join(path, spec.name)
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
