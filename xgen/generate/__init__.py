"""Generation: a KV-cached, batched sampler (`Engine`), the chat format, and model loading."""

from xgen.generate.engine import Completion, Engine, SamplingConfig, Scored, settings_from_config

__all__ = ["Completion", "Engine", "SamplingConfig", "Scored", "settings_from_config"]
