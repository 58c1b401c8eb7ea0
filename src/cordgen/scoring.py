"""`cordgen score`: per-step predictive perplexity and answer correctness for finished traces.

Works on cordgen's own run directories and on plain JSONL traces made by other tools. Every
prefix of every trace in a batch goes to the scorer in one call (the prefix cache makes the
shared prefixes cheap); answers are graded by math-verify in a process pool. Scores go to a
separate append-only file keyed by id, so the traces themselves are never rewritten and an
interrupted scoring pass resumes where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cordgen.config import (
    EngineDefaults,
    EngineSettings,
    HybridJudge,
    PrmSettings,
    Recipe,
    ScorerConfig,
    ScorerKind,
    StepFormat,
    check_role_sources,
    load_recipe,
    pick_scorer,
)
from cordgen.engines import Scorer, ScoreRequest
from cordgen.engines import StepScore as Scored
from cordgen.engines.placement import fit_scorer_to_host
from cordgen.engines.scorers import check_scorer_tokens
from cordgen.errors import CordgenError
from cordgen.grading import grade_answers
from cordgen.problems import problem_rows
from cordgen.prompts import split_trace
from cordgen.records import ScoreRecord, StepScore
from cordgen.store import CONFIG, ENGINE_LOG, RESULTS, SCORES, JsonlLog, RunDirectory


@dataclass(frozen=True)
class Trace:
    id: str
    question: str
    answer: str  # gold
    steps: tuple[str, ...]  # thinking, split at the step markers
    response: str  # the text graded: the final answer after thinking, or the whole response
    teachers: tuple[str, ...] = ()  # author per step, when known
    generated_tokens: int = 0  # what synthesis spent on it, when known


@dataclass(frozen=True)
class ForeignFields:
    """Field names of a JSONL made by another tool."""

    id: str = "id"
    question: str = "question"
    answer: str = "answer"
    response: str = "response"
    messages: str = "messages"


def traces_of_run(run_dir: RunDirectory) -> Iterator[Trace]:
    for record in run_dir.records():
        final = record.result.final_answer
        yield Trace(
            id=record.id,
            question=record.question,
            answer=record.answer,
            steps=tuple(s.text for s in record.result.steps),
            response=final.text if final else "",
            teachers=tuple(s.teacher for s in record.result.steps),
            generated_tokens=sum(record.usage.generated_tokens.values()),
        )


def split_response(fmt: StepFormat, response: str) -> tuple[tuple[str, ...], str]:
    """(thinking steps, text to grade) of a free-form response: the thinking is what precedes
    `</think>` (without a leading `<think>` and first step header); without step markers it is one
    step; without `</think>` the whole response is both the one step and the text graded."""
    if fmt.think_close not in response:
        return ((response,) if response.strip() else ()), response
    thinking, _, answer = response.partition(fmt.think_close)
    thinking = thinking.split(fmt.think_open, 1)[-1].lstrip("\n")
    steps, _ = split_trace(fmt, thinking + fmt.think_close)
    if steps and not steps[0].strip() and len(steps) > 1:
        steps = steps[1:]
    return tuple(s for s in steps if s) or (thinking,), answer


def assistant_text(row: dict[str, Any], fields: ForeignFields, where: str) -> str:
    if isinstance(row.get(fields.response), str):
        return row[fields.response]
    messages = row.get(fields.messages)
    if isinstance(messages, list):
        replies = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if replies and isinstance(replies[-1], str):
            return replies[-1]
    raise CordgenError(
        f"{where}: neither a '{fields.response}' string nor an assistant message in '{fields.messages}'"
    )


def foreign_traces(path: Path, fields: ForeignFields, fmt: StepFormat) -> Iterator[Trace]:
    rows = problem_rows(path, id_field=fields.id, question_field=fields.question, answer_field=fields.answer)
    for problem, row, _ in rows:
        steps, response = split_response(fmt, assistant_text(row, fields, f"{path}: id {problem.id}"))
        yield Trace(problem.id, problem.question, problem.answer, steps, response)


def step_score(index: int, score: Scored | None) -> StepScore:
    """A prefix too long for a scorer engine's window has no score."""
    if score is None:
        return StepScore(index=index, score=None, perplexity=None)
    value = score.score
    return StepScore(
        index=index, score=value, perplexity=1 / value if value > 0 else None, scores=score.components
    )


