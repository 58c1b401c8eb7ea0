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


@app.command()
def export(
    run: Path = typer.Argument(..., help="The run directory to export."),
    jsonl: Path = typer.Option(..., "--jsonl", help="The JSONL file to write (replaced as a whole)."),
    format: str = typer.Option("messages", "--format", help="messages | sharegpt (OpenThoughts layout)"),
    only_correct: bool = typer.Option(
        False, "--only-correct", help="Keep only traces `cordgen score` graded correct."
    ),
    max_perplexity: float | None = typer.Option(
        None, "--max-perplexity", help="Drop traces whose perplexity is unknown or above this."
    ),
    system_prompt: str | None = typer.Option(
        None, "--system-prompt", help="A system turn for every example."
    ),
    think_tags: bool = typer.Option(
        True, "--think-tags/--no-think-tags", help="Wrap the steps in the run's think tags."
    ),
    include_unfinished: bool = typer.Option(
        False, "--include-unfinished", help="Keep traces whose thinking or answer never finished."
    ),
) -> None:
    """Write a run's traces as chat-format fine-tuning data, one example per line."""
    from cordgen.export import export_run

    with user_errors():
        report = export_run(
            run,
            jsonl,
            format=format,
            only_correct=only_correct,
            max_perplexity=max_perplexity,
            system_prompt=system_prompt,
            think_tags=think_tags,
            include_unfinished=include_unfinished,
        )
    dropped = ", ".join(f"{reason} {count}" for reason, count in report.dropped.items())
    typer.echo(
        f"exported {report.kept} of {report.total} traces to {jsonl}"
        + (f" (dropped: {dropped})" if dropped else ""),
        err=True,
    )


@app.command()
def score(
    source: Path = typer.Argument(..., help="A run directory, or a JSONL of traces from any tool."),
    scorer: str | None = typer.Option(
        None, "--scorer", help="Scoring model, or a teacher/scorer of the recipe."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Scores file (default: beside the traces)."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Recipe (a run directory brings its own)."
    ),
    question_field: str = typer.Option("question", help="JSONL field of the question."),
    answer_field: str = typer.Option("answer", help="JSONL field of the gold answer."),
    response_field: str = typer.Option("response", help="JSONL field of the response text."),
    messages_field: str = typer.Option(
        "messages", help="JSONL field of a chat (its last assistant turn is used)."
    ),
    id_field: str = typer.Option("id", help="JSONL field of the id (default: the line number)."),
    batch_size: int = typer.Option(512, min=1, help="Traces per scorer call and per write."),
    timeout: float = typer.Option(5.0, min=0.1, help="Seconds math-verify may spend on one answer."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the scores file over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or summary."),
) -> None:
    """Per-step predictive perplexity and final-answer correctness (math-verify) for every trace.

    Scores go to a separate file keyed by id; re-running resumes."""
    from cordgen.scoring import ForeignFields, plan_scoring

    fields = ForeignFields(id_field, question_field, answer_field, response_field, messages_field)
    with user_errors():
        plan = plan_scoring(source, out, scorer, config, fields, overwrite)
    run_score(plan, batch_size, timeout, quiet)


def run_score(plan, batch_size: int, timeout: float, quiet: bool) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from cordgen.progress import score_summary
    from cordgen.scoring import execute_scoring
    from cordgen.store import load_scores

    console = Console(stderr=True, quiet=quiet)
    computed = 0
    with Progress(console=console, disable=quiet) as progress:
        task = progress.add_task("score", total=len(plan.traces), completed=len(plan.traces) - len(plan.todo))

        def advance(records, tokens: int) -> None:
            nonlocal computed
            computed += tokens
            progress.advance(task, len(records))

        execute_scoring(plan, advance, batch_size, timeout)
    scores = load_scores(plan.output.path) or {}
    console.print(score_summary(plan.traces, scores, computed, plan.synthesis_seconds))
    console.print(f"scores: {plan.output.path}")


def main() -> None:
    app()
