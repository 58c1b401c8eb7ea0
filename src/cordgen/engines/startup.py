"""Why an engine did not start, in one line: vLLM's own root cause, made short, and the fix
where it is known. The full traceback stays in the engine log."""

from __future__ import annotations

import re

# (vLLM's message, our line): the first pattern that matches the root cause's text wins.
KNOWN_CAUSES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"max_model_len \((\d+)\) is greater than the derived max_model_len \((\w+)=(\d+)"),
        "max_model_len {0} exceeds the model's {2} ({1}); lower max_model_len",
    ),
    (
        re.compile(r"No common block size for (\d+) \((.*)\)"),
        "block_size {0} is not supported by the attention backend ({1}); leave block_size unset",
    ),
    (
        re.compile(
            r"\(([\d.]+)/[\d.]+ GiB\) on startup is less than desired CPU memory utilization \(([\d.]+)"
        ),
        "{0} GiB of host memory is free, less than gpu_memory_utilization {1} asks for; leave "
        "gpu_memory_utilization unset (cordgen then sizes the KV cache from free memory) or set "
        "kv_cache_memory_bytes",
    ),
    (
        re.compile(r"is less than desired GPU memory utilization \(([\d.]+)"),
        "the GPU has less free memory than gpu_memory_utilization {0} asks for (another process "
        "holds it?); lower gpu_memory_utilization",
    ),
    (
        re.compile(r"No available memory for the cache blocks"),
        "no memory is left for the KV cache after the weights; raise kv_cache_memory_bytes or "
        "gpu_memory_utilization, or use more GPUs",
    ),
    (
        re.compile(r"max seq len \((\d+)\)"),
        "the KV cache cannot hold one {0}-token sequence; raise kv_cache_memory_bytes or "
        "gpu_memory_utilization, or lower max_model_len",
    ),
    (
        re.compile(r"(?:CUDA|HIP) out of memory"),
        "out of GPU memory while loading; lower max_model_len or gpu_memory_utilization, or raise "
        "tensor_parallel_size",
    ),
)


def root_message(error: BaseException) -> str:
    """The exception's text without pydantic's wrapping: a vLLM config error arrives as
    `1 validation error for ModelConfig\\n  Value error, ... [type=value_error, ...]`."""
    text = str(error)
    wrapped = re.search(r"Value error, (.*?)(?: \[type=|\n|$)", text)
    if wrapped:
        return wrapped.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def start_failure(error: BaseException) -> str:
    """One line for an engine that raised while starting: the first known cause in the error's
    chain, else the outermost error's type and first line."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for link in chain:
        message = root_message(link)
        for pattern, line in KNOWN_CAUSES:
            found = pattern.search(message)
            if found:
                return line.format(*found.groups())
    message = root_message(error)
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
