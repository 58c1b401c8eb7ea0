"""Inputs beyond JSONL: JSON arrays, Parquet files and folders of them, `save_to_disk` folders and
dataset repositories read by `datasets` (`hf:`), with answers taken from boxed solutions. All
local: no network, no engines (runs are planned, never executed)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cordgen.cli import app
from cordgen.config import semantic_view
from cordgen.errors import CordgenError
from cordgen.problems import Problem, Shard, describe_unanswered, load_problems
from cordgen.store import RunDirectory, merge_runs
from cordgen.synth import plan_run
from tests.helpers import make_record, resolved, write_recipe

# s1K-1.1: the gold answer is only inside `solution`, the last \boxed{} of it, braces nested
S1K = [
    {"question": "Half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}.", "cot_type": "math"},
    {"question": "2 + 3?", "solution": "Not \\boxed{4} but \\boxed{5}", "cot_type": "math"},
    {"question": "Prove it.", "solution": "A proof, no boxed answer.", "cot_type": "proof"},
    {
        "question": "x^2 = 4, x > 0?",
        "solution": "so $x = \\boxed{\\sqrt{\\frac{16}{4}}}$",
        "cot_type": "math",
    },
]
# NuminaMath-CoT: the question is `problem`
NUMINA = [
    {"source": "amc", "problem": f"Start with {i}. Add 1.", "solution": f"We get \\boxed{{{i + 1}}}."}
    for i in range(9)
]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load_error(source, **options) -> str:
    with pytest.raises(CordgenError) as error:
        load_problems(source, **options)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """`datasets` writes its cache under the test's directory and never asks the Hub."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_repository(root: Path, splits: dict[str, list[dict]]) -> Path:
    """A dataset repository as on the Hub: a card with a `configs:` header and Parquet data."""
    files = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
    card = f"---\nconfigs:\n- config_name: default\n  data_files:\n{files}---\n# A test set\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(card)
    for split, rows in splits.items():
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows)
    return root


def test_parquet_answers_from_the_last_boxed_and_counts_rows_without_one(tmp_path):
    loaded = load_problems(write_parquet(tmp_path / "s1k.parquet", S1K), answer_from="solution")
    assert loaded.problems == [
        Problem("0", "Half of 1?", "\\frac{1}{2}"),
        Problem("1", "2 + 3?", "5"),
        Problem("3", "x^2 = 4, x > 0?", "\\sqrt{\\frac{16}{4}}"),
    ]
    assert loaded.unanswered == ["2"] and len(loaded.digest) == 64
    assert loaded.name == str((tmp_path / "s1k.parquet").resolve())


def test_json_array_and_json_lines_under_json(tmp_path):
    array = tmp_path / "numina.json"
    array.write_bytes(orjson.dumps(NUMINA[:2], option=orjson.OPT_INDENT_2))
    loaded = load_problems(array, question_field="problem", answer_from="solution")
    assert loaded.problems == [
        Problem("0", "Start with 0. Add 1.", "1"),
        Problem("1", "Start with 1. Add 1.", "2"),
    ]
    lines = tmp_path / "limo.json"
    lines.write_bytes(b"\n" + b"\n".join(orjson.dumps({"question": "Q", "answer": a}) for a in ("1", "2")))
    assert [p.id for p in load_problems(lines).problems] == ["2", "3"]  # JSON Lines: line numbers
    array.write_bytes(b'[{"question": "Q", "answer": "1"}, 3]')
    assert load_error(array) == f"{array} row 1: expected a JSON object, got int"
    array.write_bytes(b'[{"question": "Q",}]')
    assert load_error(array).startswith(f"{array}: invalid JSON (")


