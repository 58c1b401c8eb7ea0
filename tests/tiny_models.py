"""Tiny teachers built on the fly: no downloads, a few seconds each.

Each gets its own BPE tokenizer (trained with `tokenizers`) and chat template, random weights,
then a few hundred steps of training on a handful of step-formatted traces so that greedy
decoding reproduces them: that makes step markers, `</think>` and EOS real model outputs.
head_dim is 64 because vLLM's CPU attention kernel rejects smaller heads.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

# The chat templates are the demo teachers' (ChatML, and one that opens <think> itself).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "demo_models"))
from tokenizers_and_templates import CHATML, THINK_OPENING  # noqa: E402


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[str, ...]  # each step's text after its `### Step k.` header
    answer: str

    @property
    def final_text(self) -> str:
        return f" The final answer is {self.answer}."


def make_problems(count: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    problems = []
    for _ in range(count):
        value = rng.randint(10, 99)
        ops, steps = [], []
        for _ in range(rng.randint(2, 3)):
            op, operand = rng.choice(["add", "multiply by", "subtract"]), rng.randint(2, 9)
            result = {"add": value + operand, "multiply by": value * operand, "subtract": value - operand}[op]
            symbol = {"add": "+", "multiply by": "*", "subtract": "-"}[op]
            ops.append(f"{op} {operand}")
            steps.append(f" {value} {symbol} {operand} = {result}\n")
            value = result
        question = f"Start with {steps[0].split()[0]}. " + ", ".join(ops).capitalize() + "."
        problems.append(Problem(question, tuple(steps), str(value)))
    return problems


@dataclass(frozen=True)
class TinySpec:
    name: str
    architecture: str  # "llama" or "qwen2"
    vocab_size: int
    special: tuple[str, ...]  # eos first
    chat_template: str
    seed: int


SPECS = {
    "alpha": TinySpec("alpha", "llama", 420, ("<|im_end|>", "<|im_start|>", "<|pad|>"), CHATML, 1),
    "beta": TinySpec(
        "beta",
        "qwen2",
        300,
        ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>"),
        THINK_OPENING,
        2,
    ),
}


def render_trace(spec: TinySpec, problem: Problem) -> str:
    """The whole conversation a teacher is trained on, in its own chat template."""
    prompt = jinja2.Template(spec.chat_template).render(
        messages=[{"role": "user", "content": problem.question}], add_generation_prompt=True
    )
    opener = "" if prompt.endswith("<think>\n") else "<think>\n"
    steps = "".join(f"### Step {i}.{s}" for i, s in enumerate(problem.steps, start=1))
    return prompt + opener + steps + "</think>" + problem.final_text + spec.special[0]


def build_tokenizer(spec: TinySpec, corpus: list[str]) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=spec.special[0], pad_token=spec.special[-1]
    )
    tokenizer.chat_template = spec.chat_template
    return tokenizer


def model_config(spec: TinySpec, tokenizer):
    config_class = LlamaConfig if spec.architecture == "llama" else Qwen2Config
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def train(model, tokenizer, texts: list[str], steps: int) -> float:
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def build_tiny_model(name: str, out: Path, problems: list[Problem], train_steps: int = 300) -> Path:
    """Builds, trains and saves one tiny teacher. Training reloads the tokenizer through
    AutoTokenizer, which picks its class by architecture, so it sees the ids vLLM will see."""
    spec = SPECS[name]
    torch.manual_seed(spec.seed)
    texts = [render_trace(spec, p) for p in problems]
    fast = build_tokenizer(spec, texts * 4)
    config = model_config(spec, fast)
    fast.save_pretrained(out)
    config.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    train(model, tokenizer, texts, train_steps)
    model.save_pretrained(out)
    return out
