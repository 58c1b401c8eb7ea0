"""Export to fine-tuning JSONL without engines: both layouts, the filters, atomic writes, and a
round trip through `datasets` and a real tokenizer's chat template."""

from __future__ import annotations

from pathlib import Path

import datasets
import orjson
import pytest
import yaml
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from cordgen.cli import app
from cordgen.errors import CordgenError
from cordgen.export import export_run
from cordgen.records import Grade, ScoreRecord, StepScore, TraceRecord, trajectory_record
from cordgen.search import Beam, ClosedBy, FinalAnswer, FinishReason, Step
from cordgen.store import RunDirectory
from cordgen.synth import plan_run
from tests.helpers import make_record, resolved, snapshot, write_problems, write_recipe
from tests.tiny_models import CHATML

# q0: two steps, by b and then a (the record's teacher list is [a, b]), the last without a
# trailing newline
Q0_TEXT = "<think>\n### Step 1. 1 + 1 = 2\n### Step 2. 2 + 1 = 3</think>\n\nThe final answer is 3."
Q1_TEXT = "<think>\n### Step 1. 1 + 1 = 2\n</think>\n\nThe final answer is 1."


def two_step_record(problem_id: str) -> TraceRecord:
    steps = (
        Step(" 1 + 1 = 2\n", ("b",), 6, FinishReason.STEP, 1, 0.5),
        Step(" 2 + 1 = 3", ("a", "b"), 5, FinishReason.END_OF_THINKING, 2, 0.25),
    )
    final = FinalAnswer("b", " The final answer is 3.\n", 7, FinishReason.EOS)
    result = trajectory_record(Beam(steps, ClosedBy.END_OF_THINKING), final)
    return make_record(problem_id, "3").model_copy(update={"result": result})


def unfinished(record: TraceRecord) -> TraceRecord:
    result = record.result.model_copy(
        update={"finished": False, "closed_by": "max_steps", "final_answer": None}
    )
    return record.model_copy(update={"result": result})


def graded(problem_id: str, correct: bool, perplexity: float = 1.5) -> ScoreRecord:
    grade = Grade(
        status="correct" if correct else "wrong", correct=correct, predicted="3" if correct else "7"
    )
    steps = [StepScore(index=1, score=0.9, perplexity=1 / 0.9)]
    return ScoreRecord(
        id=problem_id, scorer="a", steps=steps, score=1 / perplexity, perplexity=perplexity, grade=grade
    )


