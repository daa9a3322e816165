"""`weight_by` shares are taken after the source's filters, as StarCoderData publishes them.

The fixture is The Stack dedup in its public layout (tests/data/released.py) with uneven
license mixes per language: 80% of the Go files under GPL-only licenses, 10% of the Python
files, none of the JavaScript files. Weighted by the tokens counted before the license
filter, Go would be drawn about three times more often than its share of what is read.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.data import released
from tests.data.test_released_layouts import configure as configure_mix
from xgen.config import ConfigError, DataMixConfig, SourceConfig
from xgen.data import build_pipeline
from xgen.data.addresses import LIST_SEP
from xgen.data.mixture import _value_codes, select_parts
from xgen.data.prepare import prepare_mix
from xgen.data.store import DocumentStore, ShardStore
from xgen.tokenizer import Tokenizer
from xgen.tokenizer.xgen import encode_to_arrays

TOK = Tokenizer.xgen()
MIN_DOC_TOKENS = 100  # data_mix.min_doc_tokens, the report's rule
LANGS = {"go": "Go", "python": "Python", "javascript": "JavaScript"}
DOCS_PER_LANG = 20
# Of every 10 files, how many carry only non-permissive licenses (or none detected).
NON_PERMISSIVE_IN_10 = {"go": 8, "python": 1, "javascript": 0}
NOT_PERMISSIVE = [["gpl-3.0"], ["agpl-3.0", "lgpl-2.1"], [], ["gpl-2.0"]]
PERMISSIVE = [["mit"], ["gpl-3.0", "apache-2.0"], ["BSD-3-Clause"], ["isc"]]  # a list passes on any element


def stack_licenses(lang: str, i: int) -> list[str]:
    pool = NOT_PERMISSIVE if i % 10 < NON_PERMISSIVE_IN_10[lang] else PERMISSIVE
    return pool[i % len(pool)]


def write_the_stack(root):
    """data/<lang>/data-00000-of-00001.parquet with The Stack dedup's columns, list-typed licenses."""
    released.the_stack(root, {lang: DOCS_PER_LANG for lang in LANGS}, licenses_of=stack_licenses, seed=300)


def expected_shares() -> tuple[dict[str, float], dict[str, float]]:
    """(share of each language's tokens before the license filter, after it), counted from
    the written documents and their license lists, not from anything `prepare` stored."""
    before, after = {}, {}
    for lang, name in LANGS.items():
        texts = released.code(lang, DOCS_PER_LANG, seed=300 + len(lang))
        lengths = [len(ids) for ids in encode_to_arrays(texts)]
        allowed = {x.lower() for x in released.PERMISSIVE}
        passes = [any(x.lower() in allowed for x in stack_licenses(lang, i)) for i in range(len(texts))]
        before[name] = sum(n for n in lengths if n >= MIN_DOC_TOKENS)
        after[name] = sum(n for n, ok in zip(lengths, passes) if ok and n >= MIN_DOC_TOKENS)
    return ({k: v / sum(before.values()) for k, v in before.items()}, {k: v / sum(after.values()) for k, v in after.items()})


