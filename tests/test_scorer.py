"""The predictive-perplexity scorer: exact answer logprobs, batching, and the prefix cache."""

from __future__ import annotations

import math

import pytest
import torch

from cordgen.config import ScorerConfig, StepFormat
from cordgen.engines import ScoreRequest

pytestmark = pytest.mark.engine


def make_scorer(model, **overrides):
    from cordgen.engines.scorers import EngineScorer, PredictiveReading, Weighted

    config = ScorerConfig(engine=model.settings, **overrides)
    return EngineScorer(config, [Weighted(PredictiveReading(config, model, StepFormat()), 1.0)])


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
        reading = scorer.readings[0].reading
        context, answer = reading.chat.scoring_ids(
            request.question, request.steps, reading.suffix, request.answer
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


# single bytes of the tiny BPEs
VERDICTS = {"yes": "Y", "no": "N", "prompt": "\nStep {step} was:{latest}Right?"}


class CountingModel:
    """A real engine whose prompt-logprob calls are counted (requests per call)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def span_logprobs(self, requests, read_cache):
        self.calls.append(len(requests))
        return self.inner.span_logprobs(requests, read_cache)


class OneModelPool:
    def __init__(self, model) -> None:
        self.counted = CountingModel(model)

    def load(self, labels) -> None:
        pass

    def model(self, settings):
        return self.counted


def kind_scorer(model, kind: str, **overrides):
    from cordgen.engines.scorers import build_scorer

    config = ScorerConfig(engine=model.settings, kind=kind, verifier=VERDICTS, **overrides)
    pool = OneModelPool(model)
    return build_scorer(config, StepFormat(), pool), pool.counted


def test_a_verdict_matches_a_transformers_forward_pass(alpha_model, reference_model, problems):
    scorer, _ = kind_scorer(alpha_model, "verifier", reuse_prefix_cache=False)
    reading = scorer.readings[0].reading
    requests = [
        ScoreRequest(p.question, p.steps[:k], p.answer) for p in problems[:3] for k in (1, len(p.steps))
    ]
    for request, verdict in zip(requests, scorer.score(requests)):
        ids = reading.prompt_ids(request.question, request.steps)
        thinking = reading.chat.thinking_text(request.question, request.steps)
        question = f"\nStep {len(request.steps)} was:{request.steps[-1]}Right?"
        assert alpha_model.tokenizer.decode(ids) == thinking + question
        with torch.no_grad():
            logprobs = reference_model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        yes, no = (logprobs[token].item() for token in reading.verdicts)
        assert (verdict.yes_logprob, verdict.no_logprob) == pytest.approx((yes, no), abs=1e-3)
        assert verdict.score == pytest.approx(math.exp(yes) / (math.exp(yes) + math.exp(no)), rel=1e-3)
        assert verdict.components == {"verifier": verdict.score}


def test_a_hybrid_on_one_engine_reads_both_kinds_in_one_call(alpha_model, problems):
    requests = score_requests(problems)[:6]
    hybrid, counted = kind_scorer(alpha_model, "hybrid", verifier_weight=2.0)
    scores = hybrid.score(requests)
    assert counted.calls == [3 * len(requests)]  # the answer span, then each verdict, per request
    predictive = make_scorer(alpha_model).score(requests)
    verdicts = kind_scorer(alpha_model, "verifier")[0].score(requests)
    for h, p, v in zip(scores, predictive, verdicts):
        assert h.components == {"predictive": pytest.approx(p.score), "verifier": pytest.approx(v.score)}
        assert h.score == pytest.approx(p.score * v.score**2, rel=1e-6)
        assert h.num_prompt_tokens == p.num_prompt_tokens + v.num_prompt_tokens


def test_the_likelihood_matches_a_transformers_forward_pass_and_a_hybrid_reads_it_in_the_answers_request(
    alpha_model, reference_model, problems
):
    requests = [ScoreRequest(p.question, p.steps[:k], p.answer) for p in problems[:3] for k in (1, 2)]
    alpha_model.reset_prefix_cache()  # no step of these in the cache: none is re-read
    hybrid, counted = kind_scorer(alpha_model, "hybrid", hybrid_with="likelihood", likelihood_weight=2.0)
    scores = hybrid.score(requests)
    assert counted.calls == [len(requests)]  # one request per candidate serves both kinds
    scorer, _ = kind_scorer(alpha_model, "likelihood", reuse_prefix_cache=False)
    reading = scorer.readings[0].reading
    for request, step in zip(requests, scorer.score(requests)):
        ids = reading.chat.encode(reading.chat.thinking_text(request.question, request.steps))
        assert alpha_model.tokenizer.decode(ids[-len(step.step_logprobs) :]) == request.steps[-1]
        with torch.no_grad():
            logprobs = reference_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        start = len(ids) - len(step.step_logprobs)
        expected = [logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))]
        assert step.step_logprobs == pytest.approx(expected, abs=1e-3)
        assert step.components == {"likelihood": step.score}
    predictive = make_scorer(alpha_model).score(requests)
    alone = kind_scorer(alpha_model, "likelihood")[0].score(requests)
    for h, p, s in zip(scores, predictive, alone):
        assert h.components == {"predictive": pytest.approx(p.score), "likelihood": pytest.approx(s.score)}
        assert h.score == pytest.approx(p.score * s.score**2, rel=1e-5)
        step = h.parts[1][1]  # served by the predictive request: none of its tokens computed again
        assert step.num_cached_tokens == step.num_prompt_tokens == s.num_prompt_tokens
