"""Export as a Hugging Face dataset folder without engines: the Hub layout, a `datasets.load_dataset`
round trip equal to the JSONL export under every filter, stated features, the card, sharding, and
the folder written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from cordgen import __version__, export_hf
from cordgen.cli import app
from cordgen.errors import CordgenError
from cordgen.export import export_run, features
from cordgen.export_hf import export_dataset
from cordgen.records import CompatRecord, RationaleCompat
from cordgen.store import RunDirectory
from tests.helpers import make_record, snapshot
from tests.test_export import graded, make_run, read_rows, two_step_record, unfinished, write_scores

ONE_SHARD = ["README.md", "data/train-00000-of-00001.parquet"]


@pytest.fixture
def run(tmp_path) -> Path:
    """q0's two steps are by a and b, q1's and q3's by a; q2 never finished."""
    records = [two_step_record("q0"), make_record("q1"), unfinished(make_record("q2")), make_record("q3")]
    return make_run(tmp_path, records)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def load(folder: Path, tmp_path: Path) -> datasets.Dataset:
    return datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))["train"]


def card(folder: Path) -> tuple[dict, str]:
    """The card's YAML header, parsed, and its body."""
    _, header, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(header), body


def yaml_block(body: str, section: str) -> object:
    text = body.split(f"## {section}\n", 1)[1]
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


def write_compat(run: Path, alphas: dict[str, list[float]]) -> None:
    lines = []
    for problem_id, weights in alphas.items():
        rationales = [
            RationaleCompat(
                source=k,
                teacher="a",
                difficulty=1.0,
                adaptability=0.0,
                consensus=0.0,
                alpha=alpha,
                answer_logprobs=[],
                epiphany_steps=[],
                steps=[],
            )
            for k, alpha in enumerate(weights)
        ]
        record = CompatRecord(id=problem_id, student="s", settings="x", rationales=rationales)
        lines.append(record.to_json_line())
    (run / "compat.jsonl").write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"format": "sharegpt", "system_prompt": "Think step by step.", "think_tags": False},
        {"only_correct": True},
        {"max_perplexity": 3.0, "include_unfinished": True},
        {"weights": "compat", "min_weight": 0.2},
    ],
    ids=["messages", "sharegpt", "only-correct", "perplexity-unfinished", "compat-weights"],
)
def test_the_folder_loads_as_the_jsonl_rows(run, tmp_path, options):
    write_scores(run, graded("q0", correct=True), graded("q1", correct=False), graded("q3", correct=True))
    write_compat(run, {"q0": [1.0], "q1": [1.0], "q3": [0.1]})
    jsonl, folder = tmp_path / "out.jsonl", tmp_path / "dataset"
    report = export_dataset(run, folder, **options)
    assert report == export_run(run, jsonl, **options) and report.kept > 0
    assert files(folder) == ONE_SHARD
    loaded = load(folder, tmp_path)
    assert loaded.to_list() == read_rows(jsonl)
    weighted = options.get("weights") == "compat"
    assert loaded.features == features(options.get("format", "messages"), weighted)


def test_format_hf_means_messages_rows(run, tmp_path):
    export_dataset(run, tmp_path / "hf", format="hf")
    export_run(run, tmp_path / "out.jsonl")
    assert load(tmp_path / "hf", tmp_path).to_list() == read_rows(tmp_path / "out.jsonl")


def test_every_run_has_the_same_schema(tmp_path):
    """Unscored, `correct` is null in every row: its type stays."""
    unscored = make_run(tmp_path / "a", [make_record("q1")])
    scored = make_run(tmp_path / "b", [two_step_record("q0")])
    write_scores(scored, graded("q0", correct=True))
    export_dataset(unscored, tmp_path / "unscored")
    export_dataset(scored, tmp_path / "scored")
    schemas = [pq.read_schema(tmp_path / name / ONE_SHARD[1]) for name in ("unscored", "scored")]
    assert schemas[0] == schemas[1] == features("messages", weighted=False).arrow_schema
    assert load(tmp_path / "unscored", tmp_path)[0]["metadata"]["correct"] is None


