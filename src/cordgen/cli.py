"""The `cordgen` command line: parses arguments, calls the library, prints errors in one line."""

from __future__ import annotations

import os
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
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if debug else "WARNING")


@app.command()
def recipe(
    path: Path = typer.Argument(..., help="A YAML recipe, e.g. configs/paper-heterogeneous.yaml"),
) -> None:
    """Validate a recipe and print it with every default filled in."""
    from cordgen.config import load_recipe

    with user_errors():
        resolved = load_recipe(path)
    yaml.safe_dump(resolved.model_dump(mode="json"), sys.stdout, sort_keys=False)


def split_list(value: str | None) -> list[str] | None:
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


@app.command()
def synth(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML recipe (see configs/)."),
    teachers: str | None = typer.Option(
        None, "--teachers", help="Comma-separated teacher names or model ids/paths."
    ),
    scorer: str | None = typer.Option(
        None, "--scorer", help="Scorer: the recipe's, a teacher's name, or a model."
    ),
    input: Path | None = typer.Option(
        None, "--input", "-i", help="JSONL of problems (id, question, answer)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run directory to write."),
    beam_width: int | None = typer.Option(None, "--beam-width", help="B: trajectories kept per problem."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Rounds before live beams are closed."),
    strategy: str | None = typer.Option(None, "--strategy", help="cord | single | curate"),
    seed: int | None = typer.Option(None, "--seed", help="Base of every sampling seed."),
    shard: str | None = typer.Option(
        None, "--shard", help="i/N: only the problems whose id hashes to shard i."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the run directory over."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or summary."),
) -> None:
    """Synthesize step-wise multi-teacher reasoning traces for every problem of the input.

    Re-running the same command resumes: finished problems are kept and skipped."""
    from cordgen.config import resolve_recipe
    from cordgen.problems import parse_shard

    overrides = dict(
        teachers=split_list(teachers),
        scorer=scorer,
        input=input,
        out=out,
        beam_width=beam_width,
        max_steps=max_steps,
        strategy=strategy,
        seed=seed,
    )
    with user_errors():
        resolved = resolve_recipe(config, overrides)
        chosen_shard = parse_shard(shard) if shard is not None else None
        if dry_run:
            yaml.safe_dump(resolved.model_dump(mode="json"), sys.stdout, sort_keys=False)
            return
        from cordgen.synth import plan_run

        plan = plan_run(resolved, chosen_shard, overwrite)
    run_synth(plan, quiet)


def run_synth(plan, quiet: bool) -> None:
    from rich.console import Console

    from cordgen.progress import RecordTally, RichProgress
    from cordgen.synth import GracefulStop, Interrupted, NoObserver, execute

    console = Console(stderr=True, quiet=quiet)
    if not plan.todo:
        console.print(f"all {len(plan.problems)} problems are already in {plan.run_dir.results_path}")
        return
    tally = RecordTally()
    try:
        with GracefulStop(lambda message: typer.echo(message, err=True)) as stop:
            if quiet:
                execute(plan, NoObserver(), tally, stop)
            else:
                with RichProgress(
                    console, len(plan.problems), len(plan.problems) - len(plan.todo)
                ) as progress:
                    execute(plan, progress, tally, stop)
    except Interrupted:
        again = "the same command without --overwrite" if plan.overwrite else "the same command"
        typer.echo(f"interrupted; re-run {again} to resume ({plan.run_dir.path})", err=True)
        raise typer.Exit(130) from None
    console.print(tally.table())
    console.print(f"results: {plan.run_dir.results_path}")


@app.command()
def merge(
    runs: list[Path] = typer.Argument(..., help="Run directories of the shards to merge."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged run directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results already in --out."),
) -> None:
    """Union shard runs of one config and input into one run directory."""
    from cordgen.store import merge_runs

    with user_errors():
        report = merge_runs(runs, out, overwrite)
    typer.echo(
        f"merged {report.sources} runs: {report.problems} problems, {report.duplicates} duplicates dropped, "
        f"{len(report.conflicts)} conflicting, {len(report.missing)} missing -> {out}",
        err=True,
    )
    for label, ids in (("conflicting", report.conflicts), ("missing", report.missing)):
        if ids:
            shown = ", ".join(ids[:20]) + (" ..." if len(ids) > 20 else "")
            typer.echo(f"{label} ids: {shown}", err=True)


def main() -> None:
    app()
