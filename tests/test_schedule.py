"""Adaptive teacher scheduling without any engine: the statistic, the choice, its floor, and the
round loop's calls under it, with stand-in teachers whose steps a stand-in scorer prefers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from cordgen.config import AdaptiveSettings, Recipe, semantic_hash, semantic_view
from cordgen.engines import RandomScore, derive_seed
from cordgen.errors import ConfigError
from cordgen.problems import Problem
from cordgen.records import ProposalCounts, TraceRecord, Usage
from cordgen.schedule import (
    Draw,
    Scheduler,
    by_phase,
    choose,
    phase_labels,
    phase_of,
    posterior,
    prior_from,
    record_kept,
    record_won,
)
from cordgen.search import Beam, FinalAnswer, FinishReason, ProblemSearch, Step, StepCandidate
from cordgen.store import warm_start_usages
from cordgen.synth import synthesize

TEACHERS = ("a", "b", "c")


def test_phases_bucket_step_indexes_and_name_themselves():
    edges = (1, 2, 4, 8)
    assert [phase_of(step, edges) for step in range(1, 11)] == [0, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    assert phase_labels(edges) == ["1", "2", "3-4", "5-8", "9+"]


def usage_with(**cells: tuple[int, int, int]) -> Usage:
    """`a_3=(asked, kept, tokens)`: teacher a at step 3."""
    usage = Usage()
    for key, (asked, kept, tokens) in cells.items():
        teacher, step = key.split("_")
        usage.proposals.setdefault(teacher, {})[step] = ProposalCounts(asked=asked, kept=kept, tokens=tokens)
    return usage


def test_counts_sum_per_teacher_and_phase_over_problems():
    usages = [usage_with(a_1=(4, 3, 40), a_3=(4, 1, 44)), usage_with(a_4=(2, 2, 20), c_1=(4, 0, 60))]
    cells = by_phase(usages, (1, 2, 4))
    assert cells[("a", 0)] == ProposalCounts(asked=4, kept=3, tokens=40)
    assert cells[("a", 2)] == ProposalCounts(asked=6, kept=3, tokens=64)  # steps 3 and 4
    assert cells[("c", 0)] == ProposalCounts(asked=4, kept=0, tokens=60)
    assert ("b", 0) not in cells


def test_the_warm_start_counts_are_the_prior_each_proposal_worth_prior_strength():
    warm = {
        ("a", 0): ProposalCounts(asked=40, kept=30, won=10),
        ("c", 0): ProposalCounts(asked=40, kept=4, won=2),
    }
    prior = prior_from(warm, strength=1)  # credit final: wins are steps of result traces
    assert prior[("a", 0)] == (11.0, 31.0)
    assert prior[("c", 0)] == (3.0, 39.0)
    rounds = prior_from(warm, strength=0.5, credit="round")  # wins are steps a round kept
    assert rounds[("a", 0)] == (16.0, 6.0)
    assert rounds[("c", 0)] == (3.0, 19.0)
    assert prior_from(warm, strength=0)[("a", 0)] == (1.0, 1.0)


def test_a_problem_own_counts_update_the_prior_only_where_its_wins_are_known():
    prior = {("a", 0): (16.0, 6.0)}
    own = {("a", 0): ProposalCounts(asked=4, kept=1, won=0)}
    assert posterior(prior, own, "a", 0, credit="round") == pytest.approx((17.0, 9.0))
    assert posterior(prior, own, "a", 0, credit="final") == (16.0, 6.0)  # known when it ends
    assert posterior(prior, own, "b", 0, credit="round") == (1.0, 1.0)  # no data at all: uniform


def test_choose_asks_the_best_draw_those_near_it_and_explorers_below_the_floor():
    settings = AdaptiveSettings(relative_threshold=0.5, floor=0.1)
    draws = {"a": Draw(0.8, 0.9), "b": Draw(0.45, 0.9), "c": Draw(0.3, 0.9)}
    assert choose(draws, settings) == ("a", "b")
    draws["c"] = Draw(0.3, 0.05)  # explores
    assert choose(draws, settings) == ("a", "b", "c")
    in_recipe_order = {"c": Draw(0.5, 0.9), "a": Draw(0.6, 0.9), "b": Draw(0.1, 0.9)}
    assert choose(in_recipe_order, settings) == ("c", "a")


def test_min_teachers_is_every_teacher_where_there_are_fewer():
    settings = AdaptiveSettings(relative_threshold=1.0, floor=0.0, min_teachers=3)
    assert choose({"a": Draw(0.2, 0.5), "b": Draw(0.1, 0.5)}, settings) == ("a", "b")


def test_min_teachers_adds_the_next_best_draws():
    settings = AdaptiveSettings(relative_threshold=1.0, floor=0.0, min_teachers=2)
    draws = {"a": Draw(0.2, 0.5), "b": Draw(0.1, 0.5), "c": Draw(0.7, 0.5)}
    assert choose(draws, settings) == ("a", "c")


def hopeless_c(floor: float) -> Scheduler:
    """A prior in which c is almost never kept and a almost always."""
    warm = {("a", 0): ProposalCounts(asked=1000, won=990), ("b", 0): ProposalCounts(asked=1000, won=500)}
    warm[("c", 0)] = ProposalCounts(asked=1000, won=1)
    settings = AdaptiveSettings(phases=(64,), floor=floor)
    return Scheduler(TEACHERS, 3, "adaptive", settings, prior_from(warm, 1))


def asked_counts(scheduler: Scheduler, beams: int = 2000) -> Counter:
    counted: Counter = Counter()
    for beam in range(beams):
        counted.update(scheduler.teachers_for(f"p{beam % 50}", 1 + beam // 50, beam % 4, 1, Usage()))
    return counted


def test_the_floor_keeps_asking_a_teacher_the_prior_has_given_up_on():
    asked = asked_counts(hopeless_c(floor=0.2))
    assert asked["a"] == 2000  # the best draw is always asked
    assert 0.17 < asked["c"] / 2000 < 0.23  # ~ the floor, never below it by more than the noise
    assert asked_counts(hopeless_c(floor=0.0))["c"] == 0


def test_decisions_depend_on_the_key_and_the_problem_own_counts_alone():
    scheduler = Scheduler(TEACHERS, 3, "adaptive", AdaptiveSettings())
    usage = usage_with(c_1=(4, 0, 40))
    first = [scheduler.teachers_for("p1", r, b, 2, usage) for r in range(1, 6) for b in range(4)]
    again = [scheduler.teachers_for("p1", r, b, 2, usage) for r in range(1, 6) for b in range(4)]
    assert first == again
    other = [scheduler.teachers_for("p2", r, b, 2, usage) for r in range(1, 6) for b in range(4)]
    assert other != first
    reseeded = Scheduler(TEACHERS, 4, "adaptive", AdaptiveSettings())
    assert [reseeded.teachers_for("p1", r, b, 2, usage) for r in range(1, 6) for b in range(4)] != first


def test_a_problem_asks_a_teacher_less_after_its_own_beams_dropped_its_steps():
    settings = AdaptiveSettings(phases=(64,), floor=0.05, credit="round")
    scheduler = Scheduler(TEACHERS, 0, "adaptive", settings)
    dropped = usage_with(c_1=(8, 0, 80), c_2=(8, 0, 80), a_1=(8, 6, 80), a_2=(8, 6, 80))
    kept = usage_with(c_1=(8, 6, 80), c_2=(8, 6, 80), a_1=(8, 6, 80), a_2=(8, 6, 80))

    def share_of_c(usage: Usage) -> float:
        chosen = [scheduler.teachers_for(f"p{i}", 3, b, 3, usage) for i in range(100) for b in range(4)]
        return sum("c" in names for names in chosen) / len(chosen)

    assert share_of_c(dropped) < 0.2 < 0.8 < share_of_c(kept)


def test_fill_beams_asks_every_teacher_where_the_frontier_could_not_fill_the_beam_width():
    settings = AdaptiveSettings(phases=(64,), floor=0.0, min_teachers=2, fill_beams=True)
    scheduler = Scheduler(TEACHERS, 3, "adaptive", settings, hopeless_c(0.0).prior, beam_width=4)
    # one beam (the first round), two teachers each: 2 proposals for 4 beams
    assert all(scheduler.teachers_for(f"p{i}", 1, 0, 1, Usage(), frontier=1) == TEACHERS for i in range(20))
    # two beams, two teachers each, can fill four: the statistic decides
    assert all("c" not in scheduler.teachers_for(f"p{i}", 3, 0, 3, Usage(), frontier=2) for i in range(20))
    no_fill = settings.model_copy(update={"fill_beams": False})
    unfilled = Scheduler(TEACHERS, 3, "adaptive", no_fill, scheduler.prior)
    assert all("c" not in unfilled.teachers_for(f"p{i}", 1, 0, 1, Usage(), frontier=1) for i in range(20))


def test_exploring_adds_a_teacher_and_never_displaces_the_chosen_ones():
    settings = AdaptiveSettings(relative_threshold=1.0, floor=0.5, min_teachers=2)
    draws = {"a": Draw(0.8, 0.9), "b": Draw(0.4, 0.9), "c": Draw(0.1, 0.2)}
    assert choose(draws, settings) == ("a", "b", "c")  # c explores on top of a and b


def test_all_asks_every_teacher():
    assert Scheduler(TEACHERS, 0).teachers_for("p", 1, 0, 1, Usage()) == TEACHERS


def test_the_author_of_each_step_of_the_result_wins_once():
    steps = (Step(" x\n", ("b", "a"), 3, FinishReason.STEP, 1), Step(" y\n", ("a",), 3, FinishReason.EOS, 2))
    usage = Usage()
    record_won(usage, Beam(steps))
    assert {t: {s: c.won for s, c in cells.items()} for t, cells in usage.proposals.items()} == {
        "b": {"1": 1},
        "a": {"2": 1},
    }


def test_the_author_of_each_step_chosen_this_round_is_credited_once():
    chosen = Step(" x\n", ("a", "b"), 3, FinishReason.STEP, 2, 0.5)
    old = Step(" y\n", ("c",), 3, FinishReason.STEP, 1, 0.5)
    done = Step(" z\n", ("c",), 3, FinishReason.END_OF_THINKING, 2, 0.4)
    search = ProblemSearch(frontier=(Beam((old, chosen)), Beam((old,))), finished=(Beam((old, done)),))
    usage = Usage()
    record_kept(usage, search, 2)
    assert {t: {s: c.kept for s, c in steps.items()} for t, steps in usage.proposals.items()} == {
        "a": {"2": 1},  # b's identical proposal added nothing to a's
        "c": {"2": 1},
    }


def test_records_made_before_proposals_were_counted_still_read():
    old = Usage.model_validate({"rounds": 2, "generated_tokens": {"a": 5}})
    assert old.proposals == {}


# The round loop under the schedule, with stand-in engines.


class StandInTeacher:
    """Writes `### Step k` as its own name and a seeded digit; three steps end thinking. Counts
    its propose calls and the beams in each."""

    def __init__(self, name: str, calls: Counter) -> None:
        self.name, self.calls = name, calls

    def propose(self, requests):
        self.calls[(self.name, "propose")] += 1
        self.calls[(self.name, "beams")] += len(requests)
        self.calls.update((self.name, "round", r) for r in {r.seed_key[1] for r in requests})
        return [
            [
                StepCandidate(
                    self.name,
                    f" {self.name}{derive_seed(0, *r.seed_key, self.name, s) % 50}\n",
                    len(self.name) * 3,
                    FinishReason.END_OF_THINKING if len(r.steps) >= 2 else FinishReason.STEP,
                    s,
                )
                for s in range(r.n)
            ]
            for r in requests
        ]

    def answer(self, requests):
        return [FinalAnswer(self.name, " The final answer is 1.", 2, FinishReason.EOS) for _ in requests]


class StandInScorer:
    """Prefers a's steps, then b's, then c's; ties broken by a digest of the trajectory."""

    name = "scorer"
    PREFERENCE = {"a": 0.6, "b": 0.3, "c": 0.1}

    def score(self, requests):
        return [
            RandomScore(self.PREFERENCE[r.steps[-1].strip()[0]] + derive_seed(0, *r.steps) % 100 / 1000.0)
            for r in requests
        ]


