"""Run directories without engines: manifest, resume checks, torn lines, merge."""

from __future__ import annotations

import orjson
import pytest
import yaml

from cordgen.config import semantic_hash
from cordgen.errors import CordgenError
from cordgen.problems import Shard
from cordgen.store import RunDirectory, merge_runs
from cordgen.synth import plan_run
from tests.helpers import make_record, resolved, snapshot, write_problems, write_recipe


@pytest.fixture
def setup(tmp_path):
    recipe_path = write_recipe(tmp_path)
    problems = write_problems(tmp_path / "problems.jsonl")
    return recipe_path, problems, tmp_path / "run"


def started(recipe, shard=None, overwrite=False):
    plan = plan_run(recipe, shard, overwrite)
    plan.run_dir.begin(plan.recipe, plan.manifest, plan.overwrite)
    return plan


def test_a_fresh_run_writes_config_and_manifest(setup):
    recipe_path, problems, out = setup
    plan = started(resolved(recipe_path, input=problems, out=out))
    manifest = plan.run_dir.manifest()
    assert (out / "config.yaml").exists() and manifest.status == "running"
    assert manifest.semantic_hash == semantic_hash(plan.recipe)
    assert manifest.input.problems == 6 and len(manifest.input.sha256) == 64 and manifest.problems == 6
    assert len(plan.todo) == 6


def test_resume_skips_written_problems_and_drops_a_torn_line(setup):
    recipe_path, problems, out = setup
    plan = started(resolved(recipe_path, input=problems, out=out))
    with plan.run_dir.writer() as append:
        append([make_record("q0"), make_record("q3")])
    with open(out / "results.jsonl", "ab") as handle:
        handle.write(make_record("q4").to_json_line()[:40])
    again = plan_run(resolved(recipe_path, input=problems, out=out))
    assert [p.id for p in again.todo] == ["q1", "q2", "q4", "q5"]
    assert again.manifest.completed == 2 and again.manifest.sessions == 2
    again.run_dir.begin(again.recipe, again.manifest, False)
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    assert [orjson.loads(line)["id"] for line in lines] == ["q0", "q3"] and lines[-1].endswith(b"\n")


def test_throughput_knobs_may_change_on_resume(setup, tmp_path):
    recipe_path, problems, out = setup
    started(resolved(recipe_path, input=problems, out=out))
    data = yaml.safe_load(recipe_path.read_text())
    data["teachers"][0]["engine"].update(gpu_memory_utilization=0.5, tensor_parallel_size=2, block_size=64)
    data["scorer"]["max_requests_per_call"] = 8
    recipe_path.write_text(yaml.safe_dump(data))
    assert (
        plan_run(resolved(recipe_path, input=problems, out=out))
        .recipe.teachers[0]
        .engine.gpu_memory_utilization
        == 0.5
    )


def test_a_different_semantic_config_is_refused_naming_the_fields(setup):
    recipe_path, problems, out = setup
    started(resolved(recipe_path, input=problems, out=out))
    before = snapshot(out)
    with pytest.raises(
        CordgenError, match=r"different config: search.beam_width \(2 -> 3\), seed \(3 -> 4\)"
    ):
        plan_run(resolved(recipe_path, input=problems, out=out, beam_width=3, seed=4))
    assert snapshot(out) == before


def test_overwrite_starts_over(setup):
    recipe_path, problems, out = setup
    plan = started(resolved(recipe_path, input=problems, out=out))
    with plan.run_dir.writer() as append:
        append([make_record("q0")])
    (out / "scores.jsonl").write_text('{"id": "q0"}\n')
    fresh = started(resolved(recipe_path, input=problems, out=out, seed=9), overwrite=True)
    assert len(fresh.todo) == 6 and not (out / "results.jsonl").exists()
    assert not (out / "scores.jsonl").exists()  # scores of the old records would pass for new ones


