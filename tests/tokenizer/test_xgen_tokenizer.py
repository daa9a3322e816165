import base64

import pytest

from xgen.tokenizer import STARCODER_SPECIALS, Tokenizer
from xgen.tokenizer import xgen as xgen_module


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.xgen()


def test_vocabulary_has_50313_tokens_and_endoftext_is_50256(tok):
    assert tok.n_tokens == 50313
    assert tok.eos_id == 50256
    assert tok.encode("<|endoftext|>") == [50256]


def test_space_runs_take_ids_50257_to_50286_longest_first(tok):
    assert tok.encode_ordinary(" " * 31) == [50257]
    assert tok.encode_ordinary(" " * 2) == [50286]
    for n in range(2, 32):
        assert tok.encode_ordinary(" " * n) == [50257 + 31 - n]


def test_tab_runs_take_ids_50287_to_50294_longest_first(tok):
    for n in range(2, 10):
        assert tok.encode_ordinary("\t" * n) == [50287 + 9 - n]


def test_starcoder_specials_take_ids_50295_to_50312_in_order(tok):
    assert len(STARCODER_SPECIALS) == 18
    for i, special in enumerate(STARCODER_SPECIALS):
        assert tok.encode(special) == [50295 + i]
    assert STARCODER_SPECIALS[0] == "<fim_prefix>" and STARCODER_SPECIALS[-1] == "<reponame>"


def test_no_added_rank_collides_with_a_gpt2_rank():
    gpt2 = xgen_module.load_gpt2_ranks()
    assert len(gpt2) == 50256 and max(gpt2.values()) == 50255
    added = [run.encode() for run in xgen_module.SPACE_RUNS + xgen_module.TAB_RUNS]
    assert not set(added) & set(gpt2)
    enc = xgen_module.xgen_encoding()
    assert len(set(enc._mergeable_ranks.values())) == len(enc._mergeable_ranks) == 50256 + 38


def test_gpt2_text_keeps_gpt2_ids(tok):
    # "Hello world" is [15496, 995] in GPT-2.
    assert tok.encode_ordinary("Hello world") == [15496, 995]


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n\treturn x  +  1\n",
        "class A:\n" + " " * 40 + "pass\n\t\t\t\tend",
        "naïve café — 日本語のテキスト, emoji 🤖 and Ελληνικά",
        "prefix <fim_prefix>code<fim_suffix> and <|endoftext|> inside",
        "",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_special_strings_are_specials_in_encode_but_text_in_encode_ordinary(tok):
    text = "a<fim_middle>b"
    assert 50296 in tok.encode(text)
    ordinary = tok.encode_ordinary(text)
    assert all(i < 50257 for i in ordinary) and tok.decode(ordinary) == text


def test_batch_encode_matches_single_encode(tok):
    texts = ["one document", "another\n\n  with   spaces", "x" * 1000]
    assert tok.encode_ordinary_batch(texts, num_threads=2) == [tok.encode_ordinary(t) for t in texts]


def test_a_ranks_file_with_the_wrong_hash_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(base64.b64encode(b"!") + b" 0\n")

    class FakeFiles:
        def joinpath(self, name):
            return bad

    monkeypatch.setattr(xgen_module.resources, "files", lambda package: FakeFiles())
    with pytest.raises(ValueError, match="sha256"):
        xgen_module.load_gpt2_ranks()
