"""Rendered conversations → fixed-length training rows, packed or padded.

A row holds `seq_len + 1` tokens (inputs are the first seq_len, targets the last); packing
places whole conversations one after another, each its own segment (attention stays inside
it, positions restart), and pads the rest of the row. A conversation longer than a row is
cut at the row's end, inside its last turns, then trimmed back to its last trained token,
so no row ends in untrained context; the log counts both. One with no trained token left is
dropped (counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Rows:
    """Packed rows as arrays [n, seq_len + 1], and what packing did."""

    tokens: np.ndarray
    loss_mask: np.ndarray  # 1 where the token is trained (as a target)
    segment_ids: np.ndarray  # 1.. per conversation in the row, 0 for padding
    positions: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        """Row `i` (an int, or an index array for several rows)."""
        return {
            "tokens": self.tokens[i],
            "loss_mask": self.loss_mask[i],
            "segment_ids": self.segment_ids[i],
            "positions": self.positions[i],
        }


def fit_to_row(ids: np.ndarray, mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Cut a conversation to `width` tokens, ending on its last trained token; None if none is left."""
    ids, mask = ids[:width], mask[:width]
    trained = np.flatnonzero(mask)
    if len(trained) == 0:
        return None
    end = trained[-1] + 1
    return ids[:end], mask[:end]


def pack(
    conversations: list[tuple[np.ndarray, np.ndarray]], seq_len: int, *, pad_id: int, packing: str = "pack"
) -> Rows:
    """Rows of `seq_len + 1` tokens in the conversations' order (first fit into the open row)."""
    if packing not in ("pack", "pad"):
        raise ValueError(f"sft.packing={packing!r} is not one of pack, pad")
    width = seq_len + 1
    counts = {"conversations": len(conversations), "truncated": 0, "dropped_no_response": 0}
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = width  # forces a new row first
    for ids, mask in conversations:
        if len(ids) > width:
            counts["truncated"] += 1
        fitted = fit_to_row(ids, mask, width)
        if fitted is None:
            counts["dropped_no_response"] += 1
            continue
        if packing == "pad" or used + len(fitted[0]) > width:
            rows.append([])
            used = 0
        rows[-1].append(fitted)
        used += len(fitted[0])
    n = len(rows)
    out = Rows(
        tokens=np.full((n, width), pad_id, np.int32),
        loss_mask=np.zeros((n, width), np.int32),
        segment_ids=np.zeros((n, width), np.int32),
        positions=np.zeros((n, width), np.int32),
    )
    for r, row in enumerate(rows):
        at = 0
        for seg, (ids, mask) in enumerate(row, start=1):
            span = slice(at, at + len(ids))
            out.tokens[r, span], out.loss_mask[r, span] = ids, mask
            out.segment_ids[r, span], out.positions[r, span] = seg, np.arange(len(ids))
            at += len(ids)
    counts["rows"] = n
    counts["trained_tokens"] = int(out.loss_mask.sum())
    counts["tokens"] = int((out.segment_ids > 0).sum())
    out.counts = counts
    return out


def to_model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[batch, seq_len + 1] rows -> inputs/targets [batch, seq_len] with the attention
    segments, positions, and a loss mask over targets that are trained tokens of the same
    conversation as their input."""
    tokens, seg = rows["tokens"], rows["segment_ids"]
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": seg[:, :-1],
        "positions": rows["positions"][:, :-1],
        "loss_mask": (rows["loss_mask"][:, 1:] * (seg[:, 1:] == seg[:, :-1])).astype(np.int32),
    }
