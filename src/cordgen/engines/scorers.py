"""Step scorers on any EngineModel: the paper's predictive score, a generative verifier, a
process reward model, the scorer's likelihood of the latest step, a hybrid of the predictive
score with any of those, and the random ablation.

Each engine-backed kind turns a trajectory into engine requests (the predictive kind: the gold
answer after the trajectory; the verifier: each verdict token after the trajectory and its
question; the PRM: the trajectory with a separator after each step; the likelihood: the latest
step after the trajectory before it) and reads its value from the answers. One pass per scorer
engine per batch serves every kind that engine reads: one `span_logprobs` call (chunked) for a
generating engine, so a hybrid whose other part the scorer's own model reads still costs one
call and shares its prefixes (the likelihood even its request), and one `step_rewards` call for
a PRM.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cordgen.config import ScorerConfig, StepFormat
from cordgen.engines import (
    AnswerScore,
    EngineModel,
    LikelihoodScore,
    RandomScore,
    RewardRequest,
    RewardScore,
    ScoreRequest,
    SpanLogprobs,
    SpanRequest,
    StepRewards,
    StepScore,
    VerdictScore,
    WeightedScore,
    derive_seed,
)
from cordgen.engines.pool import EnginePool
from cordgen.engines.tokenizers import load_tokenizer
from cordgen.errors import ConfigError, EngineError
from cordgen.prompts import ChatPrompt, step_header

EngineRequest = SpanRequest | RewardRequest
EngineAnswer = SpanLogprobs | StepRewards


class Reading(Protocol):
    """One kind read from one engine: its requests for a trajectory, and its value from the
    engine's answers to them."""

    kind: str
    model: EngineModel

    def spans(self, request: ScoreRequest) -> tuple[EngineRequest, ...] | None:
        """None when a prompt does not fit the window."""
        ...

    def read(self, spans: Sequence[Any], prompts: Sequence[Any], rescored: bool) -> StepScore: ...


def fits(model: EngineModel, ids: list[int]) -> bool:
    return len(ids) < model.max_model_len


class PredictiveReading:
    """S = exp(mean log p(gold answer | trajectory + answer suffix))."""

    kind = "predictive"

    def __init__(self, config: ScorerConfig, model: EngineModel, fmt: StepFormat) -> None:
        self.name, self.suffix, self.model = config.name, config.answer_suffix, model
        self.chat = ChatPrompt(model.tokenizer, config.chat, fmt)

    def spans(self, request: ScoreRequest) -> tuple[SpanRequest, ...] | None:
        context, answer = self.chat.scoring_ids(request.question, request.steps, self.suffix, request.answer)
        if not answer:
            raise EngineError(f"scorer {self.name}: the gold answer {request.answer!r} has no tokens")
        ids = context + answer
        return (SpanRequest(ids, len(context), request.route),) if fits(self.model, ids) else None

    def read(
        self, spans: Sequence[SpanLogprobs], prompts: Sequence[SpanRequest], rescored: bool
    ) -> AnswerScore:
        (span,), (prompt,) = spans, prompts
        assert span.logprobs is not None
        return AnswerScore(span.logprobs, len(prompt.prompt), span.num_cached_tokens, rescored)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class LikelihoodReading:
    """The scorer's confidence in the latest step: the prompt logprobs of its tokens after the
    trajectory before it. Its prompt is a prefix of the predictive kind's, so a hybrid reads both
    from one request (EngineScorer merges them)."""

    kind = "likelihood"

    def __init__(self, config: ScorerConfig, model: EngineModel, fmt: StepFormat) -> None:
        self.model, self.fmt = model, fmt
        self.chat = ChatPrompt(model.tokenizer, config.chat, fmt)

    def spans(self, request: ScoreRequest) -> tuple[SpanRequest, ...] | None:
        ids = self.chat.encode(self.chat.thinking_text(request.question, request.steps))
        earlier = self.chat.thinking_text(request.question, request.steps[:-1])
        header = self.chat.encode(earlier + step_header(self.fmt, len(request.steps)))
        start = common_prefix(header, ids)  # the step's first token (a merge across it: from there)
        return (SpanRequest(ids, start, request.route),) if fits(self.model, ids) else None

    def read(
        self, spans: Sequence[SpanLogprobs], prompts: Sequence[SpanRequest], rescored: bool
    ) -> LikelihoodScore:
        (span,), (prompt,) = spans, prompts
        assert span.logprobs is not None
        return LikelihoodScore(span.logprobs, len(prompt.prompt), span.num_cached_tokens, rescored)


