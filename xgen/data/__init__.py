"""Data: raw readers, `prepare` into shards, document stores, packing, mixtures, the grain loader."""

from xgen.data.loader import DataPipeline, build_pipeline

__all__ = ["DataPipeline", "build_pipeline"]
