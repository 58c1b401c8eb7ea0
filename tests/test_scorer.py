"""The predictive-perplexity scorer: exact answer logprobs, batching, and the prefix cache."""

from __future__ import annotations

import math

import pytest
import torch

from cordgen.config import ScorerConfig, StepFormat
from cordgen.engines import ScoreRequest

pytestmark = pytest.mark.engine


def make_scorer(model, **overrides):
    from cordgen.engines.roles import EngineScorer

    return EngineScorer(ScorerConfig(engine=model.settings, **overrides), model, StepFormat())


def score_requests(problems) -> list[ScoreRequest]:
    """Every prefix of every trace, scored against its own gold answer and a wrong one."""
    requests = []
    for p in problems[:5]:
        for k in range(1, len(p.steps) + 1):
            requests.append(ScoreRequest(p.question, p.steps[:k], p.answer))
            requests.append(ScoreRequest(p.question, p.steps[:k], str(int(p.answer) + 11)))
    return requests


@pytest.fixture(scope="module")
def reference_model(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dirs["alpha"], torch_dtype=torch.float32).eval()


def transformers_answer_logprobs(model, context: list[int], answer: list[int]) -> list[float]:
    ids = torch.tensor([context + answer])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return [logprobs[len(context) + i - 1, token].item() for i, token in enumerate(answer)]


def test_answer_logprobs_match_a_transformers_forward_pass(alpha_model, reference_model, problems):
    scorer = make_scorer(alpha_model, reuse_prefix_cache=False)
    requests = score_requests(problems)
    scores = scorer.score(requests)
    worst = 0.0
    for request, score in zip(requests, scores):
        context, answer = scorer.chat.scoring_ids(
            request.question, request.steps, scorer.config.answer_suffix, request.answer
        )
        expected = transformers_answer_logprobs(reference_model, context, answer)
        assert len(score.answer_logprobs) == len(expected)
        worst = max(worst, *(abs(a - b) for a, b in zip(score.answer_logprobs, expected)))
        assert score.score == pytest.approx(math.exp(sum(expected) / len(expected)), rel=1e-3)
        assert score.perplexity == pytest.approx(1 / score.score)
    print(f"max |vLLM - transformers| answer logprob: {worst:.2e}")
    assert worst < 1e-3


def test_the_gold_answer_scores_higher_after_the_full_trace(alpha_model, problems):
    scorer = make_scorer(alpha_model)
    for p in problems[:4]:
        gold, wrong = scorer.score(
            [
                ScoreRequest(p.question, p.steps, p.answer),
                ScoreRequest(p.question, p.steps, str(int(p.answer) + 11)),
            ]
        )
        assert gold.score > wrong.score


def test_batched_scores_equal_one_at_a_time(alpha_model, problems):
    scorer = make_scorer(alpha_model)
    requests = score_requests(problems)[:8]
    batched = scorer.score(requests)
    alone = [scorer.score([r])[0] for r in requests]
    for b, a in zip(batched, alone):
        assert b.answer_logprobs == pytest.approx(a.answer_logprobs, abs=1e-4)


def test_cache_reuse_gives_the_scores_of_no_reuse(alpha_model, problems):
    requests = score_requests(problems)
    without = make_scorer(alpha_model, reuse_prefix_cache=False).score(requests)
    reused = make_scorer(alpha_model, reuse_prefix_cache=True)
    reused.score(requests)  # warm the cache
    with_cache = reused.score(requests)
    assert sum(s.num_cached_tokens for s in with_cache) > 0
    assert all(s.num_cached_tokens == 0 for s in without)
    for a, b in zip(without, with_cache):
        assert b.answer_logprobs == pytest.approx(a.answer_logprobs, abs=1e-4)


def test_cached_prefix_reaching_into_the_answer_is_rescored(alpha_model, problems):
    """A long answer on a short context, scored twice: the second time the cache covers most of
    the answer span, so the placeholders vLLM returns there must never reach the score."""
    scorer = make_scorer(alpha_model)
    long_answer = " ".join(f"{i} + {i} = {2 * i}." for i in range(40))
    request = ScoreRequest(problems[0].question, problems[0].steps[:1], long_answer)
    first = scorer.score([request])[0]
    second = scorer.score([request])[0]
    assert second.rescored
    assert second.answer_logprobs == pytest.approx(first.answer_logprobs, abs=1e-4)
    reference = make_scorer(alpha_model, reuse_prefix_cache=False).score([request])[0]
    assert first.answer_logprobs == pytest.approx(reference.answer_logprobs, abs=1e-4)


def test_chunked_calls_bound_memory_and_keep_order(alpha_model, problems):
    requests = score_requests(problems)
    whole = make_scorer(alpha_model, max_requests_per_call=1000).score(requests)
    chunked = make_scorer(alpha_model, max_requests_per_call=3).score(requests)
    for a, b in zip(whole, chunked):
        assert b.answer_logprobs == pytest.approx(a.answer_logprobs, abs=1e-4)


def test_scorer_shares_the_teacher_engine(engine_pool, alpha_model, tiny_model_dirs):
    from tests.conftest import engine_settings

    before = len(engine_pool)
    assert engine_pool.model(engine_settings(tiny_model_dirs["alpha"])) is alpha_model
    assert len(engine_pool) == before
