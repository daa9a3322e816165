"""The held-out split: chosen by each document's content, the same however it was prepared,
never trained on, and counted in data_mix.json."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.data.heldout import KEY_SPACE, content_key, heldout_mask, threshold
from xgen.data.loader import build_pipeline
from xgen.data.sources import open_store
from xgen.tokenizer import Tokenizer

SHARE = 0.2  # large, so that the synthetic corpus holds out enough documents to compare


def _store(data_dir, *overrides):
    cfg = compose_config("data_mix=synthetic", f"data_dir={data_dir}", f"data_mix.heldout_share={SHARE}", *overrides)
    name, src = next(iter(cfg.data_mix.sources.items()))
    return cfg, name, src, open_store(name, src, Tokenizer.xgen(), cfg.data_mix.seed)


def _contents(store, docs) -> set[bytes]:
    return {store.tokens(int(d)).astype("<u4").tobytes() for d in docs}


def test_a_documents_key_is_a_hash_of_its_tokens_whatever_their_dtype():
    ids = [50256, 1, 2, 3, 40000]
    assert content_key(np.asarray(ids, np.uint16)) == content_key(np.asarray(ids, np.int64)) == content_key(ids)
    assert content_key(ids) != content_key(ids[::-1])
    assert 0 <= content_key(ids) < KEY_SPACE
    assert threshold(0.0) == 0 and threshold(0.5) == KEY_SPACE // 2
    keys = np.asarray([0, 99, 100, 65535], np.uint16)
    assert heldout_mask(keys, 100 / KEY_SPACE).tolist() == [True, True, False, False]


def test_the_prepared_index_stores_each_documents_key(synthetic_data):
    _, _, _, store = _store(synthetic_data)
    assert store.keys.dtype == np.uint16 and len(store.keys) == len(store)
    for doc in range(0, len(store), max(1, len(store) // 20)):
        assert int(store.keys[doc]) == content_key(store.tokens(doc))


def test_the_held_out_documents_are_the_same_after_preparing_again_with_other_workers_and_units(synthetic_data, tmp_path):
    """Re-preparing the same raw files with other workers and another unit size gives other
    shards, and the same held-out documents."""
    import shutil

    from xgen.data.prepare import prepare_mix

    cfg, name, src, store = _store(synthetic_data)
    again = tmp_path / "again"
    shutil.copytree(synthetic_data / "synthetic" / "raw", again / "synthetic" / "raw")
    other = compose_config("data_mix=synthetic_stage2", f"data_dir={again}", "prepare.workers=2", "prepare.split_bytes=20000")
    prepare_mix(other.data_mix, Tokenizer.xgen(), other.prepare)
    _, _, _, store2 = _store(again)
    held = np.flatnonzero(heldout_mask(store.keys, SHARE))
    held2 = np.flatnonzero(heldout_mask(store2.keys, SHARE))
    assert len(held) > 0 and _contents(store, held) == _contents(store2, held2)


def test_training_never_reads_a_held_out_document_and_evaluation_reads_only_them(synthetic_data):
    cfg, name, src, store = _store(synthetic_data, "stage=s1_2k", "stage.seq_len=64", "stage.batch_tokens=256")
    pipe = build_pipeline(cfg.data_mix, cfg.stage, Tokenizer.xgen())
    held = set(np.flatnonzero(heldout_mask(store.keys, SHARE)).tolist())
    mine = [p for n, p in zip(pipe.names, pipe.parts) if n == name or n.startswith(name + "/")]
    trained = {int(d) for packed in mine for d in packed.docs}
    assert held and trained and not (held & trained)
    evaluated = {int(d) for d in pipe.heldout[name].docs}
    assert evaluated and evaluated <= held
    report = pipe.report["sources"][name]
    assert report["heldout"]["documents"] == len(pipe.heldout[name].docs)
    assert report["reconciliation"]["removed_by_filters"]["heldout"] >= 1
    # The batches: the stage's shape, the same every time, padding rows masked out.
    batches = pipe.heldout_batches(3)
    again = pipe.heldout_batches(3)
    for source, got in batches.items():
        assert 1 <= len(got) <= 3
        for a, b in zip(got, again[source]):
            assert all(np.array_equal(a[k], b[k]) for k in a)
            assert a["inputs"].shape == (pipe.global_batch, 64) and a["loss_mask"].shape == a["targets"].shape


def test_a_larger_share_only_adds_held_out_documents(synthetic_data):
    _, _, _, store = _store(synthetic_data)
    small, large = heldout_mask(store.keys, 0.05), heldout_mask(store.keys, 0.2)
    assert small.sum() < large.sum() and not (small & ~large).any()


@pytest.mark.parametrize("share", ["-0.1", "0.6"])
def test_a_share_out_of_range_is_one_line(share):
    from xgen.config import ConfigError
    from xgen.config.validate import validate

    with pytest.raises(ConfigError, match=r"data_mix.heldout_share=.* must be a finite number in \[0, 0.5\]"):
        validate(compose_config(f"data_mix.heldout_share={share}"))
