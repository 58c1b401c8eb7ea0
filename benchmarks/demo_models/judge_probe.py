"""Where the demo scorer holds "this step is right": the measurements behind the README's note on
why no demo verifier ships yet.

    python benchmarks/demo_models/judge_probe.py            # 1,500 judged steps, ~2 minutes

On steps judged as train.py's verifier is taught (half right, the wrong ones written under a
teacher's bug rule or as a slip), it reports:
- the AUC of the scorer's lowest log-probability of the latest step's result digits, inside the
  trajectory and after a bare check question: does the model's own prediction tell right from
  wrong?
- the held-out accuracy of a linear probe on the hidden state at the step's last digit and at
  its newline, per layer output: does any layer hold the verdict where a judge could read it?
Writes benchmarks/results/judge_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import task
import torch
from tokenizers_and_templates import STYLES, build_tokenizer
from train import CLEAN_STYLE, FMT, judged_steps
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report_files import RESULTS, write_report  # noqa: E402

from cordgen.config import ChatSettings  # noqa: E402
from cordgen.prompts import ChatPrompt  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent / "weights"
TRAIN_SHARE = 2 / 3


def auc(right: Sequence[float], wrong: Sequence[float]) -> float:
    """P(a right step's value > a wrong one's), ties half."""
    r, w = torch.tensor(right)[:, None], torch.tensor(wrong)[None, :]
    return ((r > w).float().mean() + 0.5 * (r == w).float().mean()).item()


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic regression fitted on the first part."""
    cut = int(TRAIN_SHARE * len(labels))
    mean, std = features[:cut].mean(0), features[:cut].std(0) + 1e-6
    x = (features - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x[:cut] @ w + b
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[:cut].float())
        value = value + 1e-3 * (w * w).sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return (((x[cut:] @ w + b) > 0) == labels[cut:].bool()).float().mean().item()


def lowest_digit_logprob(model: LlamaForCausalLM, ids: list[int], equals: int) -> tuple[float, tuple]:
    """The lowest log p of the latest step's result digits (after the last ` = `, before the
    closing newline), and the hidden states of the forward pass."""
    result_start = max(i for i, token in enumerate(ids) if token == equals) + 1
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    logprobs = out.logits[0].log_softmax(-1)
    lowest = min(logprobs[i - 1, ids[i]].item() for i in range(result_start, len(ids) - 1))
    return lowest, out.hidden_states


def measure(count: int, seed: int) -> dict:
    tokenizer = build_tokenizer(STYLES[CLEAN_STYLE])
    model = LlamaForCausalLM.from_pretrained(WEIGHTS / "scorer").eval()
    chat = ChatPrompt(tokenizer, ChatSettings(), FMT)
    (equals,) = chat.encode(" = ")
    rng, problems = random.Random(seed), task.sample_problems(3000, seed)
    inside: dict[bool, list[float]] = {True: [], False: []}
    bare: dict[bool, list[float]] = {True: [], False: []}
    states: dict[str, list[torch.Tensor]] = {}
    labels = []
    for _ in range(count):
        problem = rng.choice(problems)
        steps, correct = judged_steps(problem, rng)
        ids = chat.encode(chat.thinking_text(problem.question, steps))
        lowest, hidden = lowest_digit_logprob(model, ids, equals)
        inside[correct].append(lowest)
        question = chat.encode(f"\n\nCheck step {len(steps)}:{steps[-1]}")
        bare[correct].append(lowest_digit_logprob(model, question, equals)[0])
        for layer, h in enumerate(hidden):
            states.setdefault(f"layer {layer}, last digit", []).append(h[0, -2])
            states.setdefault(f"layer {layer}, newline", []).append(h[0, -1])
        labels.append(correct)
    target = torch.tensor(labels)
    return {
        "judged_steps": count,
        "right_share": round(target.float().mean().item(), 3),
        "digit_logprob_auc_in_trajectory": round(auc(inside[True], inside[False]), 4),
        "digit_logprob_auc_bare_question": round(auc(bare[True], bare[False]), 4),
        "linear_probe_accuracy": {
            where: round(probe_accuracy(torch.stack(h).float(), target), 3) for where, h in states.items()
        },
    }


def markdown(report: dict) -> str:
    lines = [
        f"{report['judged_steps']} judged steps ({100 * report['right_share']:.1f}% right).",
        "",
        f"- AUC of the lowest result-digit log-prob, in the trajectory: "
        f"{report['digit_logprob_auc_in_trajectory']:.3f}; after a bare check question: "
        f"{report['digit_logprob_auc_bare_question']:.3f}",
        "",
        "| hidden state | linear probe accuracy (held out) |",
        "|---|---|",
    ]
    lines += [f"| {where} | {100 * acc:.1f}% |" for where, acc in report["linear_probe_accuracy"].items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="judged steps")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    report = measure(args.steps, args.seed)
    write_report(args.out, "judge_probe", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
