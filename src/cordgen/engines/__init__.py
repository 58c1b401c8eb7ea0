"""What the search asks of engines, independent of where they run (in a worker process, in Ray
actors across a cluster, behind a `vllm serve` URL).

A teacher proposes next steps and writes final answers (`StepCandidate`, `FinalAnswer`, types
the controller owns in `cordgen.search`); a scorer reads how likely a trajectory makes the gold
answer. Every call takes a whole batch: the controller never loops around them.
Below the roles, an `EngineModel` does seeded sampling and prompt logprobs over a span (a
generating engine), or reads a reward head at step separators (a pooling engine), on prompts
given as token ids that the roles build with the model's own tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cordgen.errors import EngineError
from cordgen.search import FinalAnswer, StepCandidate
from cordgen.seeds import derive_seed as derive_seed  # re-exported: engines seed their sampling with it

SeedKey = tuple[str | int, ...]


@dataclass(frozen=True)
class ProposeRequest:
    question: str
    steps: tuple[str, ...]
    n: int = 1
    seed_key: SeedKey = ()
    route: str = ""  # the problem's id: its requests go to the engine replica that holds its prefixes


@dataclass(frozen=True)
class AnswerRequest:
    question: str
    steps: tuple[str, ...]
    seed_key: SeedKey = ()
    route: str = ""


@dataclass(frozen=True)
class ScoreRequest:
    """A trajectory (the candidate step is its last step) and the gold answer to read."""

    question: str
    steps: tuple[str, ...]
    answer: str
    route: str = ""


class StepScore(Protocol):
    """What any step scorer says of one trajectory: `score` ranks it, in (0, 1]; `components`
    holds each kind's own value (a hybrid reads several); the token counts are its cost."""

    @property
    def score(self) -> float: ...

    @property
    def components(self) -> dict[str, float]: ...

    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache, not recomputed


@dataclass(frozen=True)
class AnswerScore:
    """The paper's predictive score S = exp(mean log p(answer tokens | context))."""

    answer_logprobs: tuple[float, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    rescored: bool = False  # the cache reached into the answer span, so it was scored again

    @property
    def mean_logprob(self) -> float:
        return math.fsum(self.answer_logprobs) / len(self.answer_logprobs)

    @property
    def score(self) -> float:
        return math.exp(self.mean_logprob)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean_logprob)

    @property
    def components(self) -> dict[str, float]:
        return {"predictive": self.score}


@dataclass(frozen=True)
class LikelihoodScore:
    """The scorer's confidence in the latest step: exp(mean log p(step tokens | the trajectory
    before it)). A step with no tokens scores 0: there is nothing to be confident in."""

    step_logprobs: tuple[float, ...]
    num_prompt_tokens: int
    num_cached_tokens: int
    rescored: bool = False

    @property
    def score(self) -> float:
        if not self.step_logprobs:
            return 0.0
        return math.exp(math.fsum(self.step_logprobs) / len(self.step_logprobs))

    @property
    def components(self) -> dict[str, float]:
        return {"likelihood": self.score}


@dataclass(frozen=True)
class VerdictScore:
    """A judge's p(correct) = p(yes) / (p(yes) + p(no)) for the trajectory's latest step, from the
    logprobs of the two verdict tokens after the same prompt."""

    yes_logprob: float
    no_logprob: float
    num_prompt_tokens: int
    num_cached_tokens: int
    rescored: bool = False

    @property
    def log_score(self) -> float:
        high = max(self.yes_logprob, self.no_logprob)  # log-sum-exp without underflow
        total = high + math.log(math.exp(self.yes_logprob - high) + math.exp(self.no_logprob - high))
        return self.yes_logprob - total

    @property
    def score(self) -> float:
        return math.exp(self.log_score)

    @property
    def components(self) -> dict[str, float]:
        return {"verifier": self.score}


@dataclass(frozen=True)
class RandomScore:
    """The ablation: a seeded uniform draw in (0, 1) that knows nothing of the trajectory."""

    score: float
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def components(self) -> dict[str, float]:
        return {"random": self.score}


@dataclass(frozen=True)
class RewardScore:
    """A process reward model's p(correct) at the separator after the trajectory's latest step.
    Its engine reads the whole prompt each time (vLLM's token-wise pooling skips prefix-cache
    reads), so none of it counts as cached."""

    p_correct: float
    num_prompt_tokens: int
    num_cached_tokens: int = 0

    @property
    def score(self) -> float:
        return self.p_correct

    @property
    def components(self) -> dict[str, float]:
        return {"prm": self.p_correct}


