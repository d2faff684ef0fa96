"""Build typed dataclass configs from YAML recipes and command-line overrides.

Contract
--------
* ``build(cls, data, where)`` turns a nested dict into dataclass ``cls``: unknown keys fail with a
  "did you mean" suggestion, values are checked against the field's annotation (int, float, bool, str,
  Literal, Optional, list, dict, nested dataclasses), and the dataclass's own ``__post_init__`` validates
  ranges. Every failure is a ``ConfigError`` whose message is one line naming the key path and the fix.
* ``apply_overrides(data, overrides)`` applies ``section.key=value`` strings (values parsed as YAML scalars)
  and the engines' pass-through flags ``--sglang-<name> <value>`` / ``--megatron-<name> <value>`` into
  ``rollout.engine_args`` / ``train.megatron_args``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message is one line naming the key and the fix."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(p)!r} does not exist; pass a YAML file (see examples/)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {str(p)!r} is not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"recipe {str(p)!r}{where}: {problem}; fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(p)!r} must be a mapping of sections, got {type(data).__name__}")
    return data


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(choices))}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}={value!r} does not match {_type_name(tp)}"
        )
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{where}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}")
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted on/off (and yes/no) as a boolean; the choice fields spell them on/off.
            return "on" if value else "off"
        raise ConfigError(f"{where}={value!r} must be a string")
    return value


def build(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data`` with type checks and "did you mean" for unknown keys."""
    data = data or {}
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {path!r}; {_suggest(str(key), list(fields))}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        # Component configs name their section already ("rollout.top_p=..."); others get it prefixed.
        prefix = f"{where}: " if where and not str(exc).startswith(f"{where}.") else ""
        raise ConfigError(f"{prefix}{exc}") from None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a config tree (for the resolved-config file in the run directory)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


PASS_THROUGH = {"--sglang-": ("rollout", "engine_args"), "--megatron-": ("train", "megatron_args")}


def parse_scalar(raw: str) -> Any:
    """A YAML scalar, except that "2e-6" is a float (YAML 1.1 would keep it a string)."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` and ``--sglang-x v`` / ``--megatron-x v`` overrides to a recipe dict (copied)."""
    import copy

    out = copy.deepcopy(data)
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        prefix = next((p for p in PASS_THROUGH if item.startswith(p)), None)
        if prefix:
            name, _, inline = item[len(prefix) :].partition("=")
            if not name:
                raise ConfigError(f"override {item!r} has no name; use {prefix}<name> <value>")
            if inline:
                raw = inline
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                raw, i = items[i + 1], i + 1
            else:
                raw = "true"  # a bare flag, e.g. --sglang-enable-metrics
            section, key = PASS_THROUGH[prefix]
            _set_dotted(out, f"{section}.{key}.{name.replace('-', '_')}", parse_scalar(raw))
        elif "=" in item and not item.startswith("-"):
            key, _, raw = item.partition("=")
            _set_dotted(out, key.strip(), parse_scalar(raw) if raw else "")
        else:
            raise ConfigError(
                f"cannot parse override {item!r}; use section.key=value or --sglang-<name> <value>"
            )
        i += 1
    return out
