"""The vLLM teacher on real tiny models: one step per call, stops, limits and seeds."""

from __future__ import annotations

import pytest

from cordgen.config import ChatSettings, SamplingSettings, StepFormat, TeacherConfig
from cordgen.engines import AnswerRequest, ProposeRequest
from cordgen.search import FinishReason

pytestmark = pytest.mark.engine

GREEDY = SamplingSettings(temperature=0.0, max_step_tokens=64, max_answer_tokens=32)


def make_teacher(model, name="t", **sampling):
    from cordgen.engines.roles import EngineTeacher

    config = TeacherConfig(
        name=name,
        engine=model.settings,
        chat=ChatSettings(),
        sampling=GREEDY.model_copy(update=sampling),
    )
    return EngineTeacher(config, model, StepFormat())


@pytest.fixture(params=["alpha_model", "beta_model"])
def model(request):
    return request.getfixturevalue(request.param)


def test_each_call_yields_exactly_the_next_step(model, problems):
    teacher = make_teacher(model)
    requests = [ProposeRequest(p.question, p.steps[:k]) for p in problems[:4] for k in range(len(p.steps))]
    results = teacher.propose(requests)
    assert len(results) == len(requests)
    for request, (candidate,) in zip(requests, results):
        problem = next(p for p in problems if p.question == request.question)
        k = len(request.steps)
        assert candidate.text == problem.steps[k]
        last = k == len(problem.steps) - 1
        assert candidate.finish_reason == (FinishReason.END_OF_THINKING if last else FinishReason.STEP)
        assert candidate.teacher == "t" and candidate.num_tokens > 0


def test_answer_follows_closed_thinking_and_ends_at_eos(model, problems):
    teacher = make_teacher(model)
    answers = teacher.answer([AnswerRequest(p.question, p.steps) for p in problems[:3]])
    for problem, answer in zip(problems, answers):
        assert answer.text == problem.final_text
        assert answer.finish_reason == FinishReason.EOS


def test_step_token_limit_cuts_a_step(alpha_model, problems):
    teacher = make_teacher(alpha_model, max_step_tokens=2)
    ((candidate,),) = teacher.propose([ProposeRequest(problems[0].question, ())])
    assert candidate.finish_reason == FinishReason.LENGTH
    assert candidate.num_tokens == 2


def test_n_samples_per_request(alpha_model, problems):
    teacher = make_teacher(alpha_model, temperature=1.0)
    results = teacher.propose(
        [
            ProposeRequest(problems[0].question, (), n=3, seed_key=("p0",)),
            ProposeRequest(problems[1].question, (), n=1),
        ]
    )
    assert [len(r) for r in results] == [3, 1]
    assert [c.sample for c in results[0]] == [0, 1, 2]


def test_same_seed_key_same_candidates_whatever_the_batch(alpha_model, problems):
    teacher = make_teacher(alpha_model, temperature=1.5, max_step_tokens=12)
    requests = [
        ProposeRequest(p.question, p.steps[:1], n=2, seed_key=(f"p{i}", 0, 0))
        for i, p in enumerate(problems[:6])
    ]
    forward = teacher.propose(requests)
    backward = teacher.propose(requests[::-1])[::-1]
    alone = [teacher.propose([r])[0] for r in requests[:2]]
    assert forward == backward
    assert forward[:2] == alone
    other_keys = teacher.propose(
        [ProposeRequest(r.question, r.steps, r.n, ("other",) + r.seed_key) for r in requests]
    )
    assert other_keys != forward


def test_teachers_with_different_tokenizers_continue_the_same_trajectory(alpha_model, beta_model, problems):
    alpha, beta = make_teacher(alpha_model, "alpha"), make_teacher(beta_model, "beta")
    assert alpha.chat.encode("### Step 1. 12 + 3") != beta.chat.encode("### Step 1. 12 + 3")
    trajectory = problems[2].steps[:1]
    ((a,),) = alpha.propose([ProposeRequest(problems[2].question, trajectory)])
    ((b,),) = beta.propose([ProposeRequest(problems[2].question, trajectory)])
    assert a.text == b.text == problems[2].steps[1]


def test_a_batch_larger_than_one_scheduler_step_samples_every_seeded_request(alpha_model, problems):
    """vLLM's CPU runner crashed when a seeded prompt was split over two steps; the engine turns
    chunked prefill off on CPU, so such a batch must come back whole."""
    from vllm.platforms import current_platform

    from cordgen.engines.vllm_local import vllm_engine_kwargs

    if current_platform.is_cpu():
        assert vllm_engine_kwargs(alpha_model.settings)["enable_chunked_prefill"] is False
    teacher = make_teacher(alpha_model, temperature=1.0, max_step_tokens=4)
    budget = 8192  # above vLLM's tokens per scheduler step here (max(max_model_len, 2048))
    prompt_tokens = len(teacher.chat.step_prompt_ids(problems[0].question, problems[0].steps))
    count = 2 * budget // prompt_tokens + 1
    requests = [
        ProposeRequest(problems[i % 12].question, problems[i % 12].steps, seed_key=(f"r{i}",))
        for i in range(count)
    ]
    results = teacher.propose(requests)
    assert len(results) == count and all(len(r) == 1 for r in results)
