"""`cordgen distill`: the weighted loss by hand, the weights' scaling, input errors, and real
TRL runs of a few steps on the shipped demo model: each example's scale in the batches the
trainer's loss sees, compat and uniform weighting learning differently, alpha recomputed from the
student in training changing its scales and weights, the LoRA adapter merged into the saved
model, and a run killed with SIGKILL resuming from its last checkpoint."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

from cordgen.cli import app
from cordgen.config import DistillConfig, LoraSettings, StepFormat, StudentSettings
from cordgen.distill import (
    DistillManifest,
    distill,
    example_scales,
    read_examples,
    tokenize_example,
    weighted_sequence_loss,
    weighted_trainer,
)
from cordgen.errors import CordgenError
from cordgen.prompts import ChatPrompt
from cordgen.student import load_student
from tests.test_compat import DEMO_STUDENT

SRC = Path(__file__).resolve().parents[1] / "src"


def test_weighted_loss_equals_the_hand_computed_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, 6]])
    scales = torch.tensor([1.5, 0.5])
    expected = 0.0
    for i in range(2):
        nlls = [
            -logits[i, t - 1].log_softmax(-1)[labels[i, t]].item()
            for t in range(1, 5)
            if labels[i, t] != -100
        ]
        expected += scales[i].item() * sum(nlls) / len(nlls)
    assert weighted_sequence_loss(logits, labels, scales).item() == pytest.approx(expected / 2, rel=1e-5)


def test_scales_keep_each_problems_weights_shape_with_mean_one():
    scales = example_scales(["p", "p", "p", "q"], [0.6, 0.3, 0.1, 1.0])
    assert scales == pytest.approx([1.8, 0.9, 0.3, 1.0])
    assert example_scales(["p", "p"], [0.0, 0.0]) == [1.0, 1.0]


def response(steps: list[str], answer: int) -> str:
    thinking = "".join(f"### Step {i}.{s}" for i, s in enumerate(steps, start=1))
    return f"<think>\n{thinking}</think>\n\nThe final answer is {answer}."


def example_rows(count: int) -> list[dict]:
    """Per problem a correct and a wrong rationale, weighted 0.8 / 0.2 as an export would."""
    rows = []
    for i in range(count):
        a, b = 10 + i, 3 + i % 5
        good, bad = [f" {a} + {b} = {a + b}\n"], [f" {a} + {b} = {a + b + 1}\n"]
        for steps, total, weight in ((good, a + b, 0.8), (bad, a + b + 1, 0.2)):
            messages = [
                {"role": "user", "content": f"Start with {a}. Add {b}."},
                {"role": "assistant", "content": response(steps, total)},
            ]
            meta = {"id": f"p{i}", "gold_answer": str(a + b), "weight": weight}
            rows.append({"messages": messages, "metadata": meta})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "export.jsonl", example_rows(12))


def test_bad_examples_are_one_line_errors_naming_file_and_line(tmp_path, data):
    rows = example_rows(2)
    rows[2]["metadata"]["weight"] = "high"
    with pytest.raises(CordgenError, match=r"w.jsonl:3: metadata.weight: expected a number"):
        read_examples(write_rows(tmp_path / "w.jsonl", rows))
    rows[2]["messages"] = [{"role": "user", "content": "q"}]
    with pytest.raises(CordgenError, match=r"m.jsonl:3: messages: no assistant turn"):
        read_examples(write_rows(tmp_path / "m.jsonl", rows))
    unweighted = example_rows(1)
    del unweighted[1]["metadata"]["weight"]
    path = write_rows(tmp_path / "u.jsonl", unweighted)
    result = CliRunner().invoke(
        app, ["distill", str(path), "--student", DEMO_STUDENT, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "u.jsonl: example 2: metadata.weight: missing; export with --weights compat" in result.output
    assert not (tmp_path / "o").exists()


def first_and_last_loss(losses: list[tuple[int, float]]) -> tuple[float, float]:
    assert len(losses) >= 2 and all(math.isfinite(loss) for _, loss in losses)
    return losses[0][1], losses[-1][1]


STUDENT = StudentSettings(model=DEMO_STUDENT, dtype="float32", device="cpu")
FEW_STEPS = dict(
    max_steps=12, batch_size=4, learning_rate=1e-3, logging_steps=3, save_steps=6, warmup_ratio=0.0
)


@pytest.fixture(scope="module")
def compat_run(data, tmp_path_factory) -> tuple[Path, DistillManifest]:
    """The reference run, compat weighting with full weights: other runs differ from it in one setting."""
    out = tmp_path_factory.mktemp("compat") / "student"
    return out, distill(data, out, STUDENT, DistillConfig(weighting="compat", **FEW_STEPS), quiet=True)


def test_distill_lowers_the_loss_and_resumes_as_done(data, compat_run):
    out, manifest = compat_run
    first, last = first_and_last_loss(manifest.losses)
    assert (
        last < first and manifest.status == "complete" and manifest.examples == 24 and manifest.problems == 12
    )
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    weights = (out / "model.safetensors").read_bytes()
    again = distill(data, out, STUDENT, DistillConfig(weighting="compat", **FEW_STEPS), quiet=True)
    assert again == manifest and (out / "model.safetensors").read_bytes() == weights
    args = [
        "distill",
        str(data),
        "--student",
        DEMO_STUDENT,
        "--out",
        str(out),
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    args += [
        "--max-steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--logging-steps",
        "3",
        "--save-steps",
        "6",
    ]
    result = CliRunner().invoke(app, [*args, "--warmup-ratio", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert (
        "distilled 24 examples of 12 problems" in result.output
        and (out / "model.safetensors").read_bytes() == weights
    )
    with pytest.raises(CordgenError, match="other data or settings"):
        distill(data, out, STUDENT, DistillConfig(weighting="uniform", **FEW_STEPS), quiet=True)


def batch_examples(trainer, batch: dict[str, torch.Tensor]) -> list[int]:
    """The example index of each row of a collated batch, found by its unpadded token ids (the
    collator drops the index; every example of `example_rows` has its own text)."""
    index_of = {tuple(row["input_ids"]): row["example"] for row in trainer.train_dataset}
    return [
        index_of[tuple(ids[mask.bool()].tolist())]
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]


def completion_nll(model, row: dict) -> float:
    """Mean NLL of a tokenized example's labelled tokens, from its own unpadded forward pass."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].log_softmax(-1)
    targets = torch.tensor(row["labels"][1:])
    learned = targets != -100
    return -logprobs[learned].gather(-1, targets[learned][:, None]).mean().item()


