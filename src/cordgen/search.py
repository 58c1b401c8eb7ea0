"""The CoRD beam controller: pure functions of (beams, candidates, scores), and the types it owns.

What a teacher hands the controller, a proposed step (`StepCandidate`) or a final answer
(`FinalAnswer`) with why its generation stopped (`FinishReason`), is defined here; engines build
these values and records store them, so the controller imports no engine module.

No engine, I/O or randomness lives here. The synthesis loop makes the batched engine calls and
hands their results to these functions, so every rule of the search is tested without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from cordgen.config import SearchConfig


class FinishReason(str, Enum):
    STEP = "step"  # stopped at the next step marker: thinking goes on
    END_OF_THINKING = "end_of_thinking"  # stopped at </think>
    EOS = "eos"  # the model ended its turn
    LENGTH = "length"  # hit the token limit of the call
    CONTEXT = "context"  # not generated: the prompt leaves too little of the context window

    @property
    def ends_thinking(self) -> bool:
        return self in (FinishReason.END_OF_THINKING, FinishReason.EOS)


@dataclass(frozen=True)
class StepCandidate:
    teacher: str
    text: str
    num_tokens: int  # tokens the teacher decoded for this step, the stop marker included
    finish_reason: FinishReason
    sample: int = 0


@dataclass(frozen=True)
class FinalAnswer:
    teacher: str
    text: str
    num_tokens: int
    finish_reason: FinishReason


class ClosedBy(str, Enum):
    END_OF_THINKING = "end_of_thinking"  # the last step closed thinking
    EOS = "eos"  # the last step ended the turn
    BUDGET = "budget"  # the thinking budget ran out: closed with </think>
    CONTEXT = "context"  # the next step, its answer or its score would not fit a context window
    MAX_STEPS = "max_steps"  # still live when the problem ran out of rounds
    STALLED = "stalled"  # no usable candidate was proposed

    @property
    def finished(self) -> bool:
        """Did thinking end (by the model or the budget), rather than the search giving up?"""
        return self in (ClosedBy.END_OF_THINKING, ClosedBy.EOS, ClosedBy.BUDGET, ClosedBy.CONTEXT)


@dataclass(frozen=True)
class Step:
    text: str
    teachers: tuple[str, ...]  # every teacher that proposed this text from this parent; the first wrote it
    num_tokens: int
    finish_reason: FinishReason
    round: int
    score: float | None = None  # the scorer's ranking value for the trajectory ending with this step
    scores: tuple[tuple[str, float], ...] = ()  # each kind the scorer read, e.g. (("predictive", S),)

    @property
    def teacher(self) -> str:
        return self.teachers[0]


@dataclass(frozen=True)
class Beam:
    steps: tuple[Step, ...] = ()
    closed_by: ClosedBy | None = None

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(step.text for step in self.steps)

    @property
    def score(self) -> float:
        last = self.steps[-1].score if self.steps else None
        return -math.inf if last is None or math.isnan(last) else last

    @property
    def num_tokens(self) -> int:
        return sum(step.num_tokens for step in self.steps)

    @property
    def ends_thinking(self) -> bool:
        return bool(self.steps) and self.steps[-1].finish_reason.ends_thinking

    def extend(self, step: Step) -> Beam:
        return Beam(self.steps + (step,))

    def close(self, reason: ClosedBy) -> Beam:
        return replace(self, closed_by=reason)


@dataclass(frozen=True)
class Candidate:
    """A distinct next step for the frontier beam at index `parent`."""

    parent: int
    step: Step


def collapse(proposals: Sequence[tuple[int, StepCandidate]], round_index: int) -> list[Candidate]:
    """One candidate per (parent, text, finish reason), crediting every teacher that proposed it.

    Without this, a step several teachers agree on fills several of the B slots with one
    trajectory. A blank step that does not end thinking carries nothing and is dropped, and so
    are the parents that some teacher had no room to continue (see `out_of_context`).
    Proposals come in (parent, teacher, sample) order; the first proposer is the author.
    """
    full = out_of_context(proposals)
    merged: dict[tuple[int, str, FinishReason], list[StepCandidate]] = {}
    for parent, proposal in proposals:
        if parent in full or (not proposal.text.strip() and not proposal.finish_reason.ends_thinking):
            continue
        merged.setdefault((parent, proposal.text, proposal.finish_reason), []).append(proposal)
    return [
        Candidate(
            parent,
            Step(
                text=text,
                teachers=tuple(dict.fromkeys(p.teacher for p in group)),
                num_tokens=group[0].num_tokens,
                finish_reason=reason,
                round=round_index,
            ),
        )
        for (parent, text, reason), group in merged.items()
    ]


def out_of_context(proposals: Sequence[tuple[int, StepCandidate]]) -> frozenset[int]:
    """Parents whose trajectory leaves some teacher no room in its window for a step and an
    answer: they close as they are, whatever the other teachers proposed, so that every beam of a
    run closes at a point that does not depend on which teacher happened to run out first."""
    return frozenset(parent for parent, p in proposals if p.finish_reason is FinishReason.CONTEXT)


@dataclass(frozen=True)
class Selection:
    frontier: tuple[Beam, ...]  # surviving beams that keep thinking, best first
    finished: tuple[Beam, ...]  # surviving beams whose last step ended thinking, best first


def closed_reason(step: Step) -> ClosedBy:
    return ClosedBy.EOS if step.finish_reason is FinishReason.EOS else ClosedBy.END_OF_THINKING


def rank_key(score: float) -> float:
    return -math.inf if math.isnan(score) else score


def select(
    frontier: Sequence[Beam], candidates: Sequence[Candidate], scores: Sequence[float], width: int
) -> Selection:
    """The `width` best children of the frontier by score; ties go to the earlier parent, then
    the earlier candidate, so the choice never depends on anything but its inputs."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    order = sorted(range(len(candidates)), key=lambda i: (-rank_key(scores[i]), candidates[i].parent, i))
    survivors = [
        frontier[candidates[i].parent].extend(replace(candidates[i].step, score=scores[i]))
        for i in order[:width]
    ]
    return Selection(
        frontier=tuple(b for b in survivors if not b.ends_thinking),
        finished=tuple(b.close(closed_reason(b.steps[-1])) for b in survivors if b.ends_thinking),
    )


