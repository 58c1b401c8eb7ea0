"""A run's traces as supervised fine-tuning data: one chat example per problem, in JSONL here or
as a Hugging Face dataset folder (`cordgen.export_hf`), from the same rows.

The thinking is rendered with the run's own step markers and think tags, so a student learns the
format its teachers wrote in. Every row has the same metadata keys and JSON types, so `datasets`
infers one schema from the JSONL without being given features; `features` states it for Parquet.
Where `cordgen score` has written scores.jsonl, its scores and grades replace the search-time ones
stored in the records.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import orjson
from pydantic import BaseModel

from cordgen.config import StepFormat, load_recipe
from cordgen.errors import CordgenError
from cordgen.prompts import render_steps
from cordgen.records import CompatRecord, ScoreRecord, TraceRecord, TrajectoryRecord
from cordgen.store import CONFIG, RESULTS, SCORES, RunDirectory, load_scores

if TYPE_CHECKING:
    import datasets

ExportFormat = Literal["messages", "sharegpt"]
Weights = Literal["none", "compat"]
FORMATS: tuple[ExportFormat, ...] = ("messages", "sharegpt")


class ExportReport(BaseModel):
    kept: int
    dropped: dict[str, int]  # traces left out, by reason

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())

    def dropped_summary(self) -> str:
        """`unfinished 1, not correct 2`, in the order the reasons were first met."""
        return ", ".join(f"{reason} {count}" for reason, count in self.dropped.items())


def step_format(run: RunDirectory) -> StepFormat:
    """The markers the run's teachers wrote with; a run copied without its recipe gets the defaults."""
    path = run.path / CONFIG
    return load_recipe(path).format if path.exists() else StepFormat()


def assistant_text(trajectory: TrajectoryRecord, fmt: StepFormat, think_tags: bool) -> str:
    """Steps verbatim, as the teachers wrote them; the answer loses the whitespace that joined it
    to the closing tag during generation. A trace without an answer ends with its thinking."""
    thinking = render_steps(fmt, [step.text for step in trajectory.steps])
    final = trajectory.final_answer
    answer = final.text.strip() if final is not None else ""
    thinking = f"{fmt.think_open}\n{thinking}{fmt.think_close}" if think_tags else thinking.strip()
    return f"{thinking}\n\n{answer}" if answer else thinking


def metadata(record: TraceRecord, result: TrajectoryRecord, scored: ScoreRecord | None) -> dict[str, Any]:
    """Provenance and quality signals to filter or weight examples by after export; `scored`
    belongs to the record's result, the only trajectory `cordgen score` reads."""
    if scored is None:
        step_scores = [step.score for step in result.steps]
        perplexity = result.steps[-1].perplexity if result.steps else None  # 1 / the result's score
        score, correct = result.score, None
        predicted = result.final_answer.extracted if result.final_answer is not None else None
    else:
        by_index = {step.index: step.score for step in scored.steps}
        step_scores = [by_index.get(step.index) for step in result.steps]
        score, perplexity, correct = scored.score, scored.perplexity, scored.grade.correct
        predicted = scored.grade.predicted
    return {
        "id": record.id,
        "gold_answer": record.answer,
        "strategy": record.strategy,
        "teachers": [step.teacher for step in result.steps],
        "step_scores": step_scores,
        "score": score,
        "perplexity": perplexity,
        "correct": correct,
        "predicted_answer": predicted,
        "num_tokens": result.num_tokens,
    }


def features(format: ExportFormat, weighted: bool) -> datasets.Features:
    """The rows' types, stated rather than inferred: a field that is null in every row of one run
    (`correct` before scoring) keeps its type, and every export with the same options has the
    same schema. The keys are `example`'s and `metadata`'s."""
    from datasets import Features, Value

    string, number = Value("string"), Value("float64")
    meta = {
        "id": string,
        "gold_answer": string,
        "strategy": string,
        "teachers": [string],
        "step_scores": [number],
        "score": number,
        "perplexity": number,
        "correct": Value("bool"),
        "predicted_answer": string,
        "num_tokens": Value("int64"),
    }
    if weighted:
        meta |= {"rationale": Value("int64"), "weight": number}
    if format == "sharegpt":
        return Features(
            {"system": string, "conversations": [{"from": string, "value": string}], "metadata": meta}
        )
    return Features({"messages": [{"role": string, "content": string}], "metadata": meta})


@dataclass(frozen=True)
class Filters:
    only_correct: bool
    max_perplexity: float | None
    include_unfinished: bool

    min_weight: float | None = None

    def reason(
        self, result: TrajectoryRecord, scored: ScoreRecord | None, meta: dict[str, Any]
    ) -> str | None:
        """Why a trace stays out, the first reason that applies; None keeps it."""
        if not self.include_unfinished and (result.final_answer is None or not result.finished):
            return "unfinished"
        if self.only_correct and scored is None:
            return "not scored"
        if self.only_correct and meta["correct"] is not True:
            return "not correct"
        limit, perplexity = self.max_perplexity, meta["perplexity"]
        if limit is not None and (perplexity is None or perplexity > limit):
            return f"perplexity above {limit:g}"
        if "weight" in meta and meta["weight"] is None:
            return "not measured by compat"
        if self.min_weight is not None and "weight" in meta and meta["weight"] < self.min_weight:
            return f"weight below {self.min_weight:g}"
        return None


