"""The XGen tokenizer as Hugging Face files (`tokenizer.json` and friends), written as JSON.

`AutoTokenizer.from_pretrained(dir)` then gives exactly tiktoken's ids with no custom code
(Salesforce's published tokenizer needs `trust_remote_code` and tiktoken). The file is built
the way transformers' `TikTokenConverter` converts a tiktoken encoding, without importing
`tokenizers` (a test-only dependency here):

- vocab: every mergeable rank, spelled with GPT-2's byte-to-unicode table;
- merges: for each token of two or more bytes, every split into two vocab tokens, ordered by
  the merged token's rank, then by the parts' ranks, so that BPE's lowest-merge-first order
  is tiktoken's lowest-rank-first order;
- `ignore_merges`: a pre-token that is itself a vocab entry is taken whole, as tiktoken does;
- pre-tokenizer: tiktoken's own split regex (GPT-2's), then bytes to unicode; decoder: back.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from xgen.tokenizer.xgen import ENDOFTEXT, EOT_ID, GPT2_PATTERN, XGEN_N_TOKENS, xgen_encoding

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    """BPE vocab and merges equivalent to tiktoken's rank-ordered merging (see module doc)."""
    vocab: dict[str, int] = {}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        vocab[_spell(token)] = rank
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [[_spell(left), _spell(right)] for *_, left, right in merges]


def _added(token_id: int, content: str) -> dict:
    return {
        "id": token_id, "content": content, "single_word": False, "lstrip": False,
        "rstrip": False, "normalized": False, "special": True,
    }  # fmt: skip


def tokenizer_json() -> dict:
    """The contents of `tokenizer.json` for the XGen encoding."""
    enc = xgen_encoding()
    vocab, merges = vocab_and_merges(enc._mergeable_ranks)
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    for content, token_id in specials:  # dense ids 0..n-1, as GPT-2's tokenizer.json
        vocab[content] = token_id
    assert len(vocab) == XGEN_N_TOKENS == enc.n_vocab, (len(vocab), enc.n_vocab)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(token_id, content) for content, token_id in specials],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GPT2_PATTERN}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": None,
        "decoder": {**byte_level, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def tokenizer_config(model_max_length: int = 8192) -> dict:
    """`tokenizer_config.json`: the generic fast tokenizer (no custom code), no added BOS,
    and no clean-up of spaces on decode, so decode(encode(text)) == text."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": special_tokens_map()["additional_special_tokens"],
        "added_tokens_decoder": {
            str(token_id): {k: v for k, v in _added(token_id, content).items() if k != "id"}
            for content, token_id in sorted(xgen_encoding()._special_tokens.items(), key=lambda kv: kv[1])
        },
    }


def special_tokens_map() -> dict:
    specials = sorted(xgen_encoding()._special_tokens, key=xgen_encoding()._special_tokens.get)
    return {
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "additional_special_tokens": [s for s in specials if s != ENDOFTEXT],
    }


def write_tokenizer(out_dir: str | Path, model_max_length: int = 8192) -> list[Path]:
    """Write the XGen tokenizer's Hugging Face files into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contents = {
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": tokenizer_config(model_max_length),
        "special_tokens_map.json": special_tokens_map(),
    }
    paths = []
    for name, data in contents.items():
        path = out / name
        path.write_text(json.dumps(data, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2) + "\n")
        paths.append(path)
    return paths


__all__ = ["EOT_ID", "TOKENIZER_FILES", "tokenizer_json", "write_tokenizer"]