def stand_in_recipe(tmp_path: Path, **search) -> Recipe:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    teachers = [{"name": t, "engine": {"model": str(models)}} for t in TEACHERS]
    return Recipe.model_validate(
        {
            "seed": 5,
            "teachers": teachers,
            "scorer": {"engine": {"model": str(models)}},
            "search": {"beam_width": 3, "max_steps": 4, **search},
        }
    )


def run(recipe: Recipe, problems, calls: Counter | None = None, groups: int = 1) -> list[TraceRecord]:
    calls = Counter() if calls is None else calls
    if groups != 1:
        search = recipe.search.model_copy(update={"pipeline_groups": groups})
        recipe = recipe.model_copy(update={"search": search})
    teachers = {t: StandInTeacher(t, calls) for t in TEACHERS}
    records: list[TraceRecord] = []
    synthesize(problems, teachers, StandInScorer(), recipe, records.extend)
    return sorted(records, key=lambda r: r.id)


PROBLEMS = [Problem(f"q{i}", f"question {i}", "1") for i in range(12)]


@pytest.fixture
def warm_start(tmp_path) -> Path:
    """The records of an `all` run over other problems."""
    path = tmp_path / "pilot.jsonl"
    others = [Problem(f"pilot{i}", f"other question {i}", "1") for i in range(20)]
    path.write_bytes(b"".join(r.to_json_line() for r in run(stand_in_recipe(tmp_path), others)))
    return path


