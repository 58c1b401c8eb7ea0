"""The shipped demo: its recipe, teachers and scorer, end to end through the CLI `make demo` runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "demo_models"))

import task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORDGEN = str(Path(sys.executable).with_name("cordgen"))
WEIGHTS = ROOT / "benchmarks" / "demo_models" / "weights"

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("name", ["teacher-a", "teacher-b", "teacher-c", "scorer", "scorer-final"])
def test_shipped_models_are_small_and_load_their_own_tokenizer(name):
    from transformers import AutoTokenizer

    directory = WEIGHTS / name
    assert (directory / "model.safetensors").stat().st_size < 10 * 2**20
    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = "### Step 2. 85 * 3 = 255\n</think> The final answer is 255."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_demo_recipe_synthesizes_scores_and_exports(tmp_path):
    problems = tmp_path / "problems.jsonl"
    lines = (ROOT / "benchmarks" / "demo_models" / "problems.jsonl").read_text().splitlines()
    problems.write_text("\n".join(lines[:12]) + "\n")
    out = tmp_path / "run"
    for args in (
        ["synth", "--config", "configs/demo.yaml", "--input", str(problems), "--out", str(out), "-q"],
        ["score", str(out), "-q"],
        ["export", str(out), "--jsonl", str(out / "sft.jsonl")],
    ):
        done = subprocess.run([CORDGEN, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    records = [orjson.loads(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    steps = [s for r in records for s in r["result"]["steps"]]
    assert len(records) == 12 and all(r["result"]["finished"] for r in records)
    assert sum(task.parse_step(s["text"]) is not None for s in steps) >= 0.9 * len(steps)
    assert {s["teacher"] for s in steps} <= {"teacher-a", "teacher-b", "teacher-c"}
    right = sum(r["result"]["final_answer"]["extracted"] == r["answer"] for r in records)
    assert right >= 6, f"{right}/12 right"  # teachers alone: 21-50%; the shipped run: 80%
    assert len((out / "sft.jsonl").read_bytes().splitlines()) == 12
