"""Reading prompt logprobs from an engine's answer: a logprob is used only when it was computed."""

from __future__ import annotations

import pytest

from cordgen.engines.remote import read_remote_span


def body(entries, cached=0) -> dict:
    return {
        "choices": [{"prompt_logprobs": entries}],
        "usage": {"prompt_tokens_details": {"cached_tokens": cached}},
    }


PROMPT = [5, 6, 7, 8]
ENTRIES = [None, {"6": {"logprob": -1.0}}, {"7": {"logprob": -0.5}}, {"8": {"logprob": -0.25}}]


def test_the_span_from_its_start_to_the_prompt_end():
    span = read_remote_span(body(ENTRIES, cached=1), 2, PROMPT)
    assert span.logprobs == pytest.approx((-0.5, -0.25)) and span.num_cached_tokens == 1


@pytest.mark.parametrize(
    ("entries", "cached"),
    [
        (ENTRIES, 2),  # the prefix cache reached the span: placeholders there
        (ENTRIES[:3], 0),  # one entry short
        ([*ENTRIES[:3], {"0": {"logprob": 0.0}}], 0),  # the prompt token is missing
        (None, 0),  # no prompt logprobs at all
    ],
)
def test_an_untrustworthy_span_is_none(entries, cached):
    assert read_remote_span(body(entries, cached), 2, PROMPT).logprobs is None
