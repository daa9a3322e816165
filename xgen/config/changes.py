"""Key-level differences between two configs (nested dicts), and one readable line for each.

One flattener for everything that compares configs: a resume against its checkpoint
(`xgen.train.resume`), the snapshots against a fresh composition (`xgen.config.snapshots`)
and `task=diff`. Plain Python, so any layer may use it.
"""

from __future__ import annotations

import json
import re
from typing import Any


class _Absent:
    """The value of a key one side does not have (distinct from a key whose value is null)."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def key_changes(old: dict, new: dict, *, whole_subtrees: bool = False) -> dict[str, tuple[Any, Any]]:
    """Every leaf that differs: dotted key -> (old value, new value), ABSENT for a side
    without the key; in config order (`old`'s keys, then those only `new` has). With
    `whole_subtrees`, a section only one side has (a data source, `eval` set vs null) is
    one change holding the whole section, for readers; otherwise each of its leaves is one."""
    changes: dict[str, tuple[Any, Any]] = {}

    def differ(a: Any, b: Any) -> bool:
        # 1 == True in Python; a flag that became a number (or back) is a change.
        return a != b or isinstance(a, bool) != isinstance(b, bool)

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in [*a, *(k for k in b if k not in a)]:
                walk(a.get(key, ABSENT), b.get(key, ABSENT), f"{prefix}{key}.")
        elif whole_subtrees or not (isinstance(a, dict) or isinstance(b, dict)):
            if differ(a, b):
                changes[prefix.rstrip(".")] = (a, b)
        else:
            leaves_a = {} if a is ABSENT else flatten(a, prefix)
            leaves_b = {} if b is ABSENT else flatten(b, prefix)
            for key in [*leaves_a, *(k for k in leaves_b if k not in leaves_a)]:
                if differ(x := leaves_a.get(key, ABSENT), y := leaves_b.get(key, ABSENT)):
                    changes[key] = (x, y)

    walk(old, new, "")
    return changes


_PLAIN = re.compile(r"[\w./][\w./:@*+-]*")


def _reads_as_another_type(text: str) -> bool:
    """Whether YAML would read `text` unquoted as a number, a boolean or null."""
    try:
        float(text)
        return True
    except ValueError:
        return text.lower() in ("null", "true", "false", "yes", "no", "on", "off", "nan", "inf", ".inf", ".nan")


def show(value: Any) -> str:
    """A value as a reader expects it in YAML: 0.0003, null, true, 0.10.2, a quoted string where needed."""
    if isinstance(value, str):
        plain = _PLAIN.fullmatch(value) and not _reads_as_another_type(value)
        return value if plain else json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def change_line(key: str, old: Any, new: Any) -> str:
    """`optimizer.lr: 0.0003 -> 0.0001`; `+ key: value` when only the new side has the key,
    `- key: value` when only the old side does."""
    if old is ABSENT:
        return f"+ {key}: {show(new)}"
    if new is ABSENT:
        return f"- {key}: {show(old)}"
    return f"{key}: {show(old)} -> {show(new)}"
