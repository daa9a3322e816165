"""Documents -> fixed-length training windows, as the report builds sequences.

Documents are concatenated with one `<|endoftext|>` after each, then cut into windows of
`seq_len + 1` tokens with stride `seq_len`: inputs are the first `seq_len` tokens, targets
the last `seq_len`, so every token of the stream is a target exactly once. A document
longer than a sequence continues into the next one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PackStats:
    documents: int
    dropped_short: int
    tokens: int
    windows: int
    tail_tokens_dropped: int


def pack_documents(
    docs: list[list[int]], *, seq_len: int, eot_id: int, min_doc_tokens: int
) -> tuple[np.ndarray, PackStats]:
    """[n_windows, seq_len + 1] int32 windows and the counts of what was kept and dropped."""
    kept = [d for d in docs if len(d) >= min_doc_tokens]
    pieces = []
    for doc in kept:
        pieces.append(np.asarray(doc, np.int32))
        pieces.append(np.asarray([eot_id], np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    n_windows = max((len(stream) - 1) // seq_len, 0)
    starts = np.arange(n_windows)[:, None] * seq_len
    windows = stream[starts + np.arange(seq_len + 1)[None, :]] if n_windows else np.zeros((0, seq_len + 1), np.int32)
    stats = PackStats(
        documents=len(kept),
        dropped_short=len(docs) - len(kept),
        tokens=int(len(stream)),
        windows=n_windows,
        tail_tokens_dropped=int(len(stream) - n_windows * seq_len - (1 if n_windows else 0)),
    )
    return windows, stats
