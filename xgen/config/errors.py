"""The one exception for a config or input that cannot run (shown as one line, exit 2)."""


class ConfigError(ValueError):
    """A config that composes but makes no sense (e.g. heads that do not divide d_model)."""

    label = "config error"  # how `python -m xgen.run` introduces the line (a subclass may say "refused")


class StorageError(ConfigError):
    """A file system that cannot take the run's files (full, read-only, not a directory):
    said in one line naming the path and the cause; a restart cannot help until someone acts."""

    label = "storage error"