def single_token(chat: ChatPrompt, text: str, field: str, role: str, model: str) -> int:
    """The one token `text` is in the model's tokenizer; a recipe naming several is one line."""
    ids = chat.encode(text)
    if len(ids) != 1:
        pieces = [chat.tokenizer.decode([i]) for i in ids]
        raise ConfigError(
            f"{field}: {text!r} is {len(ids)} tokens of {model}'s tokenizer "
            f"({', '.join(map(repr, pieces))}); {role} must be one token"
        )
    return ids[0]


def verdict_token(chat: ChatPrompt, verdict: str, field: str, model: str) -> int:
    return single_token(chat, verdict, f"scorer.verifier.{field}", "a verdict", model)


def separator_token(chat: ChatPrompt, separator: str, model: str) -> int:
    return single_token(chat, separator, "scorer.prm.separator", "the separator", model)


def check_scorer_tokens(scorer: ScorerConfig, fmt: StepFormat) -> None:
    """Plan time, before any engine loads: each verdict is one token of the judge's tokenizer,
    and the PRM's separator one token of its own."""
    if "prm" in scorer.components:
        prm = scorer.prm
        if prm is None:
            kind = "prm" if scorer.kind == "prm" else "hybrid with prm"
            raise ConfigError(f"scorer.prm: kind {kind} needs a reward model (scorer.prm.engine, or --prm)")
        separator_token(
            ChatPrompt(load_tokenizer(prm.engine), prm.chat, fmt), prm.separator, prm.engine.model
        )
    if scorer.judge is None:
        return
    engine, chat = scorer.judge
    prompt = ChatPrompt(load_tokenizer(engine), chat, fmt)
    verdict_token(prompt, scorer.verifier.yes, "yes", engine.model)
    verdict_token(prompt, scorer.verifier.no, "no", engine.model)


class VerdictReading:
    """p(correct) from a judge: the verdict tokens after the trajectory and the question about
    its latest step. Both verdict prompts share everything but their last token."""

    kind = "verifier"

    def __init__(self, config: ScorerConfig, model: EngineModel, fmt: StepFormat) -> None:
        assert config.judge is not None
        self.settings, self.model = config.verifier, model
        self.chat = ChatPrompt(model.tokenizer, config.judge[1], fmt)
        self.verdicts = (
            verdict_token(self.chat, self.settings.yes, "yes", model.settings.model),
            verdict_token(self.chat, self.settings.no, "no", model.settings.model),
        )

    def prompt_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        question_text = self.settings.prompt.format(step=len(steps), latest=steps[-1] if steps else "")
        return self.chat.encode(self.chat.thinking_text(question, steps) + question_text)

    def spans(self, request: ScoreRequest) -> tuple[SpanRequest, ...] | None:
        ids = self.prompt_ids(request.question, request.steps)
        if not fits(self.model, ids + [0]):
            return None
        return tuple(SpanRequest(ids + [token], len(ids), request.route) for token in self.verdicts)

    def read(
        self, spans: Sequence[SpanLogprobs], prompts: Sequence[SpanRequest], rescored: bool
    ) -> VerdictScore:
        (yes,), (no,) = (span.logprobs for span in spans)  # type: ignore[misc]
        cached = sum(span.num_cached_tokens for span in spans)
        return VerdictScore(yes, no, sum(len(p.prompt) for p in prompts), cached, rescored)


