"""Documents -> fixed-length windows, as the report builds sequences, with random access.

Documents (in a given order) are concatenated with one `<|endoftext|>` after each and cut
into windows of `seq_len + 1` tokens with stride `seq_len`: inputs are the first
`seq_len`, targets the last `seq_len`, so every token of the stream is a target once. A
document longer than a sequence continues into the next. Window i is computed from the
documents' cumulative offsets, so any window can be read without building the stream, and
it reads only its own slice of each document it covers (`DocumentStore.tokens(doc, start,
stop)`): the cost of a window does not grow with the length of a document.
"""

from __future__ import annotations

import numpy as np

from xgen.data.store import DocumentStore


class PackedWindows:
    """A grain random-access data source of packed windows over `docs` of `store`.

    Each element is a dict of [seq_len + 1] arrays: `tokens`, and `segment_ids` (1 + the
    document's position in `docs`, for document masking) and `positions` (the token's
    index within its document, restarting after each end-of-text).
    """

    def __init__(self, store: DocumentStore, docs: np.ndarray, *, seq_len: int, eot_id: int):
        self.store, self.docs, self.seq_len, self.eot_id = store, np.asarray(docs), seq_len, eot_id
        sizes = store.lengths[self.docs].astype(np.int64) + 1  # + end-of-text (int64: a prepared index stores uint32)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.total_tokens = int(self.offsets[-1])
        self._len = max((self.total_tokens - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self._len:
            raise IndexError(i)
        lo, hi = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        last = int(np.searchsorted(self.offsets, hi - 1, side="right")) - 1
        tokens, segments, positions = [], [], []
        for k in range(first, last + 1):
            size = int(self.offsets[k + 1] - self.offsets[k])  # the document and its end-of-text
            start = max(lo - int(self.offsets[k]), 0)
            stop = min(hi - int(self.offsets[k]), size)
            piece = self.store.tokens(self.docs[k], start, stop).astype(np.int32)  # only what the window covers
            if stop == size:
                piece = np.concatenate([piece, np.asarray([self.eot_id], np.int32)])
            tokens.append(piece)
            segments.append(np.full(stop - start, k + 1, np.int32))
            positions.append(np.arange(start, stop, dtype=np.int32))
        return {
            "tokens": np.concatenate(tokens),
            "segment_ids": np.concatenate(segments),
            "positions": np.concatenate(positions),
        }

    def __repr__(self) -> str:  # grain logs data sources by repr
        return f"PackedWindows(docs={len(self.docs)}, seq_len={self.seq_len}, windows={self._len})"


def to_model_batch(windows: dict[str, np.ndarray], document_masking: bool) -> dict[str, np.ndarray]:
    """[batch, seq_len + 1] windows -> next-token `inputs` and `targets` of [batch, seq_len].

    With document masking the batch also carries `segment_ids` and `positions` for the
    attention mask and rotary positions, and `loss_mask` drops the targets that lie in the
    next document (predicting a document's first token from the previous one's end).
    """
    tokens = windows["tokens"]
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if "sequence_ids" in windows:  # loader.trace_sequences: read by the trainer's trace, not the model
        batch["sequence_ids"] = windows["sequence_ids"]
    if document_masking:
        seg = windows["segment_ids"]
        batch["segment_ids"] = seg[:, :-1]
        batch["positions"] = windows["positions"][:, :-1]
        batch["loss_mask"] = (seg[:, :-1] == seg[:, 1:]).astype(np.int32)
    return batch
