"""Trains the demo teachers and scorer for chained arithmetic on 2 CPU cores.

    python benchmarks/demo_models/train.py --out benchmarks/demo_models/weights          # full run
    python benchmarks/demo_models/train.py --out /tmp/demo --quick                       # smoke test
    python benchmarks/demo_models/train.py --out ... --models teacher-b --teacher-steps 900
    python benchmarks/demo_models/train.py --out W --models prm --device cuda      # W/scorer: the scorer
    python benchmarks/demo_models/train.py --out W --models verifier --device cuda # W/prm: the PRM

One clean model is trained from random weights on correct traces in the ChatML style; each
teacher is cut out of it into its own tokenizer (embedding rows looked up by string, strings the
clean model never saw started from an alias) and fine-tuned, in its own chat template, on traces
written with its bug rule. Two scorers are the clean model trained further in ChatML: `scorer` also
on traces cut after step k and closed with the gold answer (see --scorer-truncated), so that
intermediate steps carry information, and `scorer-final` on whole traces only, its ablation. The
`prm` is the scorer in Qwen2.5-Math-PRM's layout, labelled at every step separator ("every step so
far is right") over trajectories written right, under every teacher's bug rule and with arithmetic
slips; the `verifier` is the PRM's body as a causal LM taught to judge the latest step of the same
trajectories: after a question that restates the step it answers ` Yes` or ` No`, labelled by the
task's checker. The two judges are trained only when named (`--models prm,verifier`; the PRM
first): the PRM learns in 12,000 steps (72.5% on held-out latest steps; 59 min on 2 AVX-512 cores),
the verifier from it in 8,000 (74.0%; 5 min on an H200). Both ship. Every
model is saved to OUT/<name>/ (safetensors, tokenizer, chat template), and OUT/training.json
records per model: data sizes, seeds, steps, wall time, final loss and a greedy held-out
evaluation.

Budgets are steps, not seconds, so a run is reproducible on any machine; the wall time of each
stage is recorded. A run can be split (`--models clean`, then the rest: the clean model is read
back from OUT/clean) and gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import task
import torch
import transformers
from reward_model import RewardModel, from_causal_lm, load_reward_model, save_reward_model, to_causal_lm
from tokenizers_and_templates import ALIASES, MAX_LENGTH, STYLES, build_tokenizer, model_config
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

from cordgen.config import ChatSettings, StepFormat, VerifierSettings
from cordgen.prompts import ChatPrompt, split_trace


@dataclass(frozen=True)
class Budget:
    steps: int
    lr: float
    problems: int  # distinct training problems the batches are drawn from


BATCH = 64
WARMUP = 0.03  # share of steps
THREADS = 2
# Step times measured on 2 idle cores (bf16 autocast, batch 64): ~0.45 s. The learning rate must
# stay high long enough: the same clean model on a 600-step schedule plateaus at loss 0.62 and
# cannot copy operands (0% answers); on the 2000-step schedule it passes 0.22 by step 600. Training
# the clean model in all three styles at once (2400 steps, 800 per style) also failed (loss 0.45,
# 0% answers), hence one style and per-teacher fine-tuning.
BUDGETS = {
    "clean": Budget(steps=2000, lr=3e-3, problems=50_000),
    "teacher": Budget(steps=500, lr=1e-3, problems=25_000),
    # The [INST] style splits `### Step ` and the operators differently from the clean model:
    # after 500 steps it was still at loss 0.114, 36% valid steps and 4.5% right answers.
    "teacher-c": Budget(steps=1200, lr=1e-3, problems=25_000),
    "scorer": Budget(steps=400, lr=1e-3, problems=25_000),
    # Started from the scorer, the verdict loss stayed at chance (800 steps here; 4,000 and 12,000
    # on an H200, lr 5e-4 to 2e-3); started from the PRM it learns at lr 1e-4 to 2e-4 (73.5-74.0%),
    # less at 3e-4 (66%) and not at 5e-4 or above (H200 runs, benchmarks/results/judges-h200/).
    "verifier": Budget(steps=8000, lr=2e-4, problems=25_000),
    # The PRM's loss leaves the labels' base rate only after ~5,000 steps at lr 5e-4 (read on an
    # H200 and reproduced here); at 2e-3 it never does.
    "prm": Budget(steps=12_000, lr=5e-4, problems=25_000),
}
QUICK_BUDGETS = {
    "clean": Budget(steps=6, lr=3e-3, problems=1_000),
    "teacher": Budget(steps=2, lr=1e-3, problems=200),
    "teacher-c": Budget(steps=2, lr=1e-3, problems=200),
    "scorer": Budget(steps=2, lr=1e-3, problems=200),
    "verifier": Budget(steps=2, lr=1e-3, problems=200),
    "prm": Budget(steps=2, lr=1e-3, problems=200),
}
EVAL_PROBLEMS, QUICK_EVAL_PROBLEMS = 200, 4
QUICK_EVAL_TOKENS = 16  # barely trained models never stop: cap their greedy traces in a smoke test
SCORER_TRUNCATED = 0.5  # share of the scorer's examples cut after an intermediate step
SEEDS = {
    "clean": 0,
    "teacher-a": 1,
    "teacher-b": 2,
    "teacher-c": 3,
    "scorer": 4,
    "scorer-final": 5,
    "verifier": 6,
    "prm": 7,
    "heldout": 1000,
}
CLEAN_STYLE = "chatml"
TEACHERS = {"teacher-a": ("chatml", "a"), "teacher-b": ("tags", "b"), "teacher-c": ("inst", "c")}
SCORERS = {"scorer": None, "scorer-final": 0.0}  # share of truncated traces: None = --scorer-truncated
VERIFIER_STYLE = "verdicts"
PRM_STYLE = "rewards"
SHIPPED = ("clean", *TEACHERS, *SCORERS)  # the default: what weights/ holds (clean is not shipped)
JUDGES = ("prm", "verifier")  # asked for by name (both ship); the verifier starts from the PRM
MODELS = (*SHIPPED, *JUDGES)
FMT = StepFormat()
ANSWER_SUFFIX = "</think> The final answer is "  # cordgen's default scorer suffix
# The demo verifier's question restates the step it judges right before the verdict, so that the
# comparison of a result with the model's own arithmetic is short-range; the verdicts are
# cordgen's defaults. From the scorer, the verdict loss stayed at chance with this question, with
# cordgen's default one and with half the examples bare; from the PRM, this question learns.
VERIFIER = VerifierSettings(prompt="\n\nCheck step {step}:{latest}Correct?")
PRM_SEPARATOR = "<extra_0>"  # cordgen's default scorer.prm.separator, Qwen's
BARE_SHARE = 0.5  # of the verifier's examples, the check question alone: shorter sequences


def conversation(chat: ChatPrompt, problem: task.Problem, bug: str | None) -> str:
    """The whole exchange in the model's own template, its trace written with its bug rule."""
    trace = task.render_trace(problem, task.BUGS[bug] if bug else None)
    ending = FMT.think_close + trace.answer + chat.tokenizer.eos_token
    return chat.thinking_text(problem.question, trace.steps) + ending


