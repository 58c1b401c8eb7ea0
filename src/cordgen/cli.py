"""The `cordgen` command line: parses arguments, calls the library, prints errors in one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast, get_args

import typer
import yaml

from cordgen import __version__
from cordgen.errors import INTERRUPTED, RUN_FAILED, CordgenError

if TYPE_CHECKING:
    from cordgen.config import HybridJudge, ScorerKind
    from cordgen.export import ExportReport

app = typer.Typer(
    name="cordgen",
    help="Synthesize long chain-of-thought data by collaborative step-wise multi-teacher decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
state = {"debug": False}


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Any failure ends as one `error:` line on stderr: a mistake in the input, recipe or command
    line with status 2, a failed engine or run with status 3 (an unexpected error too), Ctrl-C
    with 130. `--debug` shows the traceback instead."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        if state["debug"]:
            raise
        typer.echo("interrupted", err=True)
        raise typer.Exit(INTERRUPTED) from None
    except CordgenError as error:
        if state["debug"]:
            raise
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(error.exit_status) from None
    except Exception as error:
        if state["debug"]:
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        typer.echo(f"error: {type(error).__name__}: {first_line} (--debug shows the traceback)", err=True)
        raise typer.Exit(RUN_FAILED) from None


@contextmanager
def option_errors() -> Iterator[None]:
    """Options that fail a settings model's validation, as a user error naming the field."""
    from pydantic import ValidationError

    from cordgen.config import describe_validation_error

    try:
        yield
    except ValidationError as error:
        raise CordgenError(describe_validation_error(error)) from None


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
    if debug:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG")