@pytest.mark.parametrize(
    "weighting, correct_scale, wrong_scale", [("compat", 1.6, 0.4), ("uniform", 1.0, 1.0)]
)
def test_each_examples_scale_reaches_compute_loss_through_the_collator(
    data, tmp_path, weighting, correct_scale, wrong_scale
):
    """A problem's 0.8 / 0.2 weights scale its examples' losses 1.6 / 0.4 (uniform: 1): the batch
    the trainer's own dataloader hands `compute_loss` carries them, and its loss is the mean of
    scale x NLL taken by hand, not the unweighted mean."""
    config = DistillConfig(weighting=weighting, **FEW_STEPS)
    trainer, _ = weighted_trainer(read_examples(data), tmp_path, STUDENT, config)
    batch = next(iter(trainer.get_train_dataloader()))
    examples = batch_examples(trainer, batch)
    scales = [correct_scale if i % 2 == 0 else wrong_scale for i in examples]  # rows alternate correct, wrong
    assert batch["example_scale"].tolist() == pytest.approx(scales)
    nlls = [completion_nll(trainer.model, trainer.train_dataset[i]) for i in examples]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert loss == pytest.approx(sum(s * n for s, n in zip(scales, nlls)) / len(examples), rel=1e-4)


def saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def differing_tensors(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in reference.items() if not torch.equal(tensor, other[name])]


