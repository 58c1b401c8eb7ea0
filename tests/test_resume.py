"""Crashes lose nothing: SIGKILL and Ctrl-C at awkward moments, then resume; shards merge."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import yaml

from cordgen.config import Recipe
from cordgen.problems import Problem, Shard
from cordgen.records import TraceRecord
from cordgen.store import RunDirectory, merge_runs
from cordgen.synth import NoObserver, execute, plan_run
from tests.test_synth import (
    assert_another_seed_changes_each,
    assert_same_records,
    recipe_data,
    unseen_inputs,
)
from tests.tiny_models import make_problems

pytestmark = pytest.mark.engine

CORDGEN = str(Path(sys.executable).with_name("cordgen"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dirs) -> Path:
    """One teacher that also scores (one engine per process keeps each start short), on problems
    it never saw, so beams wander for several rounds and problems finish at different rounds."""
    root = tmp_path_factory.mktemp("resume")
    data = recipe_data({"alpha": tiny_model_dirs["alpha"]}, beam_width=3, max_steps=5, thinking_budget=120)
    data["teachers"][0]["sampling"]["n"] = 2
    (root / "recipe.yaml").write_text(yaml.safe_dump(data))
    rows = [
        {"id": f"u{i}", "question": p.question, "answer": p.answer}
        for i, p in enumerate(make_problems(24, 99))
    ]
    (root / "problems.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return root


def command(workdir: Path, out: Path) -> list[str]:
    return [
        CORDGEN,
        "synth",
        "-c",
        str(workdir / "recipe.yaml"),
        "-i",
        str(workdir / "problems.jsonl"),
        "-o",
        str(out),
    ]


def result_lines(out: Path) -> int:
    path = out / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def start_and_interrupt(args: list[str], out: Path, signum: int, delay: float, group: bool = False):
    """Starts the command in its own process group, waits until it writes a round (+ `delay`),
    then signals the main process alone or, with `group`, the whole job (engines included) as a
    terminal's Ctrl-C, an OOM kill of the job or a lost node does."""
    written = result_lines(out)
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while result_lines(out) == written and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        (os.killpg if group else os.kill)(process.pid, signum)
        process.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, process.stderr.read()


