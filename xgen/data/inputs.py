"""Which raw files a source reads: found by glob, locally or at any fsspec URL.

Local matches are resolved to their real paths, so the same file reached by another path
(`data` against `$PWD/data`, a symlink) is one input. Dangling symlinks among the matches
are returned, to be counted. What a file *is* (its content digest) is computed while it
is prepared (`xgen.data.units`), never by a separate read.

A path without wildcards that names a folder stands for the data files in it (`folder_files`):
a Hugging Face dataset saved with `save_to_disk` is read as `datasets` would load it (its
`state.json` lists its Arrow files; a `DatasetDict`'s folder is read through its `train`
split), so `data_mix.paths=[my_dataset]` needs no knowledge of the layout.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import fsspec

from xgen.config import ConfigError

log = logging.getLogger(__name__)

_WILDCARDS = set("*?[")
# What a folder's files are read as: the data formats of `xgen.data.readers`, under any
# compression; anything else in a folder (a README.md, a .gitattributes) is left out, logged.
_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".arrow", ".feather", ".txt")
_COMPRESSED = ("", ".gz", ".zst", ".zstd", ".bz2", ".xz")
# The Hugging Face Hub's shard names, `<split>-00000-of-00002[-<hash>].parquet` (push_to_hub).
_HUB_SHARD = re.compile(r"^(?P<split>[\w.]+?)-\d{5}-of-\d{5}")


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


def _is_data_file(name: str) -> bool:
    lower = name.lower()
    return lower not in _HF_METADATA and lower.endswith(tuple(s + c for s in _DATA_SUFFIXES for c in _COMPRESSED))


# The metadata `save_to_disk` writes beside a dataset's Arrow files (not documents).
_HF_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")


def _files_below(folder: str) -> list[str]:
    """Every file below `folder` (dangling symlinks included, to be counted), hidden files and
    folders (`.gitattributes`, `.cache/`) left out; paths start with `folder`."""
    if "://" in folder:
        fs, root = fsspec.core.url_to_fs(folder)
        return [f"{folder.rstrip('/')}/{p[len(root):].lstrip('/')}" for p in fs.find(root)
                if not any(part.startswith(".") for part in p[len(root):].split("/"))]  # fmt: skip
    found = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(parent, n) for n in names if not n.startswith(".")]
    return found


def folder_files(folder: str) -> list[str]:
    """The files a folder stands for, sorted. A dataset saved by `datasets`' `save_to_disk`:
    the Arrow files its `state.json` lists; a `DatasetDict` (`dataset_dict.json`): its train
    split's, since training on every split would train on the test set; any other folder: the
    data files below it (by name: JSON Lines, JSON, Parquet, Arrow, text, under any
    compression), the others logged as left out, and of files of several splits (the Hub's
    shard names, `train-00000-of-00002.parquet`; `test.jsonl`; a `validation/` folder) only
    the train split's; split files beside files of no split are refused (which to read?)."""
    folder = folder.rstrip("/") or "/"
    fs, root = fsspec.core.url_to_fs(folder)

    def load(name: str) -> dict:
        try:
            with fs.open(f"{root}/{name}", "rb") as fh:
                return json.load(fh)
        except ValueError as ex:
            raise ConfigError(f"{folder}/{name} is not JSON ({ex}): is the dataset saved whole?")

    if fs.exists(f"{root}/dataset_dict.json"):
        splits = [str(s) for s in load("dataset_dict.json").get("splits", [])]
        if "train" not in splits:
            raise ConfigError(
                f"{folder} is a Hugging Face DatasetDict without a train split (splits: {', '.join(splits) or 'none'}): "
                f"name the split to read, e.g. {folder}/{splits[0] if splits else '<split>'}"
            )
        log.info("%s is a Hugging Face DatasetDict (splits: %s): reading its train split", folder, ", ".join(splits))
        return folder_files(f"{folder}/train")
    if fs.exists(f"{root}/state.json"):
        files = load("state.json").get("_data_files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
            raise ConfigError(f"{folder}/state.json lists no _data_files: is it a dataset saved by datasets' save_to_disk?")
        return sorted(f"{folder}/{f['filename']}" for f in files)
    below = sorted(_files_below(folder))
    kept = [p for p in below if _is_data_file(os.path.basename(p))]
    if len(kept) < len(below):
        left = [p[len(folder) :].lstrip("/") for p in below if p not in set(kept)]
        log.info("%s: %d files that are not data left out (%s%s)", folder, len(left), ", ".join(left[:3]), ", ..." if len(left) > 3 else "")
    labels = {p: _split_of(p[len(folder) :]) for p in kept}
    splits = set(labels.values())
    if splits - {None, "train"}:  # a test or validation split among the files: never trained on by default
        if None in splits or "train" not in splits:
            named = sorted(p[len(folder) :].lstrip("/") for p, s in labels.items() if s not in (None, "train"))
            raise ConfigError(
                f"{folder} holds split files ({', '.join(named[:3])}{', ...' if len(named) > 3 else ''}) beside "
                f"{'files of no split' if None in splits else 'no train split'}: name the files to read, e.g. "
                f"'{folder}/**/train*'"
            )
        log.info("%s holds the splits %s: reading the train split's files", folder, ", ".join(sorted(splits)))
        kept = [p for p in kept if labels[p] == "train"]
    return kept


SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")


def _split_of(relative: str) -> str | None:
    """The split a file below a folder belongs to, by the Hub's shard names
    (`test-00000-of-00001.parquet`), its own name (`test.jsonl`, `validation.parquet`) or a
    folder's (`test/part-0.jsonl`); None for a file of no split."""
    name = os.path.basename(relative)
    shard = _HUB_SHARD.match(name)
    if shard:
        return shard.group("split")
    stem = name.split(".", 1)[0].lower()
    if stem in SPLIT_NAMES:
        return stem
    folders = [d.lower() for d in relative.strip("/").split("/")[:-1]]
    return next((d for d in folders if d in SPLIT_NAMES), None)


def expand_paths(patterns: list[str]) -> Expanded:
    """Files matching the patterns (local globs or fsspec URLs), sorted, each once, and the
    dangling symlinks among the matches (counted, never silently skipped). A path without
    wildcards that names a folder stands for its files (`folder_files`)."""
    found: dict[str, tuple[str, ...]] = {}
    dangling: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            try:
                fs, _, paths = fsspec.get_fs_token_paths(pattern)
            except (ImportError, ValueError) as ex:  # e.g. gs:// without gcsfs installed
                raise ConfigError(f"raw input {pattern}: {ex}")
            if not _WILDCARDS & set(pattern) and paths and fs.isdir(paths[0]):
                for url in folder_files(pattern):
                    found.setdefault(url, _parts_below(url, pattern.rstrip("/")))
                continue
            prefix = _fixed_prefix(pattern)
            for p in paths:
                url = fs.unstrip_protocol(p)
                found.setdefault(url, _parts_below(url, prefix))
            continue
        pattern = os.path.expanduser(pattern)
        prefix = os.path.abspath(_fixed_prefix(pattern) or ".")
        matches = glob.glob(pattern, recursive=True)
        if not _WILDCARDS & set(pattern) and os.path.isdir(pattern):
            prefix, matches = os.path.abspath(pattern), folder_files(pattern)
        for match in matches:
            if os.path.islink(match) and not os.path.exists(match):
                dangling.append(match)
            elif os.path.isfile(match):
                found.setdefault(os.path.realpath(match), _parts_below(os.path.abspath(match), prefix))
            elif not os.path.exists(match):  # named by a dataset's state.json
                raise ConfigError(f"{match} does not exist (listed in {os.path.dirname(match)}/state.json)")
    return Expanded([RawFile(p, found[p]) for p in sorted(found)], sorted(set(dangling)))


def spread(items: list, k: int = 8) -> list:
    """k items evenly spread over the list (all of them when there are no more than k): the
    files a sample is read from, the same ones every time."""
    n = len(items)
    return list(items) if n <= k else [items[(2 * i + 1) * n // (2 * k)] for i in range(k)]


def source_files(name: str, spec) -> Expanded:
    """A source's raw files (`expand_paths` of its `raw.paths`); none at all is a one-line error."""
    expanded = expand_paths(list(spec.paths))
    if not expanded.files:
        dangling = f" ({len(expanded.dangling_symlinks)} dangling symlinks)" if expanded.dangling_symlinks else ""
        raise ConfigError(f"data_mix.sources.{name}.raw.paths {list(spec.paths)} match no file{dangling}")
    return expanded
