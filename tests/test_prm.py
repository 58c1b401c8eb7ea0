"""The process reward model kind on a real vLLM pooling engine: its rewards against a torch
forward pass, synthesis with kind prm and with a hybrid over the predictive score and the PRM
(one PRM call per round, each kind kept per step in the records), and the same rewards from a
`vllm serve` of the PRM and from PRM replicas on Ray."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from cordgen.config import EngineSettings, PlacementConfig, Recipe, ScorerConfig, StepFormat
from cordgen.engines import RewardRequest, ScoreRequest
from cordgen.errors import EngineError
from cordgen.problems import Problem
from tests.test_synth import CountingPool, recipe_data, run
from tests.tiny_prm import SEPARATOR, reference_rewards

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def inputs(problems) -> list[Problem]:
    return [Problem(f"p{i}", p.question, p.answer) for i, p in enumerate(problems[:6])]


def prm_settings(prm_model) -> dict:
    return {"engine": prm_model.settings.model_dump(exclude_none=True)}


def test_the_rewards_at_each_separator_match_a_torch_forward_pass(
    engine_pool, prm_model, tiny_prm_dir, problems
):
    from cordgen.engines.scorers import build_scorer

    config = ScorerConfig(engine={"model": tiny_prm_dir}, kind="prm", prm=prm_settings(prm_model))
    scorer = build_scorer(config, StepFormat(), engine_pool)
    reading = scorer.readings[0].reading
    assert reading.model is prm_model
    requests = [
        ScoreRequest(p.question, p.steps[:k], p.answer) for p in problems[:3] for k in (1, len(p.steps))
    ]
    prompts = [reading.prompt_ids(r.question, r.steps) for r in requests]
    reply = "".join(step.strip() + SEPARATOR for step in problems[0].steps)
    expected_text = (
        f"<|im_start|>user\n{problems[0].question}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"
    )
    assert prm_model.tokenizer.decode(prompts[1]) == expected_text
    every = prm_model.step_rewards([RewardRequest(ids, reading.separator) for ids in prompts])
    for request, ids, rewards, score in zip(requests, prompts, every, scorer.score(requests)):
        expected = reference_rewards(tiny_prm_dir, ids, reading.separator)
        assert len(rewards) == len(request.steps) == len(expected)
        assert rewards == pytest.approx(expected, rel=1e-3)
        assert score.score == pytest.approx(expected[-1], rel=1e-3)
        assert score.components == {"prm": score.score} and score.num_prompt_tokens == len(ids)


def prm_recipe(tiny_model_dirs, prm_model, **scorer) -> Recipe:
    data = recipe_data(tiny_model_dirs)
    data["scorer"] |= {"prm": prm_settings(prm_model), **scorer}
    return Recipe.model_validate(data)


def test_a_prm_run_calls_the_prm_once_a_round_and_nothing_else_scores(
    tiny_model_dirs, tiny_prm_dir, engine_pool, alpha_model, beta_model, prm_model, inputs
):
    calls: Counter = Counter()
    records = run(
        prm_recipe(tiny_model_dirs, prm_model, kind="prm"), CountingPool(engine_pool, calls), inputs
    )
    rounds = max(r.usage.rounds for r in records)
    assert calls == Counter({(tiny_prm_dir, "step_rewards"): rounds})
    for record in records:
        assert record.result.steps and record.usage.scored_tokens > 0
        for step in record.result.steps:
            assert step.scores == {"prm": step.score} and 0 < step.score < 1


def test_a_hybrid_with_a_prm_reads_each_engine_once_a_round_and_records_both_kinds(
    tiny_model_dirs, tiny_prm_dir, engine_pool, alpha_model, beta_model, prm_model, inputs
):
    recipe = prm_recipe(tiny_model_dirs, prm_model, kind="hybrid", prm_weight=2.0)
    assert recipe.scorer.components == ("predictive", "prm")
    calls: Counter = Counter()
    records = run(recipe, CountingPool(engine_pool, calls), inputs)
    rounds = max(r.usage.rounds for r in records)
    assert calls[(tiny_prm_dir, "step_rewards")] == calls[(tiny_model_dirs["alpha"], True)] == rounds
    assert calls.total() <= 3 * rounds  # the predictive engine's re-reads without cache reads at most
    for record in records:
        for step in record.result.steps:
            assert set(step.scores) == {"predictive", "prm"}
            expected = step.scores["predictive"] * step.scores["prm"] ** 2
            assert step.score == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def prm_server(tiny_prm_dir, prm_model, tmp_path_factory):
    """`vllm serve` of the tiny PRM, its pooler reading at our separator."""
    from tests.test_remote import free_port, server_command, serving

    separator = prm_model.tokenizer.convert_tokens_to_ids(SEPARATOR)
    port, log = free_port(), tmp_path_factory.mktemp("prm-serve") / "server.log"
    command = server_command(tiny_prm_dir, port)
    command.remove("--enable-prompt-tokens-details")
    command += ["--runner", "pooling", "--pooler-config", f'{{"step_tag_id": {separator}}}']
    with serving(command, log, port) as url:
        yield url


def test_a_served_prm_gives_the_rewards_of_the_local_engine(prm_server, prm_model, tiny_prm_dir, problems):
    from cordgen.engines.remote import RemoteModel
    from cordgen.engines.scorers import RewardReading

    remote = RemoteModel(EngineSettings(model=tiny_prm_dir, runner="pooling", remote={"url": prm_server}))
    try:
        config = ScorerConfig(engine={"model": tiny_prm_dir}, kind="prm", prm=prm_settings(prm_model))
        reading = RewardReading(config, remote, StepFormat())
        requests = [
            RewardRequest(reading.prompt_ids(p.question, p.steps), reading.separator) for p in problems[:4]
        ]
        for served, local in zip(remote.step_rewards(requests), prm_model.step_rewards(requests)):
            assert served == pytest.approx(local, rel=1e-4)
        absent = min(set(range(len(prm_model.tokenizer))) - set(requests[0].prompt))
        other = replace(requests[0], separator=absent)  # the server still reads at its own
        with pytest.raises(EngineError, match=r"rewards for \d+ separators .*--pooler-config"):
            remote.step_rewards([other])
    finally:
        remote.shutdown()


def test_prm_replicas_on_ray_give_the_rewards_of_the_local_engine(prm_model, tiny_prm_dir, problems):
    pytest.importorskip("ray")
    from cordgen.engines.placement import vllm_is_cpu_build
    from cordgen.engines.ray_replicas import RayEngines
    from cordgen.engines.scorers import RewardReading

    settings = prm_model.settings.model_copy(update={"replicas": 2})
    cluster = RayEngines(PlacementConfig(mode="ray", replica_timeout_s=300), vllm_is_cpu_build(), None)
    try:
        replicas = cluster.start({settings: "prm"})[settings]
        config = ScorerConfig(engine={"model": tiny_prm_dir}, kind="prm", prm=prm_settings(prm_model))
        reading = RewardReading(config, replicas, StepFormat())
        requests = [
            RewardRequest(reading.prompt_ids(p.question, p.steps), reading.separator, route=f"p{i}")
            for i, p in enumerate(problems[:8])
        ]
        for replicated, local in zip(replicas.step_rewards(requests), prm_model.step_rewards(requests)):
            assert replicated == pytest.approx(local, rel=1e-4)
        assert sorted(cluster.clock.take()) == ["prm#0", "prm#1"]  # each replica served its share
    finally:
        cluster.shutdown()
