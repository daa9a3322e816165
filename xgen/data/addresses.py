"""Where a field lives in a released record: dotted paths, lists, and the file's own path.

Releases nest their metadata differently: RedPajama keeps it under `meta` with each
subset's own keys, its GitHub subset lists languages as `[{"name", "bytes"}]`, SlimPajama
names the subset in `meta.redpajama_set_name`, and StarCoderData has no language column at
all: the language is the folder. So a source's config says where each field is:

- `content`, `meta.redpajama_set_name`: a key, or a dotted path into nested objects;
- `meta.language[].name`: `[]` maps the rest of the path over a list (a list value);
- `path:0`, `path:-2`: a component of the file's path below the pattern's fixed prefix
  (`path:-1` is the file name, `path:-2` the folder holding it).

Stored metadata is a string per document; a list value is its elements joined by
`LIST_SEP`, and a filter matches it when any element matches (`matches`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from xgen.config import ConfigError

LIST_SEP = "\x1f"  # ASCII unit separator: never part of a language, license or subset name


@dataclass(frozen=True)
class Address:
    steps: tuple[tuple[str, bool], ...] = ()  # (key, maps over a list)
    path_index: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Address":
        if text.startswith("path:"):
            try:
                return cls(path_index=int(text[5:]))
            except ValueError:
                raise ConfigError(f"metadata address {text!r}: path:N needs an integer N") from None
        steps = []
        for key in text.split("."):
            is_list = key.endswith("[]")
            key = key.removesuffix("[]")
            if not key:
                raise ConfigError(f"metadata address {text!r} has an empty key")
            steps.append((key, is_list))
        return cls(steps=tuple(steps))

    @property
    def column(self) -> str | None:
        """The top-level field it reads (the Parquet column), None for a path component."""
        return self.steps[0][0] if self.steps else None

    def get(self, record: Any, parts: tuple[str, ...]) -> Any:
        """The value at this address, or None where the record has none."""
        if self.path_index is not None:
            return parts[self.path_index] if -len(parts) <= self.path_index < len(parts) else None
        return _walk(record, self.steps)


def _walk(value: Any, steps: tuple[tuple[str, bool], ...]) -> Any:
    if not steps:
        return value
    (key, is_list), rest = steps[0], steps[1:]
    value = value.get(key) if isinstance(value, dict) else None
    if not is_list:
        return _walk(value, rest)
    if not isinstance(value, list):
        return None
    return [_walk(element, rest) for element in value]


def compile_addresses(meta: dict[str, str]) -> dict[str, Address]:
    return {name: Address.parse(address) for name, address in meta.items()}


def stored_value(value: Any) -> str | None:
    """A metadata value as stored: a string, lists joined by LIST_SEP; None when absent.

    An empty list is an empty string (present, with no element: The Stack's files whose
    license was not detected), unlike a missing field."""
    if value is None:
        return None
    if isinstance(value, list):
        elements = [stored_value(v) for v in _flatten(value)]
        return LIST_SEP.join(e for e in elements if e)
    if isinstance(value, str):
        return value
    if isinstance(value, (dict,)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _flatten(values: list) -> list:
    out = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


def matches(stored: np.ndarray, allowed: list[str], *, casefold: bool = False) -> np.ndarray:
    """Per document: does its value (any element of a list value) equal an allowed one?

    Computed once per distinct value, so it costs little on millions of documents."""
    norm = (lambda s: s.lower()) if casefold else (lambda s: s)
    allowed_set = {norm(a) for a in allowed}
    values, inverse = np.unique(np.asarray(stored, dtype=str), return_inverse=True)
    hit = np.array([any(norm(e) in allowed_set for e in v.split(LIST_SEP) if e) for v in values], bool)
    return hit[inverse.reshape(-1)] if len(values) else np.zeros(len(stored), bool)
