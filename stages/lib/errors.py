"""The project's error types: each message names the file or key at fault and what to do."""


class StageError(RuntimeError):
    """A stage cannot do its job; ``stage_main`` prints the message on one line and exits with status 2."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the key and the fix."""


class ModelLoadError(StageError):
    """The configured model cannot be loaded; the message names the source, path and what to do."""