class RewardReading:
    """p(correct) from a process reward model at the latest step's separator: the question as
    the user turn and, as the assistant's, each step's text (stripped) followed by the separator,
    as Qwen2.5-Math-PRM is prompted. The rewards at the earlier separators are the earlier
    steps', which their own rounds recorded."""

    kind = "prm"

    def __init__(self, config: ScorerConfig, model: EngineModel, fmt: StepFormat) -> None:
        assert config.prm is not None
        self.settings, self.model = config.prm, model
        self.chat = ChatPrompt(model.tokenizer, config.prm.chat, fmt)
        self.separator = separator_token(self.chat, config.prm.separator, model.settings.model)

    def prompt_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        return self.chat.encode(self.chat.reward_text(question, steps, self.settings.separator))

    def spans(self, request: ScoreRequest) -> tuple[RewardRequest, ...] | None:
        ids = self.prompt_ids(request.question, request.steps)
        if len(ids) > self.model.max_model_len:
            return None
        return (RewardRequest(ids, self.separator, self.settings.correct_label, request.route),)

    def read(
        self, spans: Sequence[StepRewards], prompts: Sequence[RewardRequest], rescored: bool
    ) -> RewardScore:
        (rewards,), (prompt,) = spans, prompts
        return RewardScore(rewards[-1], len(prompt.prompt))


def chunked(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


SpanKey = tuple[int, int, int]  # (request, reading, span of that reading)
Read = tuple[EngineAnswer, bool]  # the answer, and whether it was read again without cache reads


def merged_spans(
    spans: dict[SpanKey, SpanRequest],
) -> tuple[dict[SpanKey, SpanRequest], dict[SpanKey, SpanKey]]:
    """One request per candidate where one prompt holds another's (the likelihood kind's prompt
    starts the predictive kind's): the longer one is read from the earlier start, so the tokens
    are computed once and no cache read by a sibling request reaches into a span. Returns the
    requests to send, and for every span the request that serves it."""
    hosts: dict[SpanKey, SpanRequest] = {}
    host_of: dict[SpanKey, SpanKey] = {}
    of_candidate: dict[int, list[SpanKey]] = {}
    for key in sorted(spans, key=lambda k: (k[0], -len(spans[k].prompt))):
        prompt, mine = spans[key].prompt, of_candidate.setdefault(key[0], [])
        host = next((h for h in mine if hosts[h].prompt[: len(prompt)] == prompt), None)
        if host is None:
            hosts[key], host_of[key] = spans[key], key
            mine.append(key)
        else:
            hosts[host] = replace(hosts[host], start=min(hosts[host].start, spans[key].start))
            host_of[key] = host
    return {key: hosts[key] for key in spans if key in hosts}, host_of  # in the batch's order


def hosted_part(answer: SpanLogprobs, host: SpanRequest, span: SpanRequest, own: bool) -> SpanLogprobs:
    """A span's logprobs out of the request that served it. Another span's request computed its
    tokens, so none of them are counted as computed for it."""
    if answer.logprobs is None:
        return answer
    part = answer.logprobs[span.start - host.start : len(span.prompt) - host.start]
    return SpanLogprobs(part, answer.num_cached_tokens if own else len(span.prompt))


@dataclass(frozen=True)
class Weighted:
    reading: Reading
    weight: float


class EngineScorer:
    """Scores a batch with every reading it holds, all engines side by side. Per generating
    engine ONE pass of prompt-logprob calls (chunked to bound memory) with prefix-cache reads,
    then the few requests whose cached prefix reached into a read span again without them; per
    PRM engine ONE `step_rewards` call (a row per separator: nothing to bound)."""

    def __init__(self, config: ScorerConfig, readings: Sequence[Weighted]) -> None:
        self.name = config.name
        self.config = config
        self.readings = readings
        self.engines = list({id(r.reading.model): r.reading.model for r in readings}.values())
        self.reward_engines = {id(r.reading.model) for r in readings if isinstance(r.reading, RewardReading)}

    def _engine_pass(self, model: EngineModel, spans: dict[SpanKey, Any]) -> dict[SpanKey, Read]:
        """(answer, read again without cache reads) for every request one engine serves."""
        if id(model) in self.reward_engines:
            return {k: (r, False) for k, r in zip(spans, model.step_rewards(list(spans.values())))}
        hosts, host_of = merged_spans(spans)
        reuse = self.config.reuse_prefix_cache
        found = {k: (r, False) for k, r in self._run(model, hosts, list(hosts), reuse).items()}
        untrusted = [k for k, (r, _) in found.items() if r.logprobs is None]
        if untrusted and reuse:
            found.update({k: (r, True) for k, r in self._run(model, hosts, untrusted, False).items()})
        return {
            key: (hosted_part(found[host][0], hosts[host], spans[key], host == key), found[host][1])
            for key, host in host_of.items()
        }

    def _run(
        self, model: EngineModel, spans: dict[SpanKey, SpanRequest], keys: Sequence[SpanKey], read_cache: bool
    ) -> dict[SpanKey, SpanLogprobs]:
        results: dict[SpanKey, SpanLogprobs] = {}
        for chunk in chunked(range(len(keys)), self.config.max_requests_per_call):
            batch = [keys[i] for i in chunk]
            results.update(zip(batch, model.span_logprobs([spans[k] for k in batch], read_cache)))
        return results

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScore | None]:
        prepared: dict[int, list[tuple[EngineRequest, ...]]] = {}
        for i, request in enumerate(requests):
            spans = [r.reading.spans(request) for r in self.readings]
            if all(s is not None for s in spans):
                prepared[i] = spans  # type: ignore[assignment]
        by_engine: dict[int, dict[SpanKey, Any]] = {id(m): {} for m in self.engines}
        for i, spans in prepared.items():
            for j, (weighted, kind_spans) in enumerate(zip(self.readings, spans)):
                for k, span in enumerate(kind_spans):
                    by_engine[id(weighted.reading.model)][(i, j, k)] = span
        results: dict[SpanKey, Read] = {}
        with ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="cordgen-scorer") as pool:
            for found in pool.map(lambda m: self._engine_pass(m, by_engine[id(m)]), self.engines):
                results.update(found)
        if any(isinstance(r, SpanLogprobs) and r.logprobs is None for r, _ in results.values()):
            raise EngineError(f"scorer {self.name}: the engine returned incomplete prompt logprobs")
        return [
            self._combine(i, prepared[i], results) if i in prepared else None for i in range(len(requests))
        ]

    def _combine(
        self, i: int, spans: list[tuple[EngineRequest, ...]], results: dict[SpanKey, Read]
    ) -> StepScore:
        parts = []
        for j, (weighted, kind_spans) in enumerate(zip(self.readings, spans)):
            found = [results[(i, j, k)] for k in range(len(kind_spans))]
            rescored = any(again for _, again in found)
            parts.append(
                (weighted.weight, weighted.reading.read([r for r, _ in found], kind_spans, rescored))
            )
        return parts[0][1] if len(parts) == 1 and parts[0][0] == 1.0 else WeightedScore(tuple(parts))


