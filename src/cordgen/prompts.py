"""Prompt-guided step segmentation (the paper's Sec. 3): text in, token ids out.

The assistant turn is forced to open with `<think>\\n### Step 1.` and every partial trajectory
is written back as the assistant's own unfinished output, ending with the next marker, so one
generation call yields exactly one step. Each model renders its own chat template, so
heterogeneous teachers see the same trajectory in their own format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Protocol

from cordgen.config import ChatSettings, StepFormat
from cordgen.templates import load_chat_template


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def step_header(fmt: StepFormat, index: int) -> str:
    """The marker that opens step `index` (1-based), e.g. `### Step 3.`."""
    return f"{fmt.marker} {index}."


def render_steps(fmt: StepFormat, steps: Sequence[str]) -> str:
    """The thinking so far; each step's text is what followed its header, verbatim."""
    return "".join(step_header(fmt, i) + text for i, text in enumerate(steps, start=1))


def split_trace(fmt: StepFormat, text: str) -> tuple[tuple[str, ...], str | None]:
    """A whole generated trace (continuing after `### Step 1.`) as (step texts, answer text);
    the answer is None when thinking never closed."""
    thinking, closed, answer = text.partition(fmt.think_close)
    pattern = re.escape(fmt.marker) + r" \d+\."
    steps = tuple(re.split(pattern, thinking))
    return steps, (answer if closed else None)


def think_opener(fmt: StepFormat, generation_prompt: str) -> str:
    """What the assistant turn still needs to open thinking: templates such as QwQ's or
    DeepSeek-R1's already end their generation prompt with `<think>`, and must not get two."""
    if generation_prompt.endswith(fmt.think_open + "\n"):
        return ""
    if generation_prompt.endswith(fmt.think_open):
        return "\n"
    return fmt.think_open + "\n"


def split_answer_boundary(suffix: str, answer: str) -> tuple[str, str]:
    """Moves the suffix's trailing whitespace onto the answer: `... is ` + `42` is scored as
    `... is` + ` 42`, the tokens a BPE model actually writes, rather than a lone space token."""
    stripped = suffix.rstrip()
    return stripped, suffix[len(stripped) :] + answer.strip()


class ChatPrompt:
    """Renders and tokenizes one model's prompts for a shared step format."""

    def __init__(self, tokenizer: ChatTokenizer, chat: ChatSettings, fmt: StepFormat) -> None:
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.system_prompt = chat.system_prompt
        self.chat_template = load_chat_template(chat.chat_template)
        self.generation_prompt = lru_cache(maxsize=65536)(self._generation_prompt)

    def _generation_prompt(self, question: str) -> str:
        return self._render([{"role": "user", "content": question}], add_generation_prompt=True)

    def conversation_text(self, question: str, reply: str) -> str:
        """The whole exchange with the assistant's reply closed, as a reward model reads it."""
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return self._render(messages, add_generation_prompt=False)

    def reward_text(self, question: str, steps: Sequence[str], separator: str) -> str:
        """A trajectory as a process reward model reads it (Qwen2.5-Math-PRM's prompting): the
        question as the user turn, each step stripped and followed by the separator as the reply."""
        return self.conversation_text(question, "".join(step.strip() + separator for step in steps))

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.system_prompt is not None:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def thinking_text(self, question: str, steps: Sequence[str]) -> str:
        prompt = self.generation_prompt(question)
        return prompt + think_opener(self.fmt, prompt) + render_steps(self.fmt, steps)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def step_prompt_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        """Prompt whose continuation is step len(steps)+1."""
        text = self.thinking_text(question, steps) + step_header(self.fmt, len(steps) + 1)
        return self.encode(text)

    def answer_prompt_ids(self, question: str, steps: Sequence[str]) -> list[int]:
        """Prompt whose continuation is the final answer after thinking closes."""
        return self.encode(self.thinking_text(question, steps) + self.fmt.think_close)

    def scoring_ids(
        self, question: str, steps: Sequence[str], suffix: str, answer: str
    ) -> tuple[list[int], list[int]]:
        """(context ids, answer ids); the answer span is exact because the two are joined as ids."""
        suffix_text, answer_text = split_answer_boundary(suffix, answer)
        context = self.encode(self.thinking_text(question, steps) + suffix_text)
        return context, self.encode(answer_text)
