"""COMPACT's metrics: pure cases by hand, the packed forward pass against plain prompts, and the
metrics read off the shipped demo model (a student that knows chained arithmetic), `cordgen
compat` end to end with resume, and `cordgen export --weights compat`."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import orjson
import pytest
import torch
from typer.testing import CliRunner

from cordgen.cli import app
from cordgen.compat import (
    adaptability,
    compat_weights,
    consensus,
    difficulty,
    epiphany_steps,
    load_compat,
    plan_compat,
    run_compat,
    teacher_summary,
    zscores,
)
from cordgen.config import CompatConfig, StepFormat, StudentSettings
from cordgen.errors import CordgenError
from cordgen.records import CompatRecord, RationaleCompat
from cordgen.student import (
    RationaleMeasure,
    load_student,
    measure_rationales,
    pack_rationale,
    student_chat,
)
from tests.test_export import make_run, read_rows, two_step_record

DEMO_STUDENT = str(
    Path(__file__).resolve().parents[1] / "benchmarks" / "demo_models" / "weights" / "scorer-final"
)
QUESTION = "Start with 95. Add 40, subtract 26, multiply by 3."
STEPS = (" 95 + 40 = 135\n", " 135 - 26 = 109\n", " 109 * 3 = 327\n")
SUFFIX = CompatConfig().answer_suffix


def measure(values: list[float], tokens: list[int] | None = None) -> RationaleMeasure:
    tokens = tokens or [1] * (len(values) - 1)
    return RationaleMeasure(tuple([0.0] * len(tokens)), tuple(tokens), tuple(values), (1.0,))


def test_difficulty_is_the_token_weighted_mean_nll():
    m = RationaleMeasure((1.0, 4.0), (3, 1), (0.0, 0.0, 0.0), (1.0,))
    assert difficulty(m) == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)


def test_adaptability_sums_positive_gains_and_epiphanies_pass_the_threshold():
    answer = [-5.0, -5.2, -1.0, -0.9]
    assert adaptability(answer) == pytest.approx(4.2 + 0.1)
    assert epiphany_steps(answer, threshold=1.0) == [2]
    assert adaptability([-1.0, -2.0, -3.0]) == 0.0


def test_consensus_is_lowest_for_the_outlier():
    embeddings = [[1.0, 0.1, 0.0], [0.9, 0.2, 0.0], [1.0, 0.0, 0.1], [0.0, 0.0, 1.0]]
    c = consensus(embeddings)
    assert min(range(4), key=c.__getitem__) == 3
    assert c[0] == pytest.approx(
        sum(
            torch.nn.functional.cosine_similarity(
                torch.tensor([embeddings[0]]), torch.tensor(embeddings[1:])
            ).tolist()
        )
    )


def test_weights_sum_to_one_and_follow_each_signal():
    config = CompatConfig()
    alpha = compat_weights([1.0, 2.0, 0.5], [3.0, 1.0, 0.0], [0.2, 0.9, 0.4], config)
    assert sum(alpha) == pytest.approx(1.0)

    def population_z(values: list[float]) -> list[float]:  # by hand: the module's own zscores is under test
        mean = statistics.fmean(values)
        return [(v - mean) / statistics.pstdev(values) for v in values]

    assert zscores([1.0, 2.0, 0.5]) == pytest.approx(population_z([1.0, 2.0, 0.5]))
    z = [
        a + b - c
        for a, b, c in zip(
            population_z([1.0, 2.0, 0.5]), population_z([3.0, 1.0, 0.0]), population_z([0.2, 0.9, 0.4])
        )
    ]
    expected = [math.exp(v) / sum(math.exp(w) for w in z) for v in z]
    assert alpha == pytest.approx(expected)
    easier = compat_weights([0.0, 0.0], [0.0, 0.0], [0.1, 0.5], config)
    assert easier[0] > easier[1]
    assert compat_weights([1.0], [1.0], [1.0], config) == [1.0]
    assert compat_weights([1.0, 1.0], [2.0, 2.0], [3.0, 3.0], config) == [0.5, 0.5]
    only_consensus = CompatConfig(beta_adaptability=0, beta_difficulty=0)
    assert compat_weights([0.1, 0.9], [5.0, 0.0], [0.0, 9.0], only_consensus)[1] > 0.5


@pytest.fixture(scope="module")
def student():
    settings = StudentSettings(model=DEMO_STUDENT, dtype="float32", device="cpu")
    model, tokenizer = load_student(settings)
    return model, student_chat(tokenizer, settings, StepFormat())


def plain_logprobs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of every token given the ones before it, and the final hidden states."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    logprobs = out.logits[0].float().log_softmax(-1)
    return logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], out.hidden_states[-1][0]


@pytest.mark.parametrize("model_name", ["alpha", "beta"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_pass_equals_one_prompt_per_boundary(tiny_model_dirs, problems, model_name, pooling):
    settings = StudentSettings(model=tiny_model_dirs[model_name], dtype="float32", device="cpu")
    model, tokenizer = load_student(settings)
    chat = student_chat(tokenizer, settings, StepFormat())
    packed = [
        pack_rationale(chat, p.question, p.steps[:k], SUFFIX, p.answer) for p in problems[:3] for k in (1, 3)
    ]
    measured = measure_rationales(model, packed, layer=-1, pooling=pooling, max_batch_tokens=300)
    for r, m in zip(packed, measured):
        logprobs, hidden = plain_logprobs(model, list(r.ids))
        first = r.boundaries[0]
        for (a, b), nll in zip(zip(r.boundaries, r.boundaries[1:]), m.step_nll):
            assert nll == pytest.approx(-logprobs[a - 1 : b - 1].mean().item(), abs=1e-4)
        for p, value in zip(r.boundaries, m.answer_logprob):
            probe_lp, _ = plain_logprobs(model, list(r.ids[:p]) + list(r.probe))
            assert value == pytest.approx(probe_lp[-r.answer_len :].mean().item(), abs=1e-4)
        pooled = hidden[-1] if pooling == "last" else hidden[first:].mean(0)
        assert torch.allclose(torch.tensor(m.embedding), pooled, atol=1e-4)


def test_an_easy_rationale_has_lower_difficulty(student):
    model, chat = student
    sloppy = (" 95 + 40 = 135 ok\n", " so 135 - 26 is 109\n", " 109 * 3 = 327\n")
    packed = [pack_rationale(chat, QUESTION, steps, SUFFIX, "327") for steps in (STEPS, sloppy)]
    easy, hard = measure_rationales(model, packed, layer=-1, pooling="last", max_batch_tokens=4096)
    assert difficulty(easy) < difficulty(hard)


def test_the_step_that_reaches_the_answer_is_an_epiphany(student):
    model, chat = student
    steps = (*STEPS, " 327 - 0 = 327\n")  # the answer arrives at step 3 of 4
    (m,) = measure_rationales(
        model,
        [pack_rationale(chat, QUESTION, steps, SUFFIX, "327")],
        layer=-1,
        pooling="last",
        max_batch_tokens=4096,
    )
    gains = [b - a for a, b in zip(m.answer_logprob, m.answer_logprob[1:])]
    assert max(range(4), key=gains.__getitem__) == 2 and gains[2] > 5.0 and abs(gains[3]) < 1.0
    assert epiphany_steps(m.answer_logprob, threshold=5.0) == [3]
    assert adaptability(m.answer_logprob) >= gains[2]


def test_an_off_topic_rationale_has_the_lowest_consensus(student):
    model, chat = student
    rationales = [STEPS, (" 95 + 40 = 135\n", " 135 - 26 = 109\n", " 109 * 3 = 317\n"), (" hello there\n",)]
    packed = [pack_rationale(chat, QUESTION, steps, SUFFIX, "327") for steps in rationales]
    measured = measure_rationales(model, packed, layer=-1, pooling="mean", max_batch_tokens=4096)
    c = consensus([m.embedding for m in measured])
    assert c.index(min(c)) == 2


def write_responses(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def three_teachers(problem_id: str, question: str, answer: str, steps: tuple[str, ...]) -> list[dict]:
    wrong = (*steps[:-1], steps[-1].replace(answer, str(int(answer) + 10)))
    texts = {"good": steps, "also-good": steps, "buggy": wrong}
    return [
        {
            "id": problem_id,
            "question": question,
            "answer": answer,
            "teacher": t,
            "response": "<think>\n" + "".join(f"### Step {i}.{s}" for i, s in enumerate(ss, 1)) + "</think>",
        }
        for t, ss in texts.items()
    ]


@pytest.fixture
def responses(tmp_path) -> Path:
    rows = three_teachers("p1", QUESTION, "327", STEPS)
    rows += three_teachers("p2", "Start with 12. Add 30.", "42", (" 12 + 30 = 42\n",))
    return write_responses(tmp_path / "responses.jsonl", rows)


def test_compat_pass_weights_each_problem_and_resumes(student, responses, tmp_path):
    model, chat = student
    settings = StudentSettings(model=DEMO_STUDENT, dtype="float32", device="cpu")
    plan = plan_compat(responses, settings, CompatConfig())
    assert [len(g) for g in plan.todo] == [3, 3] and plan.output.path.name == "responses.compat.jsonl"
    run_compat(plan, model, chat, lambda records: None, batch_problems=1)
    records = load_compat(plan.output.path)
    assert set(records) == {"p1", "p2"}
    for record in records.values():
        alphas = {r.teacher: r.alpha for r in record.rationales}
        assert sum(alphas.values()) == pytest.approx(1.0)
        assert alphas["buggy"] < alphas["good"] == pytest.approx(alphas["also-good"])
    summary = {s.teacher: s for s in teacher_summary(list(records.values()))}
    assert summary["buggy"].mean_alpha < summary["good"].mean_alpha and summary["good"].steps == 4
    assert plan_compat(responses, settings, CompatConfig()).todo == ()
    with pytest.raises(CordgenError, match="other settings"):
        plan_compat(responses, settings, CompatConfig(pooling="mean"))
    data = plan.output.path.read_bytes()
    plan.output.path.write_bytes(data[: data.index(b"\n") + 1] + b'{"id": "p2", "stu')
    again = plan_compat(responses, settings, CompatConfig())
    assert [g[0].problem_id for g in again.todo] == ["p2"]
    run_compat(again, model, chat, lambda records: None)
    assert plan.output.path.read_bytes() == data


def test_cli_compat_prints_the_teacher_table(responses, tmp_path):
    out = tmp_path / "compat.jsonl"
    result = CliRunner().invoke(app, ["compat", str(responses), "--student", DEMO_STUDENT, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert set(load_compat(out)) == {"p1", "p2"}
    table = result.output[result.output.index("compatibility with") :]
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in table.splitlines()]
    rows = {row[0]: row[1:3] for row in cells if len(row) == 8}  # teacher: traces, alpha
    assert set(rows) == {"buggy", "good", "also-good"}
    assert all(traces == "2" for traces, _ in rows.values())
    assert float(rows["buggy"][1]) < float(rows["good"][1])
    result = CliRunner().invoke(app, ["compat", str(responses), "--student", DEMO_STUDENT, "--betas", "1,2"])
    assert result.exit_code == 2 and "--betas: expected 3" in result.output


def test_compat_input_errors_name_file_and_line(tmp_path):
    settings = StudentSettings(model=DEMO_STUDENT)
    bad = write_responses(
        tmp_path / "bad.jsonl", [{"id": "p", "question": "q", "answer": "1", "teacher": 3, "response": "x"}]
    )
    with pytest.raises(CordgenError, match=r"bad.jsonl:1: teacher: expected a teacher name"):
        plan_compat(bad, settings, CompatConfig())
    rows = [
        {"id": "p", "question": "q", "answer": "1", "response": "x"},
        {"id": "p", "question": "r", "answer": "1", "response": "y"},
    ]
    with pytest.raises(CordgenError, match=r"mixed.jsonl:2: id 'p': question or answer differs from line 1"):
        plan_compat(write_responses(tmp_path / "mixed.jsonl", rows), settings, CompatConfig())


def compat_line(problem_id: str, alphas: list[float]) -> bytes:
    rationales = [
        RationaleCompat(
            source=k,
            teacher="a",
            difficulty=0.1,
            adaptability=1.0,
            consensus=0.5,
            alpha=a,
            answer_logprobs=[-1.0, 0.0],
            epiphany_steps=[],
            steps=[],
        )
        for k, a in enumerate(alphas)
    ]
    return CompatRecord(id=problem_id, student="s", settings="x", rationales=rationales).to_json_line()


def test_export_weights_every_rationale_by_alpha(tmp_path):
    record = two_step_record("q0")
    alternative = record.result.model_copy(update={"steps": record.result.steps[:1]})
    unanswered = alternative.model_copy(update={"final_answer": None})
    run = make_run(tmp_path, [record.model_copy(update={"alternatives": [alternative, unanswered]})])
    jsonl = tmp_path / "out.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run), "--jsonl", str(jsonl), "--weights", "compat"])
    assert result.exit_code == 2 and "no compat.jsonl; run `cordgen compat" in result.output
    (run / "compat.jsonl").write_bytes(compat_line("q0", [0.6, 0.3, 0.1]))
    result = runner.invoke(app, ["export", str(run), "--jsonl", str(jsonl), "--weights", "compat"])
    assert result.exit_code == 0, result.output
    rows = read_rows(jsonl)
    assert [(r["metadata"]["rationale"], r["metadata"]["weight"]) for r in rows] == [(0, 0.6), (1, 0.3)]
    assert "unfinished 1" in result.output
    result = runner.invoke(
        app, ["export", str(run), "--jsonl", str(jsonl), "--weights", "compat", "--min-weight", "0.5"]
    )
    assert [r["metadata"]["weight"] for r in read_rows(jsonl)] == [
        0.6
    ] and "weight below 0.5 1" in result.output
