import json

import grain
import numpy as np
import pytest

from tests.conftest import compose_config
from xgen.config import ConfigError
from xgen.data import build_pipeline
from xgen.data.mixture import mixture_counts, select_parts, stage_chunk
from xgen.data.store import ShardStore
from xgen.tokenizer import Tokenizer

TOK = Tokenizer.xgen()


@pytest.fixture(scope="module")
def demo():
    cfg = compose_config("stage.seq_len=64", "stage.batch_tokens=256")
    return cfg, build_pipeline(cfg.data_mix, cfg.stage, TOK)


def synthetic(data_dir, *overrides):
    cfg = compose_config("data_mix=synthetic_stage2", f"data_dir={data_dir}", "stage.seq_len=64", *overrides)
    return cfg


def rows(batch):
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def test_batches_have_the_stage_shape_and_shifted_targets(demo):
    _, pipe = demo
    batch = pipe.dataset[0]
    assert batch["inputs"].shape == batch["targets"].shape == (4, 64)
    assert batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_same_seed_same_batches_other_seed_other_batches(demo):
    cfg, pipe = demo
    again = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    np.testing.assert_array_equal(pipe.dataset[3]["inputs"], again.dataset[3]["inputs"])
    cfg2 = compose_config("stage.seq_len=64", "stage.batch_tokens=256", "data_mix.seed=1")
    other = build_pipeline(cfg2.data_mix, cfg2.stage, TOK)
    assert not np.array_equal(pipe.dataset[3]["inputs"], other.dataset[3]["inputs"])


def test_every_sequence_comes_from_its_source_in_table_2_proportions(demo):
    _, pipe = demo
    owner = {}
    for name, part in zip(pipe.names, pipe.parts):
        owner.update({part[i]["tokens"].tobytes(): name for i in range(len(part))})
    seen = [owner[r.tobytes()] for i in range(750) for r in rows(pipe.dataset[i])]
    assert len(seen) == 3000
    assert seen.count("python_stdlib") / 3000 == pytest.approx(0.0469, abs=0.001)
    assert mixture_counts(3000, pipe.weights) == [seen.count(n) for n in pipe.names]


def test_mixture_counts_match_grain_and_hold_in_every_window():
    weights = [0.47655, 0.02345, 0.5 * 0.4, 0.5 * 0.3, 0.5 * 0.2, 0.5 * 0.1]
    labels = [grain.MapDataset.source([k]).repeat() for k in range(len(weights))]
    mixed = grain.MapDataset.mix(labels, weights)
    drawn = np.array([mixed[i] for i in range(20000)])
    for n in (1, 7, 999, 20000):
        assert mixture_counts(n, weights) == [int((drawn[:n] == k).sum()) for k in range(len(weights))]
    total = sum(weights)
    for start in range(0, 20000 - 3000, 997):
        window = drawn[start : start + 3000]
        for k, w in enumerate(weights):
            assert abs((window == k).sum() - 3000 * w / total) <= 3  # exact up to rounding


def test_starcoder_half_is_permissive_and_weighted_per_language_by_the_tokens_the_filters_keep(synthetic_data):
    cfg = synthetic(synthetic_data)
    src = cfg.data_mix.sources["starcoder"]
    store = ShardStore(src.path, TOK)
    parts = select_parts("starcoder", src, store, cfg.data_mix, cfg.stage.name)
    kept_docs = np.isin(store.meta["license"], src.licenses) & (store.lengths >= cfg.data_mix.min_doc_tokens)
    by_language = {lang: int(store.lengths[kept_docs & (store.meta["language"] == lang)].sum()) for lang in store.tokens_by("language")}
    total = sum(by_language.values())
    assert {p.name for p in parts} == {f"starcoder/{lang}" for lang in by_language}
    for p in parts:
        lang = p.name.split("/")[1]
        assert p.weight == pytest.approx(0.5 * by_language[lang] / total)
        assert set(store.meta["language"][p.docs]) == {lang}
        assert set(store.meta["license"][p.docs]) <= set(src.licenses)
    kept = np.concatenate([p.docs for p in parts])
    not_permissive = np.isin(store.meta["license"], ["gpl-3.0", "agpl-3.0"])
    assert not_permissive.sum() > 0 and set(np.flatnonzero(~not_permissive)) == set(kept)
    assert sum(p.weight for p in parts) == pytest.approx(0.5)


def test_sub_stage_chunks_are_disjoint_and_cover_the_data(synthetic_data):
    cfg = compose_config("data_mix=synthetic", f"data_dir={synthetic_data}")
    store = ShardStore(cfg.data_mix.sources["natural_language"].path, TOK)
    docs = np.arange(len(store))
    split = cfg.data_mix.stage_split
    chunks = {stage: stage_chunk(docs, store.lengths, split, stage, seed=0) for stage in split}
    union = np.concatenate(list(chunks.values()))
    assert len(union) == len(set(union)) == len(docs)
    shares = {s: store.lengths[c].sum() / store.lengths.sum() for s, c in chunks.items()}
    # Cut at document boundaries: each share is off by at most the largest document.
    largest = store.lengths.max() / store.lengths.sum()
    total = sum(split.values())  # s1_2k 800, s2_4k 400, s3_8k 300, s5_32k 50
    assert shares["s1_2k"] == pytest.approx(800 / total, abs=largest + 0.01)
    assert shares["s3_8k"] == pytest.approx(300 / total, abs=largest + 0.01)
    assert shares["s5_32k"] == pytest.approx(50 / total, abs=largest + 0.01)
    # A stage outside the split (the code stage) reads everything, shuffled.
    assert sorted(stage_chunk(docs, store.lengths, split, "s4_code_8k", seed=0)) == list(docs)


