"""Params sections as frozen, typed objects.

`pipeline.config.load_params` validates the whole profile once and fills every default in from
`SCHEMA`. A stage then takes each section it needs as a frozen dataclass whose fields are the
section's keys (`typed_section(cfg, "preprocess", PreprocessConfig)`), and passes the library
those objects or their fields: code reads `p.max_size`, never a dict key with a fallback. The
classes live beside the code that reads them (`pipeline.data.settings`,
`pipeline.evaluation.settings`, `pipeline.inference.settings`, `pipeline.training.recipe`), so
a stage imports, and depends on, the definitions of its own sections only.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from pipeline.config import checked_section

T = TypeVar("T")


def build(cls: type[T], tree: Mapping[str, Any]) -> T:
    """`cls` (a frozen dataclass) from a validated mapping: one field per key, a nested
    dataclass field from its sub-mapping, a list as a tuple (frozen all the way down).

    Raises:
        KeyError: a field has no key in `tree` (the class and `SCHEMA` disagree).
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        value, hint = tree[field.name], hints[field.name]
        if dataclasses.is_dataclass(hint):
            value = build(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    return cls(**values)


def typed_section(cfg: Mapping[str, Any], section: str, cls: type[T]) -> T:
    """The `section` of `cfg` (the active profile, as `load_params` returns it), validated
    against `SCHEMA[section]` with its defaults, as `cls`.

    Raises:
        ParamsError: the section is missing a key, has an unknown one or a value out of bounds.
    """
    return build(cls, checked_section(cfg, section))


def schema_keys(cls: type) -> dict[str, Any]:
    """The key tree a section class reads: {field: None, or the nested class's tree}; tests
    compare it with `SCHEMA` so that a key added to one is added to the other."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: schema_keys(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None
        for f in dataclasses.fields(cls)
    }
