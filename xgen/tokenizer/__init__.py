"""The XGen tokenizer (tiktoken) and its packaged GPT-2 ranks."""

from xgen.tokenizer.xgen import EOT_ID, STARCODER_SPECIALS, Tokenizer, n_tokens_of, xgen_encoding

__all__ = ["EOT_ID", "STARCODER_SPECIALS", "Tokenizer", "n_tokens_of", "xgen_encoding"]