def test_two_processes_batches_together_are_the_single_process_batch(synthetic_data):
    cfg = synthetic(synthetic_data, "stage.batch_tokens=512")
    single = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    hosts = [build_pipeline(cfg.data_mix, cfg.stage, TOK, process_index=p, process_count=2) for p in (0, 1)]
    for step in (0, 1, 5):
        whole = rows(single.dataset[step])
        parts = [rows(h.dataset[step]) for h in hosts]
        assert all(len(p) == len(whole) // 2 for p in parts)
        assert sorted(map(bytes, np.concatenate(parts))) == sorted(map(bytes, whole))


def test_restored_iterator_state_gives_the_same_batches_token_by_token(synthetic_data):
    cfg = synthetic(synthetic_data, "stage.batch_tokens=256")
    pipe = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    it = pipe.iterator()
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as it travels through a checkpoint
    expected = [next(it) for _ in range(4)]
    resumed = build_pipeline(cfg.data_mix, cfg.stage, TOK).iterator()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_a_source_that_runs_out_repeats_and_counts_epochs(synthetic_data):
    cfg = synthetic(synthetic_data, "stage.batch_tokens=2048")
    pipe = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    small = min(range(len(pipe.parts)), key=lambda k: len(pipe.parts[k]) / pipe.weights[k])
    steps = int(3 * len(pipe.parts[small]) / (pipe.weights[small] * pipe.global_batch)) + 1
    epochs = pipe.epochs(steps)
    assert epochs[pipe.names[small]] > 2.5
    assert len(pipe.dataset[steps]["inputs"]) == 32  # still full batches


def test_document_masking_adds_segments_positions_and_loss_mask(synthetic_data):
    cfg = synthetic(synthetic_data, "stage.batch_tokens=256", "data_mix.document_masking=true")
    batch = build_pipeline(cfg.data_mix, cfg.stage, TOK).dataset[0]
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    eot = batch["inputs"] == TOK.eos_id
    assert (batch["loss_mask"][eot] == 0).all() and batch["loss_mask"].mean() > 0.9


def test_unprepared_data_is_refused_in_one_line(tmp_path):
    cfg = compose_config("data_mix=stage1", f"data_dir={tmp_path}")
    with pytest.raises(ConfigError, match="run task=prepare"):
        build_pipeline(cfg.data_mix, cfg.stage, TOK)


def test_data_mix_json_accounts_for_every_document_from_raw_bytes_to_tokens_consumed(synthetic_data, tmp_path):
    cfg = synthetic(synthetic_data)
    pipe = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    pipe.write_report(tmp_path, steps=7)
    report = json.loads((tmp_path / "data_mix.json").read_text())
    rec = report["sources"]["natural_language"]["reconciliation"]
    raw = synthetic_data / "synthetic" / "raw" / "prose"
    assert rec["raw_bytes"] == sum(p.stat().st_size for p in raw.iterdir())  # every byte read, once
    at_prepare = rec["dropped_at_prepare"]
    bad = sum(at_prepare.get(k, 0) for k in ("invalid_utf8", "malformed_json", "missing_field"))
    assert bad > 0 and rec["records_read"] == rec["documents_read"] + bad
    assert rec["documents_read"] == rec["documents_prepared"] + at_prepare["dropped_short"]
    assert rec["documents_prepared"] == rec["documents_kept"] + sum(rec["removed_by_filters"].values())
    assert 0 < rec["documents_this_stage"] <= rec["documents_kept"]
    code = report["sources"]["starcoder"]["reconciliation"]
    assert code["removed_by_filters"]["license"] > 0  # the GPL files, counted where they were removed
    consumed = report["consumed"]
    assert consumed["steps"] == 7 and sum(consumed["tokens_by_source"].values()) == 7 * cfg.stage.batch_tokens
    assert {name: s["reconciliation"]["tokens_consumed"] for name, s in report["sources"].items()} == consumed["tokens_by_source"]


def test_prepared_counts_that_do_not_add_up_are_refused_at_start_up(synthetic_data, tmp_path):
    import shutil

    src = synthetic_data / "synthetic" / "prepared" / "natural_language"
    copy = tmp_path / "synthetic" / "prepared" / "natural_language"
    shutil.copytree(src, copy)
    for other in ("code", "starcoder"):
        shutil.copytree(src.parent / other, copy.parent / other)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["totals"]["records"] += 3  # three documents read that neither the shards nor a drop count holds
    manifest["totals"]["documents_read"] += 3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"natural_language: documents read .* != documents in shards \+ dropped_short .*went missing"):
        build_pipeline(synthetic(tmp_path).data_mix, synthetic(tmp_path).stage, TOK)
