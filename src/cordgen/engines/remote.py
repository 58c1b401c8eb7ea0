"""An engine behind an OpenAI-compatible vLLM server (`vllm serve`), reached by URL.

Prompts go as token ids built with our copy of the model's tokenizer, which is checked against
the server's at connect time. Every sample is its own request, so its seed alone decides it
(a multi-prompt request would share one seed); the requests of one call are all in flight at
once, up to `max_concurrent_requests`, and the server batches them. The API key is read from the
environment when the engine connects and lives only in this client's headers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from cordgen.config import EngineSettings, RemoteEndpoint
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
from cordgen.engines.tokenizers import load_tokenizer
from cordgen.errors import ConfigError, EngineError

RETRIED_STATUS = {502, 503, 504}
BACKOFF_CAP_S = 30.0  # a long max_retries waits at most this between two tries
TOKENIZER_PROBE = "<think>\n### Step 1. 12 + 7 = 19\n</think> The final answer is 19"


def server_root(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


def auth_headers(endpoint: RemoteEndpoint) -> dict[str, str]:
    if endpoint.api_key_env is None:
        return {}
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise ConfigError(
            f"remote engine {endpoint.url}: environment variable {endpoint.api_key_env} is not set"
        )
    return {"Authorization": f"Bearer {key}"}


def error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:200]


class RemoteModel:
    def __init__(self, settings: EngineSettings) -> None:
        assert settings.remote is not None
        self.settings = settings
        self.endpoint = settings.remote
        self.name = f"remote engine {self.endpoint.url}"
        limits = httpx.Limits(max_connections=self.endpoint.max_concurrent_requests)
        self._client = httpx.Client(
            base_url=server_root(self.endpoint.url),
            headers=auth_headers(self.endpoint),
            timeout=self.endpoint.timeout_s,
            limits=limits,
        )
        self._requests = ThreadPoolExecutor(self.endpoint.max_concurrent_requests, "cordgen-remote")
        self._closed = threading.Event()
        try:
            self.served_model, server_len = self._served_model()
            self.max_model_len = min(server_len, settings.max_model_len or server_len)
            self.tokenizer = load_tokenizer(settings)
            self._check_tokenizer()
        except BaseException:
            self.shutdown()
            raise

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._send("POST", path, payload)

    def _send(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Retries lost connections and overloaded-server answers with backoff; any other
        failure is one line naming the server."""
        for attempt in range(self.endpoint.max_retries + 1):
            retry = attempt < self.endpoint.max_retries
            try:
                response = self._client.request(method, path, json=payload)
            except httpx.TransportError as error:
                if retry and self._backed_off(attempt):
                    continue
                raise EngineError(f"{self.name}: {type(error).__name__}: {error}") from None
            if response.status_code in RETRIED_STATUS and retry and self._backed_off(attempt):
                continue
            if response.status_code != 200:
                raise EngineError(
                    f"{self.name}: {method} {path} answered {response.status_code}: {error_message(response)}"
                )
            return response.json()
        raise AssertionError("unreachable")

    def _backed_off(self, attempt: int) -> bool:
        """Waits 1, 2, 4, ... s (at most BACKOFF_CAP_S) before retry `attempt + 1`; False, at once,
        when the engine is shut down meanwhile (cordgen is stopping: no more retries)."""
        return not self._closed.wait(min(2.0**attempt, BACKOFF_CAP_S))

    def _served_model(self) -> tuple[str, int]:
        models = self._send("GET", "/v1/models").get("data", [])
        wanted = self.endpoint.served_model_name
        if wanted is None and len(models) == 1:
            wanted = models[0]["id"]
        for model in models:
            if model["id"] == wanted:
                return wanted, int(model["max_model_len"])
        names = ", ".join(m["id"] for m in models) or "none"
        raise EngineError(f"{self.name}: serves {names}; set remote.served_model_name to one of them")

    def _check_tokenizer(self) -> None:
        """Token-id prompts only mean the same thing when both sides tokenize alike."""
        ours = self.tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        payload = {"model": self.served_model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False}
        theirs = self._post("/tokenize", payload)["tokens"]
        if ours != theirs:
            local = self.settings.tokenizer or self.settings.model
            raise EngineError(
                f"{self.name}: the server's tokenizer differs from {local} "
                "(engine.model / engine.tokenizer must name the served model's tokenizer)"
            )

    def _map(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self._requests.map(lambda p: self._post("/v1/completions", p), payloads))

    def sample(self, requests: Sequence[SampleRequest]) -> list[Sample]:
        payloads = [
            {
                "model": self.served_model,
                "prompt": r.prompt,
                "max_tokens": r.max_tokens,
                "seed": r.seed,
                "temperature": r.temperature,
                "top_p": r.top_p,
                **({"top_k": r.top_k} if r.top_k else {}),
                "stop": list(r.stop),
                "skip_special_tokens": False,
                "return_token_ids": True,
            }
            for r in requests
        ]
        samples = []
        for body in self._map(payloads):
            choice = body["choices"][0]
            stop = choice.get("stop_reason")
            token_ids = choice.get("token_ids")
            samples.append(
                Sample(
                    text=choice["text"],
                    num_tokens=len(token_ids)
                    if token_ids is not None
                    else body["usage"]["completion_tokens"],
                    stop_string=stop if isinstance(stop, str) else None,
                    truncated=choice.get("finish_reason") == "length",
                )
            )
        return samples

    def span_logprobs(self, requests: Sequence[SpanRequest], read_cache: bool) -> list[SpanLogprobs]:
        """The server decides prefix-cache reads itself (vLLM 0.32 skips them for prompt-logprob
        requests); the cached count it reports (`--enable-prompt-tokens-details`) is checked."""
        payloads = [
            {
                "model": self.served_model,
                "prompt": r.prompt,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": 0,
            }
            for r in requests
        ]
        return [read_remote_span(body, r.start, r.prompt) for body, r in zip(self._map(payloads), requests)]

    def step_rewards(self, requests: Sequence[RewardRequest]) -> list[StepRewards]:
        """vLLM serve's `/pooling`, token ids in, one row of class logits per separator out. The
        server's pooler config decides where it reads (`step_tag_id`); `read_rewards` checks that
        it read at our separators."""
        payloads = [
            {"model": self.served_model, "input": r.prompt, "task": "token_classify", "use_activation": False}
            for r in requests
        ]
        bodies = list(self._requests.map(lambda p: self._post("/pooling", p), payloads))
        return [read_rewards(r, body["data"][0]["data"], self.name) for body, r in zip(bodies, requests)]

    def reset_prefix_cache(self) -> None:
        """Needs a server started with VLLM_SERVER_DEV_MODE=1 (benchmarks only)."""
        self._post("/reset_prefix_cache", {})

    def shutdown(self) -> None:
        self._closed.set()
        self._requests.shutdown(wait=True, cancel_futures=True)
        self._client.close()


def read_remote_span(body: dict[str, Any], start: int, prompt: list[int]) -> SpanLogprobs:
    """Prompt logprobs as JSON: one entry per position, keyed by the token id as a string."""
    details = body.get("usage", {}).get("prompt_tokens_details") or {}
    entries = body["choices"][0].get("prompt_logprobs")

    def logprob_at(position: int, token: int) -> float | None:
        found = (entries[position] or {}).get(str(token))
        return None if found is None else float(found["logprob"])

    positions = None if entries is None else len(entries)
    return read_span(prompt, start, int(details.get("cached_tokens") or 0), positions, logprob_at)
