"""Per-teacher tokenizers and chat templates, and the model shape they all share.

Heterogeneous teachers are the point of CoRD, so every teacher gets its own vocabulary (its own
pieces, special tokens and id order) and its own chat template; the step text is the same for all.

Tokenizers are WordLevel over a regex split: one token per digit (so arithmetic is visible
digit by digit), a few multi-character pieces as single tokens, every other ASCII character a
token of its own, joined back by a Fuse decoder, so decoding is exact. No piece crosses a place
where cordgen cuts text (after `### Step k.`, before `### Step`, after `</think>`, between
`... answer is` and ` 42`: cordgen's scorer moves that space onto the answer), so text
tokenized in pieces gives the same ids as tokenized whole. `<think>` and `</think>` are ordinary
tokens: cordgen's stop strings must see them in the detokenized text.

The architecture is Llama: transformers 5 (and vLLM) load a Qwen2 directory with Qwen2's own
tokenizer class whatever `tokenizer.json` says, which re-tokenizes a WordLevel vocabulary into
garbage; Llama directories keep the tokenizer they ship.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

MAX_LENGTH = 256
CHARS = ("\n", *(chr(c) for c in range(32, 127)))
STEP_PIECES = ("<think>", "</think>", "### Step ", " + ", " - ", " * ", " = ", " The final answer is")
WORD_PIECES = ("Start with ", "Add ", "Subtract ", "Multiply by ", "add ", "subtract ", "multiply by ", ", ")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Opens thinking itself, as QwQ's and DeepSeek-R1's templates do.
THINK_OPENING = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
# Mistral-like: a BOS token written by the template, no generation prompt at all.
INST = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Style:
    """One tokenizer and chat template. `order` lays out the vocabulary: groups of specials,
    pieces and characters, so the same string gets different ids in different styles."""

    specials: tuple[str, ...]
    pieces: tuple[str, ...]
    order: tuple[str, str, str]
    template: str
    eos: str
    pad: str
    unk: str
    bos: str | None = None


CHATML_STYLE = Style(
    specials=("<|im_start|>", "<|im_end|>", "<|pad|>", "<|unk|>"),
    pieces=STEP_PIECES + WORD_PIECES + ("user", "assistant"),
    order=("specials", "pieces", "chars"),
    template=CHATML,
    eos="<|im_end|>",
    pad="<|pad|>",
    unk="<|unk|>",
)

STYLES = {
    "chatml": CHATML_STYLE,
    # ChatML with the verifier's verdict tokens, cordgen's defaults, one token each
    "verdicts": replace(CHATML_STYLE, pieces=(*CHATML_STYLE.pieces, " Yes", " No")),
    # ChatML with Qwen2.5-Math-PRM's step separator (cordgen's default) as one token
    "rewards": replace(CHATML_STYLE, specials=(*CHATML_STYLE.specials, "<extra_0>")),
    "tags": Style(  # ids laid out characters first, specials last
        specials=("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<unk>"),
        pieces=STEP_PIECES + WORD_PIECES,
        order=("chars", "pieces", "specials"),
        template=THINK_OPENING,
        eos="<|end|>",
        pad="<|end|>",
        unk="<unk>",
    ),
    "inst": Style(  # operators as bare characters, `### Step ` in two pieces
        specials=("<unk>", "<s>", "</s>"),
        pieces=("<think>", "</think>", "### ", "Step ", " The final answer is", "[INST]", "[/INST]")
        + WORD_PIECES,
        order=("specials", "chars", "pieces"),
        template=INST,
        eos="</s>",
        pad="<unk>",
        unk="<unk>",
        bos="<s>",
    ),
}


# Where a teacher's vocabulary has a string the clean model never saw, its embedding starts from
# the clean model's nearest equivalent; fine-tuning in the teacher's own style does the rest.
ALIASES = {
    "<|user|>": "user",
    "<|assistant|>": "assistant",
    "<|system|>": "<|im_start|>",
    "<|end|>": "<|im_end|>",
    "<unk>": "<|unk|>",
    "<s>": "<|im_start|>",
    "</s>": "<|im_end|>",
    "[INST]": "<|im_start|>",
    "[/INST]": "<|im_end|>",
    "### ": "### Step ",
    "Step ": "### Step ",
    " Yes": "Y",
    " No": "N",
    "<extra_0>": "\n",  # the separator ends a step where the newline did
}


def vocabulary(style: Style) -> list[str]:
    groups = {"specials": style.specials, "pieces": style.pieces, "chars": CHARS}
    return list(dict.fromkeys(token for group in style.order for token in groups[group]))


def build_tokenizer(style: Style) -> PreTrainedTokenizerFast:
    """Longest piece first in the split pattern, so `### Step ` wins over `### `."""
    vocab = {token: i for i, token in enumerate(vocabulary(style))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=style.unk))
    pieces = sorted(style.pieces, key=len, reverse=True)
    pattern = "|".join(["\\d", *(escape(p) for p in pieces), "[\\s\\S]"])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in style.specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=style.eos,
        pad_token=style.pad,
        unk_token=style.unk,
        bos_token=style.bos,
        model_max_length=MAX_LENGTH,
    )
    tokenizer.chat_template = style.template
    return tokenizer


def escape(piece: str) -> str:
    """Oniguruma escaping for the few metacharacters pieces contain."""
    return "".join("\\" + c if c in "[]()*+.|?^$\\{}" else c for c in piece)


def model_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """~0.87M parameters, 3.5 MB in fp32: trains in minutes on 2 CPU cores. head_dim 64 because
    vLLM's CPU attention kernel rejects smaller heads."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
