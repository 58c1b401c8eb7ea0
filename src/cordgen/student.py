"""The student's forward passes for COMPACT: one packed pass per rationale gives every metric.

A rationale of T steps needs the student's NLL of its tokens (difficulty), its log-likelihood of
the gold answer after each of the T+1 step boundaries (adaptability) and a hidden state
(consensus). Rather than T+2 prompts, the T+1 answer probes are packed after the rationale in one
sequence: probe t attends to the rationale's first p_t tokens and to itself, with position ids
continuing from p_t, so it computes exactly what the prompt `rationale[:p_t] + probe` would, and
the rationale's own positions never see a probe. The student runs in transformers, not vLLM: its
hidden states are needed, and `cordgen distill` measures the weights it is training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from cordgen.config import StepFormat, StudentSettings, resolve_model_source
from cordgen.errors import CordgenError
from cordgen.prompts import ChatPrompt, split_answer_boundary, step_header, think_opener

LOGIT_ROWS = 1024  # hidden rows projected to the vocabulary at once: bounds memory for big vocabularies


@dataclass(frozen=True)
class PackedRationale:
    """A rationale in the student's tokens; steps are tokenized one by one (header + text), so
    every step boundary is a token boundary and each prefix is an exact prefix of the ids."""

    ids: tuple[int, ...]  # the prompt, then each step
    boundaries: tuple[int, ...]  # p_0 = the prompt's length, p_t = where step t ends
    probe: tuple[int, ...]  # the answer suffix, then the gold answer
    answer_len: int

    @property
    def length(self) -> int:
        return len(self.ids) + len(self.boundaries) * len(self.probe)


@dataclass(frozen=True)
class RationaleMeasure:
    step_nll: tuple[float, ...]  # the student's mean token NLL of each step
    step_tokens: tuple[int, ...]
    answer_logprob: tuple[float, ...]  # I_0..I_T: mean log p(gold answer token) after boundary t
    embedding: tuple[float, ...]


def pack_rationale(
    chat: ChatPrompt, question: str, steps: Sequence[str], suffix: str, answer: str
) -> PackedRationale:
    prompt = chat.generation_prompt(question)
    ids = chat.encode(prompt + think_opener(chat.fmt, prompt))
    boundaries = [len(ids)]
    for index, text in enumerate(steps, start=1):
        ids += chat.encode(step_header(chat.fmt, index) + text)
        boundaries.append(len(ids))
    suffix_text, answer_text = split_answer_boundary(suffix, answer)
    context, gold = chat.encode(suffix_text), chat.encode(answer_text)
    if not context or not gold:
        raise CordgenError(f"answer suffix {suffix!r} or gold answer {answer!r} encodes to no tokens")
    return PackedRationale(tuple(ids), tuple(boundaries), tuple(context + gold), len(gold))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_student(settings: StudentSettings):
    """(model in eval mode on its device, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(settings.model)
    common = dict(revision=settings.revision, trust_remote_code=settings.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_source(settings.tokenizer or settings.model), **common
    )
    dtype = settings.dtype if settings.dtype == "auto" else getattr(torch, settings.dtype)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
    return model.to(resolve_device(settings.device)).eval(), tokenizer


def student_chat(tokenizer, settings: StudentSettings, fmt: StepFormat) -> ChatPrompt:
    return ChatPrompt(tokenizer, settings.chat, fmt)


def packed_layout(r: PackedRationale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, position ids, boolean attention mask) of one packed rationale."""
    length, m = len(r.ids), len(r.probe)
    ids = torch.tensor(list(r.ids) + list(r.probe) * len(r.boundaries))
    positions = [torch.arange(length)] + [torch.arange(p, p + m) for p in r.boundaries]
    allowed = torch.zeros(r.length, r.length, dtype=torch.bool)
    allowed[:length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
    probe_causal = torch.ones(m, m, dtype=torch.bool).tril()
    for t, p in enumerate(r.boundaries):
        start = length + t * m
        allowed[start : start + m, :p] = True
        allowed[start : start + m, start : start + m] = probe_causal
    return ids, torch.cat(positions), allowed


def batches_by_tokens(rationales: Sequence[PackedRationale], max_tokens: int) -> Iterator[list[int]]:
    """Indices, longest first, in batches whose padded size stays within `max_tokens` (a longer
    rationale goes alone)."""
    order = sorted(range(len(rationales)), key=lambda i: -rationales[i].length)
    batch: list[int] = []
    for index in order:
        if batch and (len(batch) + 1) * rationales[batch[0]].length > max_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def target_logprobs(model, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[i]) from the hidden state at rows[i], projected in chunks."""
    head = model.get_output_embeddings()
    out = []
    for start in range(0, len(rows), LOGIT_ROWS):
        logits = head(hidden[rows[start : start + LOGIT_ROWS]]).float()
        chosen = targets[start : start + LOGIT_ROWS]
        out.append(logits.log_softmax(-1).gather(-1, chosen[:, None])[:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def read_measure(
    model, r: PackedRationale, ids: torch.Tensor, last: torch.Tensor, layer_states: torch.Tensor, pooling: str
) -> RationaleMeasure:
    """One rationale's metrics from its row of the batch (`last`: final-layer states)."""
    length, m, gold = len(r.ids), len(r.probe), r.answer_len
    first = r.boundaries[0]
    step_rows = torch.arange(first - 1, length - 1, device=ids.device)
    step_lp = target_logprobs(model, last, step_rows, ids[first:length]).tolist()
    probe_rows = torch.cat(
        [
            torch.arange(length + t * m + m - gold - 1, length + t * m + m - 1)
            for t in range(len(r.boundaries))
        ]
    ).to(ids.device)
    probe_lp = target_logprobs(model, last, probe_rows, ids[probe_rows + 1])
    answer = probe_lp.view(len(r.boundaries), gold).mean(-1).tolist()
    spans = list(zip(r.boundaries, r.boundaries[1:]))
    step_nll = tuple(-sum(step_lp[a - first : b - first]) / max(1, b - a) for a, b in spans)
    pooled = layer_states[length - 1] if pooling == "last" else layer_states[first:length].mean(0)
    return RationaleMeasure(
        step_nll, tuple(b - a for a, b in spans), tuple(answer), tuple(pooled.float().tolist())
    )


@torch.no_grad()
def measure_rationales(
    model, rationales: Sequence[PackedRationale], *, layer: int, pooling: str, max_batch_tokens: int
) -> list[RationaleMeasure]:
    """Every rationale's metrics, batched by packed length; works on a model being trained too
    (no gradients, its train/eval mode restored)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    dtype = next(model.parameters()).dtype
    results: list[RationaleMeasure | None] = [None] * len(rationales)
    try:
        for batch in batches_by_tokens(rationales, max_batch_tokens):
            width = rationales[batch[0]].length
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            positions = torch.zeros(len(batch), width, dtype=torch.long)
            allowed = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)  # padding sees itself
            for row, index in enumerate(batch):
                r_ids, r_pos, r_allowed = packed_layout(rationales[index])
                n = len(r_ids)
                ids[row, :n], positions[row, :n], allowed[row, :n, :n] = r_ids, r_pos, r_allowed
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            out = model(
                input_ids=ids.to(device),
                position_ids=positions.to(device),
                attention_mask=mask[:, None].to(device),
                output_hidden_states=True,
                logits_to_keep=1,
            )
            for row, index in enumerate(batch):
                results[index] = read_measure(
                    model,
                    rationales[index],
                    ids[row].to(device),
                    out.hidden_states[-1][row],
                    out.hidden_states[layer][row],
                    pooling,
                )
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]
