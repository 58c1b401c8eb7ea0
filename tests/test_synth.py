"""`cordgen synth` end to end on real tiny vLLM engines: lockstep, provenance, determinism."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml

from cordgen.config import Recipe
from cordgen.problems import Problem
from cordgen.records import TraceRecord
from cordgen.synth import synthesize
from tests.conftest import ENGINE_DEFAULTS
from tests.tiny_models import make_problems

pytestmark = pytest.mark.engine


def recipe_data(dirs: dict[str, str], **search) -> dict:
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_step_tokens": 24, "max_answer_tokens": 16}
    teachers = [
        {"name": n, "engine": {"model": dirs[n], **ENGINE_DEFAULTS}, "sampling": sampling} for n in dirs
    ]
    return {
        "seed": 3,
        "teachers": teachers,
        "scorer": {"name": "alpha-scorer", "engine": teachers[0]["engine"]},
        "search": {"beam_width": 2, "max_steps": 6, "thinking_budget": 200, **search},
    }


@pytest.fixture(scope="module")
def recipe(tiny_model_dirs) -> Recipe:
    return Recipe.model_validate(recipe_data(tiny_model_dirs))


@pytest.fixture(scope="module")
def inputs(problems) -> list[Problem]:
    return [Problem(f"p{i}", p.question, p.answer) for i, p in enumerate(problems[:8])]


class Counting:
    """Counts a real engine's calls; everything else passes straight through."""

    def __init__(self, inner, calls: Counter) -> None:
        self.inner, self.calls, self.name = inner, calls, inner.name

    def __getattr__(self, method):
        def counted(*args, **kwargs):
            self.calls[(self.name, method)] += 1
            return getattr(self.inner, method)(*args, **kwargs)

        return counted


def run(recipe: Recipe, pool, problems, calls: Counter | None = None) -> list[TraceRecord]:
    from cordgen.engines.roles import build_roles

    teachers, scorer = build_roles(recipe, pool)
    if calls is not None:
        teachers = {name: Counting(t, calls) for name, t in teachers.items()}
        scorer = Counting(scorer, calls)
    records: list[TraceRecord] = []
    synthesize(problems, teachers, scorer, recipe, records.extend)
    return sorted(records, key=lambda r: r.id)


@pytest.fixture(scope="module")
def cord_records(recipe, engine_pool, alpha_model, beta_model, inputs):
    calls: Counter = Counter()
    return run(recipe, engine_pool, inputs, calls), calls


def test_every_round_is_one_call_per_teacher_and_one_scorer_call(cord_records, inputs):
    records, calls = cord_records
    rounds = max(r.usage.rounds for r in records)
    assert len(records) == len(inputs) >= 8
    assert calls[("alpha", "propose")] == calls[("beta", "propose")] == rounds
    assert calls[("alpha-scorer", "score")] == rounds
    assert calls[("alpha", "answer")] + calls[("beta", "answer")] <= 2 * rounds
    assert all(len(r.result.steps) <= r.usage.rounds <= rounds for r in records)


def test_records_carry_full_provenance(cord_records, inputs):
    records, _ = cord_records
    for record, problem in zip(records, sorted(inputs, key=lambda p: p.id)):
        assert TraceRecord.model_validate(record.model_dump(mode="json")) == record
        assert record.id == problem.id and record.answer == problem.answer
        assert record.teachers == ["alpha", "beta"] and record.strategy == "cord"
        steps = record.result.steps
        assert steps and [s.index for s in steps] == list(range(1, len(steps) + 1))
        for step in steps:
            assert step.teacher in ("alpha", "beta") and step.teacher == step.teachers[0]
            assert set(step.teachers) <= {"alpha", "beta"}
            assert 0 < step.score <= 1 and step.perplexity == pytest.approx(1 / step.score)
            assert step.num_tokens > 0 and 1 <= step.round <= record.usage.rounds
        assert [s.round for s in steps] == sorted(s.round for s in steps)
        answer = record.result.final_answer
        assert answer is not None and answer.teacher == steps[-1].teacher
        assert set(record.usage.generated_tokens) <= {"alpha", "beta"}
        assert record.usage.scored_requests > 0 and record.usage.scored_tokens > 0
        for alternative in record.alternatives:
            assert alternative.finished and alternative.final_answer is None


def test_the_tiny_teachers_mostly_solve_what_they_memorised(cord_records):
    records, _ = cord_records
    solved = sum(r.result.final_answer.extracted == r.answer for r in records)
    assert solved >= len(records) // 2


def test_same_seed_same_records_and_batched_equals_alone(cord_records, recipe, engine_pool, inputs):
    records, _ = cord_records
    again = run(recipe, engine_pool, inputs)
    assert_same_records(again, records)
    alone = [run(recipe, engine_pool, [p])[0] for p in inputs[:3]]
    assert_same_records(alone, records[:3])