def test_the_card_describes_the_export(run, tmp_path):
    write_scores(run, graded("q0", correct=True), graded("q1", correct=False), graded("q3", correct=True))
    with RunDirectory(run).writer() as append:
        append([two_step_record("q4")])  # unscored: the search's perplexity, 4
    folder = tmp_path / "dataset"
    export_dataset(run, folder, max_perplexity=3.0, system_prompt="Be brief.")
    header, body = card(folder)
    assert header["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}
    ]
    assert header["task_categories"] == ["text-generation"] and "cordgen" in header["tags"]
    assert "license" not in header
    info = header["dataset_info"]
    assert [f["name"] for f in info["features"]] == ["messages", "metadata"]
    correct = next(f for f in info["features"][1]["struct"] if f["name"] == "correct")
    assert correct == {"name": "correct", "dtype": "bool"}
    assert info["splits"] == [{"name": "train", "num_bytes": info["dataset_size"], "num_examples": 3}]
    assert "| kept | 3 |" in body and "| dropped: unfinished | 1 |" in body
    assert "| dropped: perplexity above 3 | 1 |" in body and "| traces in all | 5 |" in body
    models = tmp_path / "models"
    assert f"| `a` | `{models / 'a'}` | 3 | 75.0% |" in body  # q0's first step, q1's and q3's
    assert f"| `b` | `{models / 'b'}` | 1 | 25.0% |" in body
    assert f"Search scorer: `a` (`{models / 'a'}`)" in body
    assert "| run results judged | 2 | 3 | 66.7% |" in body
    assert "| exported examples graded | 2 | 3 | 66.7% |" in body
    assert yaml_block(body, "Export options") == {
        "format": "messages",
        "only_correct": False,
        "max_perplexity": 3.0,
        "system_prompt": "Be brief.",
        "think_tags": True,
        "include_unfinished": False,
        "weights": "none",
        "min_weight": None,
    }
    assert f"exported with cordgen {__version__}" in body
    assert yaml_block(body, "Recipe") == RunDirectory(run).manifest().semantic_config


def test_the_card_of_an_unscored_run_and_a_license(run, tmp_path):
    export_dataset(run, tmp_path / "dataset", license="cc-by-4.0")
    header, body = card(tmp_path / "dataset")
    assert header["license"] == "cc-by-4.0"
    assert "Not graded: the run has no scores.jsonl" in body and "accuracy" not in body


def test_shards_by_rows_and_by_bytes(run, tmp_path, monkeypatch):
    export_run(run, tmp_path / "out.jsonl")
    export_dataset(run, tmp_path / "by-rows", shard_rows=2)
    assert files(tmp_path / "by-rows") == [
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert load(tmp_path / "by-rows", tmp_path).to_list() == read_rows(tmp_path / "out.jsonl")
    monkeypatch.setattr(export_hf, "BATCH_ROWS", 1)
    export_dataset(run, tmp_path / "by-bytes", shard_bytes=1)
    assert len(files(tmp_path / "by-bytes" / "data")) == 3
    assert pq.read_table(tmp_path / "by-bytes" / "data" / "train-00002-of-00003.parquet").num_rows == 1


def test_an_export_that_keeps_nothing_is_refused(run, tmp_path):
    """`datasets` cannot load a folder without rows: a one-line error rather than a broken dataset."""
    write_scores(run, *(graded(i, correct=False) for i in ("q0", "q1", "q2", "q3")))
    expected = r"kept none of 4 traces \(dropped: not correct 3, unfinished 1\); `datasets` cannot load"
    with pytest.raises(CordgenError, match=expected):
        export_dataset(run, tmp_path / "dataset", only_correct=True)
    assert not (tmp_path / "dataset").exists() and not (tmp_path / ".dataset.tmp").exists()


def test_an_earlier_export_is_replaced_only_with_overwrite(run, tmp_path):
    folder = tmp_path / "dataset"
    export_dataset(run, folder, shard_rows=1)
    before = snapshot(folder)
    with pytest.raises(CordgenError, match=r"dataset: holds an earlier export \(use --overwrite"):
        export_dataset(run, folder)
    assert snapshot(folder) == before
    export_dataset(run, folder, overwrite=True)
    assert files(folder) == ONE_SHARD  # the three old shards are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["dataset", "models", "problems.jsonl", "recipe.yaml", "run"]
    )
    (folder.parent / "empty").mkdir()
    export_dataset(run, folder.parent / "empty")
    assert files(folder.parent / "empty") == ONE_SHARD