class RandomScorer:
    """The ablation: a uniform score per trajectory, seeded by the run's seed, the question and the
    trajectory's text, so it never depends on the batch it came in."""

    def __init__(self, name: str, seed: int) -> None:
        self.name, self.seed = name, seed

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScore | None]:
        draws = [derive_seed(self.seed, r.question, *r.steps) for r in requests]
        return [RandomScore((draw + 1) / 2**31) for draw in draws]


def build_scorer(
    config: ScorerConfig, fmt: StepFormat, pool: EnginePool, seed: int = 0
) -> EngineScorer | RandomScorer:
    """The scorer a recipe names, its engines loaded (none for `random`)."""
    if config.kind == "random":
        return RandomScorer(config.name, seed)
    pool.load(config.engines())
    hybrid = config.kind == "hybrid"
    readings = []
    if "predictive" in config.components:
        readings.append(Weighted(PredictiveReading(config, pool.model(config.engine), fmt), 1.0))
    if "likelihood" in config.components:
        weight = config.likelihood_weight if hybrid else 1.0
        readings.append(Weighted(LikelihoodReading(config, pool.model(config.engine), fmt), weight))
    if config.judge is not None:
        weight = config.verifier_weight if hybrid else 1.0
        readings.append(Weighted(VerdictReading(config, pool.model(config.judge[0]), fmt), weight))
    if "prm" in config.components and config.prm is not None:
        weight = config.prm_weight if hybrid else 1.0
        readings.append(Weighted(RewardReading(config, pool.model(config.prm.engine), fmt), weight))
    return EngineScorer(config, readings)
