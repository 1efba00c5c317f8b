"""Reading config YAML and ``key=value`` overrides, merged in order into plain data.

Safe YAML with YAML 1.2 scalars and no duplicate keys; OmegaConf interpolation limited to plain key references.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, get_origin

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lvdm.configlib.common import BROKEN, UNSET, first_line, join_path, plain_data, show_value, type_hints
from lvdm.fileio import read_bounded

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


def _refuse_tag(loader: _Loader, node: yaml.Node) -> None:
    """YAML types a config cannot hold (sets, dates, ordered pairs) are refused where they are written: the config
    merge refused them too, but dropped the whole file, and then named every key it set as missing."""
    raise yaml.constructor.ConstructorError(
        None,
        None,
        f"{node.tag.replace(_TAG, '!!')} is not a config value (use a list, a string or a number)",
        node.start_mark,
    )


for _tag in ("set", "timestamp", "omap", "pairs"):
    _Loader.add_constructor(_TAG + _tag, _refuse_tag)


class YamlDumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 or 1.2 would read as something else (``no``, ``1e-4``)."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        """A string holding NEL (U+0085) double-quoted, where it is escaped: single-quoted, PyYAML wrote it as a line
        break, and the saved config read it back as a space."""
        if "\x85" in data:
            return self.represent_scalar("tag:yaml.org,2002:str", data, style='"')
        return super().represent_str(data)


YamlDumper.add_representer(str, YamlDumper.represent_str)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in (_TAG + "null", _TAG + "merge")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _name, _regexp, _first in _YAML12_SCALARS:
    _Loader.add_implicit_resolver(_TAG + _name, re.compile(_regexp), list(_first))
    YamlDumper.add_implicit_resolver(_TAG + _name, re.compile(_regexp), list(_first))

_UNESCAPED_INTERPOLATION = re.compile(r"(?<!\\)(?:\\\\)*\$\{")
_KEY_REFERENCE = re.compile(r"[\w.\[\]-]+\}")
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*")


def _calls_resolver(text: str) -> bool:
    """Whether ``text`` holds an interpolation other than a plain key reference such as ``${train.lr}``."""
    return any(not _KEY_REFERENCE.match(text, m.end()) for m in _UNESCAPED_INTERPOLATION.finditer(text))


def escape_interpolations(text: str) -> str:
    """``text`` written so that OmegaConf reads it back literally: ``${x}`` -> ``\\${x}``."""
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)


def _refuse_resolvers(value: Any, path: str, source: str, problems: list[str]) -> Any:
    """``value`` with each resolver call reported and turned into literal text, so it is never evaluated."""
    if isinstance(value, Mapping):
        return {key: _refuse_resolvers(item, join_path(path, key), source, problems) for key, item in value.items()}
    if isinstance(value, list):
        return [_refuse_resolvers(item, f"{path}[{i}]", source, problems) for i, item in enumerate(value)]
    if isinstance(value, str) and _calls_resolver(value):
        problems.append(
            f"{path}: {value!r} ({source}): only plain key references like ${{train.lr}} are interpolated;"
            " resolvers such as ${oc.env:...} are refused so that no environment value lands in a saved config"
        )
        return escape_interpolations(value)
    return value


MAX_DEPTH = 64  # nesting levels, aliases expanded
MAX_NODES = 100_000  # values, aliases expanded (a "billion laughs" document expands to far more)
MAX_BYTES = 16 << 20


class _TooComplex(yaml.YAMLError):
    """A document refused before it is built: too deep, too large once aliases are expanded, or self-referring."""


def _load_yaml(text: str) -> Any:
    """``yaml.load`` with the safe loader, refusing nesting deeper than MAX_DEPTH and alias bombs, quickly."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):  # an event stream: no recursion, so depth is safe to count
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise _TooComplex(f"nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, 1)
        try:
            return loader.construct_document(node)
        except ValueError as exc:  # an integer of more digits than Python converts (4300), ...
            raise _TooComplex(f"a value cannot be read ({str(exc).split(':')[0]})") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], level: int) -> int:
    """Values in ``node`` with every alias expanded; raises past MAX_DEPTH levels (or a cycle) or MAX_NODES."""
    if level > MAX_DEPTH:
        raise _TooComplex(f"nested over {MAX_DEPTH} levels deep with aliases expanded (or an alias refers to itself)")
    if id(node) in sizes:
        return sizes[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, level + 1) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, level + 1) + _expanded_size(v, sizes, level + 1) for k, v in node.value)
    if size > MAX_NODES:
        raise _TooComplex(f"more than {MAX_NODES:,} values once aliases are expanded (an alias bomb?)")
    sizes[id(node)] = size
    return size