def test_on_unseen_problems_the_same_seed_gives_the_same_records_and_another_seed_others(
    unseen_records, tiny_model_dirs, engine_pool
):
    """Seeds keyed by the problem, not by its place in the batch: the last problem alone samples
    what it sampled fourth in the batch."""
    unseen, recipe = unseen_inputs(), short_recipe(tiny_model_dirs, 3)
    assert_same_records(run(recipe, engine_pool, unseen), unseen_records)
    assert_same_records(run(recipe, engine_pool, unseen[-1:]), unseen_records[-1:])
    reseeded = run(short_recipe(tiny_model_dirs, 4), engine_pool, unseen)
    assert_another_seed_changes_each(unseen_records, reseeded)


def test_pipelined_groups_give_the_lockstep_records_with_one_call_per_group_round(
    cord_records, tiny_model_dirs, engine_pool, inputs
):
    records, _ = cord_records
    pipelined = Recipe.model_validate(recipe_data(tiny_model_dirs, pipeline_groups=3))
    calls: Counter = Counter()
    got = run(pipelined, engine_pool, inputs, calls)
    assert_same_records(got, records)
    groups = [got[0:3], got[3:6], got[6:8]]  # ids p0..p7 in input order, split 3/3/2
    group_rounds = sum(max(r.usage.rounds for r in group) for group in groups)
    assert calls[("alpha", "propose")] == calls[("alpha-scorer", "score")] == group_rounds


def test_pipelined_groups_give_the_lockstep_records_on_unseen_problems_and_follow_the_seed(
    unseen_records, tiny_model_dirs, engine_pool
):
    pipelined = run(short_recipe(tiny_model_dirs, 3, pipeline_groups=2), engine_pool, unseen_inputs())
    assert_same_records(pipelined, unseen_records)
    reseeded = run(short_recipe(tiny_model_dirs, 4, pipeline_groups=2), engine_pool, unseen_inputs())
    assert_another_seed_changes_each(pipelined, reseeded)


def scores_of(records: list[TraceRecord]) -> list[float]:
    """Every trajectory's and every step's score, in record order; NaN where there is none."""
    trajectories = [t for r in records for t in (r.result, *r.alternatives)]
    scores = [s for t in trajectories for s in (t.score, *(step.score for step in t.steps))]
    return [math.nan if s is None else s for s in scores]


def assert_same_records(got: list[TraceRecord], expected: list[TraceRecord]) -> None:
    """Equal records, their scores to 1e-3: those may differ in the last bits between batch shapes."""
    assert [r.without_scores() for r in got] == [r.without_scores() for r in expected]
    assert scores_of(got) == pytest.approx(scores_of(expected), rel=1e-3, nan_ok=True)


def unseen_inputs(count: int = 4) -> list[Problem]:
    """Problems the tiny teachers never saw. On the memorised ones they write the same steps
    whatever the seed, so only here do equal records show that a path passes the seed on."""
    return [Problem(f"u{i}", p.question, p.answer) for i, p in enumerate(make_problems(count, seed=41))]


def short_recipe(dirs: dict[str, str], seed: int, **search) -> Recipe:
    """At most three rounds: enough for samples at temperature 1 to part between seeds."""
    return Recipe.model_validate({**recipe_data(dirs, max_steps=3, **search), "seed": seed})


def assert_another_seed_changes_each(records: list[TraceRecord], reseeded: list[TraceRecord]) -> None:
    """The negative control: another recipe seed gives every unseen problem another record, so
    equal records elsewhere are the seed's doing, not the tiny teachers' memory."""
    assert [r.id for r in reseeded] == [r.id for r in records]
    unchanged = [a.id for a, b in zip(records, reseeded) if a.without_scores() == b.without_scores()]
    assert not unchanged, f"another seed, the same records for {unchanged}"


def test_single_teacher_search(tiny_model_dirs, engine_pool, alpha_model, inputs):
    dirs = {"beta": tiny_model_dirs["beta"]}
    data = recipe_data(dirs, strategy="single")
    data["scorer"]["engine"]["model"] = tiny_model_dirs["alpha"]
    records = run(Recipe.model_validate(data), engine_pool, inputs[:4])
    assert len(records) == 4
    assert all({s.teacher for s in r.result.steps} == {"beta"} for r in records)


def test_curation_keeps_the_best_whole_trace(recipe, engine_pool, inputs):
    curate = Recipe.model_validate(
        {
            **recipe.model_dump(),
            "search": {**recipe.search.model_dump(), "strategy": "curate", "curate_samples": 2},
        }
    )
    calls: Counter = Counter()
    records = run(curate, engine_pool, inputs[:4], calls)
    assert (
        calls[("alpha", "solve")] == calls[("beta", "solve")] == 1 and calls[("alpha-scorer", "score")] == 1
    )
    for record in records:
        assert record.strategy == "curate"
        trajectories = [record.result, *record.alternatives]
        assert len(trajectories) == 4
        assert len({s.teacher for s in record.result.steps}) == 1
        scores = [t.score for t in trajectories]
        assert scores[0] == max(scores)
        assert record.result.steps[-1].score == record.result.score
        assert all(s.score is None for s in record.result.steps[:-1])
        closed = [t for t in record.alternatives if t.closed_by == "end_of_thinking"]
        assert all(
            t.final_answer is not None and t.final_answer.teacher == t.steps[0].teacher for t in closed
        )


