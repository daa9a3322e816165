import numpy as np

from xgen.data import pack_documents

EOT = 99


def test_short_documents_are_dropped_and_counted():
    docs = [[1] * 5, [2] * 100, [3] * 99, [4] * 150]
    windows, stats = pack_documents(docs, seq_len=50, eot_id=EOT, min_doc_tokens=100)
    assert stats.documents == 2 and stats.dropped_short == 2
    assert not np.isin(windows, [1, 3]).any()


def test_one_endoftext_after_each_document_and_documents_continue_across_sequences():
    docs = [[1] * 7, [2] * 3, [3] * 12]
    windows, stats = pack_documents(docs, seq_len=5, eot_id=EOT, min_doc_tokens=1)
    stream = [1] * 7 + [EOT] + [2] * 3 + [EOT] + [3] * 12 + [EOT]
    assert stats.tokens == len(stream) == 25
    # Windows of seq_len + 1 with stride seq_len: inputs w[:-1], targets w[1:].
    assert windows.shape == (4, 6) and windows.dtype == np.int32
    for i, w in enumerate(windows):
        assert list(w) == stream[i * 5 : i * 5 + 6]
    assert stats.tail_tokens_dropped == 25 - 4 * 5 - 1


def test_every_stream_token_is_a_target_exactly_once():
    docs = [list(range(1, 40)), list(range(100, 170))]
    windows, _ = pack_documents(docs, seq_len=8, eot_id=EOT, min_doc_tokens=1)
    targets = windows[:, 1:].reshape(-1)
    stream = docs[0] + [EOT] + docs[1] + [EOT]
    assert list(targets) == stream[1 : 1 + len(targets)]


def test_too_little_data_gives_no_windows():
    windows, stats = pack_documents([[1] * 3], seq_len=8, eot_id=EOT, min_doc_tokens=1)
    assert windows.shape == (0, 9) and stats.windows == 0
