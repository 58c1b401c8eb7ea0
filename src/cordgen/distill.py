"""`cordgen distill`: fine-tune a student on exported traces, each example's loss scaled by its
compatibility weight (COMPACT's L = sum_k alpha_k L_k), with TRL's SFTTrainer.

A problem's K weights alpha_k sum to 1; each example's scale is K * alpha_k / sum(alpha), so a
problem's scales average 1 and uniform weighting is plain SFT (every scale 1). L_k is the mean
token NLL of the example's completion (the assistant turn), and a batch's loss is the mean of
scale * L_k. With `recompute_every`, the current student re-measures every rationale and the
scales follow, as the student changes under training.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch
from pydantic import BaseModel

from cordgen.compat import Rationale, measure_problems
from cordgen.config import CompatConfig, DistillConfig, StepFormat, StudentSettings, semantic_view
from cordgen.errors import CordgenError
from cordgen.problems import json_rows
from cordgen.prompts import ChatPrompt, think_opener
from cordgen.scoring import split_response
from cordgen.store import write_atomically

MANIFEST = "distill.json"


@dataclass(frozen=True)
class DistillExample:
    problem_id: str
    question: str
    gold_answer: str | None
    response: str  # the assistant turn, thinking and answer
    weight: float | None  # alpha from `cordgen export --weights compat`


def chat_turns(row: dict[str, Any], where: str) -> tuple[str, str]:
    """(last user turn, last assistant turn) of an exported `messages` row."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise CordgenError(
            f"{where}: messages: expected a list of chat turns (export with --format messages)"
        )
    turns = {m.get("role"): m.get("content") for m in messages}
    for role in ("user", "assistant"):
        if not isinstance(turns.get(role), str) or not turns[role]:
            raise CordgenError(f"{where}: messages: no {role} turn")
    return turns["user"], turns["assistant"]


def read_examples(path: Path) -> list[DistillExample]:
    examples = []
    for line_no, row in json_rows(path):
        where = f"{path}:{line_no}"
        question, response = chat_turns(row, where)
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        weight = meta.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0
        ):
            raise CordgenError(f"{where}: metadata.weight: expected a number >= 0, got {weight!r}")
        gold = meta.get("gold_answer")
        problem_id = meta.get("id", str(line_no))
        examples.append(
            DistillExample(
                str(problem_id), question, str(gold) if gold is not None else None, response, weight
            )
        )
    if not examples:
        raise CordgenError(f"{path}: no examples")
    return examples


def check_examples(path: Path, examples: Sequence[DistillExample], config: DistillConfig) -> None:
    if config.weighting == "compat":
        missing = next((i for i, e in enumerate(examples) if e.weight is None), None)
        if missing is not None:
            raise CordgenError(
                f"{path}: example {missing + 1}: metadata.weight: missing; "
                "export with --weights compat, or distill with --weighting uniform"
            )
    if config.recompute_every:
        missing = next((i for i, e in enumerate(examples) if e.gold_answer is None), None)
        if missing is not None:
            raise CordgenError(
                f"{path}: example {missing + 1}: metadata.gold_answer: missing; needed to recompute"
            )


def example_scales(problem_ids: Sequence[str], alphas: Sequence[float]) -> list[float]:
    """K * alpha / sum(alpha) per problem: the weights' shape within a problem, mean 1."""
    totals: dict[str, list[float]] = {}
    for problem_id, alpha in zip(problem_ids, alphas):
        total = totals.setdefault(problem_id, [0.0, 0])
        total[0] += alpha
        total[1] += 1
    return [totals[p][1] * a / totals[p][0] if totals[p][0] > 0 else 1.0 for p, a in zip(problem_ids, alphas)]


