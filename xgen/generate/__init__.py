"""Generation: a KV-cached, batched sampler (`Engine`), the chat format, and model loading."""

from xgen.generate.engine import Completion, Engine, SamplingSettings, Scored, settings_from_config

__all__ = ["Completion", "Engine", "SamplingSettings", "Scored", "settings_from_config"]