def test_cli_synth_writes_one_valid_record_per_problem(tiny_model_dirs, inputs, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_data(tiny_model_dirs)))
    problems_path = tmp_path / "problems.jsonl"
    problems_path.write_bytes(b"".join(orjson.dumps(p.__dict__) + b"\n" for p in inputs[:4]))
    out = tmp_path / "run"
    cordgen = str(Path(sys.executable).with_name("cordgen"))
    args = [cordgen, "synth", "--config", str(recipe_path), "--teachers", "alpha,beta", "--scorer", "alpha"]
    args += ["--input", str(problems_path), "--out", str(out), "--beam-width", "2"]
    dry = subprocess.run([*args, "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "beam_width: 2" in dry.stdout and not out.exists()
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cordgen synth" in result.stderr and "steps kept" in result.stderr
    lines = (out / "results.jsonl").read_bytes().splitlines()
    records = [TraceRecord.model_validate(orjson.loads(line)) for line in lines]
    assert sorted(r.id for r in records) == [p.id for p in inputs[:4]]
    assert yaml.safe_load((out / "config.yaml").read_text())["scorer"]["name"] == "alpha"
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "already in" in rerun.stderr


class CountingPool:
    """The session's engines, each prompt-logprob call counted per model directory and whether it
    read the prefix cache (calls without are the placeholder guard's re-reads), and each reward
    model call as (model directory, "step_rewards"). Like the pool it wraps, it gives the same
    engine object for the same settings."""

    def __init__(self, inner, calls: Counter) -> None:
        self.inner, self.calls, self.counted = inner, calls, {}

    def load(self, labels) -> None:
        self.inner.load(labels)

    def model(self, settings):
        if settings not in self.counted:
            self.counted[settings] = self.counting(settings)
        return self.counted[settings]

    def counting(self, settings):
        inner, calls = self.inner.model(settings), self.calls

        class Counted:
            def __getattr__(self, name):
                return getattr(inner, name)

            def span_logprobs(self, requests, read_cache):
                calls[(settings.model, read_cache)] += 1
                return inner.span_logprobs(requests, read_cache)

            def step_rewards(self, requests):
                calls[(settings.model, "step_rewards")] += 1
                return inner.step_rewards(requests)

        return Counted()


def test_a_hybrid_with_its_own_judge_reads_each_engine_once_a_round_and_records_both_kinds(
    cord_records, tiny_model_dirs, engine_pool, inputs
):
    data = recipe_data(tiny_model_dirs)
    judge = {"engine": data["teachers"][1]["engine"], "yes": "Y", "no": "N"}
    data["scorer"] |= {"kind": "hybrid", "verifier_weight": 2.0, "verifier": judge}
    calls: Counter = Counter()
    records = run(Recipe.model_validate(data), CountingPool(engine_pool, calls), inputs)
    rounds = max(r.usage.rounds for r in records)
    assert calls[(tiny_model_dirs["alpha"], True)] == calls[(tiny_model_dirs["beta"], True)] == rounds
    assert calls.total() <= 4 * rounds
    for record in records:
        for step in record.result.steps:
            assert set(step.scores) == {"predictive", "verifier"}
            expected = step.scores["predictive"] * step.scores["verifier"] ** 2
            assert step.score == pytest.approx(expected, rel=1e-6)
    plain, _ = cord_records
    assert [r.result.steps[0].scores for r in plain] == [
        {"predictive": r.result.steps[0].score} for r in plain
    ]


def test_a_hybrid_with_the_likelihood_reads_the_scorer_once_a_round_and_records_both_kinds(
    tiny_model_dirs, engine_pool, inputs
):
    data = recipe_data(tiny_model_dirs)
    data["scorer"] |= {"kind": "hybrid", "hybrid_with": "likelihood"}
    calls: Counter = Counter()
    records = run(Recipe.model_validate(data), CountingPool(engine_pool, calls), inputs)
    rounds = max(r.usage.rounds for r in records)
    assert calls[(tiny_model_dirs["alpha"], True)] == rounds
    for record in records:
        for step in record.result.steps:
            assert set(step.scores) == {"predictive", "likelihood"} and 0 < step.scores["likelihood"] <= 1
            assert step.score == pytest.approx(
                step.scores["predictive"] * step.scores["likelihood"], rel=1e-6
            )


def test_the_random_kind_loads_no_scorer_and_is_seeded(tiny_model_dirs, engine_pool, inputs):
    data = recipe_data(tiny_model_dirs)
    data["scorer"]["kind"] = "random"
    calls: Counter = Counter()
    records = run(Recipe.model_validate(data), CountingPool(engine_pool, calls), inputs[:4])
    assert not calls and all(r.usage.scored_tokens == 0 for r in records)
    assert all(set(s.scores) == {"random"} for r in records for s in r.result.steps)
    assert run(Recipe.model_validate(data), engine_pool, inputs[:4]) == records
