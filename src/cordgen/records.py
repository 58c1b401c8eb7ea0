"""The output record: one JSON line per problem, with per-step provenance.

Every step says which teacher(s) proposed it, its score and its token count, so later passes
(scoring, export, COMPACT's per-teacher weighting) never need to re-run the search.
"""

from __future__ import annotations

import math
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from cordgen.answers import extract_answer
from cordgen.search import Beam, FinalAnswer

SCHEMA_VERSION = 1


class RecordModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepRecord(RecordModel):
    index: int = Field(ge=1)
    text: str
    teacher: str  # the author: the first teacher that proposed this step
    teachers: list[str]  # every teacher that proposed the identical step from the same parent
    score: float | None  # the scorer's ranking value for the trajectory up to and including this step
    perplexity: float | None  # 1 / score
    scores: dict[str, float] | None = None  # each kind the scorer read (a hybrid's parts), by kind
    num_tokens: int
    round: int
    finish_reason: str


class FinalAnswerRecord(RecordModel):
    teacher: str
    text: str
    extracted: str | None
    num_tokens: int
    finish_reason: str


class TrajectoryRecord(RecordModel):
    steps: list[StepRecord]
    score: float | None
    closed_by: str
    finished: bool  # thinking ended (by the model or the budget) rather than the search giving up
    num_tokens: int
    final_answer: FinalAnswerRecord | None = None


class ProposalCounts(RecordModel):
    """One teacher's step proposals at one step index of one problem."""

    asked: int = 0  # proposals requested (samples: n per beam the teacher was asked on)
    kept: int = 0  # distinct proposed steps that survived the round's selection
    won: int = 0  # of those, steps of the problem's result trace
    tokens: int = 0  # tokens generated for those proposals


class Usage(RecordModel):
    rounds: int = 0
    generated_tokens: dict[str, int] = Field(default_factory=dict)  # per teacher, answers included
    scored_requests: int = 0
    scored_tokens: int = 0  # prompt tokens sent to the scorer
    scored_tokens_computed: int = 0  # of those, not served from the prefix cache
    # Per teacher, per step index (a JSON key: "1", "2", ...): what the scheduler learns from and
    # what the summaries bucket into phases. Empty in records made before it existed.
    proposals: dict[str, dict[str, ProposalCounts]] = Field(default_factory=dict)

    def add_generated(self, teacher: str, tokens: int) -> None:
        self.generated_tokens[teacher] = self.generated_tokens.get(teacher, 0) + tokens

    def at(self, teacher: str, step: int) -> ProposalCounts:
        return self.proposals.setdefault(teacher, {}).setdefault(str(step), ProposalCounts())


class TraceRecord(RecordModel):
    schema_version: int = SCHEMA_VERSION
    cordgen_version: str
    id: str
    question: str
    answer: str  # the gold answer
    strategy: str
    teachers: list[str]  # every teacher of the run, in order
    result: TrajectoryRecord
    alternatives: list[TrajectoryRecord]  # the other finished trajectories, best first
    usage: Usage

    def to_json_line(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json")) + b"\n"

    def without_scores(self) -> dict:
        """What a resumed, sharded, re-batched or re-routed run must reproduce exactly: the record
        less its score floats, whose last bits follow the batch shape, and less the scorer tokens
        computed, which follow what each engine had cached."""
        data = self.model_dump(mode="json")
        for trajectory in [data["result"], *data["alternatives"]]:
            trajectory.pop("score")
            for step in trajectory["steps"]:
                step.pop("score"), step.pop("perplexity"), step.pop("scores")
        data["usage"].pop("scored_tokens_computed")
        return data


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def trajectory_record(beam: Beam, answer: FinalAnswer | None = None) -> TrajectoryRecord:
    steps = [
        StepRecord(
            index=i,
            text=step.text,
            teacher=step.teacher,
            teachers=list(step.teachers),
            score=finite(step.score),
            perplexity=finite(1 / step.score) if step.score else None,
            scores=dict(step.scores) or None,
            num_tokens=step.num_tokens,
            round=step.round,
            finish_reason=step.finish_reason.value,
        )
        for i, step in enumerate(beam.steps, start=1)
    ]
    final = None
    if answer is not None:
        final = FinalAnswerRecord(
            teacher=answer.teacher,
            text=answer.text,
            extracted=extract_answer(answer.text),
            num_tokens=answer.num_tokens,
            finish_reason=answer.finish_reason.value,
        )
    closed_by = beam.closed_by
    return TrajectoryRecord(
        steps=steps,
        score=finite(beam.score),
        closed_by=closed_by.value if closed_by else "open",
        finished=bool(closed_by and closed_by.finished),
        num_tokens=beam.num_tokens,
        final_answer=final,
    )


class Grade(RecordModel):
    """Final-answer correctness against the gold answer (math-verify)."""

    status: Literal["correct", "wrong", "unparsable", "timeout", "error"]
    correct: bool | None  # None when the answer could not be judged
    predicted: str | None  # the answer as parsed from the trace, if any


class StepScore(RecordModel):
    index: int = Field(ge=1)
    score: float | None  # the scorer's value for the trajectory up to and including this step
    perplexity: float | None  # 1 / score
    scores: dict[str, float] | None = None  # each kind read, by kind


class ScoreRecord(RecordModel):
    """One line of `scores.jsonl`, written next to a run's records by `cordgen score`: new
    fields keyed by problem id, the records themselves never rewritten."""

    id: str
    scorer: str
    kind: str = "predictive"  # the scorer kind that read it; a hybrid's part named (hybrid-prm)
    steps: list[StepScore]
    score: float | None  # the score after the whole thinking trajectory
    perplexity: float | None
    grade: Grade

    def to_json_line(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json")) + b"\n"


class StepCompat(RecordModel):
    index: int = Field(ge=1)
    teacher: str  # the step's author from provenance; "" when the source does not say
    num_tokens: int  # in the student's tokenizer, step header included
    nll: float  # the student's mean token NLL of the step
    gain: float  # I_t - I_{t-1}: the step's change to the student's mean log p(gold answer)
    epiphany: bool  # gain above the epiphany threshold


class RationaleCompat(RecordModel):
    source: int  # in a run: 0 its result, k its k-th alternative; in a JSONL: the line number
    teacher: str  # the author; a stitched trace's authors joined by "+"
    difficulty: float  # D: the student's mean token NLL of the rationale
    adaptability: float  # A: the sum of the positive gains
    consensus: float  # C: weighted degree in the cosine-similarity graph of the problem's rationales
    alpha: float  # the weight; a problem's alphas sum to 1
    answer_logprobs: list[float]  # I_0..I_T
    epiphany_steps: list[int]
    steps: list[StepCompat]


class CompatRecord(RecordModel):
    """One line of `compat.jsonl`, written by `cordgen compat`: a problem's rationales as its
    student sees them."""

    id: str
    student: str
    settings: str  # digest of everything that decides the numbers: a resumed pass must match it
    rationales: list[RationaleCompat]

    def to_json_line(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json")) + b"\n"
