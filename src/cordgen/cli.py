"""The `cordgen` command line: parses arguments, calls the library, prints errors in one line."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
import yaml

from cordgen import __version__
from cordgen.errors import CordgenError

app = typer.Typer(
    name="cordgen",
    help="Synthesize long chain-of-thought data by collaborative step-wise multi-teacher decoding.",
    no_args_is_help=True,
    add_completion=False,
)
USAGE_ERROR = 2
state = {"debug": False}


@contextmanager
def user_errors() -> Iterator[None]:
    """A user's mistake ends as one line on stderr and exit status 2; --debug shows the traceback."""
    try:
        yield
    except CordgenError as error:
        if state["debug"]:
            raise
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(USAGE_ERROR) from None


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cordgen {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """CoRD: teachers propose steps, a scorer ranks them, beam search keeps the best."""
    state["debug"] = debug


@app.command()
def recipe(path: Path = typer.Argument(..., help="A YAML recipe, e.g. configs/paper-heterogeneous.yaml")) -> None:
    """Validate a recipe and print it with every default filled in."""
    from cordgen.config import load_recipe

    with user_errors():
        resolved = load_recipe(path)
    yaml.safe_dump(resolved.model_dump(mode="json"), sys.stdout, sort_keys=False)


def main() -> None:
    app()