def adaptive(tmp_path: Path, warm_start: Path, **settings) -> Recipe:
    return stand_in_recipe(
        tmp_path, schedule="adaptive", adaptive={"warm_start": str(warm_start), "phases": [1, 2], **settings}
    )


def test_usage_counts_asked_kept_and_tokens_per_teacher_and_step(tmp_path):
    calls: Counter = Counter()
    records = run(stand_in_recipe(tmp_path), PROBLEMS, calls)
    rounds = max(r.usage.rounds for r in records)
    assert all(calls[(t, "propose")] == rounds for t in TEACHERS)
    for record in records:
        usage = record.usage
        for teacher in TEACHERS:
            proposed = sum(c.tokens for c in usage.proposals[teacher].values())
            answered = 2 * (record.result.final_answer.teacher == teacher)
            assert proposed + answered == usage.generated_tokens[teacher]
        assert usage.proposals["a"]["1"].asked == 1  # one beam in round 1
        kept = sum(c.kept for steps in usage.proposals.values() for c in steps.values())
        won = sum(c.won for steps in usage.proposals.values() for c in steps.values())
        assert kept >= won == len(record.result.steps)
    assert sum(calls[(t, "beams")] for t in TEACHERS) == sum(
        c.asked for r in records for steps in r.usage.proposals.values() for c in steps.values()
    )


