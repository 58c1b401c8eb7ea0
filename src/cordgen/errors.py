"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class CordgenError(Exception):
    """A problem with the user's input, config or environment, stated in one line."""


class ConfigError(CordgenError):
    """A recipe or setting that cannot be used as given."""


class EngineError(CordgenError):
    """An engine that cannot serve a request as asked (too long, untrustworthy output)."""
