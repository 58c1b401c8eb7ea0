"""`cordgen distill`: the weighted loss by hand, the weights' scaling, input errors, and real
TRL runs of a few steps on the shipped demo model (full weights, then LoRA with alpha recomputed
from the student in training), resumable from their output directory."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest
import torch
from typer.testing import CliRunner

from cordgen.cli import app
from cordgen.config import DistillConfig, LoraSettings, StudentSettings
from cordgen.distill import distill, example_scales, read_examples, weighted_sequence_loss
from cordgen.errors import CordgenError
from tests.test_compat import DEMO_STUDENT


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


@pytest.fixture
def data(tmp_path) -> Path:
    return write_rows(tmp_path / "export.jsonl", example_rows(12))


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


def test_distill_lowers_the_loss_and_resumes_as_done(data, tmp_path):
    out = tmp_path / "student"
    manifest = distill(data, out, STUDENT, DistillConfig(weighting="compat", **FEW_STEPS), quiet=True)
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


def test_lora_distill_recomputes_alpha_from_the_student_in_training(data, tmp_path):
    out = tmp_path / "lora"
    config = DistillConfig(lora=LoraSettings(r=4), recompute_every=4, **FEW_STEPS)
    manifest = distill(data, out, STUDENT, config, quiet=True)
    first, last = first_and_last_loss(manifest.losses)
    assert last < first and manifest.recomputed == 2  # at steps 4 and 8; none after the last step
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()


def test_a_failure_inside_distill_is_one_line_with_the_run_status(tmp_path, data):
    """A student whose weights are missing fails after the data was read: one `error:` line and
    exit status 3 (a run failure), not a traceback."""
    import shutil

    student = tmp_path / "student"
    shutil.copytree(DEMO_STUDENT, student, ignore=shutil.ignore_patterns("*.safetensors"))
    args = ["distill", str(data), "--student", str(student), "--out", str(tmp_path / "o"), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: OSError: ") and line.endswith("(--debug shows the traceback)")
