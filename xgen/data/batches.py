"""What the Trainer reads: a source of step-ordered batches with a checkpointable position.

Pre-training's `DataPipeline` and SFT's `SFTPipeline` both satisfy it (structurally, as
`typing.Protocol`s: neither imports the other or the trainer), so a new kind of data needs
only these few members, and `tests/train/test_batches_protocol.py` checks both."""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable


@runtime_checkable
class Batches(Protocol):
    """Batches in step order whose position can be saved with a checkpoint and restored."""

    def __next__(self) -> dict[str, Any]: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...

    def close(self) -> None:
        """Stop the threads or processes that read ahead."""


@runtime_checkable
class BatchSource(Protocol):
    """`dataset[i]`: this host's batch of step i + 1 (a dict of [rows, seq_len] int arrays);
    `iterator()` the same batches in order; `epochs(steps)` each part's passes after `steps`."""

    dataset: Any
    global_batch: int

    def iterator(self) -> Batches: ...

    def epochs(self, steps: int) -> dict[str, float]: ...