def score_traces(
    traces: Sequence[Trace], scorer: Scorer, timeout_s: float, kind: str = "predictive"
) -> tuple[list[ScoreRecord], int]:
    """Every prefix of every trace in ONE scorer call, every answer in one grading pass; also
    returns the prompt tokens the scorer computed (not served from its prefix cache)."""
    requests, owners = [], []
    for index, trace in enumerate(traces):
        for k in range(1, len(trace.steps) + 1):
            requests.append(ScoreRequest(trace.question, trace.steps[:k], trace.answer, trace.id))
            owners.append(index)
    results = scorer.score(requests)
    grades = grade_answers([(t.answer, t.response) for t in traces], timeout_s=timeout_s)
    per_trace: list[list[Scored | None]] = [[] for _ in traces]
    for owner, result in zip(owners, results):
        per_trace[owner].append(result)
    records = []
    for trace, scores, grade in zip(traces, per_trace, grades):
        steps = [step_score(i, s) for i, s in enumerate(scores, start=1)]
        last = steps[-1] if steps else StepScore(index=1, score=None, perplexity=None)
        records.append(
            ScoreRecord(
                id=trace.id,
                scorer=scorer.name,
                kind=kind,
                steps=steps,
                score=last.score,
                perplexity=last.perplexity,
                grade=grade,
            )
        )
    computed = sum(r.num_prompt_tokens - r.num_cached_tokens for r in results if r is not None)
    return records, computed


@dataclass(frozen=True)
class ScoringPlan:
    """A scoring pass checked before the scorer loads: traces read, output file resumable."""

    source: Path
    scorer: ScorerConfig
    fmt: StepFormat
    traces: tuple[Trace, ...]
    todo: tuple[Trace, ...]
    output: JsonlLog
    synthesis_seconds: float | None = None  # from the run's manifest, when scoring a run
    seed: int = 0  # the recipe's: seeds the random kind

    @property
    def engine_log(self) -> Path:
        """A run's engine log, or one beside the scores file."""
        if self.source.is_dir():
            return self.source / ENGINE_LOG
        return self.output.path.with_suffix(".engines.log")


def rekinded(scorer: ScorerConfig, kind: ScorerKind | None, hybrid_with: HybridJudge | None) -> ScorerConfig:
    """The recipe's scorer read as `kind`, a hybrid's other part as `hybrid_with`: a kind that is
    not a hybrid keeps no other part."""
    kind = kind or scorer.kind
    if hybrid_with is not None and kind != "hybrid":
        raise CordgenError(f"--hybrid-with is read only by kind hybrid, not by kind {kind}")
    other = (hybrid_with or scorer.hybrid_with) if kind == "hybrid" else None
    return scorer.model_copy(update={"kind": kind, "hybrid_with": other})


def kind_label(scorer: ScorerConfig) -> str:
    """`hybrid-likelihood` where a hybrid names its other part, else the kind."""
    return f"hybrid-{scorer.hybrid_with}" if scorer.hybrid_with else scorer.kind


def scorer_label(name: str, kind: str) -> str:
    return name if kind == "predictive" else f"{name} ({kind})"