def records_of(out: Path) -> dict[str, dict]:
    lines = (out / "results.jsonl").read_bytes().splitlines()
    ids = [orjson.loads(line)["id"] for line in lines]
    assert len(ids) == len(set(ids)), "a problem was written twice"
    return {r.id: r.without_scores() for r in RunDirectory(out).records()}


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> dict[str, dict]:
    out = workdir / "whole"
    finished = subprocess.run([*command(workdir, out), "-q"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return records_of(out)


def test_sigkill_just_after_a_write_and_mid_round_then_resume(workdir, uninterrupted):
    out = workdir / "killed"
    args = [*command(workdir, out), "-q"]
    code, _ = start_and_interrupt(args, out, signal.SIGKILL, delay=0.0, group=True)
    assert code == -signal.SIGKILL
    written = result_lines(out)
    assert 0 < written < len(uninterrupted)
    code, _ = start_and_interrupt(args, out, signal.SIGKILL, delay=0.15, group=True)
    assert code == -signal.SIGKILL and written < result_lines(out) < len(uninterrupted)
    with open(out / "results.jsonl", "ab") as handle:  # as if the kill had torn a write
        handle.write(b'{"schema_version": 1, "id": "u')
    finished = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert records_of(out) == uninterrupted
    manifest = RunDirectory(out).manifest()
    assert (
        manifest.status == "complete" and manifest.completed == len(uninterrupted) and manifest.sessions == 3
    )


def test_ctrl_c_stops_at_the_round_boundary_and_resumes(workdir, uninterrupted):
    out = workdir / "interrupted"
    code, stderr = start_and_interrupt(command(workdir, out), out, signal.SIGINT, delay=0.0)
    assert code == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted; re-run the same command to resume")
    assert "Traceback" not in stderr
    assert (out / "results.jsonl").read_bytes().endswith(b"\n")
    interrupted = RunDirectory(out).manifest()
    assert interrupted.status == "interrupted" and interrupted.wall_seconds > 0
    finished = subprocess.run([*command(workdir, out), "-q"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert records_of(out) == uninterrupted
    assert RunDirectory(out).manifest().wall_seconds > interrupted.wall_seconds  # both sessions count


def test_ctrl_c_at_a_terminal_finishes_the_round_and_resumes(workdir, uninterrupted):
    """A terminal's Ctrl-C goes to the whole foreground process group; the engines run in sessions
    of their own, so they serve the round in flight, it is written, and the run resumes."""
    out = workdir / "terminal"
    code, stderr = start_and_interrupt(command(workdir, out), out, signal.SIGINT, delay=0.05, group=True)
    assert code == 130, stderr[-2000:]
    assert any(
        line.startswith("interrupted; re-run the same command to resume") for line in stderr.splitlines()
    )
    finished = subprocess.run([*command(workdir, out), "-q"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert records_of(out) == uninterrupted


def test_sigterm_as_a_scheduler_sends_it_stops_at_the_round_boundary_and_resumes(workdir, uninterrupted):
    """Slurm, Kubernetes and Ray stop a job with SIGTERM: the same as a first Ctrl-C."""
    out = workdir / "terminated"
    code, stderr = start_and_interrupt(command(workdir, out), out, signal.SIGTERM, delay=0.0)
    assert code == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted; re-run the same command to resume")
    assert RunDirectory(out).manifest().status == "interrupted"
    written = records_of(out)
    assert 0 < len(written) < len(uninterrupted)
    assert written == {i: uninterrupted[i] for i in written}
    finished = subprocess.run([*command(workdir, out), "-q"], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert records_of(out) == uninterrupted


def test_a_second_signal_exits_at_once_with_whole_lines_only(workdir, uninterrupted):
    out = workdir / "twice"
    written = result_lines(out)
    process = subprocess.Popen(
        [*command(workdir, out), "-q"], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        while result_lines(out) == written and process.poll() is None:
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        assert time.monotonic() - signalled < 10  # at once, not after the round in flight
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    data = (out / "results.jsonl").read_bytes()
    assert data.endswith(b"\n")
    assert records_of(out) == {i: uninterrupted[i] for i in records_of(out)}


class SignalDuringRound:
    """An engine that sends this process SIGTERM from inside the propose call of one round, as
    a scheduler's signal lands mid-round. Once per pool: a second SIGTERM means "stop at once"."""

    def __init__(self, model, marker: str, at_round: int, pool: SignallingPool) -> None:
        self.model, self.marker, self.at_round, self.rounds, self.pool = model, marker, at_round, 0, pool

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def sample(self, requests):
        if requests and self.marker in requests[0].stop:
            self.rounds += 1
            if self.rounds == self.at_round and self.pool.first_signal():
                os.kill(os.getpid(), signal.SIGTERM)
        return self.model.sample(requests)


class SignallingPool:
    def __init__(self, pool, at_round: int) -> None:
        self.pool, self.at_round, self.signalled = pool, at_round, False
        self.lock = threading.Lock()  # teachers propose in threads

    def first_signal(self) -> bool:
        with self.lock:
            first, self.signalled = not self.signalled, True
            return first

    def load(self, labels) -> None:
        self.pool.load(labels)

    def model(self, settings):
        return SignalDuringRound(self.pool.model(settings), "### Step", self.at_round, self)

    def replica_seconds(self) -> dict:
        return {}


def test_the_round_in_flight_when_sigterm_lands_is_written(workdir, uninterrupted, engine_pool, tmp_path):
    from cordgen.synth import GracefulStop, Interrupted

    finishing = sorted({r["usage"]["rounds"] for r in uninterrupted.values()})
    at_round = finishing[1]  # some problems finish in it, and others earlier
    data = yaml.safe_load((workdir / "recipe.yaml").read_text())
    data |= {"input": {"path": str(workdir / "problems.jsonl")}, "output": {"path": str(tmp_path / "run")}}
    plan = plan_run(Recipe.model_validate(data))
    with GracefulStop(lambda message: None) as stop, pytest.raises(Interrupted):
        execute(plan, NoObserver(), lambda records: None, stop, pool=SignallingPool(engine_pool, at_round))
    written = records_of(tmp_path / "run")
    assert set(written) == {i for i, r in uninterrupted.items() if r["usage"]["rounds"] <= at_round}
    assert written == {i: uninterrupted[i] for i in written}
    assert RunDirectory(tmp_path / "run").manifest().status == "interrupted"


def test_shards_merged_equal_one_unsharded_run(
    tmp_path, tiny_model_dirs, engine_pool, alpha_model, beta_model
):
    """Memorised problems, and unseen ones (one in each shard), where only seeds keyed by the
    problem alone give each shard the unsharded run's samples."""
    data = recipe_data(tiny_model_dirs, max_steps=3)
    memorised = [Problem(f"m{i}", p.question, p.answer) for i, p in enumerate(make_problems(10, 7))]
    rows = [{"id": p.id, "question": p.question, "answer": p.answer} for p in memorised + unseen_inputs(3)]
    (tmp_path / "problems.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    data["input"] = {"path": str(tmp_path / "problems.jsonl")}

    def run(out: str, shard: Shard | None, seed: int = 3) -> list[TraceRecord]:
        recipe = Recipe.model_validate({**data, "seed": seed, "output": {"path": str(tmp_path / out)}})
        execute(plan_run(recipe, shard), NoObserver(), lambda records: None, pool=engine_pool)
        return sorted(RunDirectory(tmp_path / out).records(), key=lambda r: r.id)

    whole = run("whole", None)
    shards = [run(f"shard{i}", Shard(i, 3)) for i in range(3)]
    assert [[r.id for r in shard if r.id.startswith("u")] for shard in shards] == [["u0"], ["u1"], ["u2"]]
    report = merge_runs([tmp_path / f"shard{i}" for i in range(3)], tmp_path / "merged")
    assert report.problems == 13 and not report.missing and not report.duplicates and not report.conflicts
    merged = list(RunDirectory(tmp_path / "merged").records())
    assert [r.id for r in merged] == [row["id"] for row in rows]
    assert_same_records(sorted(merged, key=lambda r: r.id), whole)
    reseeded = run("reseeded", None, seed=4)
    assert_another_seed_changes_each(whole[-3:], reseeded[-3:])  # u0..u2, after m0..m9


def test_an_adaptive_schedule_decides_alike_whole_resumed_and_sharded(
    tmp_path, tiny_model_dirs, engine_pool, alpha_model, beta_model
):
    """Its draws are keyed like the seeds and its statistic is each problem's own plus a fixed
    warm start, so a run stopped by SIGTERM mid-round and resumed, and three shards merged, ask
    the same teachers and keep the same steps as one uninterrupted run."""
    from cordgen.synth import GracefulStop, Interrupted

    pilot = recipe_data(tiny_model_dirs, max_steps=3)
    pilot_rows = [
        {"id": f"m{i}", "question": p.question, "answer": p.answer} for i, p in enumerate(make_problems(6, 7))
    ]
    (tmp_path / "pilot.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in pilot_rows))
    pilot |= {"input": {"path": str(tmp_path / "pilot.jsonl")}, "output": {"path": str(tmp_path / "pilot")}}
    execute(plan_run(Recipe.model_validate(pilot)), NoObserver(), lambda records: None, pool=engine_pool)
    data = recipe_data(tiny_model_dirs, max_steps=3)
    data["search"] |= {
        "schedule": "adaptive",
        "adaptive": {
            "warm_start": str(tmp_path / "pilot"),
            "relative_threshold": 1.0,
            "floor": 0.3,
            "min_teachers": 1,
            "fill_beams": False,
        },
    }
    rows = [{"id": p.id, "question": p.question, "answer": p.answer} for p in unseen_inputs(6)]
    (tmp_path / "problems.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    data["input"] = {"path": str(tmp_path / "problems.jsonl")}

    def plan(out: str, shard: Shard | None = None):
        return plan_run(Recipe.model_validate({**data, "output": {"path": str(tmp_path / out)}}), shard)

    def records(out: str) -> list[TraceRecord]:
        return sorted(RunDirectory(tmp_path / out).records(), key=lambda r: r.id)

    execute(plan("whole"), NoObserver(), lambda records: None, pool=engine_pool)
    whole = records("whole")

    def asked(record: TraceRecord, teacher: str) -> dict[str, int]:
        return {step: c.asked for step, c in record.usage.proposals.get(teacher, {}).items()}

    assert any(asked(r, "alpha") != asked(r, "beta") for r in whole)  # some beams asked one teacher
    with GracefulStop(lambda message: None) as stop, pytest.raises(Interrupted):
        execute(
            plan("resumed"), NoObserver(), lambda records: None, stop, pool=SignallingPool(engine_pool, 2)
        )
    assert len(records("resumed")) < len(whole)
    execute(plan("resumed"), NoObserver(), lambda records: None, pool=engine_pool)
    assert_same_records(records("resumed"), whole)
    for i in range(3):
        execute(plan(f"shard{i}", Shard(i, 3)), NoObserver(), lambda records: None, pool=engine_pool)
    merge_runs([tmp_path / f"shard{i}" for i in range(3)], tmp_path / "merged")
    assert_same_records(records("merged"), whole)
