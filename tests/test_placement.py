"""Placement: the plan checked before anything loads, and engines in worker processes."""

from __future__ import annotations

import os
import signal

import pytest

from cordgen.config import PlacementConfig, Recipe
from cordgen.engines.placement import check_placement
from cordgen.errors import ConfigError, EngineError
from cordgen.problems import Problem


def plan(*engines: dict, mode: str = "workers", share: bool = False) -> Recipe:
    teachers = [{"name": f"t{i}", "engine": {"model": f"m{i}", **e}} for i, e in enumerate(engines)]
    return Recipe.model_validate(
        {
            "teachers": teachers,
            "scorer": {"engine": teachers[0]["engine"]},
            "placement": {"mode": mode, "share_gpus": share},
        }
    )


def test_a_sound_plan_passes_and_the_device_count_is_asked_only_when_gpus_are_named():
    check_placement(plan({}, {}, mode="in_process"), lambda: pytest.fail("asked for devices"))
    check_placement(plan({"gpus": [0, 1], "tensor_parallel_size": 2}, {"gpus": [2]}), lambda: 4)


@pytest.mark.parametrize(
    ("engines", "mode", "share", "message"),
    [
        (({"gpus": [0]},), "in_process", False, r"t0/scorer: gpus \[0\] need placement.mode: workers"),
        (({"gpus": [0, 4]},), "workers", False, r"GPU 4 does not exist \(this machine has 4\)"),
        (({"gpus": [1, 1]},), "workers", False, r"names a device twice"),
        (
            ({"gpus": [0, 1, 2], "tensor_parallel_size": 2},),
            "workers",
            False,
            r"tensor_parallel_size 2 does not",
        ),
        (({"gpus": [0, 1]}, {"gpus": [1, 2]}), "workers", False, r"t1: GPU 1 is already t0/scorer's"),
    ],
)
def test_a_bad_plan_is_one_line_naming_the_engine(engines, mode, share, message):
    with pytest.raises(ConfigError, match=message):
        check_placement(plan(*engines, mode=mode, share=share), lambda: 4)


def test_shared_devices_pass_when_asked_for():
    check_placement(plan({"gpus": [0, 1]}, {"gpus": [1, 2]}, share=True), lambda: 4)


@pytest.fixture(scope="module")
def worker_pool():
    from cordgen.engines.pool import EnginePool

    pool = EnginePool(PlacementConfig(mode="workers"))
    yield pool
    pool.shutdown()


@pytest.mark.engine
def test_workers_give_the_records_in_process_engines_give(
    tiny_model_dirs, engine_pool, worker_pool, problems
):
    from tests.test_synth import assert_same_records, recipe_data, run

    recipe = Recipe.model_validate(recipe_data(tiny_model_dirs))
    inputs = [Problem(f"p{i}", p.question, p.answer) for i, p in enumerate(problems[:6])]
    in_process = run(recipe, engine_pool, inputs)
    in_workers = run(recipe, worker_pool, inputs)
    assert len(worker_pool) == 2 and all(m.process.is_alive() for m in worker_pool._models.values())
    assert_same_records(in_workers, in_process)


@pytest.mark.engine
def test_workers_give_the_in_process_records_on_unseen_problems_and_follow_the_seed(
    unseen_records, tiny_model_dirs, worker_pool
):
    from tests.test_synth import (
        assert_another_seed_changes_each,
        assert_same_records,
        run,
        short_recipe,
        unseen_inputs,
    )

    in_workers = run(short_recipe(tiny_model_dirs, 3), worker_pool, unseen_inputs())
    assert_same_records(in_workers, unseen_records)
    reseeded = run(short_recipe(tiny_model_dirs, 4), worker_pool, unseen_inputs())
    assert_another_seed_changes_each(in_workers, reseeded)


def test_each_worker_process_sees_the_gpus_its_engine_names(tiny_model_dirs, tmp_path):
    """A worker sets CUDA_VISIBLE_DEVICES itself before vLLM loads, and its engine-log line reads
    the variable back (its /proc/PID/environ, written at exec, cannot show it). The workers are
    killed there: on a CPU build their engines would start (vLLM ignores the variable), a minute
    more for nothing this checks."""
    import re

    from cordgen.engines.worker import WorkerModel
    from tests.conftest import engine_settings

    before, alpha = os.environ.get("CUDA_VISIBLE_DEVICES"), tiny_model_dirs["alpha"]
    logs = {label: tmp_path / f"{label}.log" for label in ("gpus-0", "gpus-1,2")}  # one each: no interleaving
    workers = {
        label: WorkerModel(engine_settings(alpha, gpus=gpus), label, logs[label])
        for label, gpus in (("gpus-0", (0,)), ("gpus-1,2", (1, 2)))
    }
    try:
        text = "".join(wait_for_log_lines(logs[label], [worker]) for label, worker in workers.items())
    finally:
        for worker in workers.values():
            worker.kill()
    lines = re.findall(r"=== cordgen engine (\S+) \(.*\), pid (\d+), (.*)", text)
    assert {label: (int(pid), devices) for label, pid, devices in lines} == {
        "gpus-0": (workers["gpus-0"].process.pid, "CUDA_VISIBLE_DEVICES=0"),
        "gpus-1,2": (workers["gpus-1,2"].process.pid, "CUDA_VISIBLE_DEVICES=1,2"),
    }
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before  # set in the workers alone


def wait_for_log_lines(log, workers, limit_s: float = 300) -> str:
    """The engine log once every worker has written its first line (`limit_s` guards against a
    hang; it is no time limit: starts are slow on a busy machine)."""
    import time

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if text.count("=== cordgen engine") >= len(workers):
            return text
        assert all(w.process.is_alive() for w in workers), text
        time.sleep(0.1)
    pytest.fail(f"not every worker wrote to {log} in {limit_s} s")