def configure(data_dir, *overrides):
    # No held-out documents: the shares below are counted over every document (the held-out
    # split, which comes first, has its own tests in test_heldout.py).
    return configure_mix(data_dir, "stage2_the_stack", "data_mix.heldout_share=0", *overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """stage2_the_stack's sources as released under raw/, prepared."""
    root = tmp_path_factory.mktemp("stack_licenses")
    released.redpajama(root / "raw" / "natural_language")
    released.redpajama_github(root / "raw" / "code")
    write_the_stack(root / "raw" / "the_stack")
    cfg = configure(root)
    prepare_mix(cfg.data_mix, TOK, cfg.prepare)
    return root


def test_each_languages_weight_is_its_share_of_the_tokens_the_license_filter_keeps(data_dir):
    cfg = configure(data_dir)
    src = cfg.data_mix.sources["starcoder"]
    store = ShardStore(src.path, TOK)
    before, after = expected_shares()
    parts = {p.name.split("/")[1]: p for p in select_parts("starcoder", src, store, cfg.data_mix, cfg.stage.name)}
    assert set(parts) == set(LANGS.values())
    for lang, part in parts.items():
        assert part.weight == pytest.approx(src.weight * after[lang], rel=1e-9), lang
        assert set(store.meta["language"][part.docs]) == {lang}
        assert part.dropped.get("license", 0) == round(DOCS_PER_LANG * NON_PERMISSIVE_IN_10[lang.lower()] / 10)
    # The pre-filter share would draw Go about three times too often (80% of its files are GPL).
    assert before["Go"] > 2.5 * after["Go"]
    assert parts["Go"].weight < 0.5 * src.weight * before["Go"]
    assert parts["JavaScript"].weight > src.weight * before["JavaScript"]  # it takes Go's lost share
    assert sum(p.weight for p in parts.values()) == pytest.approx(src.weight)


def test_the_pipeline_configures_and_draws_each_language_part_at_its_post_filter_share(data_dir):
    cfg = configure(data_dir)
    pipe = build_pipeline(cfg.data_mix, cfg.stage, TOK)
    _, after = expected_shares()
    rows = {r["part"]: r for r in pipe.report["parts"] if r["source"] == "starcoder"}
    assert set(rows) == {f"starcoder/{lang}" for lang in LANGS.values()}
    half = cfg.data_mix.sources["starcoder"].weight / sum(s.weight for s in cfg.data_mix.sources.values())
    for lang, share in after.items():
        row = rows[f"starcoder/{lang}"]
        assert row["configured_weight"] == pytest.approx(half * share, abs=2e-6), lang
        assert row["weight"] == pytest.approx(half * share, rel=cfg.data_mix.weight_tolerance), lang
    # What the model reads: 2,000 sequences, each traced back to the part it came from.
    owner = {}
    for name, part in zip(pipe.names, pipe.parts):
        owner.update({part[i]["tokens"].tobytes(): name for i in range(len(part))})
    seen = []
    for step in range(50):
        batch = pipe.dataset[step]
        seen += [owner[r.tobytes()] for r in np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)]
    code = [s for s in seen if s.startswith("starcoder/")]
    for lang, share in after.items():
        assert code.count(f"starcoder/{lang}") / len(code) == pytest.approx(share, abs=0.01), lang


class ArrayStore(DocumentStore):
    """Per-document token counts and metadata only: what `select_parts` reads of a store."""

    def __init__(self, lengths, short_by=None, **meta):
        self.lengths = np.asarray(lengths, np.int64)
        self.meta = {k: np.asarray(v, dtype=str) for k, v in meta.items()}
        self.keys = np.full(len(self.lengths), 0xFFFF, np.uint16)  # none held out
        self._short_by = short_by or {}

    def dropped_short_by(self, field: str) -> dict[str, int]:
        return self._short_by.get(field, {})


def mix_of(src: SourceConfig, **kw) -> DataMixConfig:
    return DataMixConfig(name="t", sources={"star": src}, **kw)


def random_store(n: int, seed: int = 0) -> ArrayStore:
    rng = np.random.default_rng(seed)
    language = rng.choice(["Go", "Python", "Rust"], n, p=[0.3, 0.5, 0.2])
    # Go mostly GPL, Python rarely, Rust never; lengths differ by language too.
    gpl = rng.random(n) < np.select([language == "Go", language == "Python"], [0.8, 0.1], 0.0)
    license_ = np.where(gpl, "gpl-3.0", "mit")
    lengths = rng.integers(20, 2000, n) * np.where(language == "Rust", 2, 1)
    subset = rng.choice(["a", "b"], n)
    return ArrayStore(lengths, language=language, license=license_, subset=subset)


