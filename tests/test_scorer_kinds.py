"""Step scorer kinds without engines: the verdict, reward, likelihood and hybrid arithmetic,
merged spans, the seeded random ablation, what each kind loads, what enters the semantic hash,
and plan-time errors for bad verdicts, verifier questions and PRM separators."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cordgen.config import Recipe, ScorerConfig, VerifierSettings, semantic_hash
from cordgen.engines import (
    AnswerScore,
    LikelihoodScore,
    RewardRequest,
    RewardScore,
    ScoreRequest,
    SpanLogprobs,
    SpanRequest,
    VerdictScore,
    WeightedScore,
    read_rewards,
)
from cordgen.engines.scorers import RandomScorer, hosted_part, merged_spans
from cordgen.errors import ConfigError, CordgenError, EngineError
from cordgen.scoring import kind_label, rekinded
from tests.helpers import write_problems

A, B = {"model": "org/a"}, {"model": "org/b"}


def test_a_verdict_is_p_yes_over_p_yes_and_p_no_even_far_in_the_tail():
    verdict = VerdictScore(math.log(0.6), math.log(0.2), 10, 4)
    assert verdict.score == pytest.approx(0.75)
    assert verdict.components == {"verifier": pytest.approx(0.75)}
    assert VerdictScore(-1000.0, -1000.0 - math.log(3), 1, 0).score == pytest.approx(0.75)


def test_a_hybrid_ranks_by_log_s_plus_w_log_p_correct_and_keeps_both_parts():
    predictive = AnswerScore((math.log(0.5), math.log(0.2)), 30, 10)
    verdict = VerdictScore(math.log(0.9), math.log(0.1), 32, 31)
    hybrid = WeightedScore(((1.0, predictive), (2.0, verdict)))
    assert hybrid.score == pytest.approx(math.exp(math.log(predictive.score) + 2 * math.log(0.9)))
    assert hybrid.components == {"predictive": predictive.score, "verifier": pytest.approx(0.9)}
    assert (hybrid.num_prompt_tokens, hybrid.num_cached_tokens) == (62, 41)


def test_prm_rewards_are_a_softmax_at_each_separator_and_a_hybrid_weighs_the_latest(tmp_path):
    request = RewardRequest([7, 3, 9, 3], separator=3, label=1)
    assert read_rewards(request, [[0.0, math.log(3)], [2.0, 2.0]], "prm") == pytest.approx((0.75, 0.5))
    with pytest.raises(EngineError, match=r"prm: 1 rewards for 2 separators \(token 3\); start vllm serve"):
        read_rewards(request, [[0.0, 1.0]], "prm")
    with pytest.raises(EngineError, match="correct_label 2, but the head has 2 classes"):
        read_rewards(RewardRequest([3], 3, label=2), [[0.0, 1.0]], "prm")
    predictive, reward = AnswerScore((math.log(0.5),), 30, 10), RewardScore(0.8, 40)
    hybrid = WeightedScore(((1.0, predictive), (2.0, reward)))
    assert hybrid.score == pytest.approx(0.5 * 0.8**2)
    assert hybrid.components == {"predictive": 0.5, "prm": 0.8}
    assert (hybrid.num_prompt_tokens, hybrid.num_cached_tokens) == (70, 10)


def test_the_likelihood_is_the_steps_mean_token_probability_and_an_empty_step_scores_zero():
    step = LikelihoodScore((math.log(0.5), math.log(0.125)), 40, 30)
    assert step.score == pytest.approx(0.25) and step.components == {"likelihood": pytest.approx(0.25)}
    assert LikelihoodScore((), 40, 30).score == 0.0
    hybrid = WeightedScore(((1.0, AnswerScore((math.log(0.5),), 44, 30)), (2.0, step)))
    assert hybrid.score == pytest.approx(0.5 * 0.25**2)
    assert hybrid.components == {"predictive": 0.5, "likelihood": pytest.approx(0.25)}


def test_a_prompt_that_starts_another_of_the_same_candidate_is_read_from_that_ones_request():
    spans = {
        (0, 0, 0): SpanRequest([1, 2, 3, 4, 5, 6], 5),  # predictive: the answer after the trajectory
        (0, 1, 0): SpanRequest([1, 2, 3, 4], 2),  # likelihood: the step inside it
        (1, 0, 0): SpanRequest([1, 2, 3, 9, 9], 4),
        (1, 1, 0): SpanRequest([1, 2, 3, 4], 2),  # same tokens, another candidate: its own request
    }
    hosts, host_of = merged_spans(spans)
    assert list(hosts) == [(0, 0, 0), (1, 0, 0), (1, 1, 0)]
    assert hosts[(0, 0, 0)] == SpanRequest([1, 2, 3, 4, 5, 6], 2)
    assert host_of == {(0, 0, 0): (0, 0, 0), (0, 1, 0): (0, 0, 0), (1, 0, 0): (1, 0, 0), (1, 1, 0): (1, 1, 0)}
    answer = SpanLogprobs((-0.1, -0.2, -0.3, -0.4), 2)
    host = hosts[(0, 0, 0)]
    assert hosted_part(answer, host, spans[(0, 0, 0)], own=True) == SpanLogprobs((-0.4,), 2)
    assert hosted_part(answer, host, spans[(0, 1, 0)], own=False) == SpanLogprobs((-0.1, -0.2), 4)
    assert hosted_part(SpanLogprobs(None, 3), host, spans[(0, 1, 0)], own=False).logprobs is None


def test_random_scores_are_seeded_by_question_and_text_never_by_the_batch():
    requests = [ScoreRequest("q", ("a", s), "1", "p") for s in ("b", "c", "d")]
    batch = RandomScorer("random", 3).score(requests)
    alone = [RandomScorer("random", 3).score([r])[0] for r in requests]
    assert [s.score for s in batch] == [s.score for s in alone]
    assert all(0 < s.score < 1 and s.components == {"random": s.score} for s in batch)
    assert len({s.score for s in batch}) == 3
    assert RandomScorer("random", 4).score(requests[:1])[0].score != batch[0].score
    other = ScoreRequest("another question", ("a", "b"), "1", "p")
    assert RandomScorer("random", 3).score([other])[0].score != batch[0].score


@pytest.mark.parametrize(
    ("scorer", "loads"),
    [
        ({"engine": A}, {"org/a": "s"}),
        ({"engine": A, "kind": "verifier"}, {"org/a": "s"}),
        ({"engine": A, "kind": "hybrid"}, {"org/a": "s"}),
        ({"engine": A, "kind": "hybrid", "verifier": {"engine": B}}, {"org/a": "s", "org/b": "s-verifier"}),
        ({"engine": A, "kind": "verifier", "verifier": {"engine": B}}, {"org/b": "s-verifier"}),
        ({"engine": A, "kind": "random"}, {}),
        ({"engine": A, "kind": "prm", "prm": {"engine": B}}, {"org/b": "s-prm"}),
        ({"engine": A, "kind": "hybrid", "prm": {"engine": B}}, {"org/a": "s", "org/b": "s-prm"}),
        ({"engine": A, "kind": "verifier", "prm": {"engine": B}}, {"org/a": "s"}),
        ({"engine": A, "kind": "likelihood"}, {"org/a": "s"}),
        ({"engine": A, "kind": "hybrid", "hybrid_with": "likelihood", "prm": {"engine": B}}, {"org/a": "s"}),
        ({"engine": A, "kind": "hybrid", "hybrid_with": "verifier", "prm": {"engine": B}}, {"org/a": "s"}),
    ],
)
def test_each_kind_loads_the_engines_it_reads(scorer, loads):
    config = ScorerConfig(name="s", **scorer)
    assert {engine.model: name for engine, name in config.engines().items()} == loads
    runners = {model: "pooling" if name.endswith("-prm") else "generate" for model, name in loads.items()}
    assert {engine.model: engine.runner for engine in config.engines()} == runners


def test_a_prm_is_loaded_by_the_pooling_runner_and_kind_prm_needs_one():
    prm = ScorerConfig(engine=A, kind="prm", prm={"engine": {**A, "runner": "generate"}}).prm
    assert prm.engine.runner == "pooling" and (prm.separator, prm.correct_label) == ("<extra_0>", 1)
    with pytest.raises(ValidationError, match=r"kind prm needs scorer.prm \(the reward model's engine\)"):
        ScorerConfig(engine=A, kind="prm")
    with pytest.raises(ValidationError, match=r"hybrid_with prm needs scorer.prm"):
        ScorerConfig(engine=A, kind="hybrid", hybrid_with="prm")


def test_a_hybrids_other_part_is_refused_on_another_kind_and_re_read_as_cordgen_score_asks():
    with pytest.raises(
        ValidationError, match=r"hybrid_with is read only by kind hybrid, not by kind verifier"
    ):
        ScorerConfig(engine=A, kind="verifier", hybrid_with="likelihood")
    predictive, hybrid = (
        ScorerConfig(engine=A),
        ScorerConfig(engine=A, kind="hybrid", hybrid_with="likelihood"),
    )
    assert rekinded(predictive, "hybrid", None).components == ("predictive", "verifier")
    assert kind_label(rekinded(predictive, "hybrid", None)) == "hybrid"
    relabelled = rekinded(predictive, "hybrid", "likelihood")
    assert relabelled.components == hybrid.components and kind_label(relabelled) == "hybrid-likelihood"
    assert rekinded(hybrid, "verifier", None).hybrid_with is None  # another kind keeps no other part
    assert rekinded(hybrid, None, None) == hybrid
    with pytest.raises(CordgenError, match=r"--hybrid-with is read only by kind hybrid, not by kind prm"):
        rekinded(hybrid, "prm", "likelihood")


def recipe(**scorer) -> Recipe:
    teachers = [{"name": "t", "engine": A}]
    return Recipe.model_validate({"teachers": teachers, "scorer": {"engine": A, **scorer}})


def test_the_default_kind_leaves_the_semantic_hash_of_earlier_runs_and_others_change_it():
    plain = semantic_hash(recipe())
    assert semantic_hash(recipe(kind="predictive", verifier_weight=1.0)) == plain
    changed = [
        recipe(kind="verifier"),
        recipe(kind="hybrid"),
        recipe(kind="hybrid", verifier_weight=2.0),
        recipe(kind="verifier", verifier={"yes": " Y"}),
        recipe(kind="verifier", verifier={"prompt": "\nStep {step} right?"}),
        recipe(kind="verifier", verifier={"engine": B}),
        recipe(kind="prm", prm={"engine": B}),
        recipe(kind="prm", prm={"engine": B, "separator": "<sep>"}),
        recipe(kind="hybrid", prm={"engine": B}),
        recipe(kind="hybrid", prm={"engine": B}, prm_weight=2.0),
        recipe(kind="likelihood"),
        recipe(kind="hybrid", hybrid_with="likelihood"),
        recipe(kind="hybrid", hybrid_with="likelihood", likelihood_weight=0.5),
    ]
    assert len({plain, *(semantic_hash(r) for r in changed)}) == len(changed) + 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"prompt": "Is {last} right?"}, r"unknown field\(s\) \{last\}; only \{step\} and \{latest\}"),
        ({"prompt": "Is step { right?"}, "not a format string with {step} and {latest}"),
        ({"yes": " Yes", "no": " Yes"}, "yes and no are the same verdict ' Yes'"),
    ],
)
def test_bad_verifier_settings_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        VerifierSettings(**settings)


def verifier_recipe(tmp_path, model: str, **verifier) -> str:
    data = {
        "teachers": [
            {
                "name": "alpha",
                "engine": {"model": model},
                "sampling": {"max_step_tokens": 24, "max_answer_tokens": 16},
            }
        ],
        "scorer": {"engine": {"model": model}, "kind": "hybrid", "verifier": verifier},
        "input": {"path": str(write_problems(tmp_path / "problems.jsonl"))},
        "output": {"path": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def plan_error(recipe_path: str) -> str:
    """The one line `cordgen synth` stops with (exit 2) when the plan rejects the recipe."""
    result = subprocess.run(
        [sys.executable, "-m", "cordgen", "synth", "--config", recipe_path, "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    return line


def test_a_verdict_of_several_tokens_stops_the_plan_naming_field_model_and_pieces(tiny_model_dirs, tmp_path):
    from cordgen.engines.scorers import check_scorer_tokens

    alpha = tiny_model_dirs["alpha"]
    fine = ScorerConfig(engine={"model": alpha}, kind="verifier", verifier={"yes": "Y", "no": "N"})
    check_scorer_tokens(fine, Recipe.model_fields["format"].default)
    line = plan_error(verifier_recipe(tmp_path, alpha, yes=" Yes", no="N"))
    assert line.startswith("error: scorer.verifier.yes: ' Yes' is ")
    assert f"tokens of {alpha}'s tokenizer" in line
    assert line.endswith("a verdict must be one token")
    assert not (tmp_path / "run").exists()


def test_the_judge_must_exist_before_anything_loads(tmp_path, tiny_model_dirs):
    from cordgen.config import check_sources

    path = verifier_recipe(tmp_path, tiny_model_dirs["alpha"], engine={"model": "./nowhere"})
    data = yaml.safe_load(Path(path).read_text())
    with pytest.raises(ConfigError, match="model path does not exist: ./nowhere"):
        check_sources(Recipe.model_validate(data))


def prm_recipe(tmp_path, teacher: str, prm: str, separator: str) -> str:
    path = verifier_recipe(tmp_path, teacher)
    data = yaml.safe_load(Path(path).read_text())
    data["scorer"] = {
        "engine": {"model": teacher},
        "kind": "prm",
        "prm": {"engine": {"model": prm}, "separator": separator},
    }
    Path(path).write_text(yaml.safe_dump(data))
    return path


def test_a_prm_separator_of_several_tokens_stops_the_plan_naming_field_and_model(
    tiny_model_dirs, tiny_prm_dir, tmp_path
):
    from cordgen.engines.scorers import check_scorer_tokens

    fmt = Recipe.model_fields["format"].default
    fine = ScorerConfig(engine={"model": tiny_prm_dir}, kind="prm", prm={"engine": {"model": tiny_prm_dir}})
    check_scorer_tokens(fine, fmt)
    with pytest.raises(ConfigError, match=r"^scorer.prm: kind prm needs a reward model"):
        check_scorer_tokens(fine.model_copy(update={"prm": None}), fmt)
    hybrid = fine.model_copy(update={"kind": "hybrid", "hybrid_with": "prm", "prm": None})
    with pytest.raises(ConfigError, match=r"^scorer.prm: kind hybrid with prm needs a reward model"):
        check_scorer_tokens(hybrid, fmt)
    line = plan_error(prm_recipe(tmp_path, tiny_model_dirs["alpha"], tiny_prm_dir, "<step>"))
    assert line.startswith("error: scorer.prm.separator: '<step>' is ")
    assert f"tokens of {tiny_prm_dir}'s tokenizer" in line
    assert line.endswith("the separator must be one token")
    assert not (tmp_path / "run").exists()
