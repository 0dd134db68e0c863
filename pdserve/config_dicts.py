"""Frozen dataclasses from YAML mappings, checked field by field: the serving config's loader.

`build_dataclass(cls, data, path)` rejects unknown keys and coerces only where it is safe (an int
where a float is declared); every error is a `ConfigError` whose message starts with the field's
dotted path (`decode.tp: expected int, got 'two'`). Literals, optionals, unions, nested dataclasses
and `dict[str, T]` are understood; nothing else is guessed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the field's dotted path."""


def build_dataclass(cls: type, data: dict[str, Any], path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{path}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}{e}") from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value if value is not None else {}, path + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{path}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
