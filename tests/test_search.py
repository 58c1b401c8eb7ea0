"""The pure beam controller, without any engine."""

from __future__ import annotations

import math

import pytest

from cordgen.config import SearchConfig
from cordgen.search import (
    Beam,
    Candidate,
    ClosedBy,
    FinishReason,
    ProblemSearch,
    Step,
    StepCandidate,
    collapse,
    select,
)

STEP, END, EOS, LENGTH = (
    FinishReason.STEP,
    FinishReason.END_OF_THINKING,
    FinishReason.EOS,
    FinishReason.LENGTH,
)


def proposal(teacher: str, text: str, finish=STEP, tokens: int = 5, sample: int = 0) -> StepCandidate:
    return StepCandidate(teacher, text, tokens, finish, sample)


def candidate(parent: int, text: str, finish=STEP, teachers=("a",), tokens: int = 5) -> Candidate:
    return Candidate(parent, Step(text, teachers, tokens, finish, 1))


def beam(*texts: str) -> Beam:
    return Beam(tuple(Step(t, ("a",), 5, STEP, i, 0.1) for i, t in enumerate(texts, start=1)))


def config(**overrides) -> SearchConfig:
    return SearchConfig(**{"beam_width": 2, "max_steps": 10, "thinking_budget": 1000, **overrides})


class TestCollapse:
    def test_identical_steps_from_one_parent_merge_with_every_proposer(self):
        merged = collapse(
            [
                (0, proposal("a", " x\n", tokens=4)),
                (0, proposal("b", " x\n", tokens=6)),
                (0, proposal("c", " y\n")),
            ],
            3,
        )
        assert [(c.parent, c.step.text, c.step.teachers) for c in merged] == [
            (0, " x\n", ("a", "b")),
            (0, " y\n", ("c",)),
        ]
        assert merged[0].step.num_tokens == 4 and merged[0].step.teacher == "a" and merged[0].step.round == 3

    def test_same_text_under_different_parents_or_finishes_stays_apart(self):
        merged = collapse(
            [(0, proposal("a", " x")), (1, proposal("a", " x")), (1, proposal("b", " x", END))], 1
        )
        assert [(c.parent, c.step.finish_reason) for c in merged] == [(0, STEP), (1, STEP), (1, END)]

    def test_a_teacher_sampling_the_same_step_twice_is_credited_once(self):
        (merged,) = collapse([(0, proposal("a", " x", sample=0)), (0, proposal("a", " x", sample=1))], 1)
        assert merged.step.teachers == ("a",)

    def test_blank_steps_are_dropped_unless_they_end_thinking(self):
        merged = collapse(
            [(0, proposal("a", " \n")), (0, proposal("b", "", LENGTH)), (0, proposal("c", "\n", END))], 1
        )
        assert [(c.step.text, c.step.finish_reason) for c in merged] == [("\n", END)]


class TestSelect:
    def test_keeps_the_width_best_children_across_parents(self):
        frontier = (beam(" p0"), beam(" p1"))
        candidates = [candidate(0, " a"), candidate(0, " b"), candidate(1, " c"), candidate(1, " d")]
        selection = select(frontier, candidates, [0.1, 0.5, 0.4, 0.2], width=2)
        assert [b.texts for b in selection.frontier] == [(" p0", " b"), (" p1", " c")]
        assert [b.score for b in selection.frontier] == [0.5, 0.4]
        assert selection.finished == ()

    def test_ties_go_to_the_earlier_parent_then_the_earlier_candidate(self):
        frontier = (beam(" p0"), beam(" p1"))
        candidates = [candidate(1, " a"), candidate(0, " b"), candidate(0, " c"), candidate(1, " d")]
        selection = select(frontier, candidates, [0.3, 0.3, 0.3, 0.3], width=3)
        assert [b.texts[-1] for b in selection.frontier] == [" b", " c", " a"]
        again = select(frontier, candidates, [0.3, 0.3, 0.3, 0.3], width=3)
        assert again == selection

    def test_finished_children_leave_the_frontier(self):
        frontier = (beam(" p0"),)
        candidates = [candidate(0, " end", END), candidate(0, " go"), candidate(0, " stop", EOS)]
        selection = select(frontier, candidates, [0.9, 0.5, 0.7], width=3)
        assert [b.texts[-1] for b in selection.frontier] == [" go"]
        assert [(b.texts[-1], b.closed_by) for b in selection.finished] == [
            (" end", ClosedBy.END_OF_THINKING),
            (" stop", ClosedBy.EOS),
        ]

    def test_finished_children_outside_the_width_are_not_kept(self):
        selection = select((beam(),), [candidate(0, " go"), candidate(0, " end", END)], [0.9, 0.1], width=1)
        assert selection.finished == () and len(selection.frontier) == 1

    def test_nan_scores_rank_last(self):
        selection = select((beam(),), [candidate(0, " a"), candidate(0, " b")], [math.nan, 0.01], width=1)
        assert selection.frontier[0].texts == (" b",)

    def test_scores_must_match_candidates(self):
        with pytest.raises(ValueError):
            select((beam(),), [candidate(0, " a")], [], width=1)

    def test_provenance_and_score_land_on_the_new_step(self):
        (kept,) = select((beam(" p"),), [candidate(0, " x", teachers=("b", "c"))], [0.25], width=4).frontier
        assert kept.steps[-1].teachers == ("b", "c") and kept.steps[-1].score == 0.25
        assert kept.steps[0].text == " p"