def test_min_doc_tokens_licenses_and_where_all_count_before_the_shares_are_taken():
    store = random_store(20_000)
    src = SourceConfig(kind="prepared", weight=0.5, weight_by="language", licenses=["mit"], where={"subset": ["a"]})
    mix = mix_of(src, min_doc_tokens=300)
    parts = select_parts("star", src, store, mix, "s4_code_8k")
    m = store.meta
    kept = (store.lengths >= 300) & (m["license"] == "mit") & (m["subset"] == "a")
    total = store.lengths[kept].sum()
    for p in parts:
        lang = p.name.split("/")[1]
        assert p.weight == pytest.approx(0.5 * store.lengths[kept & (m["language"] == lang)].sum() / total, rel=1e-12)
        assert sorted(p.docs) == list(np.flatnonzero(kept & (m["language"] == lang)))
        of_lang = m["language"] == lang
        assert p.dropped.get("min_doc_tokens", 0) == int((of_lang & (store.lengths < 300)).sum())
    go = {p.name: p for p in parts}["star/Go"]
    assert go.weight < 0.5 * 0.5 * store.lengths[m["language"] == "Go"].sum() / store.lengths.sum()


def test_every_sub_stage_weights_the_languages_the_same_from_all_kept_documents():
    store = random_store(5_000, seed=1)
    src = SourceConfig(kind="prepared", weight=1.0, weight_by="language", licenses=["mit"])
    mix = mix_of(src, min_doc_tokens=1, stage_split={"s1_2k": 800, "s2_4k": 400, "s3_8k": 300})
    by_stage = {s: select_parts("star", src, store, mix, s) for s in mix.stage_split}
    weights = {s: [p.weight for p in parts] for s, parts in by_stage.items()}
    assert weights["s1_2k"] == weights["s2_4k"] == weights["s3_8k"]
    chunks = [np.concatenate([p.docs for p in parts]) for parts in by_stage.values()]
    assert sum(map(len, chunks)) == len(set(np.concatenate(chunks))) == int((store.meta["license"] == "mit").sum())


def test_a_language_the_filters_empty_stays_a_part_with_no_documents_and_no_weight():
    store = ArrayStore(
        [150, 250, 400, 120], short_by={"language": {"Go": 3}},
        language=["Go", "Go", "Python", "Python"], license=["gpl-3.0", "agpl-3.0", "mit", "mit"],
    )  # fmt: skip
    src = SourceConfig(kind="prepared", weight=0.5, weight_by="language", licenses=["mit"], allow_empty=True)
    parts = {p.name: p for p in select_parts("star", src, store, mix_of(src), "s4_code_8k")}
    assert list(parts) == ["star/Go", "star/Python"]
    assert len(parts["star/Go"].docs) == 0 and parts["star/Go"].weight == 0
    assert parts["star/Go"].dropped == {"dropped_short": 3, "license": 2}  # prepare's drops, per value, kept
    assert parts["star/Python"].weight == 0.5 and sorted(parts["star/Python"].docs) == [2, 3]


def test_a_list_valued_or_missing_weight_by_field_is_refused_in_one_line():
    store = ArrayStore([200, 200, 200], language=["Go", f"Python{LIST_SEP}Shell", f"C{LIST_SEP}Shell"])
    src = SourceConfig(kind="prepared", weight=0.5, weight_by="language")
    with pytest.raises(ConfigError, match=r"weight_by='language': 2 documents have several values"):
        select_parts("star", src, store, mix_of(src), "s4_code_8k")
    src = replace(src, weight_by="lang")
    with pytest.raises(ConfigError, match=r"weight_by='lang': the data has no such metadata"):
        select_parts("star", src, store, mix_of(src), "s4_code_8k")


@pytest.mark.parametrize("n", [0, 1, 999, 1000, 2501])
def test_values_coded_a_chunk_at_a_time_are_numpys_unique_and_inverse(n):
    rng = np.random.default_rng(n)
    stored = np.asarray([f"v{k}" for k in rng.zipf(1.5, n) % 50], dtype=str)  # some values in one chunk only
    values, code = _value_codes(stored, chunk=1000)
    want_values, want_code = np.unique(stored, return_inverse=True)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(code, want_code.reshape(-1))
