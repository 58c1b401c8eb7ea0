"""Every user mistake: exit status 2, one line naming file/line/field, no traceback, and an
existing run directory left byte for byte as it was. All of these fail before a model loads."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from cordgen.cli import app
from cordgen.synth import plan_run
from tests.helpers import make_record, resolved, snapshot, write_problems, write_recipe


def jsonl(*rows) -> bytes:
    return b"".join((row if isinstance(row, bytes) else orjson.dumps(row)) + b"\n" for row in rows)


ROW = {"id": "x", "question": "Q?", "answer": "1"}

# (name, files to write, extra arguments, expected text in the message)
CASES = [
    ("missing input", {}, ["-i", "{tmp}/nope.jsonl"], "nope.jsonl: input file not found"),
    (
        "input folder without input files",
        {},
        ["-i", "{tmp}/models"],
        "models: no .jsonl, .json or .parquet files in the input folder",
    ),
    (
        "invalid JSON",
        {"bad.jsonl": jsonl(ROW, b'{"id": 2,')},
        ["-i", "{tmp}/bad.jsonl"],
        "bad.jsonl:2: invalid JSON",
    ),
    (
        "missing question",
        {"bad.jsonl": jsonl({"id": 1, "answer": "2"})},
        ["-i", "{tmp}/bad.jsonl"],
        "bad.jsonl:1: question: missing field 'question'",
    ),
    (
        "empty answer",
        {"bad.jsonl": jsonl(ROW, {"question": "Q", "answer": " "})},
        ["-i", "{tmp}/bad.jsonl"],
        "bad.jsonl:2: answer: empty",
    ),
    (
        "duplicate id",
        {"bad.jsonl": jsonl(ROW, {**ROW, "question": "Other?"})},
        ["-i", "{tmp}/bad.jsonl"],
        "bad.jsonl:2: id: duplicate id 'x' (first on line 1)",
    ),
    ("empty input", {"bad.jsonl": b"\n  \n"}, ["-i", "{tmp}/bad.jsonl"], "bad.jsonl: no problems in input"),
    (
        "unknown teacher",
        {},
        ["--teachers", "a,nope"],
        "--teachers: unknown teacher 'nope'; the recipe has: a, b",
    ),
    (
        "missing model path",
        {},
        ["--teachers", "./no/such/model"],
        "model path does not exist: ./no/such/model",
    ),
    ("unknown scorer", {}, ["--scorer", "nope"], "--scorer: unknown scorer 'nope'"),
    (
        "beam width 0",
        {},
        ["--beam-width", "0"],
        "search.beam_width: Input should be greater than or equal to 1",
    ),
    (
        "unknown strategy",
        {},
        ["--strategy", "greedy"],
        "search.strategy: Input should be 'cord', 'single' or 'curate'",
    ),
    (
        "single with two teachers",
        {},
        ["--strategy", "single"],
        "strategy 'single' needs exactly one teacher, got 2",
    ),
    ("shard 3/2", {}, ["--shard", "3/2"], "--shard: '3/2' needs 0 <= i < N"),
    ("shard a/b", {}, ["--shard", "a/b"], "--shard: 'a/b' is not of the form i/N"),
    ("output is a file", {"file.txt": b"x"}, ["-o", "{tmp}/file.txt"], "file.txt: output path is a file"),
    ("different config", {}, ["--seed", "9"], "results come from a different config: seed (3 -> 9)"),
    ("other shard", {}, ["--shard", "1/2"], "this run is shard none, not 1/2"),
    ("missing recipe", {}, ["-c", "{tmp}/none.yaml"], "none.yaml: recipe file not found"),
]

RECIPE_EDITS = [
    (
        "temperature < 0",
        lambda d: d["teachers"][0]["sampling"].update(temperature=-1),
        "teachers.0.sampling.temperature",
    ),
    (
        "unknown key",
        lambda d: d["search"].update(beam_wdth=2),
        "search.beam_wdth: Extra inputs are not permitted",
    ),
    (
        "missing chat template",
        lambda d: d["teachers"][1].update(chat={"chat_template": "/no/such.jinja"}),
        "b: chat_template",
    ),
    (
        "a hybrid's other part on another kind",
        lambda d: d["scorer"].update(hybrid_with="likelihood"),
        "scorer: Value error, hybrid_with is read only by kind hybrid, not by kind predictive",
    ),
    (
        "unknown tokenizer path",
        lambda d: d["scorer"]["engine"].update(tokenizer="./no/tok"),
        "model path does not exist: ./no/tok",
    ),
]


@pytest.fixture
def existing_run(tmp_path) -> tuple[Path, Path, Path]:
    """A real run directory holding one result, which no failed command may touch."""
    recipe_path = write_recipe(tmp_path)
    problems = write_problems(tmp_path / "problems.jsonl")
    out = tmp_path / "run"
    plan = plan_run(resolved(recipe_path, input=problems, out=out))
    plan.run_dir.begin(plan.recipe, plan.manifest, False)
    with plan.run_dir.writer() as append:
        append([make_record("q0")])
    return recipe_path, problems, out


def invoke(recipe_path: Path, problems: Path, out: Path, extra: list[str]):
    args = ["synth", "-c", str(recipe_path), "-i", str(problems), "-o", str(out), *extra]
    return CliRunner().invoke(app, args)


def assert_refused(result, expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr and isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(("name", "files", "extra", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_command_line_or_input(existing_run, tmp_path, name, files, extra, expected):
    recipe_path, problems, out = existing_run
    for file_name, data in files.items():
        (tmp_path / file_name).write_bytes(data)
    before = snapshot(out)
    result = invoke(recipe_path, problems, out, [a.format(tmp=tmp_path) for a in extra])
    assert_refused(result, expected)
    assert snapshot(out) == before


@pytest.mark.parametrize(("name", "edit", "expected"), RECIPE_EDITS, ids=[e[0] for e in RECIPE_EDITS])
def test_bad_recipe_value(existing_run, tmp_path, name, edit, expected):
    recipe_path, problems, out = existing_run
    data = yaml.safe_load(recipe_path.read_text())
    edit(data)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    before = snapshot(out)
    assert_refused(invoke(bad, problems, out, []), expected)
    assert snapshot(out) == before


def test_results_without_a_manifest_are_not_taken_for_a_run(existing_run, tmp_path):
    recipe_path, problems, _ = existing_run
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.jsonl").write_bytes(jsonl(ROW))
    before = snapshot(foreign)
    assert_refused(invoke(recipe_path, problems, foreign, []), "results without manifest.json")
    assert snapshot(foreign) == before


def test_a_corrupt_results_line_is_named(existing_run):
    recipe_path, problems, out = existing_run
    with open(out / "results.jsonl", "ab") as handle:
        handle.write(b"{not json}\n")
    before = snapshot(out)
    assert_refused(invoke(recipe_path, problems, out, []), "results.jsonl:2: corrupt result line")
    assert snapshot(out) == before


def test_debug_shows_the_traceback(existing_run):
    recipe_path, problems, out = existing_run
    result = CliRunner().invoke(
        app, ["--debug", "synth", "-c", str(recipe_path), "-i", "/no/file", "-o", str(out)]
    )
    assert (
        result.exit_code != 0
        and result.exception is not None
        and not isinstance(result.exception, SystemExit)
    )