class TestProblemSearch:
    def test_starts_from_one_empty_beam(self):
        state = ProblemSearch()
        assert state.frontier == (Beam(),) and not state.done(config())

    def test_done_when_the_finished_pool_holds_the_beam_width(self):
        state = ProblemSearch().advance(
            [candidate(0, " a", END), candidate(0, " b", EOS)], [0.2, 0.3], config()
        )
        assert state.done(config()) and len(state.finished) == 2 and state.frontier == ()
        result, alternatives = state.outcome()
        assert result.texts == (" b",) and result.closed_by is ClosedBy.EOS
        assert [b.texts for b in alternatives] == [(" a",)]

    def test_done_when_the_frontier_empties(self):
        state = ProblemSearch().advance([candidate(0, " a", END)], [0.2], config(beam_width=4))
        assert state.done(config(beam_width=4)) and state.frontier == ()

    def test_max_steps_closes_live_beams_unfinished(self):
        state = ProblemSearch()
        for _ in range(3):
            state = state.advance([candidate(0, " a"), candidate(0, " b")], [0.1, 0.2], config(max_steps=3))
        assert state.rounds == 3 and state.done(config(max_steps=3))
        result, alternatives = state.outcome()
        assert result.closed_by is ClosedBy.MAX_STEPS and not result.closed_by.finished
        assert alternatives == () and len(result.steps) == 3

    def test_thinking_budget_closes_a_beam_as_finished(self):
        limits = config(thinking_budget=12)
        state = ProblemSearch().advance([candidate(0, " a", tokens=7)], [0.5], limits)
        assert not state.done(limits)
        state = state.advance(
            [candidate(0, " b", tokens=7), candidate(0, " c", tokens=2)], [0.4, 0.3], limits
        )
        assert [b.texts for b in state.finished] == [(" a", " b")]
        assert state.finished[0].closed_by is ClosedBy.BUDGET and state.finished[0].closed_by.finished
        assert [b.texts for b in state.frontier] == [(" a", " c")]

    def test_no_candidates_stalls_the_problem(self):
        state = ProblemSearch().advance([candidate(0, " a")], [0.5], config()).advance([], [], config())
        assert state.done(config())
        result, _ = state.outcome()
        assert result.closed_by is ClosedBy.STALLED and result.texts == (" a",)

    def test_best_finished_beats_better_live_ones(self):
        state = ProblemSearch().advance(
            [candidate(0, " live"), candidate(0, " end", END)], [0.9, 0.1], config()
        )
        state = state.advance([candidate(0, " more")], [0.95], config(max_steps=2))
        result, _ = state.outcome()
        assert result.texts == (" end",)

    def test_problems_of_different_lengths_finish_in_different_rounds(self):
        limits = config(beam_width=1)
        short, long = ProblemSearch(), ProblemSearch()
        finished_in = {}
        script = {"short": [[(" s1", END)]], "long": [[(" l1", STEP)], [(" l2", STEP)], [(" l3", END)]]}
        states = {"short": short, "long": long}
        for round_index in range(1, 4):
            for name, state in states.items():
                if state.done(limits):
                    continue
                steps = script[name][round_index - 1]
                states[name] = state.advance(
                    [candidate(0, t, f) for t, f in steps], [0.5] * len(steps), limits
                )
                if states[name].done(limits):
                    finished_in[name] = round_index
        assert finished_in == {"short": 1, "long": 3}
        assert states["long"].outcome()[0].texts == (" l1", " l2", " l3")
