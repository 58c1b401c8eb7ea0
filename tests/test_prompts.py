"""Prompt-guided step segmentation with real tokenizers and chat templates."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cordgen.config import ChatSettings, StepFormat
from cordgen.errors import ConfigError
from cordgen.prompts import ChatPrompt, render_steps, split_answer_boundary, step_header, think_opener
from tests.tiny_models import CHATML, THINK_OPENING

FMT = StepFormat()
STEPS = (" 12 + 3 = 15\n", " 15 * 2 = 30\n")


def tokenizer(template: str) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["<think>\n### Step 1. 12 + 3 = 15\n</think> The final answer is 30.", "Start with 12. Add 3."]
    specials = ["<|im_end|>", "<|im_start|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    bpe.train_from_iterator(
        corpus * 5,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    fast.chat_template = template
    return fast


def test_steps_render_after_their_headers():
    assert step_header(FMT, 3) == "### Step 3."
    assert render_steps(FMT, STEPS) == "### Step 1. 12 + 3 = 15\n### Step 2. 15 * 2 = 30\n"


@pytest.mark.parametrize(
    ("prompt", "opener"),
    [
        ("<|im_start|>assistant\n", "<think>\n"),
        ("<|assistant|><think>\n", ""),
        ("<|assistant|><think>", "\n"),
    ],
)
def test_thinking_is_opened_once(prompt, opener):
    assert think_opener(FMT, prompt) == opener


def test_answer_boundary_moves_the_space_onto_the_answer():
    assert split_answer_boundary("</think> The final answer is ", " 42 ") == (
        "</think> The final answer is",
        " 42",
    )
    assert split_answer_boundary("Answer:", "42") == ("Answer:", "42")


def test_step_prompt_ends_at_the_next_header():
    chat = ChatPrompt(tokenizer(CHATML), ChatSettings(), FMT)
    ids = chat.step_prompt_ids("Start with 12. Add 3.", STEPS)
    text = chat.tokenizer.decode(ids)
    assert text == (
        "<|im_start|>user\nStart with 12. Add 3.<|im_end|>\n<|im_start|>assistant\n"
        "<think>\n### Step 1. 12 + 3 = 15\n### Step 2. 15 * 2 = 30\n### Step 3."
    )


def test_template_that_opens_thinking_gets_no_second_think_tag():
    chat = ChatPrompt(tokenizer(THINK_OPENING), ChatSettings(system_prompt="Be brief."), FMT)
    text = chat.tokenizer.decode(chat.step_prompt_ids("Q?", ()))
    assert text == "<|system|>Be brief.<|end|><|user|>Q?<|end|><|assistant|><think>\n### Step 1."
    answer_text = chat.tokenizer.decode(chat.answer_prompt_ids("Q?", STEPS))
    assert answer_text.endswith("### Step 2. 15 * 2 = 30\n</think>")
    assert answer_text.count("<think>") == 1


def test_scoring_ids_split_exactly_at_the_answer():
    chat = ChatPrompt(tokenizer(CHATML), ChatSettings(), FMT)
    context, answer = chat.scoring_ids("Q?", STEPS, "</think> The final answer is ", "30")
    assert chat.tokenizer.decode(context).endswith("15 * 2 = 30\n</think> The final answer is")
    assert chat.tokenizer.decode(answer) == " 30"


def test_chat_template_override_from_file_or_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    for value in (str(path), path.read_text()):
        chat = ChatPrompt(tokenizer(CHATML), ChatSettings(chat_template=value), FMT)
        assert chat.generation_prompt("Q?") == "[Q?]"
    with pytest.raises(ConfigError, match="neither a template nor an existing file"):
        ChatPrompt(tokenizer(CHATML), ChatSettings(chat_template=str(tmp_path / "missing.jinja")), FMT)