def plan_scoring(
    source: Path,
    out: Path | None = None,
    scorer_spec: str | None = None,
    recipe_path: Path | None = None,
    fields: ForeignFields = ForeignFields(),
    overwrite: bool = False,
    kind: ScorerKind | None = None,
    verifier_spec: str | None = None,
    prm_spec: str | None = None,
    hybrid_with: HybridJudge | None = None,
) -> ScoringPlan:
    """`kind` (and, for a hybrid, `hybrid_with`) re-reads a finished run (or a foreign JSONL) with
    another scorer kind, into its own file unless `out` names one; `verifier_spec` names the judge
    (a teacher or a model), `prm_spec` the process reward model (a model)."""
    if source.is_dir():
        run_dir = RunDirectory(source)
        if not run_dir.results_path.exists():
            raise CordgenError(f"{source}: no {RESULTS}; not a cordgen run directory")
        recipe = load_recipe(recipe_path or source / CONFIG)
        traces = tuple(traces_of_run(run_dir))
        default_out = source / SCORES
        manifest = run_dir.manifest()
        synthesis_seconds = manifest.wall_seconds if manifest and manifest.wall_seconds else None
    else:
        recipe = load_recipe(recipe_path) if recipe_path else None
        if scorer_spec is None:
            raise CordgenError("--scorer: name the scoring model (or a teacher of --config)")
        traces = tuple(foreign_traces(source, fields, recipe.format if recipe else StepFormat()))
        synthesis_seconds = None
        default_out = source.with_name(source.stem + ".scores.jsonl")
    fmt = recipe.format if recipe else StepFormat()
    teachers = list(recipe.teachers) if recipe else []
    scorer = pick_scorer(recipe, scorer_spec, teachers) if scorer_spec is not None else recipe.scorer
    chosen = rekinded(scorer, kind, hybrid_with)
    if chosen.components != scorer.components:
        default_out = default_out.with_suffix(f".{kind_label(chosen)}.jsonl")
    scorer = chosen
    if verifier_spec is not None:
        judge = pick_scorer(recipe, verifier_spec, teachers)
        verifier = scorer.verifier.model_copy(update={"engine": judge.engine, "chat": judge.chat})
        scorer = scorer.model_copy(update={"verifier": verifier})
    if prm_spec is not None:
        scorer = scorer.model_copy(update={"prm": prm_named(recipe, scorer, prm_spec)})
    check_role_sources(scorer)
    check_scorer_tokens(scorer, fmt)
    scorer = fit_scorer_to_host(scorer)
    output = JsonlLog(out or default_out)
    if overwrite:
        output.path.unlink(missing_ok=True)
    earlier = {row["id"]: (row.get("scorer"), row.get("kind", "predictive")) for row in output.rows()}
    ours = (scorer.name, kind_label(scorer))
    others = sorted({scorer_label(*pair) for pair in earlier.values() if pair != ours})
    if others:
        raise CordgenError(
            f"{output.path}: scored by {', '.join(others)}, not {scorer_label(*ours)} "
            "(use --overwrite or --out)"
        )
    todo = tuple(t for t in traces if t.id not in earlier)
    seed = recipe.seed if recipe else 0
    return ScoringPlan(source, scorer, fmt, traces, todo, output, synthesis_seconds, seed)


def prm_named(recipe: Recipe | None, scorer: ScorerConfig, model: str) -> PrmSettings:
    """The scorer's PRM settings (else the defaults) with `model` as the reward model, loaded with
    the recipe's engine defaults."""
    defaults = recipe.engine_defaults if recipe else EngineDefaults()
    settings = scorer.prm.model_dump() if scorer.prm else {}
    return PrmSettings.model_validate({**settings, "engine": EngineSettings.for_model(model, defaults)})


def run_scoring(
    plan: ScoringPlan,
    scorer: Scorer,
    on_batch: Callable[[Sequence[ScoreRecord], int], None],
    batch_size: int = 512,
    timeout_s: float = 5.0,
) -> None:
    """Scores what is still to do, `batch_size` traces per scorer call, each batch appended and
    fsynced before the next starts."""
    plan.output.repair()
    with plan.output.appender() as append:
        for start in range(0, len(plan.todo), batch_size):
            batch = plan.todo[start : start + batch_size]
            records, computed = score_traces(batch, scorer, timeout_s, kind_label(plan.scorer))
            append(records)
            on_batch(records, computed)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else math.nan


def execute_scoring(
    plan: ScoringPlan,
    on_batch: Callable[[Sequence[ScoreRecord], int], None],
    batch_size: int = 512,
    timeout_s: float = 5.0,
    pool: Any = None,
    engine_log: bool = True,
) -> None:
    """Loads the scorer (or takes it from `pool`) only when something is left to score; its
    output goes to the engine log, or with `engine_log=False` to stderr."""
    if not plan.todo:
        return
    from cordgen.engines.pool import EnginePool
    from cordgen.engines.scorers import build_scorer

    own_pool = pool is None
    pool = EnginePool(log_path=plan.engine_log if engine_log else None) if own_pool else pool
    try:
        scorer = build_scorer(plan.scorer, plan.fmt, pool, plan.seed)
        run_scoring(plan, scorer, on_batch, batch_size, timeout_s)
    finally:
        if own_pool:
            pool.shutdown()
