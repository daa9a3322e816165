"""Data: sources, packing into sequences, and the grain loader."""

from xgen.data.loader import build_dataset
from xgen.data.packing import PackStats, pack_documents

__all__ = ["PackStats", "build_dataset", "pack_documents"]
