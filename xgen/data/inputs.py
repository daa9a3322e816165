"""Which raw files a source reads: found by glob, locally or at any fsspec URL.

Local matches are resolved to their real paths, so the same file reached by another path
(`data` against `$PWD/data`, a symlink) is one input. Dangling symlinks among the matches
are returned, to be counted. What a file *is* (its content digest) is computed while it
is prepared (`xgen.data.units`), never by a separate read.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import NamedTuple

import fsspec

from xgen.config import ConfigError

_WILDCARDS = set("*?[")


class RawFile(NamedTuple):
    path: str  # local real path, or an fsspec URL
    parts: tuple[str, ...]  # the path below its pattern's fixed prefix (for `path:N` metadata)


@dataclass
class Expanded:
    files: list[RawFile]
    dangling_symlinks: list[str]


def _fixed_prefix(pattern: str) -> str:
    """The folders of a glob pattern before its first wildcard."""
    kept = []
    for part in pattern.split("/")[:-1]:
        if _WILDCARDS & set(part):
            break
        kept.append(part)
    return "/".join(kept)


def _parts_below(path: str, prefix: str) -> tuple[str, ...]:
    rel = path[len(prefix) :].lstrip("/") if prefix and path.startswith(prefix) else path
    return tuple(p for p in rel.split("/") if p)


def expand_paths(patterns: list[str]) -> Expanded:
    """Files matching the patterns (local globs or fsspec URLs), sorted, each once, and the
    dangling symlinks among the matches (counted, never silently skipped)."""
    found: dict[str, tuple[str, ...]] = {}
    dangling: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            try:
                fs, _, paths = fsspec.get_fs_token_paths(pattern)
            except (ImportError, ValueError) as ex:  # e.g. gs:// without gcsfs installed
                raise ConfigError(f"raw input {pattern}: {ex}")
            prefix = _fixed_prefix(pattern)
            for p in paths:
                url = fs.unstrip_protocol(p)
                found.setdefault(url, _parts_below(url, prefix))
            continue
        pattern = os.path.expanduser(pattern)
        prefix = os.path.abspath(_fixed_prefix(pattern) or ".")
        for match in glob.glob(pattern, recursive=True):
            if os.path.islink(match) and not os.path.exists(match):
                dangling.append(match)
            elif os.path.isfile(match):
                found.setdefault(os.path.realpath(match), _parts_below(os.path.abspath(match), prefix))
    return Expanded([RawFile(p, found[p]) for p in sorted(found)], sorted(set(dangling)))


def source_files(name: str, spec) -> Expanded:
    """A source's raw files (`expand_paths` of its `raw.paths`); none at all is a one-line error."""
    expanded = expand_paths(list(spec.paths))
    if not expanded.files:
        dangling = f" ({len(expanded.dangling_symlinks)} dangling symlinks)" if expanded.dangling_symlinks else ""
        raise ConfigError(f"data_mix.sources.{name}.raw.paths {list(spec.paths)} match no file{dangling}")
    return expanded