@app.command()
def recipe(
    path: Path = typer.Argument(..., help="A YAML recipe, e.g. configs/paper-heterogeneous.yaml"),
) -> None:
    """Validate a recipe and print it with every default filled in."""
    from cordgen.config import load_recipe

    with one_line_errors():
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
    input: str | None = typer.Option(
        None,
        "--input",
        "-i",
        help="Problems: .jsonl, .json or .parquet, a folder of those, a save_to_disk folder, "
        "or hf:NAME[:CONFIG] (a Hub dataset or a local dataset repository).",
    ),
    split: str | None = typer.Option(None, "--split", help="Split of a dataset input (default: train)."),
    question_field: str | None = typer.Option(None, "--question-field", help="Field of the question."),
    answer_field: str | None = typer.Option(None, "--answer-field", help="Field of the gold answer."),
    answer_from: str | None = typer.Option(
        None, "--answer-from", help="Take the gold answer from the last \\boxed{} of this field's text."
    ),
    id_field: str | None = typer.Option(
        None, "--id-field", help="Field of the id (default: the line or row number)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Run directory to write."),
    beam_width: int | None = typer.Option(None, "--beam-width", help="B: trajectories kept per problem."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Rounds before live beams are closed."),
    strategy: str | None = typer.Option(None, "--strategy", help="cord | single | curate"),
    schedule: str | None = typer.Option(
        None, "--schedule", help="all (every teacher on every beam) | adaptive (a subset per beam)"
    ),
    warm_start: Path | None = typer.Option(
        None, "--warm-start", help="adaptive: a finished run (or its records) whose counts are the prior."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Base of every sampling seed."),
    shard: str | None = typer.Option(
        None, "--shard", help="i/N: only the problems whose id hashes to shard i."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the run directory over."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or summary."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Stream the engines' logs here instead of RUN/engines.log."
    ),
) -> None:
    """Synthesize step-wise multi-teacher reasoning traces for every problem of the input.

    Re-running the same command resumes: finished problems are kept and skipped."""
    from cordgen.config import resolve_recipe
    from cordgen.engines.placement import fit_recipe_to_host
    from cordgen.problems import parse_shard

    overrides = dict(
        teachers=split_list(teachers),
        scorer=scorer,
        input=input,
        out=out,
        beam_width=beam_width,
        max_steps=max_steps,
        strategy=strategy,
        schedule=schedule,
        warm_start=warm_start,
        seed=seed,
        split=split,
        id_field=id_field,
        question_field=question_field,
        answer_field=answer_field,
        answer_from=answer_from,
    )
    with one_line_errors():
        resolved = fit_recipe_to_host(resolve_recipe(config, overrides))
        chosen_shard = parse_shard(shard) if shard is not None else None
        if dry_run:
            yaml.safe_dump(resolved.model_dump(mode="json"), sys.stdout, sort_keys=False)
            return
        from cordgen.synth import plan_run

        plan = plan_run(resolved, chosen_shard, overwrite)
        run_synth(plan, quiet, verbose)


def run_synth(plan, quiet: bool, verbose: bool) -> None:
    from rich.console import Console

    from cordgen.progress import RecordTally, RichProgress, phase_table
    from cordgen.synth import GracefulStop, Interrupted, NoObserver, execute

    console = Console(stderr=True, quiet=quiet)
    for note in plan.notes:  # even when quiet: they say what this run will and will not do
        typer.echo(note, err=True)
    if not plan.todo:
        console.print(f"all {len(plan.problems)} problems are already in {plan.run_dir.results_path}")
        return
    tally = RecordTally()
    try:
        with GracefulStop(lambda message: typer.echo(message, err=True)) as stop:
            if quiet:
                execute(plan, NoObserver(), tally, stop, engine_log=not verbose)
            else:
                with RichProgress(
                    console, len(plan.problems), len(plan.problems) - len(plan.todo)
                ) as progress:
                    execute(plan, progress, tally, stop, engine_log=not verbose)
    except Interrupted:
        again = "the same command without --overwrite" if plan.overwrite else "the same command"
        typer.echo(f"interrupted; re-run {again} to resume ({plan.run_dir.path})", err=True)
        raise typer.Exit(INTERRUPTED) from None
    console.print(tally.table())
    phases = phase_table(tally.records, plan.recipe.search.adaptive.phases)
    if phases is not None:
        console.print(phases)
    console.print(f"results: {plan.run_dir.results_path}")


@app.command()
def merge(
    runs: list[Path] = typer.Argument(..., help="Run directories of the shards to merge."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged run directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results already in --out."),
) -> None:
    """Union shard runs of one config and input into one run directory."""
    from cordgen.store import merge_runs

    with one_line_errors():
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
    jsonl: Path | None = typer.Option(None, "--jsonl", help="A JSONL file to write (replaced as a whole)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="A Hugging Face dataset folder to write: Parquet shards and a card."
    ),
    format: str = typer.Option(
        "messages", "--format", help="messages | sharegpt (OpenThoughts layout); hf: messages, with --out"
    ),
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
    weights: str = typer.Option(
        "none", "--weights", help="none | compat: every kept rationale, weighted by `cordgen compat`'s alpha."
    ),
    min_weight: float | None = typer.Option(
        None, "--min-weight", help="With --weights compat: drop alpha below this."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --out: replace an earlier export."),
    shard_rows: int | None = typer.Option(
        None, "--shard-rows", help="With --out: rows per Parquet shard (a shard also ends at ~500 MB)."
    ),
    license: str | None = typer.Option(
        None, "--license", help="With --out: the card's license id (none stated unless given)."
    ),
) -> None:
    """Write a run's traces as chat-format fine-tuning data: a JSONL file or a dataset folder."""
    options = dict(
        format=format,
        only_correct=only_correct,
        max_perplexity=max_perplexity,
        system_prompt=system_prompt,
        think_tags=think_tags,
        include_unfinished=include_unfinished,
        weights=weights,
        min_weight=min_weight,
    )
    folder_options = dict(overwrite=overwrite, shard_rows=shard_rows, license=license)
    with one_line_errors():
        report = write_export(run, jsonl, out, folder_options, options)
    dropped = report.dropped_summary()
    typer.echo(
        f"exported {report.kept} of {report.total} traces to {jsonl or out}"
        + (f" (dropped: {dropped})" if dropped else ""),
        err=True,
    )


def write_export(
    run: Path, jsonl: Path | None, out: Path | None, folder_options: dict, options: dict
) -> ExportReport:
    """Exactly one of the outputs; the folder's own options are refused with --jsonl rather than
    ignored."""
    from cordgen.export import export_run
    from cordgen.export_hf import export_dataset

    if (jsonl is None) == (out is None):
        raise CordgenError(
            "give one of --jsonl FILE (JSON lines) or --out DIR (a Hugging Face dataset folder)"
        )
    if jsonl is not None:
        given = [name for name, value in folder_options.items() if value is not None and value is not False]
        if given:
            raise CordgenError(f"--{given[0].replace('_', '-')}: only with --out DIR, not --jsonl")
        return export_run(run, jsonl, **options)
    return export_dataset(run, out, **folder_options, **options)


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
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Stream the scorer engine's log here instead of its log file."
    ),
    kind: str | None = typer.Option(
        None,
        "--kind",
        help="Scorer kind: predictive, verifier, prm, likelihood, hybrid or random (default: the recipe's); "
        "another kind than the recipe's writes scores.KIND.jsonl.",
    ),
    verifier: str | None = typer.Option(
        None, "--verifier", help="The judge for verifier/hybrid: a teacher of the recipe or a model."
    ),
    prm: str | None = typer.Option(
        None, "--prm", help="The process reward model for prm/hybrid: a model id or directory."
    ),
    hybrid_with: str | None = typer.Option(
        None,
        "--hybrid-with",
        help="The hybrid's other part: verifier, prm or likelihood (default: the recipe's).",
    ),
) -> None:
    """Per-step scores (the recipe's scorer kind, or --kind) and final-answer correctness
    (math-verify) for every trace.

    Scores go to a separate file keyed by id; re-running resumes."""
    from cordgen.scoring import ForeignFields, plan_scoring

    fields = ForeignFields(id_field, question_field, answer_field, response_field, messages_field)
    chosen, other = scorer_kind(kind), hybrid_part(hybrid_with)
    with one_line_errors():
        plan = plan_scoring(source, out, scorer, config, fields, overwrite, chosen, verifier, prm, other)
        run_score(plan, batch_size, timeout, quiet, verbose)