@dataclass(frozen=True)
class ProblemSearch:
    """One problem's search state between rounds."""

    frontier: tuple[Beam, ...] = (Beam(),)
    finished: tuple[Beam, ...] = ()
    rounds: int = 0
    stalled: bool = False

    def done(self, config: SearchConfig) -> bool:
        return (
            self.stalled
            or not self.frontier
            or len(self.finished) >= config.beam_width
            or self.rounds >= config.max_steps
        )

    def advance(
        self,
        candidates: Sequence[Candidate],
        scores: Sequence[float | None],
        config: SearchConfig,
        full: frozenset[int] = frozenset(),
    ) -> ProblemSearch:
        """One round: close the frontier beams that are out of context, select the best children
        of the others, then close beams that spent the thinking budget. `full` holds the parents
        a teacher had no room to continue; a candidate scored None did not fit the scorer's
        window, and a parent left with no scorable candidate is out of context too."""
        scored = [(c, s) for c, s in zip(candidates, scores) if s is not None and c.parent not in full]
        unscorable = {c.parent for c, s in zip(candidates, scores) if s is None}
        full = full | (unscorable - {c.parent for c, _ in scored})
        closed = tuple(self.frontier[i].close(ClosedBy.CONTEXT) for i in sorted(full))
        if not scored and not closed:
            return replace(self, rounds=self.rounds + 1, stalled=True)
        if not scored:
            return replace(self, frontier=(), finished=self.finished + closed, rounds=self.rounds + 1)
        selection = select(self.frontier, [c for c, _ in scored], [s for _, s in scored], config.beam_width)
        spent = tuple(b for b in selection.frontier if b.num_tokens >= config.thinking_budget)
        return ProblemSearch(
            frontier=tuple(b for b in selection.frontier if b.num_tokens < config.thinking_budget),
            finished=self.finished
            + closed
            + selection.finished
            + tuple(b.close(ClosedBy.BUDGET) for b in spent),
            rounds=self.rounds + 1,
        )

    def outcome(self) -> tuple[Beam, tuple[Beam, ...]]:
        """(the result, the other finished beams). The result is the best finished beam; if none
        finished, the best live one, closed and marked unfinished."""
        if self.finished:
            ranked = sorted(range(len(self.finished)), key=lambda i: (-self.finished[i].score, i))
            return self.finished[ranked[0]], tuple(self.finished[i] for i in ranked[1:])
        best = max(self.frontier, key=lambda b: b.score, default=Beam())
        return best.close(ClosedBy.STALLED if self.stalled else ClosedBy.MAX_STEPS), ()
