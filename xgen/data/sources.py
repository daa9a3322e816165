"""A mixture's sources as document stores.

The built-in corpora exist on every machine with Python, so the default run needs no
download: `python_docs` is the interpreter's documentation (`pydoc_data.topics`, English
prose) and `python_stdlib` its standard library's `.py` files (code). `prepared` sources
are directories written by `task=prepare`.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from pathlib import Path

import numpy as np

from xgen.config import ConfigError, SourceConfig
from xgen.data.store import DocumentStore, InMemoryStore, ShardStore
from xgen.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def python_docs() -> list[str]:
    """The pydoc topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


_NOT_LIBRARY_CODE = ("site-packages", "encodings", "test", "tests", "idle_test")


def _python_files(root: Path) -> list[Path]:
    """The `.py` files under `root`, not descending into site-packages (os.walk prunes it;
    `rglob` would list every installed package first, seconds on a full environment), nor
    into `encodings` (generated codec tables, `0x00 -> LATIN CAPITAL LETTER ...` by the
    hundred lines) or the test suites (`test`, `tests`, `idle_test`: assertEqual by the
    thousand), which a small model learns first, and only, if left in."""
    found = []
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _NOT_LIBRARY_CODE]
        found += [Path(parent) / n for n in names if n.endswith(".py")]
    return found


def python_stdlib(max_documents: int | None, seed: int) -> list[str]:
    """Standard-library sources; a seeded sample of `max_documents` files when set."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(_python_files(root))
    if max_documents is not None and max_documents < len(files):
        keep = np.sort(np.random.default_rng(seed).permutation(len(files))[:max_documents])
        files = [files[i] for i in keep]
    texts, undecodable = [], 0
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            undecodable += 1
    if undecodable:
        log.info("python_stdlib: skipped %d unreadable or non-UTF-8 files of %d", undecodable, len(files))
    return texts


def open_store(name: str, src: SourceConfig, tokenizer: Tokenizer, seed: int) -> DocumentStore:
    """The documents of one source."""
    if src.kind == "prepared":
        if not src.path:
            raise ConfigError(f"data_mix.sources.{name}: kind 'prepared' needs a path")
        return ShardStore(src.path, tokenizer)
    if src.kind == "python_docs":
        texts = python_docs()[: src.max_documents]
    elif src.kind == "python_stdlib":
        texts = python_stdlib(src.max_documents, seed)
    else:
        raise ConfigError(f"data_mix.sources.{name}.kind={src.kind!r} is not one of python_docs, python_stdlib, prepared")
    return InMemoryStore(tokenizer.encode_ordinary_batch(texts))
