"""COMPACT (arXiv 2601.13992): how compatible each teacher's rationale is with one student.

For a problem's K rationales the student gives three signals: difficulty D (its mean token NLL of
the rationale), adaptability A (the sum of positive jumps in its log-likelihood of the gold answer
across step boundaries, the "epiphany moments") and consensus C (the rationale's weighted degree in
the cosine-similarity graph of the K rationales' hidden states). Each is z-scored across the K and
alpha = softmax(b_C z(C) + b_A z(A) - b_D z(D)) weights the rationales in distillation. The metric
functions are pure; the student's forward passes are in `cordgen.student`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from pydantic import BaseModel

from cordgen.config import CompatConfig, StepFormat, StudentSettings, load_recipe, semantic_view
from cordgen.errors import CordgenError
from cordgen.problems import problem_rows
from cordgen.records import CompatRecord, RationaleCompat, StepCompat, TrajectoryRecord
from cordgen.scoring import ForeignFields, assistant_text, split_response
from cordgen.store import CONFIG, RESULTS, JsonlLog, RunDirectory
from cordgen.student import PackedRationale, RationaleMeasure, measure_rationales, pack_rationale

COMPAT = "compat.jsonl"  # written by `cordgen compat` beside a run's records


@dataclass(frozen=True)
class Rationale:
    problem_id: str
    question: str
    answer: str  # gold
    source: int  # see RationaleCompat.source
    teacher: str
    steps: tuple[str, ...]
    step_teachers: tuple[str, ...]


def difficulty(measure: RationaleMeasure) -> float:
    """Token-weighted: the mean NLL over all of the rationale's tokens."""
    tokens = sum(measure.step_tokens)
    return sum(n * k for n, k in zip(measure.step_nll, measure.step_tokens)) / max(1, tokens)


def answer_gains(answer_logprobs: Sequence[float]) -> list[float]:
    """I_t - I_{t-1} for t = 1..T."""
    return [b - a for a, b in zip(answer_logprobs, answer_logprobs[1:])]


def adaptability(answer_logprobs: Sequence[float]) -> float:
    return sum(max(0.0, gain) for gain in answer_gains(answer_logprobs))


def epiphany_steps(answer_logprobs: Sequence[float], threshold: float) -> list[int]:
    return [t for t, gain in enumerate(answer_gains(answer_logprobs), start=1) if gain > threshold]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b)) / norm if norm else 0.0


def consensus(embeddings: Sequence[Sequence[float]]) -> list[float]:
    """Each node's weighted degree: the sum of its cosine similarities to the other rationales."""
    n = len(embeddings)
    similarity = [
        [cosine(embeddings[i], embeddings[j]) if i < j else 0.0 for j in range(n)] for i in range(n)
    ]
    return [sum(similarity[min(i, j)][max(i, j)] for j in range(n) if j != i) for i in range(n)]


def zscores(values: Sequence[float]) -> list[float]:
    """Across one problem's rationales; all zero where they do not differ (or K = 1)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std if std > 1e-12 else 0.0 for v in values]


def compat_weights(
    consensus_: Sequence[float],
    adaptability_: Sequence[float],
    difficulty_: Sequence[float],
    config: CompatConfig,
) -> list[float]:
    logits = [
        config.beta_consensus * c + config.beta_adaptability * a - config.beta_difficulty * d
        for c, a, d in zip(zscores(consensus_), zscores(adaptability_), zscores(difficulty_))
    ]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    return [e / sum(exps) for e in exps]


def problem_record(
    rationales: Sequence[Rationale],
    measures: Sequence[RationaleMeasure],
    student: str,
    settings: str,
    config: CompatConfig,
) -> CompatRecord:
    """One problem's rationales (all of the same problem), measured in the same order."""
    d = [difficulty(m) for m in measures]
    a = [adaptability(m.answer_logprob) for m in measures]
    c = consensus([m.embedding for m in measures])
    alpha = compat_weights(c, a, d, config)
    out = []
    for k, (rationale, m) in enumerate(zip(rationales, measures)):
        gains = answer_gains(m.answer_logprob)
        steps = [
            StepCompat(
                index=i,
                teacher=teacher,
                num_tokens=tokens,
                nll=nll,
                gain=gain,
                epiphany=gain > config.epiphany_threshold,
            )
            for i, (teacher, tokens, nll, gain) in enumerate(
                zip(rationale.step_teachers, m.step_tokens, m.step_nll, gains), start=1
            )
        ]
        out.append(
            RationaleCompat(
                source=rationale.source,
                teacher=rationale.teacher,
                difficulty=d[k],
                adaptability=a[k],
                consensus=c[k],
                alpha=alpha[k],
                answer_logprobs=list(m.answer_logprob),
                epiphany_steps=epiphany_steps(m.answer_logprob, config.epiphany_threshold),
                steps=steps,
            )
        )
    return CompatRecord(id=rationales[0].problem_id, student=student, settings=settings, rationales=out)


