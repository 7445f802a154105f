"""Typed-dataclass configuration machinery (litgpt style): YAML files and ``--set`` overrides are
checked against the dataclass annotations, and field docs become ``--help``.

A config is a tree of dataclasses. Every field carries a ``metadata={"doc": "..."}`` string; the
annotation is the schema. Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``Any``,
``Literal[...]``, ``X | None`` and other unions, ``list[X]``, ``tuple[X, ...]``, fixed tuples,
``dict[K, V]`` and nested dataclasses.

Coercion is deliberately narrow, so a typo is an error rather than a silent surprise:

- ``float`` also takes an int and a numeric string (PyYAML 1.1 reads ``1e-4`` as a *string*);
- ``int`` also takes an integral float (``2.0``) and an integer string;
- ``bool`` takes only booleans (YAML already maps true/false/yes/no/on/off);
- ``str`` takes only strings; ``list``/``tuple`` take a YAML list (a scalar is not wrapped).

Errors are :class:`ConfigError` (a ``ValueError``) and always name the source (file path or
``--set``), the full dotted key and, for an unknown key, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "field_docs",
    "from_dict",
    "help_text",
    "keys",
    "load_config",
    "load_yaml",
    "missing_docs",
    "to_dict",
    "type_name",
]

T = TypeVar("T")

_NO_DEFAULT = object()


class ConfigError(ValueError):
    """A configuration problem, with the source and dotted key in the message."""


# ---------------------------------------------------------------------------------------------
# Type introspection


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves string annotations (`from __future__ import annotations`).
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def type_name(tp: Any) -> str:
    """A short readable name for an annotation: ``list[str] | str``, ``'auto' | 'cpu'``."""
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------------------------
# Coercion of one value against one annotation


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{where}: '{key}' expects {type_name(tp)}, got {_describe(value)}")

    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise bad()
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, key, where)
        raise ConfigError(
            f"{where}: '{key}' is a section ({tp.__name__}) and expects a mapping, got {_describe(value)}"
        )
    if _is_union(tp):
        members = typing.get_args(tp)
        # Exact matches first, so `list[str] | str` keeps a string a string and `bool | Literal['auto']`
        # keeps True a bool; only then try the coercing conversions in declaration order.
        for m in members:
            if _matches_exactly(value, m):
                return _coerce(value, m, key, where)
        for m in members:
            try:
                return _coerce(value, m, key, where)
            except ConfigError:
                continue
        raise bad()
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool | float):
            return value
        choices = ", ".join(repr(a) for a in typing.get_args(tp))
        raise ConfigError(f"{where}: '{key}' must be one of {choices}, got {_describe(value)}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise bad()
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{where}: '{key}' expects {len(args)} values ({type_name(tp)}), got {_describe(value)}"
            )
        return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad()
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, k_tp, f"{key}.<key>", where): _coerce(v, v_tp, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        # Non-finite values are refused here, for every float key at once (validate.py says why).
        if isinstance(value, int | float) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(out):
            raise ConfigError(f"{where}: '{key}' expects a finite float, got {_describe(value)}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    raise ConfigError(f"{where}: '{key}' has an unsupported annotation {tp!r} (config machinery limitation)")


def _matches_exactly(value: Any, tp: Any) -> bool:
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is Literal:
        return value in typing.get_args(tp) and not isinstance(value, bool | float)
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, tp) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return isinstance(value, list | tuple)
    if origin is dict or (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
        return isinstance(value, Mapping) or (isinstance(tp, type) and isinstance(value, tp))
    return False


# ---------------------------------------------------------------------------------------------
# Building, dumping


def _closest(name: str, prefix: str, cls: type, root: type | None) -> str:
    """' — did you mean …?' for an unknown key: the same leaf name in another section, else the
    closest sibling, else the closest leaf anywhere, else the list of valid keys."""
    siblings = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    leaves = keys(root) if root is not None else []
    # A right key in the wrong section (top-level `lr:`) is the likeliest mistake: check it first.
    by_leaf = [k for k in leaves if k.rsplit(".", 1)[-1] == name]
    if by_leaf:
        return f" — did you mean '{by_leaf[0]}'?"
    match = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if match:
        return f" — did you mean '{_join(prefix, match[0])}'?"
    # Short keys defeat difflib ratios ('rank' vs 'r' is 0.4): the longest sibling the key starts
    # with, else a sibling that starts with the key ('warmup' → 'warmup_ratio').
    stems = sorted((s for s in siblings if name.startswith(s)), key=len, reverse=True)
    stems += [s for s in siblings if s.startswith(name)]
    if stems:
        return f" — did you mean '{_join(prefix, stems[0])}'?"
    tails = {k.rsplit(".", 1)[-1]: k for k in leaves}
    match = difflib.get_close_matches(name, list(tails), n=1, cutoff=0.75)
    if match:
        return f" — did you mean '{tails[match[0]]}'?"
    return f" (valid keys{' in ' + repr(prefix) if prefix else ''}: {', '.join(siblings)})"


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, where: str, root: type | None = None) -> T:
    root = root or cls
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: '{prefix or '<root>'}' expects a mapping, got {_describe(data)}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if not isinstance(name, str) or name not in names:
            raise ConfigError(
                f"{where}: unknown key '{_join(prefix, str(name))}'{_closest(str(name), prefix, cls, root)}"
            )
        tp = hints[name]
        if (
            dataclasses.is_dataclass(tp)
            and isinstance(tp, type)
            and (value is None or isinstance(value, Mapping))
        ):
            # A partial section fills in from the *parent's* default for it (TrainConfig's lora has
            # r=16, not LoraConfig's r=8), so a file means "these keys differ from --help". An empty
            # section (`lora:` with everything commented out) is that default.
            base = _field_default(fields[name])
            value = (
                _deep_merge(to_dict(base), value or {}) if dataclasses.is_dataclass(base) else (value or {})
            )
        kwargs[name] = _coerce(value, tp, _join(prefix, name), where)
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.init
        and f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(_join(prefix, m) for m in missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        # __post_init__ validation: keep its message, add where it came from.
        raise ConfigError(f"{where}: invalid {repr(prefix) if prefix else 'config'}: {e}") from e


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "<dict>") -> T:
    """Build the dataclass ``cls`` (recursively) from plain data, type-checking every value.

    ``where`` names the source in error messages (a file path, ``--set``)."""
    return _build(cls, data or {}, "", where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-dumpable data (tuples become lists) that ``from_dict`` reads back to an equal config."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return typing.cast(dict[str, Any], _plain(cfg))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one, which hides typos)."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        k = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        line = key_node.start_mark.line + 1
        if k in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {k!r} (first on line {seen[k]})", key_node.start_mark
            )
        seen[k] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping. Syntax errors name ``file:line:column``; an empty file is ``{}``."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; expected a YAML config file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not valid UTF-8 (byte {e.start}); a config file is UTF-8 YAML text") from e
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{loc}: YAML syntax error: {what}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: YAML error: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _parse_override(item: str, where: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{where}: override {item!r} must look like 'section.key=value'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse the value of {key!r} ({raw!r}) as YAML: {e}") from e
    return key, value


def apply_overrides(cfg: T, overrides: Sequence[str], where: str = "--set") -> T:
    """Return a new config with ``key.path=value`` overrides applied (values parsed with
    ``yaml.safe_load``, then type-checked like a file). ``__post_init__`` validation re-runs."""
    if not overrides:
        return cfg
    cls = type(cfg)
    data = to_dict(cfg)
    for item in overrides:
        key, value = _parse_override(item, where)
        parts = key.split(".")
        node: Any = data
        section: type = cls
        for depth, part in enumerate(parts):
            prefix = ".".join(parts[:depth])
            names = {f.name for f in dataclasses.fields(section)}  # type: ignore[arg-type]
            if part not in names:
                raise ConfigError(f"{where}: unknown key '{key}'{_closest(part, prefix, section, cls)}")
            tp = _hints(section)[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
                    node[part] = _deep_merge(node[part], value)  # `lora={r: 4}` updates, not replaces
                else:
                    node[part] = value
            elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
                node, section = node[part], tp
            else:
                raise ConfigError(
                    f"{where}: '{'.'.join(parts[: depth + 1])}' is a {type_name(tp)} value, not a section"
                )
    return from_dict(cls, data, where=where)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults ← YAML file (optional) ← ``--set`` overrides, validated at each step."""
    cfg = from_dict(cls, load_yaml(path), where=str(path)) if path is not None else from_dict(cls, {})
    return apply_overrides(cfg, overrides)