def test_shards_partition_the_input(setup):
    recipe_path, problems, out = setup
    plans = [plan_run(resolved(recipe_path, input=problems, out=out / str(i)), Shard(i, 3)) for i in range(3)]
    parts = [{p.id for p in plan.todo} for plan in plans]
    assert set().union(*parts) == {f"q{i}" for i in range(6)} and sum(map(len, parts)) == 6


def test_a_shard_run_refuses_another_shard(setup):
    recipe_path, problems, out = setup
    started(resolved(recipe_path, input=problems, out=out), Shard(0, 2))
    with pytest.raises(CordgenError, match="this run is shard 0/2, not 1/2"):
        plan_run(resolved(recipe_path, input=problems, out=out), Shard(1, 2))


def shard_runs(setup, count=2):
    recipe_path, problems, out = setup
    runs = []
    for i in range(count):
        plan = started(resolved(recipe_path, input=problems, out=out / f"s{i}"), Shard(i, count))
        with plan.run_dir.writer() as append:
            append([make_record(p.id) for p in plan.todo])
        runs.append(plan.run_dir.path)
    return runs


def test_merge_unions_shards_in_input_order(setup, tmp_path):
    runs = shard_runs(setup)
    for run, seconds in zip(runs, (1.5, 2.0)):
        directory = RunDirectory(run)
        directory.save(directory.manifest().model_copy(update={"wall_seconds": seconds}))
    report = merge_runs(runs, tmp_path / "all")
    assert report.problems == 6 and report.missing == [] and report.duplicates == 0 and report.conflicts == []
    merged = RunDirectory(tmp_path / "all")
    assert [r.id for r in merged.records()] == [f"q{i}" for i in range(6)]
    assert merged.manifest().status == "complete" and merged.manifest().shard is None
    assert merged.manifest().wall_seconds == 3.5


def test_merge_reports_duplicates_conflicts_and_missing(setup, tmp_path):
    runs = shard_runs(setup)
    first = RunDirectory(runs[0])
    ids = sorted(first.completed_ids())
    with first.writer() as append:
        append([make_record(ids[0]), make_record(ids[1], text=" different\n")])
    lines = (runs[1] / "results.jsonl").read_bytes().splitlines(keepends=True)
    (runs[1] / "results.jsonl").write_bytes(b"".join(lines[1:]))
    dropped = orjson.loads(lines[0])["id"]
    report = merge_runs(runs, tmp_path / "all")
    assert report.duplicates == 1 and report.conflicts == [ids[1]] and report.missing == [dropped]
    assert RunDirectory(tmp_path / "all").manifest().status == "partial"


def test_merge_refuses_mismatched_configs(setup, tmp_path):
    recipe_path, problems, out = setup
    a = started(resolved(recipe_path, input=problems, out=out / "a"), Shard(0, 2)).run_dir.path
    b = started(resolved(recipe_path, input=problems, out=out / "b", beam_width=4), Shard(1, 2)).run_dir.path
    with pytest.raises(CordgenError, match=r"config differs from .*search.beam_width \(2 -> 4\)"):
        merge_runs([a, b], tmp_path / "all")
    assert not (tmp_path / "all").exists()


def test_the_merge_command_unions_shards_and_refuses_another_input(setup, tmp_path):
    from typer.testing import CliRunner

    from cordgen.cli import app

    runs = shard_runs(setup)
    result = CliRunner().invoke(app, ["merge", *map(str, runs), "--out", str(tmp_path / "all")])
    assert result.exit_code == 0, result.output
    assert "merged 2 runs: 6 problems, 0 duplicates dropped, 0 conflicting, 0 missing" in result.output
    assert [r.id for r in RunDirectory(tmp_path / "all").records()] == [f"q{i}" for i in range(6)]
    recipe_path, _, out = setup
    other = write_problems(tmp_path / "other.jsonl", count=7)
    stranger = started(resolved(recipe_path, input=other, out=out / "other"), Shard(1, 2)).run_dir.path
    result = CliRunner().invoke(app, ["merge", str(runs[0]), str(stranger), "--out", str(tmp_path / "mixed")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {stranger}: made from another input than {runs[0]}"
    assert not (tmp_path / "mixed").exists()
