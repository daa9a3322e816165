import numpy as np
import pytest

from xgen.data.packing import PackedWindows, to_model_batch
from xgen.data.store import InMemoryStore

EOT = 99


def stream_of(docs):
    out = []
    for d in docs:
        out += list(d) + [EOT]
    return out


def test_one_endoftext_after_each_document_and_documents_continue_across_sequences():
    docs = [[1] * 7, [2] * 3, [3] * 12]
    packed = PackedWindows(InMemoryStore(docs), np.arange(3), seq_len=5, eot_id=EOT)
    stream = stream_of(docs)
    assert packed.total_tokens == len(stream) == 25
    assert len(packed) == 4  # (25 - 1) // 5
    for i in range(len(packed)):
        w = packed[i]
        assert w["tokens"].dtype == np.int32 and len(w["tokens"]) == 6
        assert list(w["tokens"]) == stream[i * 5 : i * 5 + 6]
    with pytest.raises(IndexError):
        packed[4]


def test_every_stream_token_is_a_target_exactly_once_in_the_given_document_order():
    docs = [list(range(1, 40)), list(range(100, 170)), list(range(200, 211))]
    order = np.array([2, 0, 1])
    packed = PackedWindows(InMemoryStore(docs), order, seq_len=8, eot_id=EOT)
    stream = stream_of([docs[i] for i in order])
    targets = np.concatenate([packed[i]["tokens"][1:] for i in range(len(packed))])
    assert list(targets) == stream[1 : 1 + len(targets)]
    assert len(stream) - 1 - len(targets) < 8  # only the tail that fills no sequence is unused


def test_segments_and_positions_restart_at_each_document():
    docs = [[1, 2, 3], [4, 5, 6, 7, 8]]
    w = PackedWindows(InMemoryStore(docs), np.arange(2), seq_len=7, eot_id=EOT)[0]
    assert list(w["tokens"]) == [1, 2, 3, EOT, 4, 5, 6, 7]
    assert list(w["segment_ids"]) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert list(w["positions"]) == [0, 1, 2, 3, 0, 1, 2, 3]
    batch = to_model_batch({k: v[None] for k, v in w.items()}, document_masking=True)
    assert list(batch["inputs"][0]) == [1, 2, 3, EOT, 4, 5, 6]
    assert list(batch["targets"][0]) == [2, 3, EOT, 4, 5, 6, 7]
    # The target after end-of-text is the next document's first token: not trained on.
    assert list(batch["loss_mask"][0]) == [1, 1, 1, 0, 1, 1, 1]
    plain = to_model_batch({k: v[None] for k, v in w.items()}, document_masking=False)
    assert set(plain) == {"inputs", "targets"}


def test_too_little_data_gives_no_windows():
    assert len(PackedWindows(InMemoryStore([[1] * 3]), np.arange(1), seq_len=8, eot_id=EOT)) == 0
