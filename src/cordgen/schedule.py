"""Adaptive teacher scheduling: which teachers propose a step on which beam, and what they won.

The statistic. For teacher t at phase f (a bucket of step indexes, `search.adaptive.phases`),
p(t, f) is the chance that a proposal of t at f wins. With `credit: final` (the default) a win
is a step of the problem's result trace; with `credit: round`, a step that survived its round's
selection. A step several asked teachers proposed identically is credited to the first of them in
the recipe's order (the author the records name), so a teacher later in the order is credited
with what it adds to those before it: the statistic measures a teacher's marginal worth, and two
teachers that always agree do not both look indispensable. Put the teacher you trust most first.

Its posterior is Beta(a0 + won, b0 + asked - won). The prior is a0 = 1 + s * W,
b0 = 1 + s * (A - W): W and A are a warm start's wins and proposals asked of t at f (summed over
a finished run's records), s is `prior_strength`, the weight of one of its proposals; without a
warm start, or without its data for (t, f), a0 = b0 = 1. A cell the warm start asked often is
thus a confident one, and a rarely asked one stays open. Under `credit: round`, won and asked
are THIS problem's own counts so far (its `Usage.proposals`); under `credit: final` a problem's
wins are known only when it ends, so the warm start alone decides.

Why final by default: a predictive scorer tells steps apart mostly at the end of a trace (the demo's
ranks the middle steps near chance and every last step right), so which proposals survive a
middle round says little about whose steps make right traces; which steps the finished traces
are made of says it. With a step scorer that is informative at every step (a verifier), the
round's selection is the faster signal, and it lets each problem adapt to itself.

The choice. On each live beam each teacher draws theta_t from its posterior (Thompson sampling)
and u_t uniformly, from a generator seeded by (run seed, "schedule", problem, round, beam,
teacher). The statistic chooses the teacher with the best draw, those whose theta_t >=
relative_threshold * max(theta), then the next best draws while fewer than `min_teachers` are
chosen (every teacher, where there are fewer); on top of those, any teacher with u_t < floor is
asked to explore, so every teacher is asked with probability at least `floor`. With `fill_beams`,
a problem whose frontier could not fill the beam width from `min_teachers` proposals per beam
asks every teacher.

Why per problem and not pooled across the run's problems: a decision then depends only on the
seed, the problem and what its own beams did, so a resumed, re-batched, pipelined or sharded run
makes exactly the decisions of an uninterrupted one. Learning across problems comes from the warm
start, a finished run fixed before this one starts (its content enters the run's config hash).
Nothing here imports an engine or does I/O.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cordgen.config import AdaptiveSettings, Credit, Schedule, SearchConfig
from cordgen.records import ProposalCounts, Usage
from cordgen.search import Beam, ProblemSearch
from cordgen.seeds import derive_seed

PhaseCounts = dict[tuple[str, int], ProposalCounts]  # (teacher, phase) -> counts
Prior = dict[tuple[str, int], tuple[float, float]]  # (teacher, phase) -> (a0, b0)


def phase_of(step: int, edges: Sequence[int]) -> int:
    """The phase of a step index: edges (1, 2, 4) make steps 1 | 2 | 3-4 | 5+ phases 0..3."""
    return bisect.bisect_left(edges, step)


def phase_labels(edges: Sequence[int]) -> list[str]:
    """Each phase's steps as text, e.g. ["1", "2", "3-4", "5+"]."""
    labels, first = [], 1
    for last in edges:
        labels.append(str(first) if first == last else f"{first}-{last}")
        first = last + 1
    return [*labels, f"{first}+"]


def by_phase(usages: Iterable[Usage], edges: Sequence[int]) -> PhaseCounts:
    """Sums per-step counts of many problems into (teacher, phase) cells."""
    cells: PhaseCounts = {}
    for usage in usages:
        for teacher, steps in usage.proposals.items():
            for step, counts in steps.items():
                cell = cells.setdefault((teacher, phase_of(int(step), edges)), ProposalCounts())
                cell.asked += counts.asked
                cell.kept += counts.kept
                cell.won += counts.won
                cell.tokens += counts.tokens
    return cells


def wins(counts: ProposalCounts, credit: Credit) -> int:
    return counts.won if credit == "final" else counts.kept


def prior_from(warm_start: PhaseCounts, strength: float, credit: Credit = "final") -> Prior:
    """The warm start's wins and losses per cell as Beta pseudo-counts, each worth `strength`."""
    return {
        cell: (1 + strength * wins(c, credit), 1 + strength * (c.asked - wins(c, credit)))
        for cell, c in warm_start.items()
    }