@pytest.mark.engine
def test_a_dead_worker_stops_the_run_with_its_name_and_the_rerun_resumes(tiny_model_dirs, problems, tmp_path):
    import orjson

    from cordgen.engines.pool import EnginePool
    from cordgen.store import RunDirectory
    from cordgen.synth import NoObserver, execute, plan_run
    from tests.test_synth import recipe_data

    path = tmp_path / "problems.jsonl"
    path.write_bytes(
        b"".join(
            orjson.dumps({"id": f"p{i}", "question": p.question, "answer": p.answer}) + b"\n"
            for i, p in enumerate(problems)
        )
    )
    data = recipe_data(tiny_model_dirs, max_steps=6)
    data |= {
        "placement": {"mode": "workers"},
        "input": {"path": str(path)},
        "output": {"path": str(tmp_path / "run")},
    }
    recipe = Recipe.model_validate(data)
    pool = EnginePool(PlacementConfig(mode="workers"))
    killed = []

    def kill_beta_after_first_records(records):
        if records and not killed:
            beta = next(m for s, m in pool._models.items() if s.model == tiny_model_dirs["beta"])
            os.kill(beta.process.pid, signal.SIGKILL)
            killed.extend([len(records), beta.process.pid])

    try:
        with pytest.raises(EngineError, match=r"engine for .*beta.* died during sample"):
            execute(plan_run(recipe), NoObserver(), kill_beta_after_first_records, pool=pool)
    finally:
        pool.shutdown()
    with pytest.raises(ProcessLookupError):  # vLLM's engine processes went with their worker
        os.killpg(killed[1], 0)
    run_dir = RunDirectory(tmp_path / "run")
    assert run_dir.manifest().status == "failed" and len(run_dir.completed_ids()) == killed[0] > 0
    execute(plan_run(recipe), NoObserver(), lambda records: None)
    assert run_dir.manifest().status == "complete" and len(run_dir.completed_ids()) == len(problems)


def test_the_paper_recipe_puts_each_teacher_on_its_own_gpu():
    from pathlib import Path

    from cordgen.config import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "paper-heterogeneous.yaml")
    check_placement(recipe, lambda: 4)
    with pytest.raises(ConfigError, match=r"r1-distill-32b: GPU 0 does not exist \(this machine has 0\)"):
        check_placement(recipe, lambda: 0)


def test_remote_engines_need_their_key_variable_and_no_gpus(monkeypatch):
    from pathlib import Path

    from cordgen.config import load_recipe, semantic_hash

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "paper-remote.yaml")
    monkeypatch.delenv("CORDGEN_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"r1-distill-32b: remote.api_key_env names CORDGEN_API_KEY, which"):
        check_placement(recipe, lambda: pytest.fail("asked for devices"))
    monkeypatch.setenv("CORDGEN_API_KEY", "k")
    check_placement(recipe, lambda: pytest.fail("asked for devices"))
    on_gpus = plan({"remote": {"url": "http://node1:8000"}, "gpus": [0]})
    with pytest.raises(ConfigError, match=r"t0/scorer: a remote engine runs on its server's GPUs"):
        check_placement(on_gpus, lambda: 4)
    moved = plan({"remote": {"url": "http://node9:8000", "max_concurrent_requests": 8}})
    assert semantic_hash(moved) == semantic_hash(plan({"remote": {"url": "http://node1:8000"}}))


def wait_for_records(path, more_than: int, process, limit_s: float = 300) -> int:
    import time

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        count = len(path.read_bytes().splitlines()) if path.exists() else 0
        if count > more_than:
            return count
        assert process.poll() is None, f"synth exited early with {process.returncode}"
        time.sleep(0.2)
    pytest.fail(f"no new records in {path} after {limit_s} s")


@pytest.mark.engine
def test_ctrl_c_and_kill_of_the_main_process_leave_no_worker_behind(tiny_model_dirs, tmp_path):
    """A terminal's Ctrl-C reaches the main process's group alone: the round in flight is written
    and the workers shut down with the run. A SIGKILLed main process takes its workers along."""
    import subprocess
    import sys

    import orjson
    import psutil
    import yaml

    from tests.test_synth import recipe_data
    from tests.tiny_models import make_problems

    # Unseen problems keep the tiny teachers wandering until max_steps: the run is still going
    # when the signals arrive.
    rows = [
        {"id": f"q{i}", "question": p.question, "answer": p.answer}
        for i, p in enumerate(make_problems(60, 11))
    ]
    (tmp_path / "problems.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    data = recipe_data(tiny_model_dirs, max_steps=40, thinking_budget=900)
    data |= {"placement": {"mode": "workers"}, "input": {"path": "problems.jsonl"}, "output": {"path": "run"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    command = [sys.executable, "-m", "cordgen", "synth", "--config", "recipe.yaml", "-q"]
    results = tmp_path / "run" / "results.jsonl"

    first = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stderr=subprocess.PIPE)
    wait_for_records(results, 0, first)
    workers = psutil.Process(first.pid).children(recursive=True)
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=180) == 130, first.stderr.read().decode()[-2000:]
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive
    assert orjson.loads((tmp_path / "run" / "manifest.json").read_bytes())["status"] == "interrupted"

    second = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stderr=subprocess.DEVNULL)
    wait_for_records(results, len(results.read_bytes().splitlines()), second)
    workers = psutil.Process(second.pid).children(recursive=True)
    assert len(workers) >= 2
    second.kill()
    second.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [p.name() for p in alive]
