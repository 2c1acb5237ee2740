"""The one error type the CLI turns into a one-line message (no traceback)."""


class ConfigError(ValueError):
    """A bad config, dataset, column, model or layer mapping; the message is one line."""
