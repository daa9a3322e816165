"""The exported tokenizer files give tiktoken's XGen ids through `AutoTokenizer`, no custom code."""

from __future__ import annotations

import glob
import os
import random

import pytest
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from xgen.hf import write_tokenizer
from xgen.hf.tokenizer_files import tokenizer_json, vocab_and_merges
from xgen.tokenizer import Tokenizer
from xgen.tokenizer.xgen import STARCODER_SPECIALS, xgen_encoding

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, they've said.",
    "def f(x):\n    if x:\n        return x  # two spaces\n\treturn None\n\t\t\tpass\n" + " " * 40 + "deep\n",
    "class A:\n\t\t\t\t\t\t\t\t\t\t\t\tx = 1\r\n    \n\n\n",
    "Unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🤗🚀👩‍💻 and ZWJ.",
    "Numbers 0 12 345 6789 3.14159 1,000,000 2^64 = 18446744073709551616 -42e-3",
    "first<|endoftext|>second <|endoftext|> third",
    "<fim_prefix>def add(a, b):\n<fim_suffix>\n    return c<fim_middle>    c = a + b<|endoftext|>",
    "<filename>src/main.py\n<gh_stars>100\n<commit_before>x<commit_msg>fix<commit_after>y",
    "trailing whitespace   ",
    "trailing newlines and tabs\n\n\t\t",
    "   leading spaces",
    "",
    " ",
    "URLs https://example.com/a?b=c&d=e#frag and e-mail a.b@c.org; paths C:\\Users\\x",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    paths = write_tokenizer(d)
    assert sorted(p.name for p in paths) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    return AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_decoding_match_tiktoken(hf_tokenizer, text):
    want = Tokenizer.xgen().encode(text)
    assert hf_tokenizer.encode(text) == want
    assert hf_tokenizer(text)["input_ids"] == want  # no BOS/EOS added
    assert hf_tokenizer.decode(want) == text


def test_ordinary_encoding_of_real_prose_and_code_matches(hf_tokenizer):
    import pydoc_data.topics

    texts = list(pydoc_data.topics.topics.values())[:40]
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "**", "*.py"), recursive=True))
    for path in random.Random(0).sample(files, 25):
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read()[:20_000])
    tok = Tokenizer.xgen()
    for text in texts:
        assert hf_tokenizer.encode(text, split_special_tokens=True) == tok.encode_ordinary(text)


def test_vocabulary_and_special_tokens(hf_tokenizer):
    assert len(hf_tokenizer) == xgen_encoding().n_vocab == 50313
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == 50256
    assert set(STARCODER_SPECIALS) <= set(hf_tokenizer.all_special_tokens)
    assert hf_tokenizer.convert_tokens_to_ids("<reponame>") == 50312
    assert hf_tokenizer.model_max_length == 8192


def test_vocab_and_merges_are_transformers_tiktoken_conversion():
    # On part of the ranks (transformers' converter takes 25 s over all 50k): single bytes,
    # the first merges, the top GPT-2 ranks and XGen's whitespace runs.
    ranks = {t: r for t, r in xgen_encoding()._mergeable_ranks.items() if r < 3000 or r > 50000}
    converter = TikTokenConverter(vocab_file="unused")
    converter.load_tiktoken_bpe = lambda _: ranks
    want_vocab, want_merges = converter.extract_vocab_merges_from_model("unused")
    vocab, merges = vocab_and_merges(ranks)
    assert vocab == want_vocab and [tuple(m) for m in merges] == want_merges
    full = tokenizer_json()["model"]
    assert all(full["vocab"][k] == v for k, v in vocab.items())