def write_scores(run: Path, *scores: ScoreRecord, torn: bytes = b"") -> None:
    (run / "scores.jsonl").write_bytes(b"".join(s.to_json_line() for s in scores) + torn)


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Enough of a real tokenizer to render its chat template."""
    word_level = Tokenizer(models.WordLevel({"<|im_end|>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    fast = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


def make_run(tmp_path: Path, records: list[TraceRecord], step_format: dict | None = None) -> Path:
    recipe_path = write_recipe(tmp_path)
    if step_format is not None:
        recipe_path.write_text(
            yaml.safe_dump({**yaml.safe_load(recipe_path.read_text()), "format": step_format})
        )
    problems = write_problems(tmp_path / "problems.jsonl")
    plan = plan_run(resolved(recipe_path, input=problems, out=tmp_path / "run"))
    plan.run_dir.begin(plan.recipe, plan.manifest, False)
    with plan.run_dir.writer() as append:
        append(records)
    return plan.run_dir.path


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(
        tmp_path, [two_step_record("q0"), make_record("q1"), unfinished(make_record("q2")), make_record("q3")]
    )


def read_rows(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def texts(path: Path) -> dict[str, str]:
    return {row["metadata"]["id"]: row["messages"][-1]["content"] for row in read_rows(path)}


@pytest.mark.parametrize("layout", ["messages", "sharegpt"])
def test_round_trip_through_datasets(run, tmp_path, layout):
    write_scores(run, graded("q0", correct=True))  # scored and unscored rows share one schema
    out = tmp_path / "out.jsonl"
    report = export_run(run, out, format=layout)
    assert report.kept == 3 and report.dropped == {"unfinished": 1}
    loaded = datasets.load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    rows = read_rows(out)
    assert loaded.num_rows == 3 and loaded.column_names == list(rows[0])
    assert loaded.to_list() == rows


def test_messages_render_through_a_chat_template(run, tmp_path):
    out = tmp_path / "out.jsonl"
    export_run(run, out)
    tokenizer = chat_tokenizer()
    rows = read_rows(out)
    for row in rows:
        question = row["messages"][0]["content"]
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert question in rendered and "<|im_start|>assistant\n<think>\n### Step 1." in rendered
        assert "</think>\n\nThe final answer is" in rendered
    assert rows[0] == {
        "messages": [{"role": "user", "content": "question q0"}, {"role": "assistant", "content": Q0_TEXT}],
        "metadata": {
            "id": "q0",
            "gold_answer": "3",
            "strategy": "cord",
            "teachers": ["b", "a"],  # per step, not the record's list
            "step_scores": [0.5, 0.25],
            "score": 0.25,
            "perplexity": 4.0,
            "correct": None,
            "predicted_answer": "3",
            "num_tokens": 11,
        },
    }


def test_sharegpt_layout_and_system_prompt(run, tmp_path):
    out = tmp_path / "out.jsonl"
    export_run(run, out, format="sharegpt", system_prompt="Think step by step.")
    row = read_rows(out)[1]
    assert list(row) == ["system", "conversations", "metadata"] and row["system"] == "Think step by step."
    assert row["conversations"] == [
        {"from": "user", "value": "question q1"},
        {"from": "assistant", "value": Q1_TEXT},
    ]
    export_run(run, out, format="sharegpt")
    assert read_rows(out)[1]["system"] == ""
    export_run(run, out, system_prompt="Think step by step.")
    assert read_rows(out)[1]["messages"][0] == {"role": "system", "content": "Think step by step."}


def test_without_think_tags(run, tmp_path):
    out = tmp_path / "out.jsonl"
    export_run(run, out, think_tags=False)
    assert texts(out) == {
        "q0": "### Step 1. 1 + 1 = 2\n### Step 2. 2 + 1 = 3\n\nThe final answer is 3.",
        "q1": "### Step 1. 1 + 1 = 2\n\nThe final answer is 1.",
        "q3": "### Step 1. 1 + 1 = 2\n\nThe final answer is 1.",
    }


def test_the_step_format_comes_from_the_run(tmp_path):
    run = make_run(
        tmp_path,
        [make_record("q1")],
        {"marker": "Step", "think_open": "<reason>", "think_close": "</reason>"},
    )
    out = tmp_path / "out.jsonl"
    export_run(run, out)
    assert texts(out) == {"q1": "<reason>\nStep 1. 1 + 1 = 2\n</reason>\n\nThe final answer is 1."}
    (run / "config.yaml").unlink()
    export_run(run, out)
    assert texts(out) == {"q1": Q1_TEXT}


def test_only_correct_uses_scores_and_ignores_a_torn_last_line(run, tmp_path):
    torn = graded("q3", correct=True).to_json_line()[:30]
    write_scores(
        run, graded("q0", correct=False), graded("q1", correct=True), graded("q0", correct=True), torn=torn
    )
    out = tmp_path / "out.jsonl"
    report = export_run(run, out, only_correct=True)
    assert report.kept == 2 and report.dropped == {"unfinished": 1, "not scored": 1}
    rows = read_rows(out)
    assert [r["metadata"]["id"] for r in rows] == ["q0", "q1"]  # the later line for q0 wins
    meta = rows[0]["metadata"]
    assert meta["step_scores"] == [0.9, None] and meta["perplexity"] == 1.5 and meta["correct"] is True
    assert meta["predicted_answer"] == "3" and meta["score"] == pytest.approx(1 / 1.5)
    write_scores(run, graded("q0", correct=False), graded("q1", correct=True), graded("q3", correct=False))
    assert export_run(run, out, only_correct=True).dropped == {"not correct": 2, "unfinished": 1}


def test_max_perplexity_drops_high_and_unknown(run, tmp_path):
    no_score = make_record("q4")
    step = no_score.result.steps[0].model_copy(update={"score": None, "perplexity": None})
    no_score.result.steps, no_score.result.score = [step], None
    with RunDirectory(run).writer() as append:
        append([no_score])
    out = tmp_path / "out.jsonl"
    report = export_run(run, out, max_perplexity=3)
    assert report.kept == 2 and report.dropped == {"perplexity above 3": 2, "unfinished": 1}
    assert list(texts(out)) == ["q1", "q3"]
    write_scores(run, graded("q0", correct=True, perplexity=2.5))  # scores.jsonl's perplexity counts
    export_run(run, out, max_perplexity=3)
    assert list(texts(out)) == ["q0", "q1", "q3"]


def test_include_unfinished(run, tmp_path):
    out = tmp_path / "out.jsonl"
    report = export_run(run, out, include_unfinished=True)
    assert report.kept == 4 and report.dropped == {}
    row = read_rows(out)[2]
    assert row["messages"][-1]["content"] == "<think>\n### Step 1. 1 + 1 = 2\n</think>"
    assert row["metadata"]["predicted_answer"] is None


def test_a_failed_export_leaves_the_old_file_and_no_temporary(run, tmp_path):
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    out = out_dir / "out.jsonl"
    out.write_bytes(b"previous export\n")
    with pytest.raises(CordgenError, match=r"no scores.jsonl .*run `cordgen score .*run` first"):
        export_run(run, out, only_correct=True)
    with open(run / "results.jsonl", "ab") as handle:  # fails after rows were already written
        handle.write(b"{not json}\n")
    with pytest.raises(CordgenError, match=r"results.jsonl:5: corrupt result line"):
        export_run(run, out)
    assert out.read_bytes() == b"previous export\n" and [p.name for p in out_dir.iterdir()] == ["out.jsonl"]


def invoke(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def test_cli_prints_a_summary(run, tmp_path):
    out = tmp_path / "out.jsonl"
    result = invoke(str(run), "--jsonl", str(out), "--format", "sharegpt", "--no-think-tags")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"exported 3 of 4 traces to {out} (dropped: unfinished 1)"
    assert read_rows(out)[1]["conversations"][1]["value"] == "### Step 1. 1 + 1 = 2\n\nThe final answer is 1."


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{tmp}/nowhere"], "nowhere: no results.jsonl; not a cordgen run directory"),
        (["{run}", "--format", "alpaca"], "--format: 'alpaca' is not one of: messages, sharegpt"),
        (["{run}", "--only-correct"], "no scores.jsonl to tell correct traces; run `cordgen score"),
        (["{run}", "--jsonl", "{run}/results.jsonl"], "would replace the run's own records"),
    ],
    ids=["not a run", "unknown format", "unscored run", "export onto the records"],
)
def test_cli_refuses_in_one_line(run, tmp_path, args, expected):
    before = snapshot(run)
    filled = [a.format(tmp=tmp_path, run=run) for a in args]
    result = invoke(*filled, *([] if "--jsonl" in filled else ["--jsonl", str(tmp_path / "out.jsonl")]))
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert snapshot(run) == before and not (tmp_path / "out.jsonl").exists()