def test_adaptive_asks_fewer_teachers_with_one_call_per_asked_teacher_a_round(tmp_path, warm_start):
    everyone: Counter = Counter()
    run(stand_in_recipe(tmp_path), PROBLEMS, everyone)
    calls: Counter = Counter()
    records = run(adaptive(tmp_path, warm_start, floor=0.0, min_teachers=1), PROBLEMS, calls)
    rounds = max(r.usage.rounds for r in records)
    assert calls[("a", "propose")] == rounds
    assert all(calls[(t, "propose")] <= rounds for t in TEACHERS)
    assert calls[("c", "beams")] < everyone[("c", "beams")] / 3
    assert sum(calls[(t, "beams")] for t in TEACHERS) < sum(everyone[(t, "beams")] for t in TEACHERS)


def test_a_teacher_asked_on_no_beam_gets_no_call(tmp_path, warm_start):
    """In the pilot every proposal of step 1 was kept (one beam, three candidates, B = 3) and
    after it only a's: asking the best draw alone, b and c may write step 1, never a later one."""
    settings = {"floor": 0.0, "relative_threshold": 1.0, "prior_strength": 10, "min_teachers": 1}
    calls: Counter = Counter()
    records = run(adaptive(tmp_path, warm_start, **settings), PROBLEMS, calls)
    rounds = max(r.usage.rounds for r in records)
    assert rounds >= 3 and calls[("a", "propose")] == rounds
    for teacher in ("b", "c"):
        assert calls[(teacher, "propose")] == calls[(teacher, "round", 1)] <= 1


