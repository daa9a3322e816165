"""Held-out documents: a share of each source set aside by content, never trained on.

Every document gets a 16-bit key from a hash of its token ids (`content_key`), computed by
the worker that tokenizes it and stored in the prepared index (`index/keys.npy`); the
built-in corpora compute theirs when they are loaded. A document is held out when its key
falls below `data_mix.heldout_share` of the key space. The choice is therefore:

- deterministic and independent of workers, engines, file order and re-preparing (the key
  is a function of the document alone);
- stable when the corpus grows (a document's side never changes; a larger share only adds);
- the same for identical documents, so an exact duplicate cannot sit on both sides.

Training selects from the other documents (`xgen.data.mixture`), evaluation reads only
these (`xgen.data.loader.heldout_batches`), and `data_mix.json` counts both.
"""

from __future__ import annotations

import hashlib

import numpy as np

KEY_SPACE = 1 << 16  # a share's granularity is 1 / 65,536 of the documents


def content_key(tokens) -> int:
    """The document's key: the first 16 bits of BLAKE2b over its token ids as little-endian
    uint32 (the same bytes whatever dtype the shards store them in)."""
    data = np.ascontiguousarray(tokens, "<u4").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=2).digest(), "little")


def content_keys(documents) -> np.ndarray:
    return np.fromiter((content_key(d) for d in documents), np.uint16)


def threshold(share: float) -> int:
    """Keys below this are held out."""
    return int(round(share * KEY_SPACE))


def heldout_mask(keys: np.ndarray, share: float) -> np.ndarray:
    return np.asarray(keys) < threshold(share)
