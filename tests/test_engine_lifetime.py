"""No engine outlives cordgen: a `kill -9` of the main process alone (the OOM killer, `scancel
--signal=KILL`, a preempted pod) takes every process it started along within seconds, whatever
the placement, and the resumed run starts normally and finishes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil
import pytest
import yaml

from tests.test_synth import recipe_data
from tests.tiny_models import make_problems

pytestmark = pytest.mark.engine
GONE_WITHIN_S = 30
CORDGEN = str(Path(sys.executable).with_name("cordgen"))


def wait_for_lines(path: Path, more_than: int, process: subprocess.Popen, limit_s: float = 300) -> int:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        count = len(path.read_bytes().splitlines()) if path.exists() else 0
        if count > more_than:
            return count
        assert process.poll() is None, (
            f"exited early with {process.returncode}: {process.stderr.read()[-2000:]}"
        )
        time.sleep(0.2)
    pytest.fail(f"no new lines in {path} after {limit_s} s")


def kill_main_process_only(process: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL of the main process alone (not its group), as the kernel or a scheduler does it;
    returns every process it had started, recorded just before."""
    started = psutil.Process(process.pid).children(recursive=True)
    assert started, "the command had started no process"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    return started


def assert_all_gone(started: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(started, timeout=GONE_WITHIN_S)
    assert not alive, [(p.pid, p.name(), p.cmdline()[:3]) for p in alive]


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    # A new session, as a batch job has: nothing but our own SIGKILL reaches the main process.
    return subprocess.Popen(command, cwd=cwd, start_new_session=True, stderr=subprocess.PIPE, text=True)


def write_run_inputs(tmp_path: Path, tiny_model_dirs: dict[str, str], placement: str) -> list[str]:
    """Unseen problems keep the tiny teachers wandering for a few rounds, so the run is still going
    when the kill comes, and still finishes in seconds when resumed."""
    rows = [
        {"id": f"q{i}", "question": p.question, "answer": p.answer}
        for i, p in enumerate(make_problems(40, 11))
    ]
    (tmp_path / "problems.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    data = recipe_data(tiny_model_dirs, max_steps=10, thinking_budget=300)
    data |= {"placement": {"mode": placement}, "input": {"path": "problems.jsonl"}, "output": {"path": "run"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    return [CORDGEN, "synth", "--config", "recipe.yaml", "-q"]


def manifest(run: Path) -> dict:
    return orjson.loads((run / "manifest.json").read_bytes())


@pytest.mark.parametrize("placement", ["shared", "workers"])
def test_a_killed_synth_leaves_no_engine_and_the_resumed_run_finishes(tiny_model_dirs, tmp_path, placement):
    command = write_run_inputs(tmp_path, tiny_model_dirs, placement)
    results = tmp_path / "run" / "results.jsonl"
    first = start(command, tmp_path)
    written = wait_for_lines(results, 0, first)
    assert_all_gone(kill_main_process_only(first))

    resumed = start(command, tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert manifest(tmp_path / "run")["status"] == "complete"
    assert manifest(tmp_path / "run")["sessions"] == 2
    assert len(results.read_bytes().splitlines()) == 40 > written


def test_a_dead_engine_ends_the_run_in_one_line_with_its_own_exit_status(tiny_model_dirs, tmp_path):
    """An engine killed under a running synth (the OOM killer picks the biggest process): the run
    stops with one line naming the engine, exit status 3, manifest `failed`, nothing left behind."""
    command = write_run_inputs(tmp_path, tiny_model_dirs, "shared")
    process = start(command, tmp_path)
    wait_for_lines(tmp_path / "run" / "results.jsonl", 0, process)
    started = psutil.Process(process.pid).children(recursive=True)
    log = (tmp_path / "run" / "engines.log").read_text()
    (beta,) = re.findall(r"=== cordgen engine beta \(.*\), pid (\d+)", log)
    os.kill(int(beta), signal.SIGKILL)
    assert process.wait(timeout=120) == 3
    lines = process.stderr.read().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: engine for beta (")
    assert "died during sample (exit code -9); log: " in lines[0] and lines[0].endswith("engines.log")
    assert manifest(tmp_path / "run")["status"] == "failed"
    assert_all_gone(started)


def test_a_killed_score_leaves_no_engine_or_grader_and_resumes(tiny_model_dirs, tmp_path):
    """`cordgen score`'s scorer engine and its math-verify graders go with it too."""
    problems = make_problems(12, 7)
    rows = []
    for i in range(1500):
        p = problems[i % len(problems)]
        thinking = "".join(f"### Step {k}.{step}" for k, step in enumerate(p.steps, start=1))
        rows.append(
            {
                "id": f"t{i}",
                "question": p.question,
                "answer": p.answer,
                "response": f"<think>\n{thinking}</think>{p.final_text}",
            }
        )
    (tmp_path / "traces.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    command = [
        CORDGEN,
        "score",
        "traces.jsonl",
        "--scorer",
        tiny_model_dirs["alpha"],
        "--batch-size",
        "10",
        "-q",
    ]
    scores = tmp_path / "traces.scores.jsonl"
    first = start(command, tmp_path)
    wait_for_lines(scores, 0, first)
    assert_all_gone(kill_main_process_only(first))

    resumed = start(command, tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    ids = [orjson.loads(line)["id"] for line in scores.read_bytes().splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert (tmp_path / "traces.scores.engines.log").stat().st_size > 0