def _yaml_reason(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join((where + (getattr(exc, "problem", None) or str(exc))).split())


def read_yaml(path: str | os.PathLike[str], problems: list[str]) -> dict[str, Any] | None:
    """The mapping in a YAML file, or ``None`` (and a problem) when it cannot be read."""
    name = os.fspath(path)
    try:
        data = _load_yaml(read_bounded(name, MAX_BYTES).decode("utf-8"))  # a SafeLoader: builds no objects
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
        problems.append(f"config file {name!r}: expected a mapping of keys at the top level, got {show_value(data)}")
        return None
    return _refuse_resolvers(data or {}, "", f"in {name}", problems)


def read_override(text: str, problems: list[str]) -> tuple[str, Any] | None:
    """``"train.lr=1e-4"`` -> ``("train.lr", 0.0001)``: the value parsed as YAML; ``None`` if malformed."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    shown = repr(text) if len(text) <= 200 else repr(text[:200]) + " (cut)"
    if not sep or not _OVERRIDE_KEY.fullmatch(key):
        problems.append(f"override {shown}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
        return None
    try:
        value = _load_yaml(raw)  # a SafeLoader: builds no objects
    except yaml.YAMLError as exc:
        problems.append(f"override {shown}: the value is not valid YAML: {_yaml_reason(exc)}")
        return None
    return key, _refuse_resolvers(value, key, "on the command line", problems)


def schema_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls`` as plain data (required sections recursed): interpolations can refer to them."""
    out = {}
    for spec in fields(cls):
        tp = type_hints(cls)[spec.name]
        if spec.default is not MISSING:
            out[spec.name] = plain_data(spec.default)
        elif spec.default_factory is not MISSING:
            out[spec.name] = plain_data(spec.default_factory())
        elif is_dataclass(tp):
            out[spec.name] = schema_defaults(tp)
    return out


def whole_mappings(cls: type, path: str = "") -> frozenset[str]:
    """The key paths of ``cls``'s mapping-valued fields (``train.tasks``): a value, which a later layer replaces
    whole, where a section merges key by key (``train.tasks={interpolate: 1}`` over a config's ``{text: 1}`` gave
    both, and ``train.tasks={}`` changed nothing)."""
    out: set[str] = set()
    for spec in fields(cls):
        tp, key = type_hints(cls)[spec.name], join_path(path, spec.name)
        if is_dataclass(tp):
            out |= whole_mappings(tp, key)
        elif (get_origin(tp) or tp) is dict:
            out.add(key)
    return frozenset(out)


def _deep_merge(base: Any, update: Any, path: str = "", whole: frozenset[str] = frozenset()) -> Any:
    """``update`` laid over ``base``: mappings merge key by key, but for those at the ``whole`` key paths; anything
    else, lists included, replaces."""
    if isinstance(base, dict) and isinstance(update, dict) and path not in whole:
        merged = {key: _deep_merge(base.get(key), value, join_path(path, key), whole) for key, value in update.items()}
        return {**base, **merged}
    return copy.deepcopy(update)


def _set_key(data: dict[str, Any], key: str, value: Any, whole: frozenset[str]) -> str | None:
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
            return f"{'.'.join(parts[:depth])} is {show_value(node)}, which has no item {part!r}"
        if last:
            old = node[slot] if isinstance(node, list) else node.get(slot)
            node[slot] = _deep_merge(old, value, ".".join(parts), whole)
        node = node[slot]
    return None


def merge_layers(
    layers: list[dict[str, Any]],
    overrides: list[tuple[str, str, Any]],
    problems: list[str],
    whole: frozenset[str] = frozenset(),
) -> Any:
    """The layers merged in order, each override laid over its key, then as an OmegaConf node to resolve; a mapping
    at one of the ``whole`` key paths is replaced, not merged."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer, "", whole)
    for text, key, value in overrides:
        if (reason := _set_key(merged, key, value, whole)) is not None:
            problems.append(f"override {text!r}: cannot set {key}: {reason}")
    try:
        return OmegaConf.create(merged)
    except OmegaConfBaseException as exc:
        problems.append(f"config: {first_line(exc)}")
        return OmegaConf.create()


def resolve_node(node: Any, path: str, problems: list[str]) -> Any:
    """Plain Python data from an OmegaConf node, resolving each interpolation on its own key."""
    if isinstance(node, DictConfig):
        keys, out = list(node.keys()), {}
    elif isinstance(node, ListConfig):
        keys, out = list(range(len(node))), {}
    else:
        return node
    for key in keys:
        sub = f"{path}[{key}]" if isinstance(node, ListConfig) else join_path(path, key)
        try:
            value = resolve_node(node[key], sub, problems)
        except MissingMandatoryValue:
            value = UNSET
        except OmegaConfBaseException as exc:
            problems.append(f"{sub}: cannot resolve: {first_line(exc)}")
            value = BROKEN
        out[key] = value
    return list(out.values()) if isinstance(node, ListConfig) else out