def test_a_folder_reads_its_files_in_name_order_with_input_wide_row_ids(tmp_path):
    folder = tmp_path / "shards"
    write_parquet(folder / "train-00001.parquet", NUMINA[3:6])
    write_parquet(folder / "train-00000.parquet", NUMINA[:3])
    (folder / "train-00002.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in NUMINA[6:]))
    (folder / "README.md").write_text("not an input file")
    loaded = load_problems(folder, question_field="problem", answer_from="solution")
    assert [p.id for p in loaded.problems] == [str(i) for i in range(9)]
    assert [p.answer for p in loaded.problems] == [str(i + 1) for i in range(9)]
    write_parquet(folder / "train-00001.parquet", [*NUMINA[3:5], {**NUMINA[5], "problem": None}])
    message = load_error(folder, question_field="problem", answer_from="solution")
    assert message == f"{folder / 'train-00001.parquet'} row 2: problem: expected a string, got null"
    (folder / "train-00002.jsonl").write_bytes(b'{"problem": "Q"}\n')
    write_parquet(folder / "train-00001.parquet", NUMINA[3:6])
    message = load_error(folder, question_field="problem", answer_from="solution")
    assert message == f"{folder / 'train-00002.jsonl'}:1: solution: missing field 'solution'"  # JSON Lines


def test_a_missing_field_names_the_fields_the_data_has(tmp_path):
    path = write_parquet(tmp_path / "s1k.parquet", S1K)
    assert load_error(path) == (
        f"{path} row 0: answer: missing field 'answer' (fields: question, solution, cot_type)"
    )
    assert load_error(path, answer_from="gold") == (
        f"{path} row 0: gold: missing field 'gold' (fields: question, solution, cot_type)"
    )


def test_parquet_row_errors_and_duplicates(tmp_path):
    row = {"id": "a", "question": "Q", "answer": 1}
    path = write_parquet(tmp_path / "p.parquet", [row, {**row, "id": "b", "answer": None}])
    assert load_error(path) == f"{path} row 1: answer: expected a string or a number, got null"
    path = write_parquet(tmp_path / "p.parquet", [row, {**row, "question": "R"}])
    assert load_error(path) == f"{path} row 1: id: duplicate id 'a' (first on row 0)"
    folder = tmp_path / "two"
    write_parquet(folder / "a.parquet", [row])
    write_parquet(folder / "b.parquet", [row])
    assert (
        load_error(folder)
        == f"{folder / 'b.parquet'} row 0: id: duplicate id 'a' (first at {folder / 'a.parquet'} row 0)"
    )
    (tmp_path / "fake.parquet").write_bytes(b"not parquet")
    assert load_error(tmp_path / "fake.parquet").startswith(
        f"{tmp_path / 'fake.parquet'}: not a readable Parquet file"
    )


def test_only_unanswered_rows_is_no_problems(tmp_path):
    path = write_parquet(tmp_path / "proofs.parquet", [S1K[2], S1K[2], {**S1K[2], "solution": None}])
    skipped = "skipped 3 rows without a \\boxed{} answer in 'solution': ids 0, 1, 2"
    assert load_error(path, answer_from="solution") == f"{path}: no problems in input ({skipped})"


def test_describe_unanswered_shows_the_first_ten():
    assert describe_unanswered([str(i) for i in range(12)], "solution") == (
        "skipped 12 rows without a \\boxed{} answer in 'solution': "
        "ids 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more"
    )


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    datasets.Dataset.from_list(S1K).save_to_disk(str(tmp_path / "one"))
    loaded = load_problems(tmp_path / "one", answer_from="solution")
    assert [p.id for p in loaded.problems] == ["0", "1", "3"] and loaded.unanswered == ["2"]
    splits = {
        "train": datasets.Dataset.from_list(NUMINA[:4]),
        "test": datasets.Dataset.from_list(NUMINA[4:6]),
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    loaded = load_problems(tmp_path / "dict", split="test", question_field="problem", answer_from="solution")
    assert [(p.id, p.answer) for p in loaded.problems] == [("0", "5"), ("1", "6")]
    message = load_error(tmp_path / "dict", split="validation", question_field="problem")
    assert message == f"{tmp_path / 'dict'}: no split 'validation' (splits: train, test)"
    message = load_error(tmp_path / "dict", question_field="problem")
    fields = "(fields: source, problem, solution)"
    assert message == f"{tmp_path / 'dict'} (train) row 0: answer: missing field 'answer' {fields}"


def test_a_dataset_repository_loads_through_datasets_by_split(tmp_path, hf_cache):
    repo = write_repository(tmp_path / "numina", {"train": NUMINA[:6], "test": NUMINA[6:]})
    loaded = load_problems(f"hf:{repo}", split="test", question_field="problem", answer_from="solution")
    assert [(p.id, p.question, p.answer) for p in loaded.problems] == [
        ("0", "Start with 6. Add 1.", "7"),
        ("1", "Start with 7. Add 1.", "8"),
        ("2", "Start with 8. Add 1.", "9"),
    ]
    assert loaded.name == f"hf:{repo.resolve()}"
    message = load_error(f"hf:{repo}", split="validation", question_field="problem")
    assert message.startswith(f"hf:{repo}: ") and "validation" in message
    message = load_error(f"hf:{repo}", question_field="problem")
    assert (
        message
        == f"hf:{repo} (train) row 0: answer: missing field 'answer' (fields: source, problem, solution)"
    )
    assert load_error(repo).endswith(
        f"no .jsonl, .json or .parquet files in the input folder (a dataset repository? give hf:{repo})"
    )


@pytest.fixture
def recipe_path(tmp_path) -> Path:
    return write_recipe(tmp_path)


def plan(recipe_path: Path, source, out: Path, shard: Shard | None = None, **input_options):
    return plan_run(resolved(recipe_path, input=source, out=out, **input_options), shard)


@pytest.mark.parametrize("form", ["parquet", "folder", "hf"])
def test_the_digest_is_stable_and_follows_the_data(tmp_path, recipe_path, hf_cache, form):
    repo = tmp_path / "repo"
    data = {
        "parquet": tmp_path / "numina.parquet",
        "folder": tmp_path / "shards" / "train-00000.parquet",
        "hf": repo / "data" / "train-00000-of-00001.parquet",
    }[form]
    write_repository(repo, {"train": NUMINA[:2]})
    write_parquet(data, NUMINA[:3])
    source = {"parquet": data, "folder": data.parent, "hf": f"hf:{repo}"}[form]
    options = dict(question_field="problem", answer_from="solution")
    first = plan(recipe_path, source, tmp_path / "run", **options).manifest.input
    again = plan(recipe_path, source, tmp_path / "run", **options).manifest.input
    assert first == again and first.problems == 3
    write_parquet(data, [*NUMINA[:2], {**NUMINA[2], "solution": "changed: \\boxed{0}"}])
    changed = plan(recipe_path, source, tmp_path / "run", **options)
    assert changed.manifest.input.sha256 != first.sha256 and changed.problems[2].answer == "0"


def test_shards_of_a_parquet_input_are_disjoint_and_cover_it(tmp_path, recipe_path):
    path = write_parquet(tmp_path / "numina.parquet", NUMINA)
    plans = [
        plan(
            recipe_path,
            path,
            tmp_path / f"run{i}",
            Shard(i, 3),
            question_field="problem",
            answer_from="solution",
        )
        for i in range(3)
    ]
    ids = [{p.id for p in shard.problems} for shard in plans]
    assert sum(len(s) for s in ids) == 9 and set.union(*ids) == {str(i) for i in range(9)}
    assert all(p.manifest.input.problems == 9 for p in plans)


def test_merge_orders_a_parquet_input_and_does_not_miss_skipped_rows(tmp_path, recipe_path):
    path = write_parquet(tmp_path / "s1k.parquet", S1K)
    runs = []
    for i in range(2):
        shard = plan(recipe_path, path, tmp_path / f"run{i}", Shard(i, 2), answer_from="solution")
        assert shard.manifest.input.unanswered == ["2"]
        shard.run_dir.begin(shard.recipe, shard.manifest, False)
        with shard.run_dir.writer() as append:
            append([make_record(p.id) for p in shard.todo])
        runs.append(shard.run_dir.path)
    report = merge_runs(runs, tmp_path / "all")
    assert report.missing == [] and report.problems == 3
    merged = RunDirectory(tmp_path / "all")
    assert [r.id for r in merged.records()] == ["0", "1", "3"] and merged.manifest().status == "complete"


def test_answer_from_and_split_are_semantic_and_options_override_the_recipe(tmp_path, recipe_path):
    recipe = resolved(
        recipe_path, input="hf:org/set:cfg", split="test", answer_from="solution", id_field="uid"
    )
    assert (recipe.input.path, recipe.input.split, recipe.input.id_field) == ("hf:org/set:cfg", "test", "uid")
    view = semantic_view(recipe)["input"]
    assert view["answer_from"] == "solution" and view["split"] == "test" and "path" not in view


def invoke(recipe_path: Path, source: Path, out: Path, *extra: str):
    args = ["synth", "-c", str(recipe_path), "-i", str(source), "-o", str(out), *extra]
    return CliRunner().invoke(app, args)


def test_cli_names_the_parquet_row_of_a_bad_input(tmp_path, recipe_path):
    path = write_parquet(tmp_path / "numina.parquet", [*NUMINA[:3], {**NUMINA[3], "problem": ""}])
    result = invoke(
        recipe_path, path, tmp_path / "run", "--question-field", "problem", "--answer-from", "solution"
    )
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert result.stderr.strip().splitlines() == [f"error: {path} row 3: problem: empty"]
    assert not (tmp_path / "run").exists()
    result = invoke(recipe_path, path, tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {path} row 0: question: missing field 'question' (fields: source, problem, solution)"
    )


def test_cli_lists_the_rows_it_skips(tmp_path, recipe_path, monkeypatch):
    planned = []
    monkeypatch.setattr("cordgen.synth.execute", lambda plan, *args, **kwargs: planned.append(plan))
    path = write_parquet(tmp_path / "s1k.parquet", S1K)
    result = invoke(
        recipe_path, path, tmp_path / "run", "--answer-from", "solution", "--id-field", "uid", "-q"
    )
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr.strip() == "skipped 1 row without a \\boxed{} answer in 'solution': ids 2"
    assert [p.answer for p in planned[0].problems] == ["\\frac{1}{2}", "5", "\\sqrt{\\frac{16}{4}}"]
    assert planned[0].manifest.input.unanswered == ["2"]


def numina_input(form: str, root: Path) -> Path | str:
    """The NuminaMath-like rows in each form a user may have them."""
    import datasets

    if form == "jsonl":
        root.mkdir(parents=True, exist_ok=True)
        (root / "n.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in NUMINA))
        return root / "n.jsonl"
    if form == "json":
        root.mkdir(parents=True, exist_ok=True)
        (root / "n.json").write_bytes(orjson.dumps(NUMINA))
        return root / "n.json"
    if form == "parquet":
        return write_parquet(root / "n.parquet", NUMINA)
    if form == "folder":
        write_parquet(root / "shards" / "train-0.parquet", NUMINA[:5])
        write_parquet(root / "shards" / "train-1.parquet", NUMINA[5:])
        return root / "shards"
    if form == "save_to_disk":
        datasets.Dataset.from_list(NUMINA).save_to_disk(str(root / "saved"))
        return root / "saved"
    return f"hf:{write_repository(root / 'repo', {'train': NUMINA})}"


@pytest.mark.parametrize("form", ["jsonl", "json", "parquet", "folder", "save_to_disk", "hf"])
def test_cli_synth_plans_every_input_form(tmp_path, recipe_path, hf_cache, monkeypatch, form):
    """Through the command line up to the run's start: the problems, the gold answers from the
    boxed solutions and the run directory's first files, for each form."""
    planned = []
    monkeypatch.setattr("cordgen.synth.execute", lambda plan, *args, **kwargs: planned.append(plan))
    source = numina_input(form, tmp_path / "data")
    options = ("--question-field", "problem", "--answer-from", "solution", "--split", "train", "-q")
    result = invoke(recipe_path, source, tmp_path / "run", *options)
    assert result.exit_code == 0, (result.stderr, result.exception)
    first_id = 1 if form == "jsonl" else 0  # a JSONL row is named by its line, others by their row
    assert [(p.id, p.question, p.answer) for p in planned[0].problems] == [
        (str(first_id + i), f"Start with {i}. Add 1.", str(i + 1)) for i in range(9)
    ]
    assert planned[0].manifest.input.problems == 9 and len(planned[0].manifest.input.sha256) == 64