def scorer_kind(kind: str | None) -> ScorerKind | None:
    from cordgen.config import ScorerKind

    kinds = get_args(ScorerKind)
    if kind is not None and kind not in kinds:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(kinds)}", param_hint="--kind")
    return cast("ScorerKind | None", kind)


def hybrid_part(part: str | None) -> HybridJudge | None:
    from cordgen.config import HybridJudge

    parts = get_args(HybridJudge)
    if part is not None and part not in parts:
        raise typer.BadParameter(f"{part!r} is not one of {', '.join(parts)}", param_hint="--hybrid-with")
    return cast("HybridJudge | None", part)


def run_score(plan, batch_size: int, timeout: float, quiet: bool, verbose: bool) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from cordgen.progress import progress_bar, score_summary
    from cordgen.scoring import execute_scoring
    from cordgen.store import load_scores

    console = Console(stderr=True, quiet=quiet)
    computed = 0
    with progress_bar(Progress(console=console, disable=quiet)) as progress:
        task = progress.add_task("score", total=len(plan.traces), completed=len(plan.traces) - len(plan.todo))

        def advance(records, tokens: int) -> None:
            nonlocal computed
            computed += tokens
            progress.advance(task, len(records))

        execute_scoring(plan, advance, batch_size, timeout, engine_log=not verbose)
    scores = load_scores(plan.output.path) or {}
    console.print(score_summary(plan.traces, scores, computed, plan.synthesis_seconds))
    console.print(f"scores: {plan.output.path}")


