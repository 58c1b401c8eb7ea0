"""A newcomer's first hour: models named on the command line start on a CPU machine, an engine
that cannot start or dies is one line with its own exit status, a beam that outgrows its window
closes instead of failing the run, and the terminal shows cordgen's progress, not vLLM's logs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from tests.test_synth import recipe_data
from tests.tiny_models import make_problems

pytestmark = pytest.mark.engine
CORDGEN = str(Path(sys.executable).with_name("cordgen"))
REPO = Path(__file__).resolve().parents[1]


def cordgen(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CORDGEN, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def problem_rows(count: int, seed: int) -> list[dict]:
    return [
        {"id": f"q{i}", "question": p.question, "answer": p.answer}
        for i, p in enumerate(make_problems(count, seed))
    ]


@pytest.fixture(scope="module")
def long_window_models(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """The tiny models with an 8192-token window (RoPE: no weights change), room for cordgen's
    default step and answer lengths, as real models have."""
    root = tmp_path_factory.mktemp("long-window")
    copies = {}
    for name, source in tiny_model_dirs.items():
        copies[name] = Path(shutil.copytree(source, root / name))
        config = json.loads((copies[name] / "config.json").read_text())
        (copies[name] / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 8192}))
    return copies


def test_models_named_on_the_command_line_run_on_this_cpu_machine(long_window_models, tmp_path):
    """No recipe: the KV cache is sized from free memory, blocks and chunked prefill fit the CPU
    backend, and --dry-run shows what was chosen."""
    write_jsonl(tmp_path / "p.jsonl", problem_rows(4, 7))
    a, b = long_window_models["alpha"], long_window_models["beta"]
    args = ["synth", "--teachers", f"{a},{b}", "--scorer", a, "--input", "p.jsonl", "--out", "run"]
    dry = cordgen(*args, "--dry-run", cwd=tmp_path, timeout=60)
    assert dry.returncode == 0, dry.stderr
    engine = yaml.safe_load(dry.stdout)["teachers"][0]["engine"]
    assert engine["kv_cache_memory_bytes"] > 0 and engine["gpu_memory_utilization"] is None
    assert engine["block_size"] == 32 and engine["enable_chunked_prefill"] is False

    result = cordgen(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "run" / "results.jsonl").read_bytes().splitlines()
    assert sorted(orjson.loads(line)["id"] for line in lines) == ["q0", "q1", "q2", "q3"]
    assert "context windows leave less thinking than thinking_budget 16384" in result.stderr

    trace_rows = [
        orjson.loads(line) | {"response": "<think>\n### Step 1. 3 + 4 = 7\n</think> The final answer is 7."}
        for line in lines
    ]
    write_jsonl(
        tmp_path / "traces.jsonl",
        [{k: r[k] for k in ("id", "question", "answer", "response")} for r in trace_rows],
    )
    scored = cordgen("score", "traces.jsonl", "--scorer", a, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert len((tmp_path / "traces.scores.jsonl").read_bytes().splitlines()) == 4


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_an_engine_that_cannot_start_is_one_line_naming_it_and_the_fix(tiny_model_dirs, tmp_path):
    data = recipe_data(tiny_model_dirs)
    for role in [*data["teachers"], data["scorer"]]:
        role["engine"] = role["engine"] | {"kv_cache_memory_bytes": 65536}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    write_jsonl(tmp_path / "p.jsonl", problem_rows(2, 7))
    result = cordgen("synth", "-c", "recipe.yaml", "-i", "p.jsonl", "-o", "run", "-q", cwd=tmp_path)
    assert result.returncode == 3
    line = one_line(result)
    assert (
        line.startswith("error: engine for ")
        and " failed to start: no memory is left for the KV cache" in line
    )
    assert line.endswith("; log: run/engines.log")
    assert "Traceback" in (tmp_path / "run" / "engines.log").read_text()
    assert orjson.loads((tmp_path / "run" / "manifest.json").read_bytes())["status"] == "failed"

    write_jsonl(tmp_path / "t.jsonl", [r | {"response": "7"} for r in problem_rows(2, 7)])
    scored = cordgen("score", "t.jsonl", "-c", "recipe.yaml", "--scorer", "alpha", cwd=tmp_path)
    assert scored.returncode == 3
    assert " failed to start: no memory is left for the KV cache" in one_line(scored)


def test_a_window_beyond_the_model_is_refused_before_anything_loads(tiny_model_dirs, tmp_path):
    data = recipe_data(tiny_model_dirs)
    data["teachers"][1]["engine"] |= {"max_model_len": 4096}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    write_jsonl(tmp_path / "p.jsonl", problem_rows(2, 7))
    result = cordgen("synth", "-c", "recipe.yaml", "-i", "p.jsonl", "-o", "run", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    beta = tiny_model_dirs["beta"]
    assert one_line(result) == (
        f"error: beta ({beta}): max_model_len 4096 exceeds the model's 1024 (max_position_embeddings)"
    )
    assert not (tmp_path / "run").exists()


def test_a_failure_inside_compat_is_one_line_with_the_run_status(tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    source = REPO / "benchmarks" / "demo_models" / "weights" / "scorer-final"
    for name in source.iterdir():
        if name.suffix != ".safetensors":
            shutil.copy(name, student / name.name)
    rows = [
        {
            "id": "1",
            "question": "Start with 3. Add 4.",
            "answer": "7",
            "response": "### Step 1. 3 + 4 = 7\n</think> 7",
        }
    ]
    write_jsonl(tmp_path / "r.jsonl", rows)
    result = cordgen("compat", "r.jsonl", "--student", student, cwd=tmp_path, timeout=120)
    assert result.returncode == 3
    assert one_line(result).startswith("error: OSError: ")


def write_small_window_recipe(tiny_model_dirs, tmp_path: Path, window: int) -> None:
    data = recipe_data(tiny_model_dirs, max_steps=30, thinking_budget=900, beam_width=2)
    for role in [*data["teachers"], data["scorer"]]:
        role["engine"] = role["engine"] | {"max_model_len": window}
    write_jsonl(tmp_path / "p.jsonl", problem_rows(12, 11))
    data |= {"input": {"path": "p.jsonl"}, "output": {"path": "run"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))


def test_beams_that_outgrow_the_window_close_and_every_problem_finishes(tiny_model_dirs, tmp_path):
    """Unseen problems keep the tiny teachers writing until their 110-token windows are full: those
    beams close by context, their problems finish with their best beam, nothing fails."""
    from cordgen.store import RunDirectory

    write_small_window_recipe(tiny_model_dirs, tmp_path, 110)
    result = cordgen("synth", "-c", "recipe.yaml", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (note,) = result.stderr.strip().splitlines()
    assert "less thinking than thinking_budget 900" in note and "closed_by: context" in note
    records = list(RunDirectory(tmp_path / "run").records())
    assert len(records) == 12
    closed = [t.closed_by for r in records for t in [r.result, *r.alternatives]]
    assert "context" in closed
    by_context = [r.result for r in records if r.result.closed_by == "context"]
    assert all(t.finished and t.final_answer is not None for t in by_context)


def test_a_window_with_no_room_for_one_step_is_refused_with_the_numbers(tiny_model_dirs, tmp_path):
    write_small_window_recipe(tiny_model_dirs, tmp_path, 48)
    result = cordgen("synth", "-c", "recipe.yaml", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert one_line(result).startswith(
        "error: alpha: max_model_len 48 leaves no room to think on the longest"
    )
    assert not (tmp_path / "run").exists()


def test_the_demo_prints_progress_and_summary_not_engine_logs(tmp_path):
    demo = [
        json.loads(line) for line in (REPO / "benchmarks/demo_models/problems.jsonl").read_text().splitlines()
    ]
    write_jsonl(tmp_path / "p.jsonl", demo[:6])
    result = cordgen(
        "synth", "-c", "configs/demo.yaml", "-i", tmp_path / "p.jsonl", "-o", tmp_path / "run", cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = (result.stdout + result.stderr).strip().splitlines()
    assert len(output) <= 30, "\n".join(output)
    assert not any("INFO" in line or "WARNING" in line or "Warning" in line for line in output), output
    log = (tmp_path / "run" / "engines.log").read_text()
    assert all(
        f"=== cordgen engine {name} (" in log for name in ("teacher-a", "teacher-b", "teacher-c", "scorer")
    )