@dataclass(frozen=True)
class WeightedScore:
    """Several kinds on a common log scale: log score = sum of weight * log(part's score)."""

    parts: tuple[tuple[float, AnswerScore | LikelihoodScore | VerdictScore | RewardScore], ...]

    @property
    def score(self) -> float:
        return math.exp(math.fsum(w * math.log(max(p.score, 1e-300)) for w, p in self.parts))

    @property
    def components(self) -> dict[str, float]:
        return {kind: value for _, part in self.parts for kind, value in part.components.items()}

    @property
    def num_prompt_tokens(self) -> int:  # type: ignore[override]
        return sum(part.num_prompt_tokens for _, part in self.parts)

    @property
    def num_cached_tokens(self) -> int:  # type: ignore[override]
        return sum(part.num_cached_tokens for _, part in self.parts)


class Teacher(Protocol):
    name: str

    def propose(self, requests: Sequence[ProposeRequest]) -> list[list[StepCandidate]]: ...

    def solve(self, requests: Sequence[ProposeRequest], max_tokens: int) -> list[list[StepCandidate]]: ...

    def answer(self, requests: Sequence[AnswerRequest]) -> list[FinalAnswer]: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


class Scorer(Protocol):
    name: str

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScore | None]:
        """None where a scoring prompt does not fit a scorer engine's context window."""
        ...


@dataclass(frozen=True)
class SampleRequest:
    """One seeded sample: its seed alone decides it, whatever else shares the engine call."""

    prompt: list[int]
    max_tokens: int
    seed: int
    temperature: float
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    route: str = ""  # which replica serves it, where an engine has several; never what it samples


@dataclass(frozen=True)
class SpanRequest:
    """Prompt logprobs of `prompt[start:]`: the scorer's one kind of engine request."""

    prompt: list[int]
    start: int
    route: str = ""


@dataclass(frozen=True)
class RewardRequest:
    """A trajectory rendered for a process reward model: its head is read at every `separator`
    token of `prompt`, and `label` is the class that means correct."""

    prompt: list[int]
    separator: int
    label: int = 1
    route: str = ""


StepRewards = tuple[float, ...]  # p(correct) at each separator of a RewardRequest's prompt


@dataclass(frozen=True)
class Sample:
    text: str  # without the stop string
    num_tokens: int  # tokens decoded, the stop string's included
    stop_string: str | None  # the stop string that ended it, None at EOS or the token limit
    truncated: bool  # hit max_tokens


@dataclass(frozen=True)
class SpanLogprobs:
    """log p(prompt[i] | prompt[:i]) for every i from the span's start, or None when an engine
    could not vouch for them (positions served from the prefix cache carry placeholders)."""

    logprobs: tuple[float, ...] | None
    num_cached_tokens: int


def read_span(
    prompt: list[int],
    start: int,
    cached: int,
    positions: int | None,
    logprob_at: Callable[[int, int], float | None],
) -> SpanLogprobs:
    """The span's logprobs, or None when any of them cannot be trusted: the engine returned
    `positions` entries instead of one per prompt token, or a token's logprob is missing, or the
    prefix cache reached into the span (vLLM returns placeholders, arbitrary token ids with
    logprob 0.0, for every position up to and including `cached`: their logits were never
    computed). `logprob_at(position, token)` reads one entry."""
    if cached >= start or positions != len(prompt):
        return SpanLogprobs(None, cached)
    logprobs = []
    for position in range(start, len(prompt)):
        found = logprob_at(position, prompt[position])
        if found is None:
            return SpanLogprobs(None, cached)
        logprobs.append(found)
    return SpanLogprobs(tuple(logprobs), cached)


def read_rewards(request: RewardRequest, rows: Sequence[Sequence[float]], engine: str) -> StepRewards:
    """p(label) by a softmax over each separator's class logits. One row per separator token,
    or the engine read its head elsewhere: a server started without our separator as its
    pooler's step_tag_id (vLLM defaults to Qwen's `<extra_0>`, 151651)."""
    expected = request.prompt.count(request.separator)
    if len(rows) != expected:
        raise EngineError(
            f"{engine}: {len(rows)} rewards for {expected} separators (token {request.separator}); "
            f"start vllm serve with --pooler-config '{{\"step_tag_id\": {request.separator}}}'"
        )
    rewards = []
    for logits in rows:
        if not 0 <= request.label < len(logits):
            raise EngineError(
                f"{engine}: correct_label {request.label}, but the head has {len(logits)} classes"
            )
        high = max(logits)
        total = math.fsum(math.exp(value - high) for value in logits)
        rewards.append(math.exp(logits[request.label] - high) / total)
    return tuple(rewards)


class EngineModel(Protocol):
    """One loaded model, wherever it runs; roles that name equal settings share it."""

    settings: Any
    tokenizer: Any
    max_model_len: int

    def sample(self, requests: Sequence[SampleRequest]) -> list[Sample]: ...

    def span_logprobs(self, requests: Sequence[SpanRequest], read_cache: bool) -> list[SpanLogprobs]: ...

    def step_rewards(self, requests: Sequence[RewardRequest]) -> list[StepRewards]:
        """A pooling engine's p(correct) at each separator, per request; one batch."""
        ...

    def reset_prefix_cache(self) -> None: ...

    def shutdown(self) -> None: ...