@dataclass(frozen=True)
class Source:
    """Examples as one model sees them: its tokenizer and its bug rule."""

    tokenizer: PreTrainedTokenizerFast
    bug: str | None = None

    @cached_property
    def chat(self) -> ChatPrompt:
        return ChatPrompt(self.tokenizer, ChatSettings(), FMT)

    def encode(self, problem: task.Problem, cut: int | None) -> tuple[list[int], list[int]]:
        """(ids, labels), loss on the assistant's part only. With `cut`, the correct trace stops
        after step `cut` and the loss is on the gold answer alone, asked for exactly as cordgen's
        scorer asks, so that intermediate prefixes become informative."""
        if cut is None:
            prompt = self.chat.generation_prompt(problem.question)
            text = conversation(self.chat, problem, self.bug)
            context, target = self.chat.encode(prompt), self.chat.encode(text[len(prompt) :])
        else:
            steps = task.render_trace(problem).steps[:cut]
            context, target = self.chat.scoring_ids(problem.question, steps, ANSWER_SUFFIX, str(problem.gold))
        return context + target, [-100] * len(context) + target


def collate(rows: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.zeros(len(rows), width, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "labels": torch.full((len(rows), width), -100, dtype=torch.long),
    }
    for i, (ids, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, : len(ids)] = 1
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
    return batch


def batches(
    source: Source, problems: Sequence[task.Problem], steps: int, seed: int, truncated: float
) -> Iterator[dict[str, torch.Tensor]]:
    """Each example draws its problem and, with probability `truncated`, a cut."""
    rng = random.Random(seed)
    for _ in range(steps):
        rows = []
        for _ in range(BATCH):
            problem = rng.choice(problems)
            cut = rng.randint(1, len(problem.ops) - 1) if rng.random() < truncated else None
            rows.append(source.encode(problem, cut))
        yield collate(rows)


def slipped(value: int, rng: random.Random) -> int:
    """A wrong result of the kinds column arithmetic makes: a carry or borrow dropped or added
    (10 or 100 off), or one digit miswritten."""
    while True:
        if rng.random() < 0.5:
            wrong = value + rng.choice((-100, -10, 10, 100))
        else:
            digits = list(str(value))
            digits[rng.randrange(len(digits))] = str(rng.randrange(10))
            wrong = int("".join(digits))
        if wrong >= 0 and wrong != value:
            return wrong


def judged_steps(problem: task.Problem, rng: random.Random) -> tuple[tuple[str, ...], bool]:
    """A trajectory for the verifier to judge, and whether its latest step is right: the earlier
    steps follow a random teacher's rule (or none), the latest is right or wrong half the time,
    wrong as some teacher's rule writes it where one fires there, else as a slip."""
    bug = rng.choice((None, *task.BUGS))
    trace = task.render_trace(problem, task.BUGS[bug] if bug else None)
    k = rng.randint(1, len(trace.steps))
    step = task.parse_step(trace.steps[k - 1])
    assert step is not None
    a, op, b, _ = step
    right = task.apply(a, op, b)
    correct = rng.random() < 0.5
    written = right
    if not correct:
        rules = [w for rule in task.BUGS.values() if (w := rule(a, op, b)) is not None]
        written = rng.choice(rules) if rules and rng.random() < 0.5 else slipped(right, rng)
    return (*trace.steps[: k - 1], f" {a} {op} {b} = {written}\n"), correct


@dataclass(frozen=True)
class Judge:
    """The verifier's examples, asked exactly as cordgen's verifier asks: the trajectory in the
    assistant's thinking, the question about its latest step, then one verdict token."""

    tokenizer: PreTrainedTokenizerFast

    @cached_property
    def chat(self) -> ChatPrompt:
        return ChatPrompt(self.tokenizer, ChatSettings(), FMT)

    @cached_property
    def verdicts(self) -> tuple[int, int]:
        (yes,), (no,) = self.chat.encode(VERIFIER.yes), self.chat.encode(VERIFIER.no)
        return yes, no

    def prompt(self, problem: task.Problem, steps: Sequence[str], bare: bool = False) -> list[int]:
        """`bare`: the check question alone, without the conversation before it."""
        question = VERIFIER.prompt.format(step=len(steps), latest=steps[-1])
        context = "" if bare else self.chat.thinking_text(problem.question, steps)
        return self.chat.encode(context + question)

    def encode(self, problem: task.Problem, rng: random.Random) -> tuple[list[int], list[int]]:
        steps, correct = judged_steps(problem, rng)
        ids = self.prompt(problem, steps, bare=rng.random() < BARE_SHARE)
        verdict = self.verdicts[0 if correct else 1]
        return ids + [verdict], [-100] * len(ids) + [verdict]


def judge_batches(
    judge: Judge, problems: Sequence[task.Problem], steps: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    rng = random.Random(seed)
    for _ in range(steps):
        yield collate([judge.encode(rng.choice(problems), rng) for _ in range(BATCH)])


def evaluate_judge(model: LlamaForCausalLM, judge: Judge, problems: Sequence[task.Problem]) -> dict:
    """Verdict accuracy (p(yes) against p(no)) on two judged trajectories per held-out problem,
    overall and where the judged step is not the problem's last."""
    start, rng = time.perf_counter(), random.Random(SEEDS["heldout"])
    right, middle, middle_right, n = 0, 0, 0, 0
    for problem in problems:
        for _ in range(2):
            steps, correct = judged_steps(problem, rng)
            ids = torch.tensor([judge.prompt(problem, steps)], device=model.device)
            with torch.no_grad():
                logits = model(ids).logits[0, -1]
            yes, no = (logits[v].item() for v in judge.verdicts)
            hit = (yes > no) == correct
            right, n = right + hit, n + 1
            if len(steps) < len(problem.ops):
                middle, middle_right = middle + 1, middle_right + hit
    return {
        "judged": n,
        "verdict_accuracy": round(right / n, 4),
        "middle_verdict_accuracy": round(middle_right / max(1, middle), 4),
        "eval_s": round(time.perf_counter() - start, 1),
    }


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (a GPU, AVX-512 CPUs: 1.3-1.6x faster than fp32 there), else
    fp32: on an AVX2-only CPU, bf16 autocast made a training step ~40x slower (10 s vs 0.25 s)."""
    native = device.type != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return torch.bfloat16 if native else torch.float32


def train(
    name: str,
    model: torch.nn.Module,
    data: Iterator[dict[str, torch.Tensor]],
    budget: Budget,
    device: torch.device,
) -> dict:
    """AdamW with a cosine schedule, under autocast to `compute_dtype(device)`; the weights
    themselves stay fp32. Batches are built on the CPU and moved to `device`; the model is left
    there for its evaluation."""
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(WARMUP * budget.steps), budget.steps)
    model.train()
    dtype, losses, start = compute_dtype(device), [], time.perf_counter()
    for step, batch in enumerate(data, start=1):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 100 == 0 or step == budget.steps:
            elapsed = time.perf_counter() - start
            log(f"{name}: step {step}/{budget.steps} loss {loss.item():.4f} ({elapsed:.0f} s)")
    model.eval()
    tail = losses[-20:]
    return {"train_s": round(time.perf_counter() - start, 1), "final_loss": round(sum(tail) / len(tail), 4)}


def fit(
    name: str,
    model: LlamaForCausalLM,
    source: Source,
    budget: Budget,
    device: torch.device,
    truncated: float = 0.0,
) -> dict:
    """Trains on a fresh pool of training-split problems drawn with the model's own seed."""
    seed = SEEDS[name]
    torch.manual_seed(seed)
    problems = task.sample_problems(budget.problems, seed)
    record = train(name, model, batches(source, problems, budget.steps, seed, truncated), budget, device)
    data = {"seed": seed, "batch": BATCH, "examples_seen": BATCH * budget.steps, "truncated_share": truncated}
    return {**asdict(budget), **data, **record}


def cut_model(
    clean: LlamaForCausalLM, clean_tokenizer: PreTrainedTokenizerFast, tokenizer: PreTrainedTokenizerFast
) -> LlamaForCausalLM:
    """The clean model speaking `tokenizer`: each token's embedding is the clean model's row for
    the same string (or its alias), so the new copy starts as the same function on the same text."""
    known, vocab = clean_tokenizer.get_vocab(), tokenizer.get_vocab()
    rows = [known[ALIASES.get(token, token)] for token in sorted(vocab, key=vocab.__getitem__)]
    state = clean.state_dict()
    embedding = state["model.embed_tokens.weight"][torch.tensor(rows)]
    state.update({"model.embed_tokens.weight": embedding, "lm_head.weight": embedding})
    config = model_config(tokenizer)
    config.attention_bias = clean.config.attention_bias
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model


def generate(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[list[int]], limit: int
) -> list[str]:
    """Greedy continuations of left-padded prompts, `limit` tokens at most."""
    width, pad = max(map(len, prompts)), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    starts = torch.tensor([width - len(p) for p in prompts], device=model.device)
    mask = (torch.arange(width, device=model.device)[None, :] >= starts[:, None]).long()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=min(limit, MAX_LENGTH - width),
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def grade(problem: task.Problem, text: str, bug: task.Bug | None) -> Counter:
    """Counts for one generated trace. Steps are also sorted by whether the model's bug rule
    fires on their visible numbers: a teacher should reproduce its bug there and be right elsewhere."""
    steps, answer = split_trace(FMT, text)
    check = task.check_trace(problem, steps)
    correct = answer is not None and task.read_answer(answer) == problem.gold
    counts = Counter(
        steps=len(steps),
        valid=sum(v is True for v in check.valid),
        sound=int(check.sound),
        correct=int(correct),
    )
    for a, op, b, c in filter(None, map(task.parse_step, steps)):
        wrong = bug(a, op, b) if bug else None
        if wrong is None:
            counts.update(unfired=1, unfired_valid=int(task.apply(a, op, b) == c))
        else:
            counts.update(fired=1, reproduced=int(c == wrong))
    return counts


def evaluate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: Sequence[task.Problem],
    bug: str | None,
    limit: int = MAX_LENGTH,
) -> dict:
    """Greedy, from the prompt cordgen itself gives a teacher (`... ### Step 1.`)."""
    start = time.perf_counter()
    chat = ChatPrompt(tokenizer, ChatSettings(), FMT)
    texts = generate(model, tokenizer, [chat.step_prompt_ids(p.question, ()) for p in problems], limit)
    counts = sum((grade(p, t, task.BUGS[bug] if bug else None) for p, t in zip(problems, texts)), Counter())
    n = len(problems)
    result = {
        "problems": n,
        "answer_accuracy": counts["correct"] / n,
        "step_validity": counts["valid"] / max(1, counts["steps"]),
        "sound_traces": counts["sound"] / n,
    }
    if bug:
        result["rule_steps"] = counts["fired"]
        result["rule_reproduced"] = counts["reproduced"] / max(1, counts["fired"])
        result["valid_off_rule"] = counts["unfired_valid"] / max(1, counts["unfired"])
    result = {k: round(v, 4) for k, v in result.items()}
    return {**result, "eval_s": round(time.perf_counter() - start, 1)}


def save(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path, bug: str | None
) -> None:
    """Reloads the tokenizer as transformers and vLLM will (AutoTokenizer) and refuses one that
    tokenizes or decodes differently: the Qwen2 pitfall must never ship silently."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    sample = conversation(ChatPrompt(tokenizer, ChatSettings(), FMT), task.sample_problems(1, 0)[0], bug)
    check_saved_tokenizer(tokenizer, directory, sample)


def check_saved_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path, sample: str) -> None:
    ids = tokenizer.encode(sample, add_special_tokens=False)
    loaded = AutoTokenizer.from_pretrained(directory)
    if loaded.encode(sample, add_special_tokens=False) != ids or loaded.decode(ids) != sample:
        raise RuntimeError(f"{directory}: the saved tokenizer does not reproduce the trained one")


@dataclass(frozen=True)
class Run:
    out: Path
    models: tuple[str, ...]
    budgets: dict[str, Budget]
    truncated: float
    heldout: tuple[task.Problem, ...]
    eval_tokens: int
    device: torch.device
    verifier_init: str


def finish(
    run: Run,
    name: str,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    bug: str | None,
    record: dict,
    report: dict,
    judge: Judge | None = None,
) -> None:
    """Saves the model, evaluates it (a judge on its verdicts) and writes the report, so a long
    run keeps what it did."""
    save(model, tokenizer, run.out / name, bug)
    if judge is None:
        record["eval"] = evaluate(model, tokenizer, run.heldout, bug, run.eval_tokens)
    else:
        record["eval"] = evaluate_judge(model, judge, run.heldout)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    report["models"][name] = record
    (run.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"{name}: {json.dumps(record['eval'])}")


def clean_model(run: Run, report: dict) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Trained here from random weights, or loaded from OUT/clean."""
    tokenizer = build_tokenizer(STYLES[CLEAN_STYLE])
    if "clean" not in run.models:
        return LlamaForCausalLM.from_pretrained(run.out / "clean"), tokenizer
    torch.manual_seed(SEEDS["clean"])
    model = LlamaForCausalLM(model_config(tokenizer))
    record = {"style": CLEAN_STYLE, "bug": None, "init": "random"}
    record |= fit("clean", model, Source(tokenizer), run.budgets["clean"], run.device)
    finish(run, "clean", model, tokenizer, None, record, report)
    return model, tokenizer


def train_all(run: Run, report: dict) -> None:
    if any(name in run.models for name in ("clean", *TEACHERS, *SCORERS)):
        train_from_clean(run, report)
    if "prm" in run.models:
        train_prm(run, report)
    if "verifier" in run.models:
        train_verifier(run, report)


def train_from_clean(run: Run, report: dict) -> None:
    clean, clean_tokenizer = clean_model(run, report)
    for name, (style, bug) in TEACHERS.items():
        if name in run.models:
            tokenizer = build_tokenizer(STYLES[style])
            model = cut_model(clean, clean_tokenizer, tokenizer)
            record = {"style": style, "bug": bug, "init": "clean"}
            budget = run.budgets.get(name, run.budgets["teacher"])
            record |= fit(name, model, Source(tokenizer, bug), budget, run.device)
            finish(run, name, model, tokenizer, bug, record, report)
    for name, truncated in SCORERS.items():
        if name in run.models:
            share = run.truncated if truncated is None else truncated
            model = cut_model(clean, clean_tokenizer, clean_tokenizer)
            record = {"style": CLEAN_STYLE, "bug": None, "init": "clean"}
            record |= fit(name, model, Source(clean_tokenizer), run.budgets["scorer"], run.device, share)
            finish(run, name, model, clean_tokenizer, None, record, report)


def train_verifier(run: Run, report: dict) -> None:
    """Starts from OUT/<run.verifier_init>, cut into the verdict style's tokenizer: the scorer (a
    model that reads a trajectory's value; it does not learn to judge, see VERIFIER) or the PRM (a
    body that already tells a right step from a wrong one at its end)."""
    tokenizer = build_tokenizer(STYLES[VERIFIER_STYLE])
    model = cut_model(*verifier_start(run), tokenizer)
    judge, budget, seed = Judge(tokenizer), run.budgets["verifier"], SEEDS["verifier"]
    torch.manual_seed(seed)
    problems = task.sample_problems(budget.problems, seed)
    record = {"style": VERIFIER_STYLE, "bug": None, "init": run.verifier_init, "prompt": VERIFIER.prompt}
    record |= {**asdict(budget), "seed": seed, "batch": BATCH, "examples_seen": BATCH * budget.steps}
    record |= train("verifier", model, judge_batches(judge, problems, budget.steps, seed), budget, run.device)
    finish(run, "verifier", model, tokenizer, None, record, report, judge)


def verifier_start(run: Run) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The model the verifier is cut from, with the tokenizer it speaks."""
    if run.verifier_init == "scorer":
        return LlamaForCausalLM.from_pretrained(run.out / "scorer"), build_tokenizer(STYLES[CLEAN_STYLE])
    tokenizer = build_tokenizer(STYLES[PRM_STYLE])
    return to_causal_lm(load_reward_model(run.out / "prm"), model_config(tokenizer)), tokenizer


def prefix_labels(problem: task.Problem, steps: Sequence[str]) -> list[int]:
    """Per step, 1 while every step so far is right (a value carried from a wrong step is wrong)."""
    valid = task.check_trace(problem, steps).valid
    return [int(all(v is True for v in valid[: i + 1])) for i in range(len(steps))]


@dataclass(frozen=True)
class Rewards:
    """The PRM's examples, rendered exactly as cordgen's `prm` kind renders a trajectory: the
    question as the user turn, each step stripped and followed by the separator, the turn closed;
    a label at every separator."""

    tokenizer: PreTrainedTokenizerFast

    @cached_property
    def chat(self) -> ChatPrompt:
        return ChatPrompt(self.tokenizer, ChatSettings(), FMT)

    @cached_property
    def separator(self) -> int:
        (token,) = self.chat.encode(PRM_SEPARATOR)
        return token

    def text(self, problem: task.Problem, steps: Sequence[str]) -> str:
        return self.chat.reward_text(problem.question, steps, PRM_SEPARATOR)

    def prompt(self, problem: task.Problem, steps: Sequence[str]) -> list[int]:
        return self.chat.encode(self.text(problem, steps))

    def encode(self, problem: task.Problem, rng: random.Random) -> tuple[list[int], list[int]]:
        steps, _ = judged_steps(problem, rng)
        ids, labels = self.prompt(problem, steps), iter(prefix_labels(problem, steps))
        return ids, [next(labels) if token == self.separator else -100 for token in ids]


def evaluate_rewards(model: RewardModel, rewards: Rewards, problems: Sequence[task.Problem]) -> dict:
    """Accuracy of p(right so far) > 0.5 at the latest step's separator, on two judged
    trajectories per held-out problem, overall and where that step is not the problem's last."""
    start, rng = time.perf_counter(), random.Random(SEEDS["heldout"])
    hits: list[tuple[bool, bool]] = []
    for problem in problems:
        for _ in range(2):
            steps, _ = judged_steps(problem, rng)
            ids = rewards.prompt(problem, steps)
            with torch.no_grad():
                logits = model(torch.tensor([ids], device=model.device)).logits[0]
            last = max(i for i, token in enumerate(ids) if token == rewards.separator)
            said = logits[last, 1].item() > logits[last, 0].item()
            hits.append((said == bool(prefix_labels(problem, steps)[-1]), len(steps) < len(problem.ops)))
    middle = [hit for hit, is_middle in hits if is_middle]
    return {
        "judged": len(hits),
        "verdict_accuracy": round(sum(hit for hit, _ in hits) / len(hits), 4),
        "middle_verdict_accuracy": round(sum(middle) / max(1, len(middle)), 4),
        "eval_s": round(time.perf_counter() - start, 1),
    }


def train_prm(run: Run, report: dict) -> None:
    """Starts from OUT/scorer, cut into the rewards style's tokenizer (the separator's embedding
    from the newline's) and moved into Qwen2.5-Math-PRM's layout; trained on the verifier's
    trajectories with a label at every separator; slow to start learning (see BUDGETS)."""
    tokenizer = build_tokenizer(STYLES[PRM_STYLE])
    scorer = LlamaForCausalLM.from_pretrained(run.out / "scorer")
    rewards, budget, seed = Rewards(tokenizer), run.budgets["prm"], SEEDS["prm"]
    torch.manual_seed(seed)  # before the head's initialisation: a split run gives the same weights
    model = from_causal_lm(cut_model(scorer, build_tokenizer(STYLES[CLEAN_STYLE]), tokenizer))
    problems = task.sample_problems(budget.problems, seed)
    rng = random.Random(seed)
    data = (
        collate([rewards.encode(rng.choice(problems), rng) for _ in range(BATCH)])
        for _ in range(budget.steps)
    )
    record = {"style": PRM_STYLE, "bug": None, "init": "scorer", "separator": PRM_SEPARATOR}
    record |= {**asdict(budget), "seed": seed, "batch": BATCH, "examples_seen": BATCH * budget.steps}
    record |= train("prm", model, data, budget, run.device)
    saved_tokenizer = save_reward_model(model, tokenizer, run.out / "prm")
    sample = task.sample_problems(1, 0)[0]
    check_saved_tokenizer(tokenizer, saved_tokenizer, rewards.text(sample, task.render_trace(sample).steps))
    record["eval"] = evaluate_rewards(model, rewards, run.heldout)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    report["models"]["prm"] = record
    (run.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"prm: {json.dumps(record['eval'])}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for OUT/<model>/ and training.json"
    )
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test in under a minute")
    parser.add_argument(
        "--models", default=",".join(SHIPPED), help=f"comma-separated subset of {','.join(MODELS)}"
    )
    for stage in BUDGETS:
        parser.add_argument(f"--{stage}-steps", type=int, help=f"override the {stage} step budget")
        parser.add_argument(f"--{stage}-lr", type=float, help=f"override the {stage} learning rate")
    parser.add_argument(
        "--verifier-init",
        choices=("scorer", "prm"),
        default="prm",
        help="what the verifier starts from",
    )
    parser.add_argument("--device", default="cpu", help="where to train: cpu (default) or cuda")
    parser.add_argument(
        "--scorer-truncated", type=float, default=SCORER_TRUNCATED, help="share of cut traces"
    )
    parser.add_argument("--eval-problems", type=int, help=f"held-out problems (default {EVAL_PROBLEMS})")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}")
    start = args.out / args.verifier_init
    if "verifier" in models and args.verifier_init not in models and not (start / "config.json").exists():
        both = f"{args.verifier_init},verifier"
        parser.error(f"--models verifier starts from {start}, not there: train both (--models {both})")
    return args


