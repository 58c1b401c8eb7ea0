"""A tiny process reward model built on the fly: Qwen2.5-Math-PRM's architecture
(`Qwen2ForProcessRewardModel`: a Qwen2 body, then Linear(h, h), ReLU, Linear(h, 2) at every
token) with random weights, so only the arithmetic is tested, never what it rewards.

Its tokenizer is a tiny teacher's BPE with the step separator added as one special token; the
weights are written as safetensors under the names vLLM's loader maps (`model.*`, `score.0.*`,
`score.2.*`). head_dim is 64 because vLLM's CPU attention kernel rejects smaller heads.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2Model

from tests.tiny_models import SPECS, Problem, build_tokenizer, model_config, render_trace

SEPARATOR = "<extra_0>"


def prm_head(hidden: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))


def build_tiny_prm(out: Path, problems: list[Problem], seed: int = 5) -> Path:
    spec = SPECS["alpha"]
    tokenizer = build_tokenizer(spec, [render_trace(spec, p) for p in problems] * 4)
    tokenizer.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
    config = model_config(replace(spec, architecture="qwen2"), tokenizer)
    config.architectures = ["Qwen2ForProcessRewardModel"]
    config.num_labels = 2
    torch.manual_seed(seed)
    body = Qwen2Model(config)
    head = prm_head(config.hidden_size, seed + 1)
    weights = {f"model.{k}": v for k, v in body.state_dict().items()}
    weights |= {f"score.{k}": v for k, v in head.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reference_rewards(model_dir: str, ids: list[int], separator: int) -> list[float]:
    """p(class 1) at each separator, by transformers' Qwen2Model and the head computed by hand."""
    from safetensors.torch import load_file

    config = Qwen2Config.from_pretrained(model_dir)
    weights = load_file(str(Path(model_dir) / "model.safetensors"))
    body = Qwen2Model(config)
    body.load_state_dict({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")})
    head = prm_head(config.hidden_size, 0)
    head.load_state_dict({k.removeprefix("score."): v for k, v in weights.items() if k.startswith("score.")})
    with torch.no_grad():
        hidden = body(torch.tensor([ids])).last_hidden_state[0]
        probabilities = head(hidden).softmax(-1)[:, 1]
    return [probabilities[i].item() for i, token in enumerate(ids) if token == separator]
