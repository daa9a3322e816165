"""Supervised fine-tuning (the report's Section 4): instruction datasets → conversations."""

from xgen.sft.formats import Conversation, Turn, load_source

__all__ = ["Conversation", "Turn", "load_source"]