def overridden(budget: Budget, args: argparse.Namespace, stage: str) -> Budget:
    steps, lr = getattr(args, f"{stage}_steps"), getattr(args, f"{stage}_lr")
    return replace(budget, steps=steps or budget.steps, lr=lr or budget.lr)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    budgets = {k: overridden(b, args, k.replace("-", "_")) for k, b in budgets.items()}
    eval_problems = args.eval_problems or (QUICK_EVAL_PROBLEMS if args.quick else EVAL_PROBLEMS)
    heldout = tuple(task.sample_problems(eval_problems, SEEDS["heldout"], "heldout"))
    eval_tokens = QUICK_EVAL_TOKENS if args.quick else MAX_LENGTH
    models = tuple(args.models.split(","))
    run = Run(
        args.out,
        models,
        budgets,
        args.scorer_truncated,
        heldout,
        eval_tokens,
        torch.device(args.device),
        args.verifier_init,
    )
    report_path = args.out / "training.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"models": {}}
    report["last_run"] = {  # per-model settings are in each model's record
        "quick": args.quick,
        "budgets": {k: asdict(b) for k, b in budgets.items()},
        "batch": BATCH,
        "warmup": WARMUP,
        "threads": THREADS,
        "device": args.device,
        "compute_dtype": str(compute_dtype(torch.device(args.device))),
        "scorer_truncated": args.scorer_truncated,
        "verifier_init": args.verifier_init,
        "heldout": {"problems": eval_problems, "seed": SEEDS["heldout"], "max_new_tokens": eval_tokens},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_all(run, report)
    report["last_run"]["total_s"] = round(time.perf_counter() - start, 1)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"done in {report['last_run']['total_s']} s: {report_path}")


if __name__ == "__main__":
    main()
