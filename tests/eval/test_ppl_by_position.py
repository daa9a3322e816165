"""Perplexity by position (task=eval eval=ppl_by_position): per-position NLL against the
model's own forward pass, short documents skipped and counted, log buckets, one curve per
checkpoint, the PNG, and resume."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from xgen.config import ConfigError
from xgen.eval import ppl_by_position as ppl
from xgen.eval.common import ItemStore
from xgen.eval.fixtures.ppl_by_position import logbook, write
from xgen.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.xgen()


def write_docs(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


class CountingEngine:
    """Forwards to a real engine and records which sequences it scored."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def score(self, sequences):
        self.calls.append([list(s) for s in sequences])
        return self.engine.score(sequences)


def test_per_position_nll_is_the_models_own_log_softmax(tiny_model, tiny_engine, tokenizer, tmp_path):
    import jax
    import jax.numpy as jnp

    _, model, _ = tiny_model
    texts = [logbook(seed, 6) for seed in range(3)]
    docs, counts = ppl.read_documents(write_docs(tmp_path / "d.jsonl", texts), tokenizer, 40)
    assert counts == {"documents": 3, "documents_read": 3, "skipped_short": 0}
    engine = CountingEngine(tiny_engine)
    nll = ppl.score_documents(engine, docs, 2, ItemStore(None, {}), "ckpt")
    assert [len(c) for c in engine.calls] == [2, 1] and nll.shape == (3, 39)  # batched; 39 positions each
    limit = tiny_engine.vocab_limit
    for doc, row in zip(docs, nll):
        assert doc.ids == tokenizer.encode_ordinary(texts[int(doc.id) - 1])[:40]
        logits = np.asarray(model(jnp.asarray([doc.ids]))[0, :-1, :limit], np.float64)
        logprobs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        expected = -logprobs[np.arange(39), doc.ids[1:]]
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-4)
    assert nll.std() > 0.1  # not a constant that would match anything


def test_short_documents_are_skipped_counted_and_limit_caps_the_kept_ones(tokenizer, tmp_path):
    texts = [logbook(0, 30), "too short", logbook(1, 30), "", logbook(2, 30), logbook(3, 30)]
    path = write_docs(tmp_path / "d.jsonl", texts)
    docs, counts = ppl.read_documents(path, tokenizer, 100, limit=2)
    assert [d.id for d in docs] == ["1", "3"] and all(len(d.ids) == 100 for d in docs)
    assert counts == {"documents": 2, "documents_read": 3, "skipped_short": 1}
    docs, counts = ppl.read_documents(path, tokenizer, 100)
    assert [d.id for d in docs] == ["1", "3", "5", "6"] and counts["skipped_short"] == 2
    with pytest.raises(ConfigError, match="none of the 2 documents .* eval.min_tokens=100"):
        ppl.read_documents(write_docs(tmp_path / "s.jsonl", ["a", "b"]), tokenizer, 100)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl record 2 has no string 'text'"):
        ppl.read_documents(tmp_path / "bad.jsonl", tokenizer, 2)


def test_log_buckets_cover_every_position_once_and_bucket_ppl_is_exp_mean_nll():
    assert ppl.log_buckets(8192) == [(2**k, 2 ** (k + 1)) for k in range(13)]
    assert [ppl.bucket_label(*b) for b in ppl.log_buckets(8192)][-2:] == ["2K-4K", "4K-8K"]
    assert ppl.log_buckets(100) == [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 100)]
    fine = ppl.log_buckets(300, per_octave=4)
    positions = [p for lo, hi in fine for p in range(lo, hi)]
    assert positions == list(range(1, 300))
    mean_nll = np.log(np.arange(1, 100, dtype=np.float64))  # position p has NLL log(p)
    got = ppl.bucket_ppl(mean_nll, [(1, 2), (4, 8), (64, 100)])
    assert got == pytest.approx([1.0, math.exp(np.log([4, 5, 6, 7]).mean()), math.exp(np.log(np.arange(64, 100)).mean())])


