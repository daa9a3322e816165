"""The one exception for a config or input that cannot run (shown as one line, exit 2)."""


class ConfigError(ValueError):
    """A config that composes but makes no sense (e.g. heads that do not divide d_model)."""