def example(question: str, text: str, meta: dict[str, Any], format: ExportFormat, system: str | None) -> dict:
    if format == "sharegpt":
        turns = [{"from": "user", "value": question}, {"from": "assistant", "value": text}]
        return {"system": system or "", "conversations": turns, "metadata": meta}
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages, "metadata": meta}


@contextmanager
def atomic_output(path: Path) -> Iterator[BinaryIO]:
    """Streams into a temporary file beside `path`, moved into place only once complete and
    durable: a failure midway leaves whatever `path` held before, and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_target(run: RunDirectory, out: Path) -> None:
    if out.is_dir():
        raise CordgenError(f"{out}: output path is a directory")
    if out.resolve() in {run.results_path.resolve(), (run.path / SCORES).resolve()}:
        raise CordgenError(f"{out}: would replace the run's own records; choose another --jsonl")


@dataclass(frozen=True)
class RowOptions:
    """How traces become rows and which stay out: one set of options for every output."""

    format: ExportFormat = "messages"
    only_correct: bool = False
    max_perplexity: float | None = None
    system_prompt: str | None = None
    think_tags: bool = True
    include_unfinished: bool = False
    weights: Weights = "none"
    min_weight: float | None = None


@dataclass(frozen=True)
class RowSource:
    """A run checked and read for export, so that every refusal comes before the first write."""

    run: RunDirectory
    options: RowOptions
    scores: dict[str, ScoreRecord] | None
    compat: dict[tuple[str, int], float] | None
    fmt: StepFormat

    def rows(self, report: ExportReport) -> Iterator[dict[str, Any]]:
        """One training example per kept trace, in the run's order; `report` counts kept and dropped.
        With `weights="compat"` every rationale the run kept (its result and its alternatives) is an
        example, weighted by the alpha `cordgen compat` gave it."""
        options, compat = self.options, self.compat
        filters = Filters(
            options.only_correct, options.max_perplexity, options.include_unfinished, options.min_weight
        )
        for record in self.run.records():
            scored = self.scores.get(record.id) if self.scores is not None else None
            for source, trajectory in exported(record, compat is not None):
                meta = metadata(record, trajectory, scored if source == 0 else None)
                if compat is not None:
                    meta["rationale"] = source
                    meta["weight"] = compat.get((record.id, source))
                reason = filters.reason(trajectory, scored if source == 0 else None, meta)
                if reason is not None:
                    report.dropped[reason] = report.dropped.get(reason, 0) + 1
                    continue
                text = assistant_text(trajectory, self.fmt, options.think_tags)
                report.kept += 1
                yield example(record.question, text, meta, options.format, options.system_prompt)


def open_rows(run_dir: str | Path, options: RowOptions) -> RowSource:
    run = RunDirectory(run_dir)
    if options.format not in FORMATS:
        folder_only = " (hf: with --out DIR)" if options.format == "hf" else ""
        raise CordgenError(f"--format: {options.format!r} is not one of: {', '.join(FORMATS)}{folder_only}")
    if not run.results_path.is_file():
        raise CordgenError(f"{run.path}: no {RESULTS}; not a cordgen run directory")
    scores = load_scores(run.path / SCORES)
    if options.only_correct and scores is None:
        raise CordgenError(
            f"{run.path}: no {SCORES} to tell correct traces; run `cordgen score {run.path}` first"
        )
    compat = compat_alphas(run, options.weights, options.min_weight)
    return RowSource(run, options, scores, compat, step_format(run))


def export_run(run_dir: str | Path, out: str | Path, **options: Any) -> ExportReport:
    """Writes `RowSource.rows` to the JSONL file `out`, all of them or, on any error, nothing.
    `options` are `RowOptions`' fields."""
    source, out = open_rows(run_dir, RowOptions(**options)), Path(out)
    check_target(source.run, out)
    report = ExportReport(kept=0, dropped={})
    with atomic_output(out) as handle:
        for row in source.rows(report):
            handle.write(orjson.dumps(row) + b"\n")
    return report


def exported(record: TraceRecord, every_rationale: bool) -> list[tuple[int, TrajectoryRecord]]:
    """(source, trajectory) pairs, numbered as `cordgen compat` numbers them."""
    return list(enumerate([record.result, *record.alternatives])) if every_rationale else [(0, record.result)]


def compat_alphas(
    run: RunDirectory, weights: Weights, min_weight: float | None
) -> dict[tuple[str, int], float] | None:
    """alpha by (problem id, source) from the run's compat.jsonl, or None when not weighting."""
    from cordgen.compat import COMPAT, load_compat

    if weights not in ("none", "compat"):
        raise CordgenError(f"--weights: {weights!r} is not one of: none, compat")
    if weights == "none":
        if min_weight is not None:
            raise CordgenError("--min-weight: needs --weights compat")
        return None
    records: dict[str, CompatRecord] | None = load_compat(run.path / COMPAT)
    if records is None:
        raise CordgenError(f"{run.path}: no {COMPAT}; run `cordgen compat {run.path} --student MODEL` first")
    return {(r.id, rationale.source): rationale.alpha for r in records.values() for rationale in r.rationales}