@pytest.mark.parametrize("target", ["run", "parent", "other"])
def test_overwrite_never_replaces_anything_but_an_export(run, tmp_path, target):
    folder = {"run": run, "parent": tmp_path, "other": tmp_path / "other"}[target]
    folder.mkdir(exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(CordgenError, match=r"holds .*not only an exported dataset; choose another --out"):
        export_dataset(run, folder, overwrite=True)
    assert snapshot(tmp_path) == before


def test_a_failed_export_leaves_the_old_folder_and_no_temporary(run, tmp_path):
    with open(run / "results.jsonl", "ab") as handle:  # fails after rows were already written
        handle.write(b"{not json}\n")
    with pytest.raises(CordgenError, match=r"results.jsonl:5: corrupt result line"):
        export_dataset(run, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    old = make_run(tmp_path / "other", [make_record("q1")])
    export_dataset(old, tmp_path / "dataset")
    before = snapshot(tmp_path / "dataset")
    with pytest.raises(CordgenError, match=r"corrupt result line"):
        export_dataset(run, tmp_path / "dataset", overwrite=True)
    assert snapshot(tmp_path / "dataset") == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def invoke(*args: str):
    return CliRunner().invoke(app, ["export", *args])


@pytest.mark.parametrize("layout", ["hf", "sharegpt"])
def test_cli_writes_a_folder(run, tmp_path, layout):
    folder = tmp_path / "dataset"
    result = invoke(str(run), "--out", str(folder), "--format", layout, "--license", "mit")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip() == f"exported 3 of 4 traces to {folder} (dropped: unfinished 1)"
    assert files(folder) == ONE_SHARD and card(folder)[0]["license"] == "mit"
    columns = {"hf": ["messages", "metadata"], "sharegpt": ["system", "conversations", "metadata"]}
    assert load(folder, tmp_path).column_names == columns[layout]
    result = invoke(str(run), "-o", str(folder), "--shard-rows", "2", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert len(files(folder / "data")) == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "give one of --jsonl FILE (JSON lines) or --out DIR (a Hugging Face dataset folder)"),
        (["--jsonl", "{tmp}/out.jsonl", "--out", "{tmp}/out"], "give one of --jsonl FILE"),
        (["--jsonl", "{tmp}/out.jsonl", "--overwrite"], "--overwrite: only with --out DIR, not --jsonl"),
        (["--jsonl", "{tmp}/out.jsonl", "--shard-rows", "0"], "--shard-rows: only with --out DIR"),
        (["--jsonl", "{tmp}/out.jsonl", "--format", "hf"], "not one of: messages, sharegpt (hf: with --out"),
        (["--out", "{tmp}/out", "--shard-rows", "0"], "--shard-rows: 0 is not a positive number of rows"),
        (["--out", "{tmp}/out", "--format", "alpaca"], "--format: 'alpaca' is not one of"),
        (["--out", "{tmp}/out", "--only-correct"], "no scores.jsonl to tell correct traces"),
        (["--out", "{run}", "--overwrite"], "run: holds config.yaml, manifest.json, results.jsonl, not only"),
        (["--out", "{tmp}/earlier"], "earlier: holds an earlier export (use --overwrite to replace it)"),
        (["--out", "{run}/results.jsonl"], "results.jsonl: output path is a file, not a folder"),
    ],
    ids=[
        "neither",
        "both",
        "overwrite-jsonl",
        "shard-rows-jsonl",
        "hf-jsonl",
        "no-rows",
        "unknown-format",
        "unscored",
        "onto-the-run",
        "earlier-export",
        "onto-a-file",
    ],
)
def test_cli_refuses_in_one_line(run, tmp_path, args, expected):
    export_dataset(run, tmp_path / "earlier")
    before = snapshot(tmp_path)
    result = invoke(str(run), *(a.format(tmp=tmp_path, run=run) for a in args))
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert snapshot(tmp_path) == before
