"""The check of config values against their dataclass's type hints: one walker for a recipe's
plain data (:func:`from_data`, what :mod:`jaxtune.config` reads YAML with) and for a dataclass built
in Python (:func:`check_fields`, called by the sections' ``__post_init__``), so that both get the
same one-line errors naming ``section.field``. Beside the layers, it imports none: the sections
live in the layers below :mod:`jaxtune.config` and may not import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal


class ConfigError(ValueError):
    """A config (file, override or value) is invalid; the message names the field and the fix.

    ``field``: where the fault is, as a path of keys (``("optimizer", "learnig_rate")``; an int
    indexes a list), when one key is at fault: the reader of a recipe file adds the file and line
    that key is written on (:func:`jaxtune.config.load`)."""

    def __init__(self, message: str, field: tuple[str | int, ...] | None = None) -> None:
        super().__init__(message)
        self.field = field


def field_path(where: str) -> tuple[str | int, ...]:
    """The keys of a dotted field name as the messages write it: ``eval.choices[0]`` ->
    ``("eval", "choices", 0)``."""
    return tuple(int(part[1:-1]) if part.startswith("[") else part
                 for part in re.findall(r"\[\d+\]|[^.\[\]]+", where))


def _error(where: str, message: str) -> ConfigError:
    """The error ``where: message`` about the field ``where``."""
    return ConfigError(f"{where}: {message}", field_path(where))


def _suggest(value: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe(hint: Any) -> str:
    """What a type hint accepts, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin in (list, tuple, Sequence):
        return "a list"
    if origin in (dict, Mapping) or dataclasses.is_dataclass(hint):
        return "a mapping"
    return str(hint)


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (and normalised: lists -> tuples, ints -> floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arm, where)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1 and not str(errors[0]).startswith(f"{where}: "):
            raise errors[0]  # X | None failing inside X (a list item, a nested field): name that spot
        literal = next((a for a in args if typing.get_origin(a) is Literal), None)
        if literal is not None and isinstance(value, str):
            raise errors[[a for a in args if a is not type(None)].index(literal)]
        raise _error(where, f"expected {describe(hint)}, got {_show(value)}")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _error(where, f"expected one of {', '.join(str(a) for a in args)}, got {_show(value)}"
                     + _suggest(value, args))
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_data(hint, value, where)  # built: checked itself
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)  # numpy's integers too, from Python callers
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()) and float(value).is_integer():
            return int(float(value))  # YAML 1.1 reads 1e3 as a string
    elif hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            raise _error(where, f"expected a string, got {_show(value)} (YAML reads unquoted yes/no/on/off as "
                                "booleans: quote the word, e.g. 'yes')")
    elif origin in (tuple, list, Sequence):
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return tuple(coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif origin in (dict, Mapping):
        if isinstance(value, Mapping):
            key_t, val_t = args if args else (Any, Any)
            return {coerce(k, key_t, f"{where}"): coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"config schema: unsupported type {hint!r} at {where}")
    raise _error(where, f"expected {describe(hint)}, got {_show(value)}")


def from_data(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, checking every key and value by type hint."""
    name = where or "config"
    here = field_path(where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hidden = {name: f.metadata["config"] for name, f in fields.items() if "config" in f.metadata}
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}: expected a mapping with keys {', '.join(fields)}, got {_show(data)}", here or None)
    for key in data:
        if key in hidden:
            raise ConfigError(f"{where}.{key}: not a config field: {hidden[key]}" if where else f"{key}: {hidden[key]}",
                              (*here, key))
        if key not in fields:
            inside = f" in {where}" if where else ""
            raise ConfigError(f"unknown key {key!r}{inside} "
                              f"(allowed: {', '.join(k for k in fields if k not in hidden)})"
                              + _suggest(key, [k for k in fields if k not in hidden]), (*here, key))
    hints = type_hints(cls)
    kwargs = {}
    for key, f in fields.items():
        path = f"{where}.{key}" if where else key
        if key not in data or key in hidden:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: required ({describe(hints[key])}), but missing", here or None)
            continue
        kwargs[key] = coerce(data[key], hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:  # a dataclass's own checks (e.g. OptimizerConfig)
        message = str(err)
        # The field the message starts with ("optimizer.b2: ..."), else the section
        at = next((key for key in kwargs if re.match(rf"{re.escape(where)}\.{key}\b", message)), None)
        raise ConfigError(message if where and message.startswith(where) else f"{name}: {message}",
                          (*here, at) if at else here or None) from None


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """``cls``'s field types, resolved once (``from __future__ import annotations`` keeps them as strings)."""
    return typing.get_type_hints(cls)


def check_fields(obj: Any, section: str, cls: type | None = None) -> None:
    """Check the fields of dataclass ``obj`` that ``cls`` declares (default: its own class) as a
    recipe's values are checked, errors naming ``section.field``, and keep the normalised values
    (ints as floats, lists as tuples). Fields a recipe cannot set (``metadata["config"]``) are the
    code's, not checked. Without it, ``TrainConfig(steps=2.5)`` trained 3 steps."""
    cls = cls or type(obj)
    hints = type_hints(cls)
    for f in dataclasses.fields(cls):
        if "config" not in f.metadata:
            object.__setattr__(obj, f.name, coerce(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}"))
