"""Raw documents of a mixture's sources.

The built-in corpora exist on every machine with Python, so the default run needs no
download: `python_docs` is the interpreter's documentation (`pydoc_data.topics`, English
prose) and `python_stdlib` its standard library's `.py` files (code).
"""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

import numpy as np

from xgen.config import ConfigError, SourceConfig

log = logging.getLogger(__name__)


def python_docs() -> list[str]:
    """The pydoc topics, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def python_stdlib(max_documents: int | None, seed: int) -> list[str]:
    """Standard-library sources; a seeded sample of `max_documents` files when set."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
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


def load_documents(name: str, src: SourceConfig, seed: int) -> list[str]:
    """The documents of one source, in a deterministic order."""
    if src.kind == "python_docs":
        docs = python_docs()
        if src.max_documents is not None:
            docs = docs[: src.max_documents]
        return docs
    if src.kind == "python_stdlib":
        return python_stdlib(src.max_documents, seed)
    if src.kind == "prepared":
        raise ConfigError(
            f"data_mix.sources.{name}: kind 'prepared' reads shards written by task=prepare, "
            "which this version of xgen does not have yet; use data_mix=demo"
        )
    raise ConfigError(f"data_mix.sources.{name}.kind={src.kind!r} is not one of python_docs, python_stdlib, prepared")
