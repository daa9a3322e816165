"""The LLaMA/XGen transformer in Flax NNX."""

from xgen.model.transformer import XGenModel, count_params

__all__ = ["XGenModel", "count_params"]