def test_plot_is_a_png_with_a_log_scaled_position_axis(tmp_path):
    path = tmp_path / "p.png"
    curves = {"2k": np.linspace(5, 3, 255), "8k": np.linspace(5, 2, 255)}
    assert ppl.plot_curves(path, curves, 256) == "log"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_checkpoints(tiny_model, tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint and one with other weights, in directories named like stages."""
    from flax import nnx

    from xgen.checkpoint import save_params
    from xgen.model.transformer import XGenModel

    cfg, _, _ = tiny_model
    other = nnx.state(XGenModel(cfg, rngs=nnx.Rngs(1)), nnx.Param)
    root = tmp_path_factory.mktemp("stages")
    save_params(root / "8k", other, {"config": {"model": dataclasses.asdict(cfg)}})
    return tiny_checkpoint, root / "8k"


def test_two_checkpoints_give_two_curves_a_table_a_plot_and_resume(two_checkpoints, run_eval, tmp_path, monkeypatch):
    first, second = two_checkpoints
    write(tmp_path / "data")  # 3 long logbooks, notes of 242 and 322 tokens
    run_dir = tmp_path / "run"
    args = ("eval=ppl_by_position", f"eval.checkpoints=[{first},{second}]", f"data_dir={tmp_path / 'data'}",
            "eval.min_tokens=300", "generate.max_len=128")  # fmt: skip
    result = run_eval(run_dir, *args)
    assert (result["documents"], result["documents_read"], result["skipped_short"]) == (4, 5, 1)
    labels = [first.name, "8k"]
    assert list(result["curves"]) == labels
    assert result["bucket_labels"] == ["1-2", "2-4", "4-8", "8-16", "16-32", "32-64", "64-128", "128-256", "256-300"]
    a, b = (result["curves"][k] for k in labels)
    assert len(a["ppl_by_position"]) == 300 and a["ppl_by_position"][0] is None
    assert a["ppl"] != pytest.approx(b["ppl"], rel=1e-3)  # other weights, another curve
    assert json.loads((run_dir / "ppl_by_position.json").read_text())["curves"] == result["curves"]
    md = (run_dir / "ppl_by_position.md").read_text().splitlines()
    assert md[0].startswith("| Model | 1-2 | 2-4 |") and md[0].endswith("| 256-300 | All |")
    assert md[2].startswith(f"| {first.name} |") and md[3].startswith("| 8k |") and "1 of 5 read" in md[5]
    assert (run_dir / "ppl_by_position.png").read_bytes()[:4] == b"\x89PNG" and result["plot_x_scale"] == "log"
    partial = run_dir / "ppl_by_position_partial.jsonl"
    assert len(partial.read_text().splitlines()) == 8  # (checkpoint, document) pairs

    def no_model(*a, **k):
        raise AssertionError("a finished run loaded a model again")

    monkeypatch.setattr(ppl, "load_checkpoint_engine", no_model)
    again = run_eval(run_dir, *args)
    assert again["curves"] == result["curves"] and len(partial.read_text().splitlines()) == 8
    with pytest.raises(AssertionError, match="loaded a model"):  # other settings: not reused
        run_eval(run_dir, *args[:-2], "eval.min_tokens=200", "generate.max_len=128")


def test_resume_scores_only_the_documents_not_yet_stored(tiny_engine, tokenizer, tmp_path):
    docs, _ = ppl.read_documents(write_docs(tmp_path / "d.jsonl", [logbook(s, 4) for s in range(3)]), tokenizer, 24)
    path = tmp_path / "partial.jsonl"
    first = ppl.score_documents(tiny_engine, docs[:2], 8, ItemStore(path, {"min_tokens": 24}), "a")
    engine = CountingEngine(tiny_engine)
    both = ppl.score_documents(engine, docs, 8, ItemStore(path, {"min_tokens": 24}), "a")
    assert engine.calls == [[docs[2].ids]]
    np.testing.assert_array_equal(both[:2], first)
    ppl.score_documents(engine, docs, 8, ItemStore(path, {"min_tokens": 24}), "b")  # another checkpoint's key
    assert len(engine.calls) == 2 and len(engine.calls[1]) == 3


def test_missing_data_or_checkpoint_fails_before_a_model_loads(tiny_checkpoint, run_eval, tmp_path, monkeypatch):
    monkeypatch.setattr(ppl, "load_checkpoint_engine", lambda *a: pytest.fail("loaded a model before checking"))
    with pytest.raises(ConfigError, match=r"file not found: expected .*nowhere/ppl/heldout.jsonl"):
        run_eval(tmp_path / "r", "eval=ppl_by_position", f"checkpoint={tiny_checkpoint}", f"data_dir={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="checkpoint .*missing: no such directory"):
        run_eval(tmp_path / "r", "eval=ppl_by_position", f"eval.checkpoints=[{tiny_checkpoint},{tmp_path / 'missing'}]")


def test_scoring_in_chunks_of_positions_equals_one_pass(tiny_model, tiny_engine, tokenizer, tmp_path):
    from xgen.generate.engine import Engine

    _, _, params = tiny_model
    chunked = Engine(tiny_engine.runtime, params, tokenizer, max_len=1024, score_chunk=16)
    docs, _ = ppl.read_documents(write_docs(tmp_path / "d.jsonl", [logbook(s, 8) for s in range(3)]), tokenizer, 100)
    one_pass = ppl.score_documents(tiny_engine, docs, 2, ItemStore(None, {}), "a")
    in_chunks = ppl.score_documents(chunked, docs, 2, ItemStore(None, {}), "a")  # 99 positions: 7 chunks, the last padded
    np.testing.assert_allclose(in_chunks, one_pass, atol=1.01e-5, rtol=0)  # stored to 5 decimals: one step of rounding
    a, b = tiny_engine.score([d.ids for d in docs], top_logprobs=3), chunked.score([d.ids for d in docs], top_logprobs=3)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.token_logprobs[1:], y.token_logprobs[1:], atol=1e-5, rtol=0)
        assert x.greedy_tokens == y.greedy_tokens
        assert [t and set(t) for t in x.top_logprobs] == [t and set(t) for t in y.top_logprobs]
    assert np.std(a[0].token_logprobs[1:]) > 0.1  # not a constant that would match anything


# Runs `python -m xgen.run` in-process and prints the process's peak RSS after it.
def test_an_8k_document_is_scored_in_bounded_memory(tiny_checkpoint, tmp_path):
    """The documented long-document command (the output head over 1,024 positions at a time,
    block-causal attention) at 8,192 tokens: one pass would hold 2 x 1.7 GB of logits and
    log-probabilities and 2 x 1 GiB of dense attention scores (3.6 GiB peak, measured); 32K by
    hand: docs/long-context.md."""
    from tests.peak_memory import run_measuring_peak

    write(tmp_path / "data")  # logbooks of 8.5K to 9.8K tokens
    args = ("task=eval", "eval=ppl_by_position", f"checkpoint={tiny_checkpoint}", f"data_dir={tmp_path / 'data'}",
            "eval.min_tokens=8192", "eval.limit=1", "eval.batch_size=1", "execution.attention=block_causal",
            "execution.attention_chunk=512", f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    proc, peak = run_measuring_peak(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"peak RSS scoring one 8,192-token document on tiny: {peak / 2**30:.2f} GiB")
    result = json.loads((tmp_path / "run" / "ppl_by_position.json").read_text())
    curve = next(iter(result["curves"].values()))
    assert result["documents"] == 1 and len(curve["ppl_by_position"]) == 8192 and math.isfinite(curve["ppl"])
    assert peak < 2 * 2**30