def weighted_sequence_loss(logits: torch.Tensor, labels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """mean_i scales[i] * (mean NLL of example i's labelled tokens); labels -100 are not learned."""
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    learned = targets != -100
    per_example = (nll * learned).sum(1) / learned.sum(1).clamp(min=1)
    return (scales.to(per_example.dtype) * per_example).mean()


def completion_text(chat: ChatPrompt, prompt: str, response: str) -> str:
    """An exported response opens thinking itself; a template whose prompt already opened it
    gets the rest, so the student never sees two `<think>`s."""
    opening = chat.fmt.think_open + "\n"
    if response.startswith(opening):
        return think_opener(chat.fmt, prompt) + response[len(opening) :]
    return response


def tokenize_example(chat: ChatPrompt, eos_id: int | None, example: DistillExample, max_length: int) -> dict:
    prompt = chat.generation_prompt(example.question)
    prompt_ids = chat.encode(prompt)
    completion = chat.encode(completion_text(chat, prompt, example.response)) + (
        [eos_id] if eos_id is not None else []
    )
    ids = (prompt_ids + completion)[:max_length]
    labels = ([-100] * len(prompt_ids) + completion)[:max_length]
    return {"input_ids": ids, "labels": labels}


def rationale_groups(examples: Sequence[DistillExample], fmt: StepFormat) -> list[list[Rationale]]:
    """The examples as COMPACT's rationales, grouped by problem; `source` is the example's index."""
    groups: dict[str, list[Rationale]] = {}
    for index, e in enumerate(examples):
        steps, _ = split_response(fmt, e.response)
        groups.setdefault(e.problem_id, []).append(
            Rationale(e.problem_id, e.question, e.gold_answer or "", index, "", steps, ("",) * len(steps))
        )
    return list(groups.values())


class WeightTable:
    """Each example's loss scale, read by the collator at batch time and rewritten on recompute."""

    def __init__(self, examples: Sequence[DistillExample], config: DistillConfig) -> None:
        self.problem_ids = [e.problem_id for e in examples]
        uniform = config.weighting == "uniform"
        self.scales = (
            [1.0] * len(examples)
            if uniform
            else example_scales(self.problem_ids, [e.weight for e in examples])
        )
        self.recomputed = 0

    def update(self, alphas: dict[int, float]) -> None:
        self.scales = example_scales(self.problem_ids, [alphas[i] for i in range(len(self.problem_ids))])
        self.recomputed += 1


class WeightedCollator:
    def __init__(self, pad_id: int, table: WeightTable) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.pad = DataCollatorForLanguageModeling(pad_token_id=pad_id)
        self.table = table

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        batch["example_scale"] = torch.tensor([self.table.scales[r["example"]] for r in rows])
        return batch


def weighted_trainer_class():
    from trl import SFTTrainer

    class WeightedSFTTrainer(SFTTrainer):
        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scales, labels = inputs.pop("example_scale"), inputs.pop("labels")
            outputs = model(**inputs, use_cache=False)
            loss = weighted_sequence_loss(outputs.logits, labels, scales.to(outputs.logits.device))
            return (loss, outputs) if return_outputs else loss

    return WeightedSFTTrainer


def recompute_callback(every: int, groups, chat: ChatPrompt, compat: CompatConfig, table: WeightTable):
    from transformers import TrainerCallback

    class RecomputeCompat(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 and state.global_step < state.max_steps:
                records = measure_problems(model, chat, groups, compat, "", "")
                alphas = {
                    r.source: c.alpha
                    for group, record in zip(groups, records)
                    for r, c in zip(group, record.rationales)
                }
                table.update(alphas)

    return RecomputeCompat()


class DistillManifest(BaseModel):
    student: dict[str, Any]
    config: dict[str, Any]
    data: str  # sha256 of the training file
    examples: int
    problems: int
    status: str
    wall_seconds: float = 0.0
    losses: list[tuple[int, float]] = []  # (step, logged training loss)
    recomputed: int = 0  # times alpha was recomputed from the student in training
    resumed_from: list[int] = []  # the checkpoint step each re-run of an interrupted run started at


def data_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_manifest(out: Path, manifest: DistillManifest, overwrite: bool) -> DistillManifest:
    """The manifest to continue from: a finished or interrupted run of the same data and settings
    resumes (from its last checkpoint); any other is refused before anything is touched."""
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise CordgenError(f"{out}: --out is a file, not a directory")
    if path.exists() and not overwrite:
        earlier = DistillManifest.model_validate(orjson.loads(path.read_bytes()))
        same = (earlier.student, earlier.config, earlier.data) == (
            manifest.student,
            manifest.config,
            manifest.data,
        )
        if not same:
            raise CordgenError(
                f"{out}: holds a distillation of other data or settings (use --overwrite or another --out)"
            )
        return earlier
    if overwrite:
        for checkpoint in out.glob("checkpoint-*"):
            shutil.rmtree(checkpoint)
    return manifest


def last_checkpoint(out: Path) -> str | None:
    """The latest checkpoint in `out` whose trainer state was written. The Trainer writes that
    file last, so a run killed while saving leaves a folder without it, which is passed over."""
    complete = [
        (int(path.name.removeprefix("checkpoint-")), path)
        for path in out.glob("checkpoint-*")
        if path.name.removeprefix("checkpoint-").isdigit() and (path / "trainer_state.json").is_file()
    ]
    return str(max(complete)[1]) if complete else None


def start_step_recorder():
    """A callback keeping the step training starts at: 0, or the checkpoint's step on a resume."""
    from transformers import TrainerCallback

    class StartStep(TrainerCallback):
        step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.step = state.global_step

    return StartStep()


def save_student(trainer, tokenizer, out: Path, lora: bool) -> None:
    """The trained student as a full model in `out` (LoRA merged in; the adapter in out/adapter),
    ready for `cordgen synth`, vLLM or another distillation."""
    model = trainer.model
    if lora:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def training_args(out: Path, config: DistillConfig, student: StudentSettings, quiet: bool):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        seed=config.seed,
        bf16=config.mixed_precision == "bf16",
        fp16=config.mixed_precision == "fp16",
        use_cpu=student.device == "cpu" or (student.device == "auto" and not torch.cuda.is_available()),
        max_length=config.max_length,
        disable_tqdm=quiet,
        dataloader_num_workers=0,
    )


def weighted_trainer(
    examples: Sequence[DistillExample],
    out: Path,
    student: StudentSettings,
    config: DistillConfig,
    compat: CompatConfig = CompatConfig(),
    fmt: StepFormat = StepFormat(),
    quiet: bool = True,
):
    """(the trainer `distill` runs, the weight table its collator reads): the student loaded and
    the examples tokenized, with alpha recomputed in training when the config asks."""
    from datasets import Dataset

    from cordgen.student import load_student

    model, tokenizer = load_student(student)
    chat = ChatPrompt(tokenizer, student.chat, fmt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    rows = [
        tokenize_example(chat, tokenizer.eos_token_id, e, config.max_length) | {"example": i}
        for i, e in enumerate(examples)
    ]
    table = WeightTable(examples, config)
    callbacks = []
    if config.recompute_every:
        groups = rationale_groups(examples, fmt)
        callbacks.append(recompute_callback(config.recompute_every, groups, chat, compat, table))
    trainer = weighted_trainer_class()(
        model=model,
        args=training_args(out, config, student, quiet),
        data_collator=WeightedCollator(pad_id, table),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=callbacks,
    )
    return trainer, table


def distill(
    data: Path,
    out: Path,
    student: StudentSettings,
    config: DistillConfig,
    compat: CompatConfig = CompatConfig(),
    fmt: StepFormat = StepFormat(),
    overwrite: bool = False,
    quiet: bool = False,
) -> DistillManifest:
    examples = read_examples(data)
    check_examples(data, examples, config)
    fresh = DistillManifest(
        student=semantic_view(student),
        config=semantic_view(config) | {"compat": semantic_view(compat), "format": semantic_view(fmt)},
        data=data_digest(data),
        examples=len(examples),
        problems=len({e.problem_id for e in examples}),
        status="running",
    )
    manifest = start_manifest(out, fresh, overwrite)
    if manifest.status == "complete":
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / MANIFEST, manifest.model_dump_json(indent=2).encode())
    trainer, table = weighted_trainer(examples, out, student, config, compat, fmt, quiet)
    start = start_step_recorder()
    trainer.add_callback(start)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_checkpoint(out))
    save_student(trainer, trainer.processing_class, out, config.lora is not None)
    history = trainer.state.log_history
    manifest = manifest.model_copy(
        update={
            "status": "complete",
            "wall_seconds": manifest.wall_seconds + time.perf_counter() - started,
            "losses": [(h["step"], h["loss"]) for h in history if "loss" in h],
            "recomputed": manifest.recomputed + table.recomputed,
            "resumed_from": manifest.resumed_from + ([start.step] if start.step else []),
        }
    )
    write_atomically(out / MANIFEST, manifest.model_dump_json(indent=2).encode())
    return manifest


def lora_config(config: DistillConfig):
    if config.lora is None:
        return None
    from peft import LoraConfig

    lora = config.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
