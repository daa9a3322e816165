"""XGen's tokenizer as a `tiktoken.Encoding`, built exactly as Salesforce's published one.

GPT-2's byte-pair ranks (0-50255) and `<|endoftext|>` (50256), then, as ordinary ranks,
runs of 31..2 spaces (50257-50286) and 9..2 tabs (50287-50294), then 18 StarCoder special
tokens (50295-50312): 50,313 tokens. The ranks file ships with the package and is checked
against its sha256; nothing is fetched.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Iterable, Sequence

import tiktoken

if TYPE_CHECKING:
    import numpy as np

GPT2_RANKS_FILE = "gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenization pattern, as tiktoken's "gpt2" encoding.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
SPACE_RUNS = tuple(" " * n for n in range(31, 1, -1))
TAB_RUNS = tuple("\t" * n for n in range(9, 1, -1))
STARCODER_SPECIALS = (
    "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
    "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
    "<commit_after>", "<reponame>",
)  # fmt: skip
XGEN_N_TOKENS = EOT_ID + 1 + len(SPACE_RUNS) + len(TAB_RUNS) + len(STARCODER_SPECIALS)


def load_gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's ranks from the packaged file, refusing a file whose sha256 is not GPT-2's.

    Parsed here rather than with `tiktoken.load.load_tiktoken_bpe`, which copies every file
    it reads into a cache directory.
    """
    data = resources.files(__package__).joinpath(GPT2_RANKS_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise ValueError(f"xgen/tokenizer/{GPT2_RANKS_FILE}: sha256 {digest} is not GPT-2's {GPT2_RANKS_SHA256}")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


@cache
def xgen_encoding() -> tiktoken.Encoding:
    """The XGen encoding (built once per process; tiktoken encodings are thread-safe)."""
    ranks = load_gpt2_ranks()
    next_id = EOT_ID + 1
    for run in SPACE_RUNS + TAB_RUNS:
        ranks[run.encode("ascii")] = next_id
        next_id += 1
    specials = {ENDOFTEXT: EOT_ID}
    for token in STARCODER_SPECIALS:
        specials[token] = next_id
        next_id += 1
    return tiktoken.Encoding(name="xgen", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


class Tokenizer:
    """A thin, typed face over a tiktoken Encoding; what the data pipeline and generation use."""

    def __init__(self, encoding: tiktoken.Encoding, eos_id: int):
        self.encoding = encoding
        self.eos_id = eos_id

    @classmethod
    def xgen(cls) -> "Tokenizer":
        return cls(xgen_encoding(), EOT_ID)

    @classmethod
    def from_name(cls, name: str) -> "Tokenizer":
        if name != "xgen":
            raise ValueError(f"tokenizer.name={name!r}: only 'xgen' is known")
        return cls.xgen()

    @property
    def n_tokens(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Special-token strings in `text` become their ids, as the published XGen tokenizer does."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """Special-token strings are plain text: what pre-training data uses."""
        return self.encoding.encode_ordinary(text)

    def encode_with_special_at(self, text: str, special: str, positions: Sequence[int]) -> list[int]:
        """`text` as ordinary text except `special` at the character `positions`, which
        becomes its id: a template's own end-of-text is a control token, the same string
        typed in a conversation is not. A `special` that is not a special token of this
        tokenizer is ordinary text everywhere. Cutting only where the template put it is
        where whole-text encoding cuts too, so the BPE merges are the same."""
        if special not in self.encoding.special_tokens_set:
            return self.encode_ordinary(text)
        special_id = self.encoding.encode_single_token(special)
        ids: list[int] = []
        start = 0
        for at in positions:
            ids += self.encode_ordinary(text[start:at])
            ids.append(special_id)
            start = at + len(special)
        return ids + self.encode_ordinary(text[start:])

    def encode_ordinary_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Encode many documents on tiktoken's thread pool (the GIL is released while encoding)."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    @property
    def identity(self) -> str:
        """A hash of the ranks, split pattern and specials, written into data manifests so that
        shards tokenized by another tokenizer are refused."""
        return encoding_identity(self.encoding)


@cache
def encoding_identity(encoding: tiktoken.Encoding) -> str:
    h = hashlib.sha256(encoding._pat_str.encode())
    for token, rank in sorted(encoding._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + token)
    for token, rank in sorted(encoding._special_tokens.items()):
        h.update(rank.to_bytes(4, "little") + token.encode())
    return f"{encoding.name}-{h.hexdigest()[:16]}"


def encode_to_arrays(texts: Sequence[str], name: str = "xgen") -> list["np.ndarray"]:
    """Ordinary encoding to compact arrays (uint16 while the vocabulary fits, as XGen's does),
    on one thread: what a `task=prepare` unit's worker runs on its own core."""
    import numpy as np

    tok = Tokenizer.from_name(name)
    dtype = np.uint16 if tok.n_tokens <= 2**16 else np.uint32
    return [np.asarray(ids, dtype) for ids in tok.encoding.encode_ordinary_batch(list(texts), num_threads=1)]


def n_tokens_of(name: str) -> int:
    """Token count of a named tokenizer without building it (config validation)."""
    if name != "xgen":
        raise ValueError(f"tokenizer.name={name!r}: only 'xgen' is known")
    return XGEN_N_TOKENS
