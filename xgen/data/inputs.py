"""Which raw files a source reads, and what each one is: found by glob, known by content.

A file is identified by a BLAKE2 hash of its bytes, not by the path string, so the same
data reached by another path (`data` against `$PWD/data`, a renamed or copied file) is
recognised; the hash is cached by path, size and modification time, so an unchanged file is
not read again. Dangling symlinks among the matches are returned, to be counted.
"""

from __future__ import annotations

import glob
import hashlib
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


def _stat_key(path: str) -> list:
    """What says a file is unchanged without reading it: size and modification time."""
    if "://" in path:
        fs, _, (p,) = fsspec.get_fs_token_paths(path)
        info = fs.info(p)
        return [info.get("size"), str(info.get("mtime") or info.get("updated") or info.get("etag") or "")]
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def content_digest(path: str) -> str:
    """BLAKE2b-128 of the file's bytes: the file's identity in a manifest."""
    h = hashlib.blake2b(digest_size=16)
    with fsspec.open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def cached_digest(path: str, cache: dict[str, list]) -> str:
    key = _stat_key(path)
    hit = cache.get(path)
    if hit is not None and hit[:-1] == key:
        return hit[-1]
    digest = content_digest(path)
    cache[path] = [*key, digest]
    return digest


def exists(path: str) -> bool:
    if "://" in path:
        fs, _, (p,) = fsspec.get_fs_token_paths(path)
        return fs.exists(p)
    return os.path.exists(path)
