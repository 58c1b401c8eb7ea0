"""`cordgen score`: traces from cordgen runs and from other tools, scored and graded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from cordgen.config import Recipe, StepFormat
from cordgen.errors import CordgenError
from cordgen.records import Grade, ScoreRecord, StepScore, TraceRecord
from cordgen.scoring import (
    ForeignFields,
    execute_scoring,
    foreign_traces,
    plan_scoring,
    split_response,
)
from cordgen.store import RunDirectory, load_scores
from cordgen.synth import NoObserver, execute, plan_run
from tests.test_synth import recipe_data
from tests.tiny_models import make_problems

FMT = StepFormat()


@pytest.mark.parametrize(
    ("response", "steps", "graded"),
    [
        (
            "<think>\n### Step 1. a\n### Step 2. b\n</think> The final answer is 3.",
            (" a\n", " b\n"),
            " The final answer is 3.",
        ),
        ("### Step 1. a\n### Step 2. b\n</think>\n\nAnswer: 3", (" a\n", " b\n"), "\n\nAnswer: 3"),
        ("<think>\nI add them: 1 + 2 = 3.\n</think> 3", ("I add them: 1 + 2 = 3.\n",), " 3"),
        (
            "1 + 2 = 3, so the answer is 3.",
            ("1 + 2 = 3, so the answer is 3.",),
            "1 + 2 = 3, so the answer is 3.",
        ),
        ("", (), ""),
    ],
)
def test_foreign_responses_split_into_steps_and_the_text_to_grade(response, steps, graded):
    assert split_response(FMT, response) == (steps, graded)


def test_foreign_jsonl_with_responses_or_messages(tmp_path):
    rows = [
        {"question": "Q1", "answer": "3", "response": "<think>\n### Step 1. x\n</think> 3"},
        {
            "question": "Q2",
            "answer": "4",
            "messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "4"}],
        },
    ]
    path = tmp_path / "foreign.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    traces = list(foreign_traces(path, ForeignFields(), FMT))
    assert [(t.id, t.steps, t.response) for t in traces] == [("1", (" x\n",), " 3"), ("2", ("4",), "4")]
    path.write_bytes(orjson.dumps({"question": "Q", "answer": "1", "text": "hi"}) + b"\n")
    with pytest.raises(
        CordgenError, match="foreign.jsonl: id 1: neither a 'response' string nor an assistant message"
    ):
        list(foreign_traces(path, ForeignFields(), FMT))


def test_a_foreign_file_needs_a_scorer(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(orjson.dumps({"question": "Q", "answer": "1", "response": "1"}) + b"\n")
    with pytest.raises(CordgenError, match="--scorer"):
        plan_scoring(path)


def score_record(trace_id: str, kind: str, score: float) -> ScoreRecord:
    grade = Grade(status="correct", correct=True, predicted="1")
    perplexity = 1 / score if kind == "predictive" else None
    step = StepScore(index=1, score=score, perplexity=perplexity)
    return ScoreRecord(
        id=trace_id, scorer="s", kind=kind, steps=[step], score=score, perplexity=perplexity, grade=grade
    )


def test_the_summary_shows_perplexity_for_the_predictive_kind_and_p_correct_for_the_others():
    from cordgen.progress import spread_rows

    predictive = [score_record("a", "predictive", 0.5), score_record("b", "predictive", 0.25)]
    assert spread_rows(predictive) == [("perplexity", [2.0, 4.0])]
    verifier = [score_record("a", "verifier", 0.9), score_record("b", "verifier", 0.6)]
    assert spread_rows(verifier) == [("verifier score", [0.9, 0.6])]
    assert [label for label, _ in spread_rows([*verifier, *predictive])] == ["perplexity", "verifier score"]


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory, tiny_model_dirs, engine_pool, alpha_model, beta_model) -> Path:
    root = tmp_path_factory.mktemp("scoring")
    rows = [
        {"id": f"s{i}", "question": p.question, "answer": p.answer} for i, p in enumerate(make_problems(6, 7))
    ]
    (root / "problems.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    data = {**recipe_data(tiny_model_dirs), "input": {"path": str(root / "problems.jsonl")}}
    recipe = Recipe.model_validate({**data, "output": {"path": str(root / "run")}})
    execute(plan_run(recipe), NoObserver(), lambda records: None, pool=engine_pool)
    return root / "run"


@pytest.mark.engine
def test_scoring_a_run_reproduces_its_synthesis_scores_and_grades_answers(synth_run, engine_pool):
    written = (synth_run / "results.jsonl").read_bytes()
    plan = plan_scoring(synth_run)
    assert plan.scorer.name == "alpha-scorer" and len(plan.todo) == 6
    execute_scoring(plan, lambda records, tokens: None, batch_size=4, pool=engine_pool)
    scores = load_scores(plan.output.path)
    records = {r.id: r for r in RunDirectory(synth_run).records()}
    assert set(scores) == set(records)
    for problem_id, score in scores.items():
        record = records[problem_id]
        assert [s.score for s in score.steps] == pytest.approx(
            [s.score for s in record.result.steps], rel=1e-3
        )
        assert score.score == pytest.approx(record.result.score, rel=1e-3)
        expected = record.result.final_answer.extracted == record.answer
        assert score.grade.status == ("correct" if expected else "wrong")
    assert (synth_run / "results.jsonl").read_bytes() == written  # scoring never rewrites records


@pytest.mark.engine
def test_scoring_resumes_after_a_torn_write(synth_run, engine_pool, tmp_path):
    out = tmp_path / "scores.jsonl"
    execute_scoring(plan_scoring(synth_run, out), lambda r, t: None, pool=engine_pool)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:30])
    again = plan_scoring(synth_run, out)
    assert len(again.todo) == 4
    execute_scoring(again, lambda r, t: None, pool=engine_pool)
    ids = [orjson.loads(line)["id"] for line in out.read_bytes().splitlines()]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6
    with pytest.raises(CordgenError, match="scored by alpha-scorer, not beta"):
        plan_scoring(synth_run, out, scorer_spec="beta")


@pytest.mark.engine
def test_another_kind_rescores_a_finished_run_into_its_own_file(synth_run, engine_pool, tmp_path):
    recipe = yaml.safe_load((synth_run / "config.yaml").read_text())
    recipe["scorer"]["verifier"] = {"yes": "Y", "no": "N"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    plan = plan_scoring(synth_run, recipe_path=tmp_path / "recipe.yaml", kind="hybrid", verifier_spec="beta")
    assert plan.output.path == synth_run / "scores.hybrid.jsonl"
    assert plan.scorer.verifier.engine.model == recipe["teachers"][1]["engine"]["model"]
    execute_scoring(plan, lambda records, tokens: None, pool=engine_pool)
    scores = load_scores(plan.output.path)
    records = {r.id: r for r in RunDirectory(synth_run).records()}
    for problem_id, score in scores.items():
        assert score.kind == "hybrid"
        steps = records[problem_id].result.steps
        assert [s.scores["predictive"] for s in score.steps] == pytest.approx(
            [s.score for s in steps], rel=1e-3
        )
        for step in score.steps:
            assert 0 < step.scores["verifier"] < 1
            assert step.score == pytest.approx(step.scores["predictive"] * step.scores["verifier"], rel=1e-6)
    with pytest.raises(CordgenError, match=r"scored by alpha-scorer \(hybrid\), not alpha-scorer \(random\)"):
        plan_scoring(synth_run, plan.output.path, kind="random")


@pytest.mark.engine
def test_the_likelihood_kind_rescores_a_finished_run_with_the_scorer_alone_and_a_hybrid_names_it(
    synth_run, engine_pool, tmp_path
):
    plan = plan_scoring(synth_run, kind="likelihood")
    assert plan.output.path == synth_run / "scores.likelihood.jsonl" and plan.scorer.engines() == {
        plan.scorer.engine: plan.scorer.name
    }
    execute_scoring(plan, lambda records, tokens: None, pool=engine_pool)
    records = {r.id: r for r in RunDirectory(synth_run).records()}
    for problem_id, score in load_scores(plan.output.path).items():
        assert score.kind == "likelihood" and len(score.steps) == len(records[problem_id].result.steps)
        assert all(step.scores == {"likelihood": step.score} and 0 < step.score <= 1 for step in score.steps)
    hybrid = plan_scoring(synth_run, kind="hybrid", hybrid_with="likelihood")
    assert hybrid.output.path == synth_run / "scores.hybrid-likelihood.jsonl"
    assert hybrid.scorer.components == ("predictive", "likelihood")
    execute_scoring(hybrid, lambda records, tokens: None, pool=engine_pool)
    assert {s.kind for s in load_scores(hybrid.output.path).values()} == {"hybrid-likelihood"}
    recipe = yaml.safe_load((synth_run / "config.yaml").read_text())
    recipe["scorer"]["verifier"] = {"yes": "Y", "no": "N"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    name = recipe["scorer"]["name"]
    with pytest.raises(
        CordgenError, match=rf"scored by {name} \(hybrid-likelihood\), not {name} \(hybrid-verifier\)"
    ):
        plan_scoring(  # another hybrid into the same file
            synth_run,
            hybrid.output.path,
            recipe_path=tmp_path / "recipe.yaml",
            kind="hybrid",
            hybrid_with="verifier",
            verifier_spec="beta",
        )
    with pytest.raises(CordgenError, match="--hybrid-with is read only by kind hybrid, not by kind verifier"):
        plan_scoring(synth_run, kind="verifier", hybrid_with="likelihood")


@pytest.mark.engine
def test_the_prm_kind_rescores_a_finished_run_into_scores_prm_jsonl(
    synth_run, engine_pool, prm_model, tiny_prm_dir, tmp_path
):
    recipe = yaml.safe_load((synth_run / "config.yaml").read_text())
    recipe["scorer"]["prm"] = {"engine": prm_model.settings.model_dump(mode="json", exclude_none=True)}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    plan = plan_scoring(synth_run, recipe_path=tmp_path / "recipe.yaml", kind="prm")
    assert plan.output.path == synth_run / "scores.prm.jsonl"
    assert plan.scorer.prm.engine == prm_model.settings
    execute_scoring(plan, lambda records, tokens: None, pool=engine_pool)
    scores = load_scores(plan.output.path)
    records = {r.id: r for r in RunDirectory(synth_run).records()}
    assert set(scores) == set(records)
    for problem_id, score in scores.items():
        assert score.kind == "prm" and len(score.steps) == len(records[problem_id].result.steps)
        assert all(0 < s.score < 1 and s.scores == {"prm": s.score} for s in score.steps)
    named = plan_scoring(synth_run, tmp_path / "other.jsonl", kind="prm", prm_spec=tiny_prm_dir)
    assert (named.scorer.prm.engine.model, named.scorer.prm.engine.runner) == (tiny_prm_dir, "pooling")
    assert named.scorer.engines() == {named.scorer.prm.engine: "alpha-scorer-prm"}


@pytest.mark.engine
def test_foreign_traces_score_like_the_same_trace_in_a_run(synth_run, engine_pool, tmp_path):
    records = list(RunDirectory(synth_run).records())
    rows = []
    for record in records:
        thinking = "".join(f"### Step {s.index}.{s.text}" for s in record.result.steps)
        response = f"<think>\n{thinking}</think>{record.result.final_answer.text}"
        rows.append(
            {"id": record.id, "problem": record.question, "solution": record.answer, "response": response}
        )
    path = tmp_path / "other-tool.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    fields = ForeignFields(question="problem", answer="solution")
    plan = plan_scoring(path, scorer_spec="alpha", recipe_path=synth_run / "config.yaml", fields=fields)
    execute_scoring(plan, lambda r, t: None, pool=engine_pool)
    scores = load_scores(plan.output.path)
    assert plan.output.path == tmp_path / "other-tool.scores.jsonl"
    for record in records:
        assert scores[record.id].score == pytest.approx(record.result.score, rel=1e-3)


@pytest.mark.engine
def test_synth_score_export_end_to_end_through_the_cli(tiny_model_dirs, tmp_path):
    """The three commands a user runs, as subprocesses, on one tiny teacher that also scores."""
    data = recipe_data({"alpha": tiny_model_dirs["alpha"]})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    rows = [{"question": p.question, "answer": p.answer} for p in make_problems(4, 7)]
    (tmp_path / "problems.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    cordgen = str(Path(sys.executable).with_name("cordgen"))
    run = tmp_path / "run"
    steps = [
        [
            "synth",
            "-c",
            str(tmp_path / "recipe.yaml"),
            "-i",
            str(tmp_path / "problems.jsonl"),
            "-o",
            str(run),
        ],
        ["score", str(run)],
        ["export", str(run), "--jsonl", str(tmp_path / "sft.jsonl"), "--only-correct"],
    ]
    outputs = []
    for args in steps:
        result = subprocess.run([cordgen, *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (args, result.stderr[-3000:])
        outputs.append(result.stderr)
    assert "accuracy (of judged)" in outputs[1] and (run / "scores.jsonl").exists()
    exported = [orjson.loads(line) for line in (tmp_path / "sft.jsonl").read_bytes().splitlines()]
    assert exported and all(row["metadata"]["correct"] is True for row in exported)
    assert all(row["messages"][-1]["content"].startswith("<think>\n### Step 1.") for row in exported)
    records = [
        TraceRecord.model_validate(orjson.loads(line))
        for line in (run / "results.jsonl").read_bytes().splitlines()
    ]
    assert sorted(r.id for r in records) == ["1", "2", "3", "4"]
