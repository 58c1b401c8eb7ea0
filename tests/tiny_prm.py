"""A tiny process reward model built on the fly: the demo PRM's layout
(`benchmarks/demo_models/reward_model.py`: Qwen2.5-Math-PRM's `Qwen2ForProcessRewardModel`, a
Qwen2 body, then Linear(h, h), ReLU, Linear(h, 2) at every token) with random weights, so only
the arithmetic is tested, never what it rewards.

Its tokenizer is a tiny teacher's BPE with the step separator added as one special token. head_dim
is 64 because vLLM's CPU attention kernel rejects smaller heads.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Qwen2Config

from tests.tiny_models import SPECS, Problem, build_tokenizer, model_config, render_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "demo_models"))

from reward_model import ARCHITECTURE, RewardModel, save_reward_model  # noqa: E402

SEPARATOR = "<extra_0>"


def build_tiny_prm(out: Path, problems: list[Problem], seed: int = 5) -> Path:
    spec = SPECS["alpha"]
    tokenizer = build_tokenizer(spec, [render_trace(spec, p) for p in problems] * 4)
    tokenizer.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
    config = model_config(replace(spec, architecture="qwen2"), tokenizer)
    config.architectures = [ARCHITECTURE]
    config.num_labels = 2
    torch.manual_seed(seed)
    save_reward_model(RewardModel(config), tokenizer, out)
    tokenizer.save_pretrained(out)  # also beside the weights: the tests serve the folder as it is
    return out


def reference_rewards(model_dir: str, ids: list[int], separator: int) -> list[float]:
    """p(class 1) at each separator, by a torch forward pass of the same layout."""
    model = RewardModel(Qwen2Config.from_pretrained(model_dir))
    model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")))
    with torch.no_grad():
        probabilities = model(torch.tensor([ids])).logits[0].softmax(-1)[:, 1]
    return [probabilities[i].item() for i, token in enumerate(ids) if token == separator]
