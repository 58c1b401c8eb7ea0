"""The demo process reward model's layout: Qwen2.5-Math-PRM's (`Qwen2ForProcessRewardModel`), so
that vLLM's pooling runner serves it as it serves the real one: a Qwen2 body, then Linear(h, h),
ReLU, Linear(h, 2) at every token, read at each step separator; class 1 is "right so far".

It starts from a demo causal LM (Llama: the same layers as Qwen2 but for Qwen2's q/k/v biases,
which start at zero), so it begins as a model that already reads the arithmetic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

ARCHITECTURE = "Qwen2ForProcessRewardModel"
TOKENIZER = "tokenizer"  # the subfolder the tokenizer is saved in


@dataclass
class RewardOutput:
    loss: torch.Tensor
    logits: torch.Tensor  # (batch, length, 2)


class RewardModel(torch.nn.Module):
    """Attribute names are the checkpoint's (`model.*`, `score.0.*`, `score.2.*`), as vLLM loads them."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        hidden = config.hidden_size
        self.score = torch.nn.Sequential(
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2)
        )

    @property
    def device(self) -> torch.device:
        return self.score[0].weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> RewardOutput:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.score(hidden)
        loss = torch.tensor(0.0)
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 2).float(), labels.reshape(-1))
        return RewardOutput(loss, logits)


def from_causal_lm(lm: LlamaForCausalLM) -> RewardModel:
    """The LM's body under Qwen2's names, zero q/k/v biases, a fresh head."""
    llama = lm.config
    config = Qwen2Config(
        vocab_size=llama.vocab_size,
        hidden_size=llama.hidden_size,
        intermediate_size=llama.intermediate_size,
        num_hidden_layers=llama.num_hidden_layers,
        num_attention_heads=llama.num_attention_heads,
        num_key_value_heads=llama.num_key_value_heads,
        head_dim=llama.head_dim,
        max_position_embeddings=llama.max_position_embeddings,
        rms_norm_eps=llama.rms_norm_eps,
        rope_parameters=llama.rope_parameters,
        tie_word_embeddings=False,
        bos_token_id=llama.bos_token_id,
        eos_token_id=llama.eos_token_id,
        pad_token_id=llama.pad_token_id,
        architectures=[ARCHITECTURE],
        num_labels=2,
    )
    model = RewardModel(config)
    missing, unexpected = model.model.load_state_dict(lm.model.state_dict(), strict=False)
    if unexpected or any(
        not name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for name in missing
    ):
        raise RuntimeError(f"the LM's body does not fit Qwen2's: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, parameter in model.model.named_parameters():
            if name in missing:
                parameter.zero_()
    return model


def save_reward_model(model: RewardModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    """Weights and config in `directory`, the tokenizer in `directory/tokenizer` (returned): a
    Qwen2 model directory gets transformers' own Qwen2Tokenizer whatever its tokenizer.json says,
    which splits the demo's text differently, so the engine is given the tokenizer's own folder
    (`engine.tokenizer`) and the model's folder holds none to be misread."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"))
    model.config.save_pretrained(directory)
    tokenizer.save_pretrained(directory / TOKENIZER)
    config = json.loads((directory / "config.json").read_text())
    if config.get("architectures") != [ARCHITECTURE]:
        raise RuntimeError(f"{directory}: config.json does not name {ARCHITECTURE}")
    return directory / TOKENIZER


def load_reward_model(directory: Path) -> RewardModel:
    model = RewardModel(Qwen2Config.from_pretrained(directory))
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model


def to_causal_lm(prm: RewardModel, config: LlamaConfig) -> LlamaForCausalLM:
    """The PRM's body as a causal LM, so that a generative judge starts from what the PRM learnt
    to read at each step: Llama with attention biases (q/k/v the PRM's, o's at zero), its LM head
    the tied embedding. `config` is the demo's Llama config for the PRM's tokenizer."""
    lm = LlamaForCausalLM(LlamaConfig.from_dict({**config.to_dict(), "attention_bias": True}))
    state = {f"model.{name}": tensor for name, tensor in prm.model.state_dict().items()}
    for name, tensor in lm.state_dict().items():
        if name.endswith("o_proj.bias"):
            state[name] = torch.zeros_like(tensor)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    lm.load_state_dict(state)
    return lm
