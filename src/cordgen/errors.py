"""Errors a user can act on: the CLI prints them as one line, without a traceback, and exits
with a status that tells a script what kind of failure it was."""

USAGE = 2  # the input, recipe or command line is wrong: nothing ran
RUN_FAILED = 3  # an engine failed to start or failed during the run: what was finished is kept
INTERRUPTED = 130  # Ctrl-C or SIGTERM: what was finished is kept, re-running resumes


class CordgenError(Exception):
    """A problem with the user's input, config or environment, stated in one line."""

    exit_status = USAGE


class ConfigError(CordgenError):
    """A recipe or setting that cannot be used as given."""


class EngineError(CordgenError):
    """An engine that did not start, died, or cannot serve a request as asked."""

    exit_status = RUN_FAILED