def authors(step_teachers: Sequence[str]) -> str:
    """A single teacher's name, or a stitched trace's authors in order of first appearance."""
    return "+".join(dict.fromkeys(t for t in step_teachers if t)) or "unknown"


def trajectory_rationale(record, source: int, trajectory: TrajectoryRecord) -> Rationale:
    step_teachers = tuple(step.teacher for step in trajectory.steps)
    return Rationale(
        record.id,
        record.question,
        record.answer,
        source,
        authors(step_teachers),
        tuple(step.text for step in trajectory.steps),
        step_teachers,
    )


def rationales_of_run(run: RunDirectory) -> Iterator[list[Rationale]]:
    """Per problem: its result and every alternative the run kept, in that order."""
    for record in run.records():
        trajectories = [record.result, *record.alternatives]
        yield [trajectory_rationale(record, k, t) for k, t in enumerate(trajectories) if t.steps]


def rationales_of_jsonl(
    path: Path, fields: ForeignFields, teacher_field: str, fmt: StepFormat
) -> list[list[Rationale]]:
    """Rows grouped by problem id, in order of first appearance; each row is one rationale."""
    groups: dict[str, list[Rationale]] = {}
    rows = problem_rows(
        path, id_field=fields.id, question_field=fields.question, answer_field=fields.answer, unique_ids=False
    )
    for problem, row, place in rows:
        where = str(place)
        steps, _ = split_response(fmt, assistant_text(row, fields, where))
        teacher = row.get(teacher_field, "unknown")
        if not isinstance(teacher, str) or not teacher:
            raise CordgenError(f"{where}: {teacher_field}: expected a teacher name, got {teacher!r}")
        group = groups.setdefault(problem.id, [])
        if group and (group[0].question, group[0].answer) != (problem.question, problem.answer):
            raise CordgenError(
                f"{where}: id {problem.id!r}: question or answer differs from line {group[0].source}"
            )
        if steps:
            group.append(
                Rationale(
                    problem.id,
                    problem.question,
                    problem.answer,
                    place.index,
                    teacher,
                    steps,
                    (teacher,) * len(steps),
                )
            )
    return list(groups.values())


