"""xgen: a Hydra-composed JAX/Flax reproduction of the XGen-7B training system."""

__version__ = "0.1.0"
