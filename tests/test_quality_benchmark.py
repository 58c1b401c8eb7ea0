"""The quality benchmark's own arithmetic: which candidate step is right, and ranking accuracy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402
import task  # noqa: E402  (quality puts benchmarks/demo_models on the path)

from cordgen.engines import ScoreRequest  # noqa: E402

PROBLEM = task.Problem(37, (("+", 48), ("*", 3), ("-", 19)))
QUESTION = PROBLEM.question


def test_a_step_is_right_when_it_applies_the_next_operation_to_the_value_reached():
    assert quality.step_is_right(PROBLEM, (" 37 + 48 = 85\n",))
    assert not quality.step_is_right(PROBLEM, (" 37 + 48 = 75\n",))
    assert not quality.step_is_right(PROBLEM, (" 37 + 49 = 86\n",))  # wrong operand
    assert quality.step_is_right(PROBLEM, (" 37 + 48 = 85\n", " 85 * 3 = 255\n"))
    assert not quality.step_is_right(PROBLEM, (" 37 + 48 = 85\n", " 85 * 3 = 245\n"))
    # after a wrong step no continuation reaches the gold answer: not a pair the scorer can judge
    assert quality.step_is_right(PROBLEM, (" 37 + 48 = 75\n", " 75 * 3 = 225\n")) is None
    assert (
        quality.step_is_right(
            PROBLEM, (" 37 + 48 = 85\n", " 85 * 3 = 255\n", " 255 - 19 = 236\n", " 1 + 1 = 2\n")
        )
        is None
    )
    assert quality.step_is_right(PROBLEM, ("garbage", " 85 * 3 = 255\n")) is None


def scored(steps, score):
    return quality.ScoredCandidate(ScoreRequest(QUESTION, steps, "236"), score)


def test_ranking_accuracy_counts_right_wrong_pairs_of_one_parent_by_position():
    first = " 37 + 48 = 85\n"
    seen = [
        scored((first,), 0.5),
        scored((" 37 + 48 = 75\n",), 0.1),  # pair at step 1: ranked right
        scored((" 37 + 48 = 75\n", " 75 * 3 = 225\n"), 0.0),  # a wrong parent: left out
        scored((" 37 + 48 = 75\n", " 75 * 3 = 215\n"), 0.9),
        scored((first, " 85 * 3 = 255\n"), 0.2),
        scored((first, " 85 * 3 = 245\n"), 0.3),  # pair at step 2: ranked wrong
        scored((first, " 85 * 3 = 265\n"), 0.2),  # a tie: half
        scored((first, " 85 * 3 = 255\n", " 255 - 19 = 236\n"), 0.9),
        scored((first, " 85 * 3 = 255\n", " 255 - 19 = 226\n"), 0.01),  # last step: right
    ]
    ranking = quality.ranking_accuracy(seen, {QUESTION: PROBLEM})
    assert ranking["1"] == {"pairs": 1, "accuracy": 1.0}
    assert ranking["2"] == {"pairs": 2, "accuracy": 0.25}
    assert ranking["middle"] == {"pairs": 3, "accuracy": 0.5}
    assert ranking["last"] == {"pairs": 1, "accuracy": 1.0}


def test_a_right_trace_is_reached_where_the_scorer_was_shown_every_operation_applied_right():
    other = task.Problem(5, (("+", 1),))
    right = (" 37 + 48 = 85\n", " 85 * 3 = 255\n", " 255 - 19 = 236\n")
    seen = [
        scored(right[:2], 0.9),  # right so far, not whole
        scored((right[0], " 85 * 3 = 245\n", " 245 - 19 = 226\n"), 0.8),  # whole, one result wrong
        quality.ScoredCandidate(ScoreRequest(other.question, (" 5 + 1 = 6\n",), "6"), 0.5),
    ]
    problems = {QUESTION: PROBLEM, other.question: other}
    assert quality.right_trace_reached(seen, problems) == 0.5
    assert quality.right_trace_reached([*seen, scored(right, 0.1)], problems) == 1.0
    assert quality.right_trace_reached([], problems) is None


def test_a_component_ranks_the_same_pairs_by_its_own_value():
    first = " 37 + 48 = 85\n"

    def both(steps, predictive, verifier):
        request = ScoreRequest(QUESTION, steps, "236")
        return quality.ScoredCandidate(
            request, predictive * verifier, {"predictive": predictive, "verifier": verifier}
        )

    seen = [
        both((first,), 0.2, 0.9),
        both((" 37 + 48 = 75\n",), 0.3, 0.1),  # predictive ranks it first, the verifier last
    ]
    problems = {QUESTION: PROBLEM}
    assert quality.ranking_accuracy(seen, problems)["1"]["accuracy"] == 1.0
    assert quality.ranking_accuracy(seen, problems, "predictive")["1"]["accuracy"] == 0.0
    assert quality.ranking_accuracy(seen, problems, "verifier")["1"]["accuracy"] == 1.0
    assert quality.ranking_accuracy(seen, problems, "prm") == {}  # a part the scorer never read


def test_judged_variants_ask_the_demo_verifier_as_it_was_trained_where_it_ships(tmp_path):
    from cordgen.config import Recipe, load_recipe

    demo = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    data = demo.model_dump()
    data["scorer"]["engine"]["model"] = str(tmp_path / "scorer")
    base = Recipe.model_validate(data)
    variants = {v.name: v for v in quality.VARIANTS}
    assert not quality.has_judge(base, variants["cord, hybrid"])  # skipped: nobody to ask
    assert quality.has_judge(base, variants["cord"])
    (tmp_path / "verifier").mkdir()
    assert quality.has_judge(base, variants["cord, hybrid"])
    hybrid = quality.variant_recipe(base, variants["cord, hybrid"], 1)
    assert hybrid.scorer.kind == "hybrid" and hybrid.seed == 1
    assert hybrid.scorer.verifier.engine.model == str(tmp_path / "verifier")
    assert hybrid.scorer.verifier.prompt == quality.JUDGE["prompt"]
    assert set(hybrid.scorer.engines().values()) == {"scorer", "scorer-verifier"}
    assert quality.variant_recipe(base, variants["cord, random choice"], 0).scorer.engines() == {}
    assert quality.variant_recipe(base, variants["cord"], 0).scorer == base.scorer


def test_the_schedule_tables_give_tokens_saved_and_who_wins_each_phase():
    saved = quality.tokens_saved_table({"a": 100.0, "c": 140.0}, {"a": 80.0, "c": 14.0})
    assert "| c | 140 | 14 | 90.0% |" in saved and "| all | 240 | 94 | 60.8% |" in saved
    proposals = {
        "a": {
            "1": {"asked": 10, "kept": 10, "won": 6, "tokens": 50},
            "3-4": {"asked": 20, "kept": 12, "won": 3},
        },
        "c": {
            "1": {"asked": 10, "kept": 2, "won": 2, "tokens": 70},
            "3-4": {"asked": 0, "kept": 0, "won": 0},
        },
    }
    table = quality.phase_wins_table("cord", proposals)
    assert "| teacher | steps 1 | steps 3-4 |" in table
    assert "| a | 75.0% (60.0%, 100.0%) | 100.0% (15.0%, 60.0%) |" in table
    assert "| c | 25.0% (20.0%, 20.0%) | - |" in table


def test_a_recipe_of_other_problems_is_measured_without_the_demo_checker():
    from tests.helpers import make_record

    records = [make_record("q0"), make_record("q1").model_copy(update={"answer": "7"})]  # right, wrong
    measured = quality.measure(records, {}, 1.0, (1, 2))
    assert measured["answer_accuracy"] == 0.5 and measured["generated_tokens_per_problem"] == 13
    assert measured["step_validity"] is None and measured["sound_and_correct"] is None
    summary = quality.mean_over_seeds([measured, measured])
    assert summary["answer_accuracy"] == 0.5 and summary["step_validity"] is None


def test_drawn_problems_are_new_held_out_ones_and_the_same_every_time():
    shipped = quality.load_problems(quality.ROOT / "benchmarks/demo_models/problems.jsonl").problems
    pilot = quality.drawn_problems(quality.PILOT_SEED, 50, shipped, "pilot")
    drawn = quality.drawn_problems(37, 200, (*shipped, *pilot), "draw37")
    assert len(drawn) == 200 and drawn == quality.drawn_problems(37, 200, (*shipped, *pilot), "draw37")
    taken = {p.question for p in (*shipped, *pilot)}
    assert not taken & {p.question for p in drawn}
    assert all(task.split_of(task.parse_question(p.question)) == "heldout" for p in drawn)
    assert (
        drawn[0].id == "draw37-0000" and str(task.parse_question(drawn[0].question).gold) == drawn[0].answer
    )


def test_variants_are_chosen_by_names_that_hold_commas_and_an_unknown_name_stops_the_run():
    chosen = quality.chosen_variants("cord,cord, verifier,adaptive, no fill")
    assert [v.name for v in chosen] == ["cord", "adaptive, no fill", "cord, verifier"]
    assert quality.chosen_variants(None) == list(quality.VARIANTS)
    with pytest.raises(SystemExit, match="--variants: no variant named 'verifier'"):
        quality.chosen_variants("cord,verifier")


def test_prm_variants_ask_the_demo_prm_with_its_own_tokenizer_folder_where_it_ships(tmp_path):
    from cordgen.config import Recipe, load_recipe

    data = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").model_dump()
    data["scorer"]["engine"]["model"] = str(tmp_path / "scorer")
    base = Recipe.model_validate(data)
    variants = {v.name: v for v in quality.VARIANTS}
    (tmp_path / "verifier").mkdir()  # a verifier is no PRM
    assert not quality.has_judge(base, variants["cord, prm"])
    assert not quality.has_judge(base, variants["cord, hybrid with prm"])
    (tmp_path / "prm").mkdir()
    hybrid = quality.variant_recipe(base, variants["cord, hybrid with prm"], 0)
    assert hybrid.scorer.kind == "hybrid" and hybrid.scorer.prm.engine.runner == "pooling"
    assert hybrid.scorer.prm.engine.model == str(tmp_path / "prm")
    assert hybrid.scorer.prm.engine.tokenizer == str(tmp_path / "prm" / "tokenizer")
    assert quality.variant_recipe(base, variants["cord, prm"], 0).scorer.kind == "prm"


def test_likelihood_variants_need_no_judge_and_read_the_scorer_alone(tmp_path):
    from cordgen.config import Recipe, load_recipe

    data = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").model_dump()
    data["scorer"]["engine"]["model"] = str(tmp_path / "scorer")  # no verifier, no PRM beside it
    base = Recipe.model_validate(data)
    variants = {v.name: v for v in quality.VARIANTS}
    for name, components in [
        ("cord, likelihood", ("likelihood",)),
        ("cord, hybrid with likelihood", ("predictive", "likelihood")),
    ]:
        assert quality.has_judge(base, variants[name])
        scorer = quality.variant_recipe(base, variants[name], 0).scorer
        assert scorer.components == components and set(scorer.engines().values()) == {"scorer"}
    for name, width, schedule, samples in [
        ("adaptive, hybrid with likelihood", 4, "adaptive", 1),
        ("cord B=6, hybrid with likelihood", 6, "all", 1),
        ("adaptive B=6, hybrid with likelihood", 6, "adaptive", 1),
        ("cord n=2, hybrid with likelihood", 4, "all", 2),
        ("cord B=6 n=2, hybrid with likelihood", 6, "all", 2),
        ("cord B=6 n=3, hybrid with likelihood", 6, "all", 3),
    ]:
        recipe = quality.variant_recipe(base, variants[name], 0)
        assert recipe.scorer.components == ("predictive", "likelihood")
        assert (recipe.search.beam_width, recipe.search.schedule) == (width, schedule)
        assert {t.sampling.n for t in recipe.teachers} == {samples}


def test_a_recipe_of_other_problems_needs_a_pilot_only_for_adaptive_rows_and_cannot_draw(tmp_path):
    from cordgen.config import load_recipe

    path = tmp_path / "problems.jsonl"
    path.write_text('{"id": "q0", "question": "What is 2 + 2?", "answer": "4"}\n')
    demo = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    base = demo.model_copy(update={"input": demo.input.model_copy(update={"path": str(path)})})
    args = quality.parse_args([])
    problems, pilot = quality.benchmark_and_pilot(args, base, adaptive=False)
    assert [p.id for p in problems] == ["q0"] and pilot == []
    with pytest.raises(SystemExit, match="give --pilot PROBLEMS"):
        quality.benchmark_and_pilot(args, base, adaptive=True)
    with pytest.raises(SystemExit, match="--draw draws demo problems"):
        quality.benchmark_and_pilot(quality.parse_args(["--draw", "3"]), base, adaptive=False)
    shipped, pilot = quality.benchmark_and_pilot(quality.parse_args(["--draw", "3"]), demo, adaptive=True)
    assert shipped[0].id == "draw3-0000" and pilot[0].id == "pilot-0000"