def settings_digest(student: StudentSettings, config: CompatConfig, fmt: StepFormat) -> str:
    view = {"student": semantic_view(student), "compat": semantic_view(config), "format": semantic_view(fmt)}
    view["student"].pop("device")
    return hashlib.sha256(orjson.dumps(view, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


@dataclass(frozen=True)
class CompatPlan:
    """A compatibility pass checked before the student loads: rationales read, output resumable."""

    source: Path
    student: StudentSettings
    config: CompatConfig
    fmt: StepFormat
    problems: tuple[tuple[Rationale, ...], ...]  # per problem, at least one rationale each
    todo: tuple[tuple[Rationale, ...], ...]
    output: JsonlLog
    settings: str


def read_rationales(
    source: Path, fields: ForeignFields, teacher_field: str, recipe_path: Path | None
) -> tuple[list[list[Rationale]], StepFormat, Path]:
    """(rationales per problem, step format, default output path) of a run directory or a JSONL."""
    if source.is_dir():
        run = RunDirectory(source)
        if not run.results_path.exists():
            raise CordgenError(f"{source}: no {RESULTS}; not a cordgen run directory")
        recipe_path = recipe_path or source / CONFIG
        fmt = load_recipe(recipe_path).format if recipe_path.exists() else StepFormat()
        return list(rationales_of_run(run)), fmt, source / COMPAT
    fmt = load_recipe(recipe_path).format if recipe_path else StepFormat()
    default_out = source.with_name(source.stem + ".compat.jsonl")
    return rationales_of_jsonl(source, fields, teacher_field, fmt), fmt, default_out


def plan_compat(
    source: Path,
    student: StudentSettings,
    config: CompatConfig,
    out: Path | None = None,
    fields: ForeignFields = ForeignFields(),
    teacher_field: str = "teacher",
    recipe_path: Path | None = None,
    overwrite: bool = False,
) -> CompatPlan:
    from cordgen.config import resolve_model_source

    resolve_model_source(student.model)
    groups, fmt, default_out = read_rationales(source, fields, teacher_field, recipe_path)
    groups = [g for g in groups if g]
    if not groups:
        raise CordgenError(f"{source}: no rationale with thinking steps to measure")
    output = JsonlLog(out or default_out)
    if overwrite:
        output.path.unlink(missing_ok=True)
    settings = settings_digest(student, config, fmt)
    earlier = {row["id"]: (row.get("student"), row.get("settings")) for row in output.rows()}
    other = next((s for s in earlier.values() if s != (student.model, settings)), None)
    if other is not None:
        raise CordgenError(
            f"{output.path}: measured with student {other[0]} under other settings (use --overwrite or --out)"
        )
    todo = tuple(tuple(g) for g in groups if g[0].problem_id not in earlier)
    return CompatPlan(source, student, config, fmt, tuple(tuple(g) for g in groups), todo, output, settings)


def measure_problems(
    model, chat, problems: Sequence[Sequence[Rationale]], config: CompatConfig, student: str, settings: str
) -> list[CompatRecord]:
    """Every rationale of every problem in ONE batched measuring pass."""
    packed: list[PackedRationale] = [
        pack_rationale(chat, r.question, r.steps, config.answer_suffix, r.answer) for g in problems for r in g
    ]
    measures = measure_rationales(
        model, packed, layer=config.layer, pooling=config.pooling, max_batch_tokens=config.max_batch_tokens
    )
    records, start = [], 0
    for group in problems:
        records.append(problem_record(group, measures[start : start + len(group)], student, settings, config))
        start += len(group)
    return records


def run_compat(
    plan: CompatPlan,
    model,
    chat,
    on_batch: Callable[[Sequence[CompatRecord]], None],
    batch_problems: int = 512,
) -> None:
    """What is still to do, `batch_problems` problems per pass, each batch appended and fsynced."""
    plan.output.repair()
    with plan.output.appender() as append:
        for start in range(0, len(plan.todo), batch_problems):
            batch = plan.todo[start : start + batch_problems]
            records = measure_problems(model, chat, batch, plan.config, plan.student.model, plan.settings)
            append(records)
            on_batch(records)


def load_compat(path: Path) -> dict[str, CompatRecord] | None:
    """`cordgen compat`'s lines by problem id, or None where it never ran."""
    if not path.exists():
        return None
    return {row["id"]: CompatRecord.model_validate(row) for row in JsonlLog(path).rows()}


STITCHED = "(stitched)"  # the row of rationales written by several teachers


class TeacherSummary(BaseModel):
    """Which teacher suits this student: rationale-level means over the rationales it wrote alone
    (stitched ones share one row), and step-level ones read through provenance, so a stitched CoRD
    trace credits each of its authors with their own steps."""

    teacher: str
    rationales: int
    mean_alpha: float | None
    mean_difficulty: float | None
    mean_adaptability: float | None
    steps: int
    mean_step_nll: float | None
    epiphany_rate: float | None  # share of the teacher's steps that are epiphanies


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def teacher_summary(records: Sequence[CompatRecord]) -> list[TeacherSummary]:
    by_rationale: dict[str, list[RationaleCompat]] = {}
    by_step: dict[str, list[StepCompat]] = {}
    for record in records:
        for rationale in record.rationales:
            label = STITCHED if "+" in rationale.teacher else rationale.teacher
            by_rationale.setdefault(label, []).append(rationale)
            for step in rationale.steps:
                by_step.setdefault(step.teacher or "unknown", []).append(step)
    summaries = []
    for teacher in sorted(by_rationale.keys() | by_step.keys(), key=lambda name: (name == STITCHED, name)):
        rs, ss = by_rationale.get(teacher, []), by_step.get(teacher, [])
        summaries.append(
            TeacherSummary(
                teacher=teacher,
                rationales=len(rs),
                mean_alpha=mean([r.alpha for r in rs]),
                mean_difficulty=mean([r.difficulty for r in rs]),
                mean_adaptability=mean([r.adaptability for r in rs]),
                steps=len(ss),
                mean_step_nll=mean([s.nll for s in ss]),
                epiphany_rate=mean([float(s.epiphany) for s in ss]),
            )
        )
    return summaries
