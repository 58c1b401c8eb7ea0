"""The synthesis loop: all problems advance in lockstep, engine calls stay batched at the edge.

Per round, each teacher gets ONE propose call holding every live beam of every live problem it is
asked on (every one under `search.schedule: all`; see `cordgen.schedule`) and the scorer ONE call
holding every distinct candidate; the choices between calls are the pure functions of
`cordgen.search` and `cordgen.schedule`. Problems leave the batch as they finish, and their
records go to the sink at once.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import psutil

from cordgen import __version__
from cordgen.config import Recipe, check_sources
from cordgen.engines import (
    AnswerRequest,
    ProposeRequest,
    Scorer,
    ScoreRequest,
    StepScore,
    Teacher,
)
from cordgen.engines.placement import check_cluster, check_placement, visible_device_count
from cordgen.engines.scorers import check_scorer_tokens
from cordgen.errors import ConfigError, CordgenError
from cordgen.problems import Problem, Shard, describe_unanswered, load_problems
from cordgen.prompts import split_trace
from cordgen.records import TraceRecord, Usage, trajectory_record
from cordgen.schedule import Prior, Scheduler, by_phase, prior_from, record_kept, record_won
from cordgen.search import (
    Beam,
    Candidate,
    ClosedBy,
    FinalAnswer,
    FinishReason,
    ProblemSearch,
    Step,
    StepCandidate,
    collapse,
    out_of_context,
)
from cordgen.store import ENGINE_LOG, InputInfo, Manifest, ReplicaRound, RunDirectory, now, warm_start_usages
from cordgen.windows import window_notes

RecordSink = Callable[[Sequence[TraceRecord]], None]  # one call per round


@dataclass
class RoundReport:
    """What one round did, for progress displays and throughput figures."""

    round: int
    live_problems: int
    live_beams: int
    finished_problems: int = 0
    generated_tokens: dict[str, int] = field(default_factory=dict)
    teacher_seconds: dict[str, float] = field(default_factory=dict)
    scored_tokens: int = 0
    scorer_seconds: float = 0.0
    engine_seconds: float = 0.0  # wall time the controller waited on engines (teachers overlap)
    replica_seconds: dict[str, float] = field(default_factory=dict)  # busy time per Ray replica

    def teacher_timed(self, name: str, started: float) -> None:
        self.teacher_seconds[name] = self.teacher_seconds.get(name, 0.0) + time.perf_counter() - started

    def scorer_timed(self, started: float) -> None:
        self.scorer_seconds += time.perf_counter() - started

    def engine_timed(self, started: float) -> None:
        self.engine_seconds += time.perf_counter() - started


class Observer(Protocol):
    def round_finished(self, report: RoundReport) -> None: ...


class NoObserver:
    def round_finished(self, report: RoundReport) -> None:
        pass


@dataclass
class Run:
    """The engines and settings one synthesis shares across its rounds."""

    recipe: Recipe
    teachers: Mapping[str, Teacher]
    scorer: Scorer
    sink: RecordSink
    observer: Observer = field(default_factory=NoObserver)
    should_stop: Callable[[], bool] = lambda: False

    def record(
        self,
        problem: Problem,
        result: Beam,
        alternatives: Sequence[Beam],
        answer: FinalAnswer,
        usage: Usage,
        alternative_answers: Sequence[FinalAnswer | None] = (),
    ) -> TraceRecord:
        """`alternative_answers`, where known (curation's whole traces bring their own), make the
        alternatives complete examples too, e.g. for COMPACT's per-teacher weighting."""
        answers = list(alternative_answers) or [None] * len(alternatives)
        return TraceRecord(
            id=problem.id,
            question=problem.question,
            answer=problem.answer,
            strategy=self.recipe.search.strategy,
            teachers=list(self.teachers),
            result=trajectory_record(result, answer),
            alternatives=[trajectory_record(b, a) for b, a in zip(alternatives, answers)],
            usage=usage,
            cordgen_version=__version__,
        )


def synthesize(
    problems: Sequence[Problem],
    teachers: Mapping[str, Teacher],
    scorer: Scorer,
    recipe: Recipe,
    sink: RecordSink,
    observer: Observer | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Runs the recipe's strategy over every problem, handing records to `sink` as problems
    finish; `should_stop` is asked between rounds."""
    run = Run(recipe, teachers, scorer, sink, observer or NoObserver(), should_stop)
    if recipe.search.strategy == "curate":
        curate(run, problems)
    else:
        beam_search(run, problems)


def beam_search(run: Run, problems: Sequence[Problem]) -> None:
    """Groups of problems take turns: while the scorer reads one group's candidates (in a
    background thread), the teachers propose for the next group. With one group (the default)
    every round waits for its scores, as the search needs them before the next proposal."""
    count = run.recipe.search.pipeline_groups
    size = -(-len(problems) // count) if problems else 1
    scheduler = scheduler_for(run)
    groups = [
        ProblemGroup(run, list(problems[i : i + size]), scheduler) for i in range(0, len(problems), size)
    ]
    pending: Pending | None = None
    turn = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cordgen-scorer") as scoring:
        while not run.should_stop():
            waiting = [g for g in groups if g.live]
            if not waiting:
                break
            group = waiting[turn % len(waiting)]
            turn += 1
            if pending is not None and pending[0] is group:
                settle(pending)
                pending = None
                continue
            step = group.propose()
            settle(pending)
            pending = (group, step, scoring.submit(group.score, step))
        settle(pending)


def scheduler_for(run: Run) -> Scheduler:
    """The run's teacher schedule; an adaptive one's warm start is read once, before round 1."""
    search = run.recipe.search
    prior: Prior = {}
    if search.schedule == "adaptive" and search.adaptive.warm_start is not None:
        cells = by_phase(warm_start_usages(search.adaptive.warm_start), search.adaptive.phases)
        prior = prior_from(cells, search.adaptive.prior_strength, search.adaptive.credit)
    return Scheduler(
        tuple(run.teachers), run.recipe.seed, search.schedule, search.adaptive, prior, search.beam_width
    )


def settle(pending: Pending | None) -> None:
    """Waits for a group's scores (the wait counts as engine time) and advances the group."""
    if pending is None:
        return
    group, step, future = pending
    started = time.perf_counter()
    scores = future.result()
    step.report.engine_timed(started)
    group.advance(step, scores)


@dataclass(frozen=True)
class GroupRound:
    report: RoundReport
    candidates: dict[str, list[Candidate]]
    full: dict[str, frozenset[int]]  # per problem, the beams some teacher had no room to continue


Scores = dict[str, list[StepScore | None]]
Pending = tuple["ProblemGroup", GroupRound, Future[Scores]]


class ProblemGroup:
    """Problems that advance in lockstep: per round, at most ONE propose call per teacher and
    ONE scorer call over all of them."""

    def __init__(self, run: Run, problems: list[Problem], scheduler: Scheduler) -> None:
        self.run = run
        self.scheduler = scheduler
        self.live = problems
        self.searches = {p.id: ProblemSearch() for p in problems}
        self.usage = {p.id: Usage() for p in problems}
        self.rounds = 0

    def propose(self) -> GroupRound:
        self.rounds += 1
        beams = sum(len(self.searches[p.id].frontier) for p in self.live)
        report = RoundReport(self.rounds, len(self.live), beams)
        proposals = propose_round(
            self.run, self.live, self.searches, self.rounds, self.usage, report, self.scheduler
        )
        return GroupRound(
            report,
            {p.id: collapse(proposals[p.id], self.rounds) for p in self.live},
            {p.id: out_of_context(proposals[p.id]) for p in self.live},
        )

    def score(self, step: GroupRound) -> Scores:
        return score_round(self.run, self.live, self.searches, step.candidates, self.usage, step.report)

    def advance(self, step: GroupRound, scores: Mapping[str, Sequence[StepScore | None]]) -> None:
        config = self.run.recipe.search
        for p in self.live:
            candidates = with_components(step.candidates[p.id], scores[p.id])
            values = [None if s is None else s.score for s in scores[p.id]]
            self.searches[p.id] = self.searches[p.id].advance(candidates, values, config, step.full[p.id])
            self.usage[p.id].rounds = self.rounds
            record_kept(self.usage[p.id], self.searches[p.id], self.rounds)
        finishing = [p for p in self.live if self.searches[p.id].done(config)]
        outcomes = {p.id: self.searches[p.id].outcome() for p in finishing}
        finish_problems(self.run, finishing, outcomes, self.usage, step.report)
        self.live = [p for p in self.live if not self.searches[p.id].done(config)]
        step.report.finished_problems = len(finishing)
        self.run.observer.round_finished(step.report)


def propose_round(
    run: Run,
    live: Sequence[Problem],
    searches: Mapping[str, ProblemSearch],
    round_index: int,
    usage: Mapping[str, Usage],
    report: RoundReport,
    scheduler: Scheduler,
) -> dict[str, list[tuple[int, StepCandidate]]]:
    """ONE propose call per teacher over the live beams the scheduler asks it on (none where it
    is asked on none); per problem, proposals in (parent, teacher, sample) order. Seeds are keyed
    by (problem, round, beam, teacher, sample)."""
    slots = [(p, parent, beam) for p in live for parent, beam in enumerate(searches[p.id].frontier)]
    asked = [
        scheduler.teachers_for(
            p.id, round_index, parent, len(beam.steps) + 1, usage[p.id], len(searches[p.id].frontier)
        )
        for p, parent, beam in slots
    ]
    samples = {t.name: t.sampling.n for t in run.recipe.teachers}

    def propose(name: str) -> dict[int, list[StepCandidate]]:
        mine = [i for i, names in enumerate(asked) if name in names]
        requests = [
            ProposeRequest(p.question, beam.texts, samples[name], (p.id, round_index, parent), p.id)
            for p, parent, beam in (slots[i] for i in mine)
        ]
        started = time.perf_counter()
        candidates = run.teachers[name].propose(requests)
        report.teacher_timed(name, started)
        return dict(zip(mine, candidates))

    started = time.perf_counter()
    results = in_parallel(propose, [t for t in run.teachers if any(t in names for names in asked)])
    report.engine_timed(started)
    proposals: dict[str, list[tuple[int, StepCandidate]]] = {p.id: [] for p in live}
    for slot, (problem, parent, beam) in enumerate(slots):
        for name in asked[slot]:
            counts = usage[problem.id].at(name, len(beam.steps) + 1)
            counts.asked += samples[name]
            for candidate in results[name][slot]:
                proposals[problem.id].append((parent, candidate))
                counts.tokens += candidate.num_tokens
                usage[problem.id].add_generated(name, candidate.num_tokens)
                report.generated_tokens[name] = report.generated_tokens.get(name, 0) + candidate.num_tokens
    return proposals


def in_parallel(call: Callable[[str], Any], names: Sequence[str]) -> dict[str, Any]:
    """One call per teacher, all in flight at once: each engine runs in its own process (vLLM's
    engine core, or a cordgen worker), so teachers on separate devices generate concurrently."""
    if len(names) <= 1:
        return {name: call(name) for name in names}
    with ThreadPoolExecutor(max_workers=len(names)) as executor:
        futures = {name: executor.submit(call, name) for name in names}
    return {name: future.result() for name, future in futures.items()}


def with_components(candidates: Sequence[Candidate], scores: Sequence[StepScore | None]) -> list[Candidate]:
    """The candidates' steps carrying every kind their scorer read, for the records."""
    return [
        c if s is None else replace(c, step=replace(c.step, scores=tuple(s.components.items())))
        for c, s in zip(candidates, scores)
    ]


def score_round(
    run: Run,
    live: Sequence[Problem],
    searches: Mapping[str, ProblemSearch],
    candidates: Mapping[str, Sequence[Candidate]],
    usage: Mapping[str, Usage],
    report: RoundReport,
) -> Scores:
    """ONE scorer call over every distinct candidate of every live problem; None for those
    whose scoring prompt does not fit the scorer's window."""
    owners, requests = [], []
    for p in live:
        frontier = searches[p.id].frontier
        for c in candidates[p.id]:
            owners.append(p.id)
            steps = frontier[c.parent].texts + (c.step.text,)
            requests.append(ScoreRequest(p.question, steps, p.answer, p.id))
    started = time.perf_counter()
    results = run.scorer.score(requests)
    report.scorer_timed(started)
    scores: Scores = {p.id: [] for p in live}
    for owner, result in zip(owners, results):
        scores[owner].append(result)
        if result is not None:
            count_scoring(usage[owner], report, result.num_prompt_tokens, result.num_cached_tokens)
    return scores


def count_scoring(usage: Usage, report: RoundReport, prompt_tokens: int, cached_tokens: int) -> None:
    usage.scored_requests += 1
    usage.scored_tokens += prompt_tokens
    usage.scored_tokens_computed += prompt_tokens - cached_tokens
    report.scored_tokens += prompt_tokens


def write_answers(
    run: Run,
    by_teacher: Mapping[str, Sequence[Problem]],
    texts: Mapping[str, tuple[str, ...]],
    usage: Mapping[str, Usage],
    report: RoundReport,
) -> dict[str, FinalAnswer]:
    """ONE answer call per teacher, over the problems whose trace (`texts`, by problem id) it
    closes, counted in each problem's usage and the round's report."""
    answers = {}
    for name, group in by_teacher.items():
        requests = [AnswerRequest(p.question, texts[p.id], (p.id,), p.id) for p in group]
        started = time.perf_counter()
        for p, answer in zip(group, run.teachers[name].answer(requests)):
            answers[p.id] = answer
            usage[p.id].add_generated(name, answer.num_tokens)
        report.teacher_timed(name, started)
        report.engine_timed(started)
    return answers


def finish_problems(
    run: Run,
    finishing: Sequence[Problem],
    outcomes: Mapping[str, tuple[Beam, tuple[Beam, ...]]],
    usage: Mapping[str, Usage],
    report: RoundReport,
) -> None:
    """The author of each result's last step writes its final answer: ONE answer call per
    teacher over every problem finishing this round, then each record goes to the sink."""
    first_teacher = next(iter(run.teachers))
    by_teacher: dict[str, list[Problem]] = {}
    for p in finishing:
        result = outcomes[p.id][0]
        by_teacher.setdefault(result.steps[-1].teacher if result.steps else first_teacher, []).append(p)
        record_won(usage[p.id], result)
    texts = {p.id: outcomes[p.id][0].texts for p in finishing}
    answers = write_answers(run, by_teacher, texts, usage, report)
    run.sink([run.record(p, *outcomes[p.id], answers[p.id], usage[p.id]) for p in finishing])


@dataclass(frozen=True)
class WholeTrace:
    problem: Problem
    teacher: str
    steps: tuple[str, ...]
    answer_text: str | None
    sample: StepCandidate


def curate(run: Run, problems: Sequence[Problem]) -> None:
    """The paper's curation baseline: every teacher writes whole traces (ONE call each), the
    scorer reads the gold answer after each full trace (ONE call), the best trace is kept."""
    config = run.recipe.search
    if run.should_stop():
        return
    report = RoundReport(1, len(problems), len(problems) * len(run.teachers) * config.curate_samples)
    usage = {p.id: Usage(rounds=1) for p in problems}
    answer_budget = {t.name: t.sampling.max_answer_tokens for t in run.recipe.teachers}
    traces: list[WholeTrace] = []

    def solve(name: str) -> list[list[StepCandidate]]:
        requests = [
            ProposeRequest(p.question, (), config.curate_samples, (p.id, "curate"), p.id) for p in problems
        ]
        started = time.perf_counter()
        outputs = run.teachers[name].solve(requests, config.thinking_budget + answer_budget[name])
        report.teacher_timed(name, started)
        return outputs

    started = time.perf_counter()
    solved = in_parallel(solve, list(run.teachers))
    report.engine_timed(started)
    for name, outputs in solved.items():
        for p, samples in zip(problems, outputs):
            for sample in samples:
                steps, answer_text = split_trace(run.recipe.format, sample.text)
                traces.append(WholeTrace(p, name, steps, answer_text, sample))
                usage[p.id].add_generated(name, sample.num_tokens)
                report.generated_tokens[name] = report.generated_tokens.get(name, 0) + sample.num_tokens
    started = time.perf_counter()
    scores = run.scorer.score(
        [ScoreRequest(tr.problem.question, tr.steps, tr.problem.answer, tr.problem.id) for tr in traces]
    )
    report.scorer_timed(started)
    report.engine_timed(started)
    beams: dict[str, list[tuple[Beam, WholeTrace]]] = {p.id: [] for p in problems}
    for trace, score in zip(traces, scores):
        if score is not None:  # a trace too long for the scorer's window ranks last
            count_scoring(usage[trace.problem.id], report, score.num_prompt_tokens, score.num_cached_tokens)
        beams[trace.problem.id].append((trace_beam(run, trace, score), trace))
    finish_curated(run, problems, beams, usage, report)
    report.finished_problems = len(problems)
    run.observer.round_finished(report)


def trace_beam(run: Run, trace: WholeTrace, score: StepScore | None) -> Beam:
    """A whole trace as a beam: only its last step carries a score (the trace's; NaN where the
    trace is too long for the scorer's window, so it ranks last)."""
    counts = run.teachers[trace.teacher].count_tokens(trace.steps)
    closed = trace.answer_text is not None
    last = FinishReason.END_OF_THINKING if closed else FinishReason.LENGTH
    steps = tuple(
        Step(text, (trace.teacher,), count, last if i == len(trace.steps) - 1 else FinishReason.STEP, 1)
        for i, (text, count) in enumerate(zip(trace.steps, counts))
    )
    return Beam(
        steps[:-1] + (scored_step(steps[-1], score),),
        ClosedBy.END_OF_THINKING if closed else ClosedBy.BUDGET,
    )


def scored_step(step: Step, score: StepScore | None) -> Step:
    if score is None:
        return replace(step, score=math.nan)
    return replace(step, score=score.score, scores=tuple(score.components.items()))


def finish_curated(
    run: Run,
    problems: Sequence[Problem],
    beams: Mapping[str, list[tuple[Beam, WholeTrace]]],
    usage: Mapping[str, Usage],
    report: RoundReport,
) -> None:
    """Keeps each problem's best trace; its own answer stands, and a trace cut off before
    `</think>` gets one written by its teacher (ONE answer call per teacher)."""
    chosen = {}
    for p in problems:
        ranked = sorted(range(len(beams[p.id])), key=lambda i: (-beams[p.id][i][0].score, i))
        chosen[p.id] = [beams[p.id][i] for i in ranked]
    answers = {}
    unanswered: dict[str, list[Problem]] = {}
    for p in problems:
        beam, trace = chosen[p.id][0]
        answer = own_answer(run, trace)
        if answer is None:
            unanswered.setdefault(trace.teacher, []).append(p)
        else:
            answers[p.id] = answer
    texts = {p.id: chosen[p.id][0][0].texts for p in problems}
    answers.update(write_answers(run, unanswered, texts, usage, report))
    records = []
    for p in problems:
        alternatives = chosen[p.id][1:]
        own = [own_answer(run, trace) for _, trace in alternatives]
        records.append(
            run.record(p, chosen[p.id][0][0], [b for b, _ in alternatives], answers[p.id], usage[p.id], own)
        )
    run.sink(records)


def own_answer(run: Run, trace: WholeTrace) -> FinalAnswer | None:
    if trace.answer_text is None:
        return None
    (tokens,) = run.teachers[trace.teacher].count_tokens([trace.answer_text])
    return FinalAnswer(trace.teacher, trace.answer_text, tokens, trace.sample.finish_reason)


class Interrupted(Exception):
    """The run stopped at a round boundary on request; everything finished so far is written."""


class GracefulStop:
    """First SIGINT/SIGTERM: finish the round in flight, write it, stop. A second one exits at
    once; the results file is still whole, because every round is a single append."""

    def __init__(self, notify: Callable[[str], None]) -> None:
        self.notify = notify
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    def __enter__(self) -> GracefulStop:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            for child in psutil.Process().children(recursive=True):
                child.kill()
            os._exit(128 + signum)
        self.requested = True
        self.notify("stopping after the round in flight; press Ctrl-C again to stop at once")


@dataclass(frozen=True)
class Plan:
    """A run checked end to end before any model loads or any file is written."""

    recipe: Recipe
    run_dir: RunDirectory
    manifest: Manifest
    problems: tuple[Problem, ...]  # this run's (its shard's) problems
    todo: tuple[Problem, ...]
    overwrite: bool
    notes: tuple[str, ...] = ()  # what the user should know before it runs (context windows)


def plan_run(recipe: Recipe, shard: Shard | None = None, overwrite: bool = False) -> Plan:
    if recipe.input.path is None:
        raise ConfigError("no input: give --input or input.path in the recipe")
    if recipe.output.path is None:
        raise ConfigError("no output: give --out or output.path in the recipe")
    check_sources(recipe)
    check_placement(recipe, visible_device_count)
    loaded = load_problems(recipe.input.path, **recipe.input.model_dump(exclude={"path"}))
    notes = tuple(window_notes(recipe, loaded.problems))
    check_scorer_tokens(recipe.scorer, recipe.format)
    if recipe.search.schedule == "adaptive" and recipe.search.adaptive.warm_start is not None:
        warm_start_usages(recipe.search.adaptive.warm_start)
    if loaded.unanswered:
        notes += (describe_unanswered(loaded.unanswered, recipe.input.answer_from),)
    chosen = tuple(p for p in loaded.problems if shard is None or shard.holds(p))
    info = InputInfo(
        path=loaded.name, sha256=loaded.digest, problems=len(loaded.problems), unanswered=loaded.unanswered
    )
    run_dir = RunDirectory(recipe.output.path)
    shard_name = str(shard) if shard else None
    existing = run_dir.check_resumable(recipe, shard_name) if not overwrite else None
    if overwrite and run_dir.path.exists() and not run_dir.path.is_dir():
        raise CordgenError(f"{run_dir.path}: output path is a file, not a run directory")
    done = run_dir.completed_ids() if existing else set()
    if existing:
        manifest = existing.model_copy(
            update={
                "input": info,
                "problems": len(chosen),
                "status": "running",
                "sessions": existing.sessions + 1,
            }
        )
    else:
        manifest = Manifest.start(recipe, info, shard_name, len(chosen))
    manifest.completed = sum(p.id in done for p in chosen)
    todo = tuple(p for p in chosen if p.id not in done)
    check_cluster(recipe)
    return Plan(recipe, run_dir, manifest, chosen, todo, overwrite, notes)


class ReplicaTimes:
    """Each round's busy time per engine replica (placement ray), from the pool into the round's
    report and the manifest, before the report goes on to `observer`."""

    def __init__(self, observer: Observer, pool: Any, manifest: Manifest) -> None:
        self.observer, self.pool, self.manifest = observer, pool, manifest

    def round_finished(self, report: RoundReport) -> None:
        report.replica_seconds = self.pool.replica_seconds()
        if report.replica_seconds:
            busy = {name: round(seconds, 3) for name, seconds in sorted(report.replica_seconds.items())}
            waited = round(report.engine_seconds, 3)
            self.manifest.replica_rounds.append(
                ReplicaRound(round=report.round, engine_seconds=waited, busy_seconds=busy)
            )
        self.observer.round_finished(report)


class SessionClock:
    """Adds this session's wall time to what earlier sessions of the run spent."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest, self.earlier, self.started = manifest, manifest.wall_seconds, time.perf_counter()

    def update(self) -> None:
        self.manifest.wall_seconds = round(self.earlier + time.perf_counter() - self.started, 2)


def execute(
    plan: Plan,
    observer: Observer,
    on_records: RecordSink,
    should_stop: Callable[[], bool] = lambda: False,
    pool: Any = None,
    engine_log: bool = True,
) -> None:
    """Writes the run's first files, loads each distinct engine once (or uses `pool`),
    synthesizes what is still to do, and keeps the manifest's status and counts current. The
    engines' own output goes to the run's engine log, or with `engine_log=False` to stderr."""
    from cordgen.engines.pool import EnginePool
    from cordgen.engines.roles import build_roles

    manifest = plan.manifest
    plan.run_dir.begin(plan.recipe, manifest, plan.overwrite)
    clock = SessionClock(manifest)
    own_pool = pool is None
    log_path = plan.run_dir.path / ENGINE_LOG if engine_log else None
    pool = EnginePool(plan.recipe.placement, log_path) if own_pool else pool
    try:
        teachers, scorer = build_roles(plan.recipe, pool)
        with plan.run_dir.writer() as append:

            def sink(records: Sequence[TraceRecord]) -> None:
                append(records)
                manifest.completed += len(records)
                clock.update()
                plan.run_dir.save(manifest)
                on_records(records)

            timed = ReplicaTimes(observer, pool, manifest)
            synthesize(plan.todo, teachers, scorer, plan.recipe, sink, timed, should_stop)
    except BaseException:
        clock.update()
        manifest.status = "interrupted" if should_stop() else "failed"
        plan.run_dir.save(manifest)
        if should_stop():
            raise Interrupted() from None
        raise
    finally:
        if own_pool:
            pool.shutdown()
    clock.update()
    if manifest.completed < manifest.problems:
        manifest.status = "interrupted"
        plan.run_dir.save(manifest)
        raise Interrupted()
    manifest.status, manifest.finished_at = "complete", now()
    plan.run_dir.save(manifest)
