"""Config dataclasses read from a `config.json`: every known field's value is checked against its declared type.

A converted folder's `config.json` can be edited by hand or written by another tool. A value of the wrong type
(`"num_layers": "40"`) would otherwise surface much later as an obscure failure deep inside model building, so
`from_dict` names the field, the value and the type expected, and the file when the dict came from one.
Fields the dataclass does not know are ignored: the published configs carry many (`_class_name`, ...).
"""

from __future__ import annotations

import types
import typing
from dataclasses import asdict, fields

from .errors import MlxVideoError

_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


class ConfigSource(dict):
    """A config dict that remembers the file it was read from, for error messages."""

    def __init__(self, data: dict, source: str):
        super().__init__(data)
        self.source = source


def _describe(hint) -> str:
    if hint in _SCALARS:
        return _SCALARS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURALS.get(args[0], _describe(args[0]))}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _coerce(value, hint):
    """`value` as `hint` wants it (a JSON list becomes a tuple, an integer a float), or raise TypeError."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is tuple:
        return _coerce_tuple(value, typing.get_args(hint))
    elif typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint))
    else:  # a type this checker does not know: taken as given
        return value
    raise TypeError


def _coerce_tuple(value, args):
    if not isinstance(value, (list, tuple)):
        raise TypeError
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0]) for v in value)
    if len(value) != len(args):
        raise TypeError
    return tuple(_coerce(v, a) for v, a in zip(value, args))


def _coerce_union(value, args):
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is not type(None):
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
    raise TypeError


class JsonConfig:
    """Mixin for a config dataclass: `to_dict` for config.json, and a type-checked `from_dict`."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        hints = typing.get_type_hints(cls)
        where = getattr(data, "source", f"the {cls.__name__} config")
        values = {}
        for field in fields(cls):
            if field.name not in data:
                continue
            value = data[field.name]
            try:
                values[field.name] = _coerce(value, hints[field.name])
            except TypeError:
                raise MlxVideoError(
                    f"{where}: {field.name!r} is {value!r}; expected {_describe(hints[field.name])}"
                ) from None
        try:
            return cls(**values)
        except ValueError as e:  # a config's own consistency checks (__post_init__)
            raise MlxVideoError(f"{where}: {e}") from None