def posterior(
    prior: Prior, own: PhaseCounts, teacher: str, phase: int, credit: Credit = "final"
) -> tuple[float, float]:
    """The prior updated by this problem's own counts; under `final` credit a problem's wins are
    known only when it ends, so the prior alone decides."""
    a0, b0 = prior.get((teacher, phase), (1.0, 1.0))
    counts = own.get((teacher, phase), ProposalCounts()) if credit == "round" else ProposalCounts()
    won = wins(counts, credit)
    return a0 + won, b0 + max(0, counts.asked - won)


@dataclass(frozen=True)
class Draw:
    theta: float  # a sampled win rate
    explore: float  # uniform in [0, 1): asked regardless where below the floor


def draw(seed: int, key: Sequence[str | int], alpha: float, beta: float) -> Draw:
    rng = random.Random(derive_seed(seed, "schedule", *key))
    return Draw(rng.betavariate(alpha, beta), rng.random())


def choose(draws: Mapping[str, Draw], settings: AdaptiveSettings) -> tuple[str, ...]:
    """The teachers to ask on one beam, in the order of `draws` (the recipe's): the statistic's
    choice (the best draw, those near it, then the next best up to `min_teachers`) and, on top of
    it, the explorers below the floor. Exploring adds a proposal and never takes the place of one
    the statistic chose: on the demo, a floor counted towards `min_teachers` swapped teacher-b's
    steps for teacher-c's on a tenth of the beams and cost 2 points of accuracy."""
    by_draw = sorted(draws, key=lambda t: -draws[t].theta)
    best = draws[by_draw[0]].theta
    chosen = [t for t in by_draw if draws[t].theta >= settings.relative_threshold * best]
    chosen += [t for t in by_draw if t not in chosen][: max(0, settings.min_teachers - len(chosen))]
    asked = set(chosen) | {t for t, d in draws.items() if d.explore < settings.floor}
    return tuple(t for t in draws if t in asked)


@dataclass(frozen=True)
class Scheduler:
    """The schedule of one run: `all` asks every teacher everywhere, as the paper does."""

    teachers: tuple[str, ...]
    seed: int
    mode: Schedule = "all"
    settings: AdaptiveSettings = field(default_factory=AdaptiveSettings)
    prior: Prior = field(default_factory=dict)
    beam_width: int = SearchConfig.model_fields["beam_width"].default  # the recipe's default

    def teachers_for(
        self, problem: str, round_index: int, beam: int, step: int, usage: Usage, frontier: int = 0
    ) -> tuple[str, ...]:
        """Who proposes the `step`-th step of the problem's `beam`-th frontier beam this round;
        `frontier`: the beams in the problem's frontier (0: not known, as full)."""
        if self.mode == "all" or len(self.teachers) == 1 or self.filling(frontier):
            return self.teachers
        phase = phase_of(step, self.settings.phases)
        own = by_phase([usage], self.settings.phases) if self.settings.credit == "round" else {}
        draws = {
            t: draw(
                self.seed,
                (problem, round_index, beam, t),
                *posterior(self.prior, own, t, phase, self.settings.credit),
            )
            for t in self.teachers
        }
        return choose(draws, self.settings)

    def filling(self, frontier: int) -> bool:
        """`fill_beams`: where the frontier's beams, asking `min_teachers` each, could not
        propose `beam_width` steps (the first round, mostly), every teacher is asked: such a
        round holds few beams, so it is cheap, and each distinct step there becomes a beam."""
        enough = frontier * min(self.settings.min_teachers, len(self.teachers)) >= self.beam_width
        return self.settings.fill_beams and frontier > 0 and not enough


def record_kept(usage: Usage, search: ProblemSearch, round_index: int) -> None:
    """Credits the author of each step chosen this round (the last step of a surviving or a
    newly finished beam) with one kept proposal at that step's index."""
    for beam in (*search.frontier, *search.finished):
        if beam.steps and beam.steps[-1].round == round_index:
            usage.at(beam.steps[-1].teacher, len(beam.steps)).kept += 1


def record_won(usage: Usage, result: Beam) -> None:
    """Credits the author of each step of the problem's result trace with a win at its index."""
    for index, step in enumerate(result.steps, start=1):
        usage.at(step.teacher, index).won += 1