@app.command()
def compat(
    source: Path = typer.Argument(..., help="A run directory, or a JSONL with one response per line."),
    student: str = typer.Option(..., "--student", help="The student model (local directory or hub id)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: beside the traces)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Recipe whose step format to use."),
    pooling: str = typer.Option(
        "last", help="Consensus embedding: last (token) | mean (over the rationale)."
    ),
    layer: int = typer.Option(-1, help="Hidden-state layer for consensus (-1: the final one)."),
    epiphany_threshold: float = typer.Option(1.0, help="Gain in mean log p(gold) marking an epiphany step."),
    betas: str = typer.Option("1,1,1", help="beta_C,beta_A,beta_D of the weights' softmax."),
    answer_suffix: str = typer.Option("</think> The final answer is ", help="Text before the gold answer."),
    dtype: str = typer.Option("auto", help="Student dtype: auto | float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model's own code."),
    batch_tokens: int = typer.Option(8192, min=1, help="Packed tokens per student forward pass."),
    batch_problems: int = typer.Option(512, min=1, help="Problems per measuring pass and per write."),
    question_field: str = typer.Option("question", help="JSONL field of the question."),
    answer_field: str = typer.Option("answer", help="JSONL field of the gold answer."),
    response_field: str = typer.Option("response", help="JSONL field of the response text."),
    messages_field: str = typer.Option("messages", help="JSONL field of a chat (last assistant turn)."),
    id_field: str = typer.Option("id", help="JSONL field of the problem id (rows may share it)."),
    teacher_field: str = typer.Option("teacher", help="JSONL field naming the response's teacher."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the output file over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display or summary."),
) -> None:
    """COMPACT: difficulty, adaptability, consensus and the weight alpha of every rationale, per
    (problem, teacher), as the student sees them. Re-running resumes."""
    from cordgen.compat import plan_compat
    from cordgen.config import CompatConfig, StudentSettings
    from cordgen.scoring import ForeignFields

    fields = ForeignFields(id_field, question_field, answer_field, response_field, messages_field)
    with one_line_errors():
        with option_errors():
            beta_c, beta_a, beta_d = parse_floats(betas, 3, "--betas")
            settings = StudentSettings(
                model=student, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
            compat_config = CompatConfig(
                answer_suffix=answer_suffix,
                pooling=pooling,
                layer=layer,
                epiphany_threshold=epiphany_threshold,
                beta_consensus=beta_c,
                beta_adaptability=beta_a,
                beta_difficulty=beta_d,
                max_batch_tokens=batch_tokens,
            )
        plan = plan_compat(source, settings, compat_config, out, fields, teacher_field, config, overwrite)
        run_compat_pass(plan, batch_problems, quiet)


def parse_floats(value: str, count: int, option: str) -> list[float]:
    try:
        numbers = [float(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != count:
        raise CordgenError(f"{option}: expected {count} comma-separated numbers, got {value!r}")
    return numbers


def run_compat_pass(plan, batch_problems: int, quiet: bool) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from cordgen.compat import load_compat, run_compat, teacher_summary
    from cordgen.progress import compat_table, progress_bar
    from cordgen.student import load_student, student_chat

    console = Console(stderr=True, quiet=quiet)
    if plan.todo:
        model, tokenizer = load_student(plan.student)
        chat = student_chat(tokenizer, plan.student, plan.fmt)
        done = len(plan.problems) - len(plan.todo)
        with progress_bar(Progress(console=console, disable=quiet)) as progress:
            task = progress.add_task("compat", total=len(plan.problems), completed=done)
            run_compat(
                plan, model, chat, lambda records: progress.advance(task, len(records)), batch_problems
            )
    records = load_compat(plan.output.path) or {}
    console.print(compat_table(teacher_summary(list(records.values())), plan.student.model))
    console.print(f"compat: {plan.output.path}")


@app.command()
def distill(
    data: Path = typer.Argument(
        ..., help="Exported JSONL (`cordgen export --weights compat` for compat weighting)."
    ),
    student: str = typer.Option(..., "--student", help="The student model (local directory or hub id)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for checkpoints and the trained student."),
    weighting: str = typer.Option("compat", help="compat (loss x alpha) | uniform (plain SFT)."),
    epochs: float = typer.Option(1.0, help="Passes over the data."),
    max_steps: int = typer.Option(-1, help="Optimizer steps (-1: as many as --epochs take)."),
    batch_size: int = typer.Option(8, help="Examples per device per step."),
    gradient_accumulation: int = typer.Option(1, help="Batches per optimizer step."),
    learning_rate: float = typer.Option(2e-5, "--lr", help="Peak learning rate."),
    lr_scheduler: str = typer.Option("cosine", help="transformers scheduler name."),
    warmup_ratio: float = typer.Option(0.03, help="Share of steps warming up."),
    max_length: int = typer.Option(4096, help="Tokens per example (longer ones are cut)."),
    mixed_precision: str = typer.Option("no", help="no | bf16 | fp16"),
    lora_r: int = typer.Option(0, help="LoRA rank; 0 trains every weight."),
    lora_alpha: int = typer.Option(32, help="LoRA alpha."),
    recompute_every: int = typer.Option(
        0, help="Recompute alpha from the current student every N steps (0: never)."
    ),
    save_steps: int = typer.Option(500, help="Checkpoint interval, for resuming."),
    logging_steps: int = typer.Option(10, help="Steps between logged losses."),
    seed: int = typer.Option(0, help="Data order and initialization seed."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Recipe whose step format to use."),
    dtype: str = typer.Option("auto", help="Student dtype as loaded: auto | float32 | bfloat16 | float16."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model's own code."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Drop --out's checkpoints and start over."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fine-tune the student on exported traces, each example's loss scaled by its COMPACT weight.
    Re-running resumes from the last checkpoint."""
    from cordgen.config import DistillConfig, LoraSettings, StepFormat, StudentSettings, resolve_model_source
    from cordgen.config import load_recipe as read_recipe
    from cordgen.distill import distill as run_distill

    with one_line_errors():
        with option_errors():
            settings = StudentSettings(
                model=student, dtype=dtype, device=device, trust_remote_code=trust_remote_code
            )
            distill_config = DistillConfig(
                weighting=weighting,
                epochs=epochs,
                max_steps=max_steps,
                batch_size=batch_size,
                gradient_accumulation=gradient_accumulation,
                learning_rate=learning_rate,
                lr_scheduler=lr_scheduler,
                warmup_ratio=warmup_ratio,
                max_length=max_length,
                mixed_precision=mixed_precision,
                lora=LoraSettings(r=lora_r, alpha=lora_alpha) if lora_r else None,
                recompute_every=recompute_every,
                save_steps=save_steps,
                logging_steps=logging_steps,
                seed=seed,
            )
        resolve_model_source(student)
        fmt = read_recipe(config).format if config else StepFormat()
        manifest = run_distill(data, out, settings, distill_config, fmt=fmt, overwrite=overwrite, quiet=quiet)
    losses = manifest.losses
    shown = (
        f"loss {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} (step {losses[-1][0]})"
        if losses
        else ""
    )
    typer.echo(
        f"distilled {manifest.examples} examples of {manifest.problems} problems; {shown} -> {out}", err=True
    )


def main() -> None:
    app()