def student_settings(path: Path) -> StudentSettings:
    return StudentSettings(model=str(path), dtype="float32", device="cpu")


def correct_minus_wrong_nll(path: Path, data: Path) -> float:
    """The student's mean NLL of each problem's correct rationale minus that of its wrong one."""
    model, tokenizer = load_student(student_settings(path))
    chat = ChatPrompt(tokenizer, STUDENT.chat, StepFormat())
    rows = [tokenize_example(chat, tokenizer.eos_token_id, e, 4096) for e in read_examples(data)]
    nlls = [completion_nll(model, row) for row in rows]
    return sum(nlls[0::2]) / len(nlls[0::2]) - sum(nlls[1::2]) / len(nlls[1::2])


def test_compat_and_uniform_weighting_train_different_students(data, compat_run, tmp_path):
    """Same data, seed and steps: the weighting alone changes what is learned. The 0.8 / 0.2
    weights favour each problem's correct rationale, so the compat student's NLL of the correct
    rationales falls further below that of the wrong ones than the uniform (plain SFT) student's."""
    out = tmp_path / "uniform"
    distill(data, out, STUDENT, DistillConfig(weighting="uniform", **FEW_STEPS), quiet=True)
    differing = differing_tensors(saved_tensors(compat_run[0]), saved_tensors(out))
    assert differing
    assert correct_minus_wrong_nll(compat_run[0], data) < correct_minus_wrong_nll(out, data)


def test_recompute_every_replaces_the_scales_the_collator_reads(data, compat_run, tmp_path):
    """Recomputing alpha at steps 4 and 8 rewrites every example's scale (each problem's still
    averaging 1), the collator hands the new ones out, and training follows: its logged loss is the
    reference run's until the first recompute and differs after, and so do the weights."""
    config = DistillConfig(weighting="compat", recompute_every=4, **FEW_STEPS)
    trainer, table = weighted_trainer(read_examples(data), tmp_path, STUDENT, config)
    exported = list(table.scales)
    trainer.train()
    assert table.recomputed == 2 and table.scales != pytest.approx(exported)
    assert [(a + b) / 2 for a, b in zip(table.scales[::2], table.scales[1::2])] == pytest.approx([1.0] * 12)
    batch = next(iter(trainer.get_train_dataloader()))
    expected = [table.scales[i] for i in batch_examples(trainer, batch)]
    assert batch["example_scale"].tolist() == pytest.approx(expected)
    reference_out, reference = compat_run
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    assert [step for step, _ in losses] == [step for step, _ in reference.losses] == [3, 6, 9, 12]
    assert losses[0][1] == pytest.approx(reference.losses[0][1])
    assert all(loss != pytest.approx(ref) for (_, loss), (_, ref) in zip(losses[1:], reference.losses[1:]))
    differing = differing_tensors(saved_tensors(reference_out), trainer.model.state_dict())
    assert differing


def test_lora_distill_recomputes_alpha_and_saves_the_merged_student(data, tmp_path):
    """The saved full model is the base with the trained adapter merged in: its logits are those
    of the base wearing out/adapter, and not the base's own."""
    out = tmp_path / "lora"
    config = DistillConfig(lora=LoraSettings(r=4), recompute_every=4, **FEW_STEPS)
    manifest = distill(data, out, STUDENT, config, quiet=True)
    first, last = first_and_last_loss(manifest.losses)
    assert last < first and manifest.recomputed == 2  # at steps 4 and 8; none after the last step
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    base, tokenizer = load_student(STUDENT)
    adapted = PeftModel.from_pretrained(load_student(STUDENT)[0], out / "adapter")
    merged, _ = load_student(student_settings(out))
    ids = torch.tensor([tokenizer.encode("Start with 12. Add 4.")])
    with torch.no_grad():
        logits = [m(input_ids=ids).logits for m in (base, adapted, merged)]
    base_logits, adapted_logits, merged_logits = logits
    from_adapted, from_base = (
        (merged_logits - other).abs().max().item() for other in (adapted_logits, base_logits)
    )
    # W + BA and Wx + B(Ax) sum in different orders: 1.1e-5 apart, measured on an AVX2-only CPU
    assert from_adapted < 1e-4 and from_base > 1e-3


