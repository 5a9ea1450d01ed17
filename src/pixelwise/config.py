"""Reading configs: YAML with YAML 1.2 numbers, and dataclass fields checked against their type hints.

Example:
    >>> load_yaml("lr: 1e-3")                # {'lr': 0.001}; PyYAML alone reads the string '1e-3'
    >>> check_field_types(cfg)               # in ``__post_init__``: lr="abc" -> "lr='abc' must be a number"
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` and ``1E5`` as floats (YAML 1.2; PyYAML follows 1.1)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (no Python objects), with YAML 1.2 exponent floats."""
    return yaml.load(text, Loader=_Loader)


_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "null"}
_PLURALS = {int: "whole numbers", float: "numbers", str: "texts"}


def matches(value: Any, hint: Any) -> bool:
    """True when ``value`` has type ``hint`` (bool, int, float, str, None, list[X], dict[K, V], unions, Any).

    An int counts as a float; a bool counts as neither an int nor a float.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    """Words for a type hint: ``list[int] | None`` -> "a list of whole numbers or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"a list of {_PLURALS.get(args[0], describe(args[0]))}"
    if origin is dict:
        return "a mapping of names to values, e.g. {name: value}"
    return _WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def check_field_types(instance: Any) -> None:
    """Raise a ValueError naming the first field of a dataclass ``instance`` whose value has the wrong type."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        value, hint = getattr(instance, f.name), hints[f.name]
        if matches(value, hint):
            continue
        if value is None or value == "":
            raise ValueError(f"{f.name} is empty; it must be {describe(hint)}")
        raise ValueError(f"{f.name}={value!r} must be {describe(hint)}")
