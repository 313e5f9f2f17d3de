"""The one codec between typed values and JSON: frozen dataclasses (settings, messages, results)
to JSON values and back, driven by the dataclasses' own type annotations.

``encode`` turns a dataclass into a dict of its fields (tuples become lists, nested dataclasses
dicts); ``decode(cls, data)`` rebuilds one, checking each field against its annotation: a missing
field takes its default, and an unknown field, a missing one without default or a value of the wrong
type is a ``CodecError`` that names the class and the field. Supported annotations: ``int``,
``float`` (an int is accepted), ``str``, ``bool``, ``None``, ``Any``, dataclasses, ``tuple[X, ...]``,
``list[X]``, ``dict[str, X]`` and unions of these (``X | None``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")


class CodecError(ValueError):
    """JSON that does not fit the dataclass it is decoded into."""


def encode(value: Any) -> Any:
    """value as JSON values: dataclasses as dicts of their fields, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(cls: type[T], data: Any) -> T:
    """The dataclass cls rebuilt from data (what encode made of one)."""
    return _dataclass(cls, data, cls.__name__)


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass(cls: Any, data: Any, where: str) -> Any:  # cls: a dataclass type
    if not isinstance(data, dict):
        raise CodecError(f"{where}: expected an object for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CodecError(f"{where}: {cls.__name__} has no field {', '.join(unknown)}")
    hints = _hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _value(hints[name], data[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise CodecError(f"{where}: {cls.__name__} needs field {name!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise CodecError(f"{where}: {err}") from None


def _value(hint: Any, data: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return data
    if origin in (Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _value(arg, data, where)
            except CodecError as err:
                errors.append(str(err))
        raise CodecError("; ".join(errors))
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint, data, where)
    if origin in (tuple, list):
        if not isinstance(data, list):
            raise CodecError(f"{where}: expected a list, got {type(data).__name__}")
        item = args[0] if args else Any
        return origin(_value(item, v, f"{where}[{i}]") for i, v in enumerate(data))
    if origin is dict:
        if not isinstance(data, dict):
            raise CodecError(f"{where}: expected an object, got {type(data).__name__}")
        item = args[1] if args else Any
        return {k: _value(item, v, f"{where}.{k}") for k, v in data.items()}
    return _scalar(hint, data, where)


def _scalar(hint: Any, data: Any, where: str) -> Any:
    if hint is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if hint is type(None) and data is None:
        return None
    if hint in (int, float, str, bool) and type(data) is hint:
        return data
    raise CodecError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {data!r}")