def test_adaptive_records_are_the_same_batched_alone_resumed_and_pipelined(tmp_path, warm_start):
    """Resuming recomputes unfinished problems from round 1, so a run cut after any problems
    (here the first five) and resumed over the rest must give the uninterrupted records."""
    recipe = adaptive(tmp_path, warm_start)
    whole = run(recipe, PROBLEMS)
    resumed = run(recipe, PROBLEMS[:5]) + run(recipe, PROBLEMS[5:])
    assert sorted(resumed, key=lambda r: r.id) == whole
    assert [run(recipe, [p])[0] for p in PROBLEMS[:3]] == [r for r in whole if r.id in ("q0", "q1", "q2")]
    assert run(recipe, PROBLEMS, groups=3) == whole
    assert run(recipe, list(reversed(PROBLEMS))) == whole


def test_the_warm_start_enters_the_config_hash_by_content(tmp_path, warm_start):
    default = stand_in_recipe(tmp_path)
    assert "schedule" not in semantic_view(default)["search"]  # runs made before still resume
    assert "adaptive" not in semantic_view(default)["search"]
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(warm_start.read_bytes())
    assert semantic_hash(adaptive(tmp_path, warm_start)) == semantic_hash(adaptive(tmp_path, moved))
    moved.write_bytes(warm_start.read_bytes().splitlines(keepends=True)[0])
    assert semantic_hash(adaptive(tmp_path, warm_start)) != semantic_hash(adaptive(tmp_path, moved))
    assert semantic_hash(adaptive(tmp_path, warm_start)) != semantic_hash(default)


def test_a_warm_start_without_proposal_counts_is_one_line(tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_bytes(orjson.dumps({"id": "x", "usage": {"rounds": 1}}) + b"\n")
    with pytest.raises(ConfigError, match=r"^search.adaptive.warm_start: .*counts no proposals") as error:
        warm_start_usages(old)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"^search.adaptive.warm_start: no records at"):
        warm_start_usages(tmp_path / "missing")


def test_the_run_summary_totals_proposals_per_teacher_and_phase(tmp_path):
    from rich.console import Console

    from cordgen.progress import phase_table, short

    records = run(stand_in_recipe(tmp_path), PROBLEMS)
    console = Console(width=200, record=True)
    console.print(phase_table(records, (1, 2)))
    text = console.export_text()
    asked_a = sum(r.usage.proposals["a"]["1"].asked for r in records)
    kept_a = sum(r.usage.proposals["a"]["1"].kept for r in records)
    won_a = sum(r.usage.proposals["a"]["1"].won for r in records)
    tokens_a = sum(r.usage.proposals["a"]["1"].tokens for r in records)
    assert "steps 1" in text and "steps 2" in text and "steps 3+" in text
    assert f"{won_a}/{kept_a}/{asked_a} {short(tokens_a)}" in text
    assert [short(n) for n in (999, 1234, 56_789_000)] == ["999", "1.2k", "56.8M"]
    assert phase_table([r.model_copy(update={"usage": Usage()}) for r in records], (1, 2)) is None


def test_the_command_line_sets_the_schedule_and_its_warm_start(tmp_path, warm_start):
    from tests.helpers import resolved, write_recipe

    recipe = resolved(write_recipe(tmp_path), schedule="adaptive", warm_start=warm_start)
    assert recipe.search.schedule == "adaptive" and recipe.search.adaptive.warm_start == str(warm_start)
    with pytest.raises(ConfigError, match="search.schedule: Input should be 'all' or 'adaptive'"):
        resolved(write_recipe(tmp_path), schedule="some")