def distill_command(data: Path, out: Path) -> list[str]:
    """FEW_STEPS as `cordgen distill` options, logging and checkpointing every step."""
    options = ["--device", "cpu", "--dtype", "float32", "--max-steps", "12", "--batch-size", "4"]
    options += ["--lr", "1e-3", "--warmup-ratio", "0", "--logging-steps", "1", "--save-steps", "1", "-q"]
    command = [sys.executable, "-m", "cordgen", "distill", str(data), "--student", DEMO_STUDENT]
    return [*command, "--out", str(out), *options]


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the checkpoints whose trainer state, the Trainer's last file, is written."""
    written = [p for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(int(p.name.removeprefix("checkpoint-")) for p in written)


def child_env() -> dict[str, str]:
    """The environment with this checkout's sources first, so the child runs the code under test."""
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def kill_at_first_checkpoint(command: list[str], out: Path, log: Path) -> int | None:
    """Starts the command in its own process group and SIGKILLs the group as soon as a checkpoint
    is complete; the command's return code."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, env=child_env(), stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not complete_checkpoints(out) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_a_killed_distill_resumes_from_its_last_checkpoint(data, compat_run, tmp_path):
    """A SIGKILL to the whole job once a checkpoint is written, then the same command: it starts
    at the last complete checkpoint's step, not 0 (passing over the folder a kill mid-save
    leaves), and ends at step 12 with the uninterrupted run's weights: optimizer, schedule and
    data order continued. Other settings in the interrupted folder are refused in one line."""
    out, command = tmp_path / "student", distill_command(data, tmp_path / "student")
    returncode = kill_at_first_checkpoint(command, out, tmp_path / "killed.log")
    assert returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    killed_at = complete_checkpoints(out)[-1]
    half_written = out / f"checkpoint-{killed_at + 1}"  # as a kill between model and trainer state leaves it
    half_written.mkdir(exist_ok=True)
    shutil.copy(out / f"checkpoint-{killed_at}" / "model.safetensors", half_written)
    refused = CliRunner().invoke(app, [*command[3:], "--weighting", "uniform"])
    (refusal,) = refused.stderr.strip().splitlines()
    assert refused.exit_code == 2 and "holds a distillation of other data or settings" in refusal
    rerun = CliRunner().invoke(app, command[3:])
    assert rerun.exit_code == 0, rerun.output
    manifest = DistillManifest.model_validate(orjson.loads((out / "distill.json").read_bytes()))
    assert manifest.status == "complete" and manifest.resumed_from == [killed_at]
    assert [step for step, _ in manifest.losses] == list(range(1, 13))
    resumed, uninterrupted = saved_tensors(out), saved_tensors(compat_run[0])
    assert all(torch.allclose(resumed[name], uninterrupted[name], atol=1e-6) for name in uninterrupted)


def test_a_failure_inside_distill_is_one_line_with_the_run_status(tmp_path, data):
    """A student whose weights are missing fails after the data was read: one `error:` line and
    exit status 3 (a run failure), not a traceback."""
    student = tmp_path / "student"
    shutil.copytree(DEMO_STUDENT, student, ignore=shutil.ignore_patterns("*.safetensors"))
    args = ["distill", str(data), "--student", str(student), "--out", str(tmp_path / "o"), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: OSError: ") and line.endswith("(--debug shows the traceback)")