# ---------------------------------------------------------------------------------------------
# Documentation


def field_docs(cls: type, defaults: Any = _NO_DEFAULT) -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type name, default, doc)`` for every leaf field, depth first.

    Defaults come from a default-constructed ``cls`` when possible, so a parent that overrides a
    section's defaults (e.g. ``lora`` with ``r=16``) shows the values actually used."""
    if defaults is _NO_DEFAULT:
        try:
            defaults = cls()
        except TypeError:
            defaults = None
    rows: list[tuple[str, str, Any, str]] = []
    _walk_docs(cls, defaults, "", rows)
    return rows


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT


def _walk_docs(cls: type, instance: Any, prefix: str, rows: list[tuple[str, str, Any, str]]) -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = _join(prefix, f.name)
        tp = hints[f.name]
        value = getattr(instance, f.name) if instance is not None else _field_default(f)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            _walk_docs(tp, value if value is not _NO_DEFAULT else None, key, rows)
        else:
            rows.append((key, type_name(tp), value, str(f.metadata.get("doc", ""))))


def keys(cls: type) -> list[str]:
    """Every leaf dotted key of a config class."""
    return [k for k, _, _, _ in field_docs(cls, defaults=None)]


def missing_docs(cls: type) -> list[str]:
    """Dotted keys (sections included) whose field has no ``metadata['doc']``: should be empty."""
    out: list[str] = []

    def walk(c: type, prefix: str) -> None:
        hints = _hints(c)
        for f in dataclasses.fields(c):  # type: ignore[arg-type]
            key = _join(prefix, f.name)
            if not f.metadata.get("doc"):
                out.append(key)
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp) and isinstance(tp, type):
                walk(tp, key)

    walk(cls, "")
    return out


def help_text(cls: type, width: int = 100) -> str:
    """Every dotted key with its type, default and doc, grouped by section: the ``--help`` body."""
    import textwrap

    lines: list[str] = []
    section = None
    rows = field_docs(cls)
    rows.sort(key=lambda r: "." in r[0])  # top-level keys first; stable, so sections keep their order
    for key, tname, default, doc in rows:
        head = key.rsplit(".", 1)[0] if "." in key else ""
        if head != section:
            section = head
            lines.append("")
            lines.append(f"[{head}]" if head else "[top level]")
        shown = "(required)" if default is _NO_DEFAULT else repr(_plain(default))
        lines.append(f"  {key}: {tname} = {shown}")
        for ln in textwrap.wrap(doc or "(undocumented)", width=width - 6):
            lines.append(f"      {ln}")
    return "\n".join(lines).lstrip("\n")
