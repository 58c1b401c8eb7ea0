"""Teachers on any EngineModel (the scorer's kinds are in `scorers`): prompts, seeds and reading
the results live here once, whether the engine runs in this process, in a worker or behind a URL.

Prompts go to engines as token ids that we build ourselves, so the scorer knows exactly where
the gold answer starts and every role counts tokens the way its engine does.
"""

from __future__ import annotations

from collections.abc import Sequence

from cordgen.config import Recipe, StepFormat, TeacherConfig
from cordgen.engines import (
    AnswerRequest,
    EngineModel,
    ProposeRequest,
    Sample,
    SampleRequest,
    Scorer,
    derive_seed,
)
from cordgen.engines.placement import distinct_engines
from cordgen.engines.pool import EnginePool
from cordgen.engines.scorers import build_scorer
from cordgen.prompts import ChatPrompt
from cordgen.search import FinalAnswer, FinishReason, StepCandidate


def build_roles(recipe: Recipe, pool: EnginePool) -> tuple[dict[str, EngineTeacher], Scorer]:
    pool.load({engine: "/".join(roles) for engine, roles in distinct_engines(recipe).items()})
    teachers = {
        t.name: EngineTeacher(t, pool.model(t.engine), recipe.format, recipe.seed) for t in recipe.teachers
    }
    return teachers, build_scorer(recipe.scorer, recipe.format, pool, recipe.seed)


def finish_reason_of(sample: Sample, fmt: StepFormat) -> FinishReason:
    if sample.truncated:
        return FinishReason.LENGTH
    if sample.stop_string == fmt.think_close:
        return FinishReason.END_OF_THINKING
    if sample.stop_string == fmt.marker:
        return FinishReason.STEP
    return FinishReason.EOS


class EngineTeacher:
    def __init__(self, config: TeacherConfig, model: EngineModel, fmt: StepFormat, seed: int = 0) -> None:
        self.name = config.name
        self.seed = seed
        self.config = config
        self.model = model
        self.fmt = fmt
        self.chat = ChatPrompt(model.tokenizer, config.chat, fmt)

    def _request(
        self, ids: list[int], seed: int, max_tokens: int, stop: tuple[str, ...], route: str
    ) -> SampleRequest:
        sampling = self.config.sampling
        return SampleRequest(
            prompt=ids,
            max_tokens=max_tokens,
            seed=seed,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=stop,
            route=route,
        )

    def _seed(self, key: tuple[str | int, ...], sample: int) -> int:
        return derive_seed(self.seed, self.name, *key, sample)

    def _sample(
        self,
        prompts: Sequence[list[int]],
        requests: Sequence[ProposeRequest | AnswerRequest],
        counts: Sequence[int],
        stop: tuple[str, ...],
        limit: int,
        needed: int = 1,
        seed_prefix: tuple[str, ...] = (),
    ) -> list[list[StepCandidate]]:
        """n seeded samples per prompt in one engine call, each up to `limit` tokens or the end
        of the context window. A prompt that leaves fewer than `needed` tokens of the window
        yields empty CONTEXT samples instead of failing the whole batch."""
        batch, slots = [], []
        results: list[list[StepCandidate | None]] = [[None] * n for n in counts]
        for i, (ids, request) in enumerate(zip(prompts, requests)):
            room = self.model.max_model_len - len(ids)
            seed_key = (*seed_prefix, *request.seed_key)
            for sample in range(len(results[i])):
                if room < needed:
                    results[i][sample] = StepCandidate(self.name, "", 0, FinishReason.CONTEXT, sample)
                    continue
                seed = self._seed(seed_key, sample)
                batch.append(self._request(ids, seed, min(limit, room), stop, request.route))
                slots.append((i, sample))
        for (i, sample), drawn in zip(slots, self.model.sample(batch)):
            results[i][sample] = StepCandidate(
                teacher=self.name,
                text=drawn.text,
                num_tokens=drawn.num_tokens,
                finish_reason=finish_reason_of(drawn, self.fmt),
                sample=sample,
            )
        return [[c for c in row if c is not None] for row in results]

    def propose(self, requests: Sequence[ProposeRequest]) -> list[list[StepCandidate]]:
        """Every request's n samples of its next step, from one engine call. A trajectory whose
        window has no room for a whole step and then a whole answer gets CONTEXT samples: the
        search closes it while its answer still fits."""
        prompts = [self.chat.step_prompt_ids(r.question, r.steps) for r in requests]
        stop = (self.fmt.marker, self.fmt.think_close)
        sampling = self.config.sampling
        needed = sampling.max_step_tokens + sampling.max_answer_tokens
        counts = [r.n for r in requests]
        return self._sample(prompts, requests, counts, stop, sampling.max_step_tokens, needed)

    def solve(self, requests: Sequence[ProposeRequest], max_tokens: int) -> list[list[StepCandidate]]:
        """n whole traces (thinking and answer) per request, from one engine call: curation."""
        prompts = [self.chat.step_prompt_ids(r.question, r.steps) for r in requests]
        return self._sample(prompts, requests, [r.n for r in requests], (), max_tokens)

    def answer(self, requests: Sequence[AnswerRequest]) -> list[FinalAnswer]:
        """The text after `</think>` for each finished trajectory, from one engine call."""
        prompts = [self.chat.answer_prompt_ids(r.question, r.steps) for r in requests]
        limit = self.config.sampling.max_answer_tokens
        samples = self._sample(prompts, requests, [1] * len(requests), (), limit, seed_prefix=("answer",))
        return [FinalAnswer(c.teacher, c.text, c.num_tokens, c.finish_reason) for (c,) in samples]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.chat.encode(text)) for text in texts]
