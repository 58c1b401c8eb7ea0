"""Placement ray: engine replicas as Ray actors on a simulated multi-node cluster
(`ray.cluster_utils.Cluster`, one raylet per "node" on this machine), against the records of
engines in worker processes. One cluster and one set of replicas serve the whole module."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml

from cordgen.config import PlacementConfig, Recipe, semantic_hash
from cordgen.engines.placement import check_placement
from cordgen.engines.routing import replica_for, split_by_replica
from cordgen.errors import ConfigError, EngineError
from cordgen.problems import Problem
from tests.test_synth import recipe_data, run

ray = pytest.importorskip("ray")

NODE_CPUS = 2
WORKER_NODES = 3


# -- routing and plans: pure functions, no engine ---------------------------------------------


def test_affinity_pins_each_problem_to_one_replica_whatever_else_is_in_the_call():
    replicas = ["t#0", "t#1", "t#2"]
    routes = [f"p{i}" for i in range(300)]
    whole = split_by_replica(routes, replicas)
    assert sorted(i for share in whole.values() for i in share) == list(range(300))
    assert all(share == sorted(share) for share in whole.values())
    assert min(len(share) for share in whole.values()) > 60  # spread, not piled on one replica
    owner = {routes[i]: name for name, share in whole.items() for i in share}
    part = routes[50:90:3]
    for name, share in split_by_replica(part, replicas).items():
        assert {owner[part[i]] for i in share} == {name}


def test_a_replica_that_joins_or_leaves_moves_only_its_own_problems():
    routes = [f"p{i}" for i in range(500)]
    before = {r: replica_for(r, ["t#0", "t#1", "t#2"]) for r in routes}
    grown = {r: replica_for(r, ["t#0", "t#1", "t#2", "t#3"]) for r in routes}
    moved = [r for r in routes if grown[r] != before[r]]
    assert moved and all(grown[r] == "t#3" for r in moved)
    assert 0.15 < len(moved) / len(routes) < 0.35
    shrunk = {r: replica_for(r, ["t#0", "t#2"]) for r in routes}
    assert all(shrunk[r] == before[r] for r in routes if before[r] != "t#1")


def test_round_robin_spreads_each_call_evenly():
    shares = split_by_replica(["p1"] * 7, ["a#0", "a#1"], routing="round_robin")
    assert shares == {"a#0": [0, 2, 4, 6], "a#1": [1, 3, 5]}


def test_progress_shows_each_engines_replicas_and_their_busy_share_of_the_round():
    from cordgen.progress import replica_shares
    from cordgen.synth import RoundReport

    busy = {"beta#1": 1.0, "beta#0": 1.8, "alpha/scorer#0": 2.0}
    report = RoundReport(round=3, live_problems=1, live_beams=2, engine_seconds=2.0, replica_seconds=busy)
    assert replica_shares(report) == ["alpha/scorer ×1 busy 100%", "beta ×2 busy 90%/50%"]
    assert replica_shares(RoundReport(round=1, live_problems=1, live_beams=1)) == []


def ray_recipe(dirs: dict[str, str], replicas: int = 2, **placement) -> Recipe:
    data = recipe_data(dirs)
    for teacher in data["teachers"]:
        teacher["engine"]["replicas"] = replicas
    data["scorer"]["engine"] = data["teachers"][0]["engine"]
    data["placement"] = {"mode": "ray", **placement}
    return Recipe.model_validate(data)


def test_replicas_are_a_throughput_setting_outside_the_semantic_hash():
    dirs = {"alpha": "m/alpha", "beta": "m/beta"}
    plain = Recipe.model_validate(recipe_data(dirs))
    assert semantic_hash(ray_recipe(dirs, replicas=3, routing="round_robin")) == semantic_hash(plain)


@pytest.mark.parametrize(
    ("engine", "mode", "message"),
    [
        ({"replicas": 2}, "shared", r"t0/scorer: replicas 2 need placement.mode: ray"),
        ({"gpus": [0]}, "ray", r"Ray gives each replica its GPUs; remove gpus"),
        ({"replicas": 2, "remote": {"url": "http://h:8000"}}, "ray", r"remote engine is one endpoint"),
    ],
)
def test_a_bad_replica_plan_is_one_line(engine, mode, message):
    recipe = Recipe.model_validate(
        {
            "teachers": [{"name": "t0", "engine": {"model": "m", **engine}}],
            "scorer": {"engine": {"model": "m", **engine}},
            "placement": {"mode": mode},
        }
    )
    with pytest.raises(ConfigError, match=message):
        check_placement(recipe, lambda: 4)


def test_a_plan_larger_than_the_cluster_is_one_line_naming_its_resources():
    from cordgen.config import EngineSettings
    from cordgen.engines.ray_replicas import check_cluster_fits

    nodes = [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 16.0, "GPU": 8.0}]
    totals = {"CPU": 32.0, "GPU": 16.0}
    placement = PlacementConfig(mode="ray")
    big = EngineSettings(model="m", tensor_parallel_size=2, replicas=9)
    with pytest.raises(
        ConfigError, match=r"need 9 CPU, 18 GPU; the Ray cluster has 32 CPU, 16 GPU \(nodes: 2\)"
    ):
        check_cluster_fits({big: "t"}, placement, False, totals, nodes)
    wide = EngineSettings(model="m", tensor_parallel_size=16)
    with pytest.raises(ConfigError, match=r"t: one replica needs 16 GPU on one node; .* largest node has 8"):
        check_cluster_fits({wide: "t"}, placement, False, totals, nodes)
    check_cluster_fits({big.model_copy(update={"replicas": 8}): "t"}, placement, False, totals, nodes)
    with pytest.raises(ConfigError, match=r"need 40 CPU; the Ray cluster has 32 CPU"):
        check_cluster_fits(
            {big.model_copy(update={"replicas": 5}): "t"},
            placement.model_copy(update={"cpus_per_replica": 8}),
            True,
            totals,
            nodes,
        )


# -- a simulated cluster ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A head node that runs no engine and three worker nodes of two CPUs each, so that a lost
    node's replicas have somewhere to go."""
    from ray.cluster_utils import Cluster

    small = {"object_store_memory": 100 << 20}
    simulated = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **small})
    for _ in range(WORKER_NODES):
        simulated.add_node(num_cpus=NODE_CPUS, **small)
    simulated.wait_for_nodes()
    ray.init(address=simulated.address, log_to_driver=False)
    yield simulated
    ray.shutdown()
    simulated.shutdown()


@pytest.fixture(scope="module")
def recipe(tiny_model_dirs) -> Recipe:
    return ray_recipe(tiny_model_dirs, replica_timeout_s=240)


@pytest.fixture(scope="module")
def ray_pool(cluster, recipe):
    from cordgen.engines.pool import EnginePool
    from cordgen.engines.roles import build_roles

    pool = EnginePool(recipe.placement)
    build_roles(recipe, pool)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def inputs(problems) -> list[Problem]:
    return [Problem(f"p{i}", p.question, p.answer) for i, p in enumerate(problems[:6])]


@pytest.fixture(scope="module")
def reference(tiny_model_dirs, engine_pool, inputs):
    """The same recipe on engines in worker processes (replicas do not change results)."""
    return run(Recipe.model_validate(recipe_data(tiny_model_dirs)), engine_pool, inputs)


def replica_sets(pool) -> list:
    return list(pool._models.values())


def assert_same_records(got, reference) -> None:
    assert [r.without_scores() for r in got] == [r.without_scores() for r in reference]
    for a, b in zip(got, reference):
        assert [s.score for s in a.result.steps] == pytest.approx([s.score for s in b.result.steps], rel=1e-3)


class CountingActor:
    """Counts the calls sent to one replica's actor, by method."""

    def __init__(self, actor, name: str, calls: Counter) -> None:
        self.actor, self.name, self.calls = actor, name, calls

    def __getattr__(self, method: str):
        target = getattr(self.actor, method)
        calls, name = self.calls, self.name

        class Method:
            def remote(self, *args):
                calls[(name, method)] += 1
                return target.remote(*args)

        return Method()


@pytest.mark.engine
def test_two_replicas_per_engine_give_the_records_of_one_engine_with_one_call_per_replica(
    ray_pool, reference, inputs, recipe
):
    sets = replica_sets(ray_pool)
    assert sorted(len(s.replicas) for s in sets) == [2, 2]
    calls: Counter = Counter()
    for replica_set in sets:
        for replica in replica_set.replicas.values():
            replica.actor = CountingActor(replica.actor, replica.name, calls)
        fan_out = replica_set._fan_out

        def counted(requests, submit, fan_out=fan_out, name=replica_set.label):
            calls[(name, "engine call")] += 1
            return fan_out(requests, submit)

        replica_set._fan_out = counted
    try:
        got = run(recipe, ray_pool, inputs)
    finally:
        for replica_set in sets:
            del replica_set._fan_out
            for replica in replica_set.replicas.values():
                replica.actor = replica.actor.actor
    assert_same_records(got, reference)
    for replica_set in sets:
        engine_calls = calls[(replica_set.label, "engine call")]
        per_replica = [
            calls[(name, "sample")] + calls[(name, "span_logprobs")] for name in replica_set.replicas
        ]
        assert engine_calls > 0 and all(0 < n <= engine_calls for n in per_replica), (
            engine_calls,
            per_replica,
        )
        assert sum(per_replica) > engine_calls  # the work was split, not sent to one replica
    assert all(sorted(r.node_id for r in s.replicas.values()) for s in sets)


def write_inputs(path: Path, inputs) -> str:
    path.write_bytes(
        b"".join(
            orjson.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + b"\n" for p in inputs
        )
    )
    return str(path)


def execute_with(recipe: Recipe, pool, tmp_path: Path, inputs, on_round=None) -> list:
    from cordgen.store import RunDirectory
    from cordgen.synth import NoObserver, execute, plan_run

    class Hook(NoObserver):
        def round_finished(self, report):
            if on_round is not None:
                on_round(report)

    tmp_path.mkdir(exist_ok=True)
    data = recipe.model_dump() | {
        "input": {"path": write_inputs(tmp_path / "problems.jsonl", inputs)},
        "output": {"path": str(tmp_path / "run")},
    }
    execute(plan_run(Recipe.model_validate(data)), Hook(), lambda records: None, pool=pool)
    run_dir = RunDirectory(tmp_path / "run")
    return sorted(run_dir.records(), key=lambda r: r.id), run_dir.manifest()


@pytest.mark.engine
def test_a_killed_replica_is_restarted_and_the_run_gives_the_same_records(
    ray_pool, reference, inputs, recipe, tmp_path
):
    beta = next(s for s in replica_sets(ray_pool) if s.label == "beta")
    victim = beta.replicas["beta#0"]
    killed = []

    def kill_in_round_two(report):
        if report.round == 2 and not killed:
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    got, manifest = execute_with(recipe, ray_pool, tmp_path, inputs, kill_in_round_two)
    assert killed and victim.pid != killed[0]  # the actor came back as a new process
    assert sorted(beta.replicas) == ["beta#0", "beta#1"]
    assert_same_records(got, reference)
    assert manifest.status == "complete"
    rounds = manifest.replica_rounds
    assert rounds and {name for r in rounds for name in r.busy_seconds} == {
        "alpha/alpha-scorer#0",
        "alpha/alpha-scorer#1",
        "beta#0",
        "beta#1",
    }
    assert all(seconds > 0 for r in rounds for seconds in r.busy_seconds.values())


@pytest.mark.engine
def test_a_replica_with_no_restart_left_hands_its_problems_over_and_the_last_one_stops_the_run(
    cluster, ray_pool, engine_pool, tiny_model_dirs, inputs, tmp_path
):
    from cordgen.engines.pool import EnginePool

    dirs = {"alpha": tiny_model_dirs["alpha"]}
    recipe = ray_recipe(dirs, replica_restarts=0)
    reference = run(Recipe.model_validate(recipe_data(dirs)), engine_pool, inputs)
    pool = EnginePool(recipe.placement)
    killed: list[str] = []

    def kill(replica_set, name):
        os.kill(replica_set.replicas[name].pid, signal.SIGKILL)
        killed.append(name)

    def kill_one_in_round_two(report):
        (alpha,) = pool._models.values()
        if report.round == 2 and not killed:
            kill(alpha, "alpha/alpha-scorer#0")

    try:
        got, _ = execute_with(recipe, pool, tmp_path / "one", inputs, kill_one_in_round_two)
        (alpha,) = pool._models.values()
        assert killed and list(alpha.replicas) == ["alpha/alpha-scorer#1"]
        assert_same_records(got, reference)
        kill(alpha, "alpha/alpha-scorer#1")
        with pytest.raises(EngineError) as failure:
            execute_with(recipe, pool, tmp_path / "none", inputs)
    finally:
        pool.shutdown()
    assert re.fullmatch(
        r"engine for alpha/alpha-scorer \(.*alpha\): no replica left \(replica alpha/alpha-scorer#1 \(.*\) "
        r"on node \S+ \(\w{8}\) died: .*\); re-run to resume",
        str(failure.value),
    ), str(failure.value)


def where_now(replica, limit_s: float = 180) -> str:
    """The node a replica's actor runs on now, once it answers (it may be restarting)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return ray.get(replica.actor.ready.remote(), timeout=limit_s)["node_id"]
        except ray.exceptions.ActorUnavailableError:
            assert time.monotonic() < deadline, f"{replica.name} did not come back"
            time.sleep(0.5)


def wait_until_dead(node_id: str, limit_s: float = 60) -> None:
    """Until the cluster has noticed the node is gone, so the next round meets the loss."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            return
        time.sleep(0.2)
    pytest.fail(f"node {node_id} still alive after {limit_s} s")


@pytest.mark.engine
def test_a_lost_node_moves_its_replicas_and_the_run_gives_the_same_records(
    cluster, ray_pool, reference, inputs, recipe, tmp_path
):
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    hosting = Counter(r.node_id for s in replica_sets(ray_pool) for r in s.replicas.values())
    doomed = max((n for n in hosting if n in nodes), key=lambda n: hosting[n])
    lost = []

    def remove_node_in_round_two(report):
        if report.round == 2 and not lost:
            cluster.remove_node(nodes[doomed], allow_graceful=False)
            lost.append(doomed)
            wait_until_dead(doomed)

    replicas = [r for s in replica_sets(ray_pool) for r in s.replicas.values()]
    before = {r.name: r.node_id for r in replicas}
    got, manifest = execute_with(recipe, ray_pool, tmp_path, inputs, remove_node_in_round_two)
    assert lost
    assert_same_records(got, reference)
    moved = [r.name for r in replicas if before[r.name] == doomed and r.node_id != doomed]
    assert moved, "no call met the lost node's replicas"
    assert all(where_now(r) != doomed for r in replicas)  # Ray placed every one elsewhere
    cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=100 << 20)  # for the tests after this one


@pytest.mark.engine
def test_a_replica_that_cannot_start_is_one_line_and_leaves_nothing_behind(
    cluster, ray_pool, tiny_model_dirs
):
    from ray.util.placement_group import placement_group_table

    from cordgen.engines.pool import EnginePool
    from cordgen.engines.roles import build_roles

    data = ray_recipe({"alpha": tiny_model_dirs["alpha"]}).model_dump()
    data["teachers"][0]["engine"]["kv_cache_memory_bytes"] = 65536
    data["scorer"]["engine"] = data["teachers"][0]["engine"]
    recipe = Recipe.model_validate(data)
    before = {pg for pg, row in placement_group_table().items() if row["state"] != "REMOVED"}
    ours = engine_actor_processes(cluster)
    pool = EnginePool(recipe.placement)
    started = time.monotonic()
    with pytest.raises(EngineError) as failure:
        build_roles(recipe, pool)
    pool.shutdown()
    message = str(failure.value)
    assert "\n" not in message and time.monotonic() - started < 200
    assert re.match(
        rf"replica alpha/alpha-scorer#[01] \({re.escape(tiny_model_dirs['alpha'])}\) on node ", message
    )
    assert " failed to start: " in message and "; its log: ray logs actor --id " in message
    assert "KV cache" in message or "memory" in message, message
    assert_released(cluster, before, ours)


def engine_actor_processes(cluster) -> set[int]:
    """Pids of the engine actors the cluster's raylets run (Ray titles them ray::EngineActor)."""
    import psutil

    pids = set()
    for node in cluster.list_all_nodes():
        for info in node.all_processes.get("raylet", []):
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(info.process.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        if "EngineActor" in " ".join(child.cmdline()):
                            pids.add(child.pid)
    return pids


CORDGEN = str(Path(sys.executable).with_name("cordgen"))


def cli_recipe(tmp_path: Path, name: str, dirs, inputs, cluster, **overrides) -> str:
    data = ray_recipe(dirs, ray_address=cluster.address, **overrides).model_dump(exclude_none=True)
    data["input"] = {"path": write_inputs(tmp_path / "problems.jsonl", inputs)}
    (tmp_path / name).write_text(yaml.safe_dump(data))
    return name


@pytest.mark.engine
def test_a_plan_larger_than_the_cluster_stops_the_command_before_anything_loads(
    cluster, tiny_model_dirs, inputs, tmp_path
):
    config = cli_recipe(tmp_path, "big.yaml", tiny_model_dirs, inputs, cluster, replicas=5)
    result = subprocess.run(
        [CORDGEN, "synth", "-c", config, "-o", "run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: the plan's replicas need 10 CPU; the Ray cluster has 6 CPU (nodes: 4)"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.engine
def test_cordgen_synth_on_a_cluster_releases_every_replica_on_ctrl_c_and_kill_and_resumes(
    cluster, ray_pool, tiny_model_dirs, inputs, tmp_path
):
    """The command line as `ray job submit -- cordgen synth ...` runs it. Replicas, their
    processes and placement groups go when cordgen ends: stopped with Ctrl-C while its engines
    start, or SIGKILLed once they run (Ray removes a dead driver's actors); then the same command
    resumes and finishes, the driver writing the whole run."""
    from ray.util.placement_group import placement_group_table

    config = cli_recipe(tmp_path, "alpha.yaml", {"alpha": tiny_model_dirs["alpha"]}, inputs, cluster)
    command = [CORDGEN, "synth", "-c", config, "-o", "run"]
    groups = {pg for pg, row in placement_group_table().items() if row["state"] != "REMOVED"}
    ours = engine_actor_processes(cluster)  # the module's replicas, wherever Ray restarted them
    log = tmp_path / "run" / "engines.log"

    stopped = subprocess.Popen(  # Ctrl-C's default action, even where this test's runner ignores it
        command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    wait_for(lambda: engine_actor_processes(cluster) - ours, "no replica process appeared")
    stopped.send_signal(signal.SIGINT)
    assert stopped.wait(timeout=300) == 130, stopped.stderr.read()
    assert_released(cluster, groups, ours)

    def replicas_started() -> int:
        return log.read_text().count("=== cordgen engine") if log.exists() else 0

    earlier = replicas_started()
    killed = subprocess.Popen(
        command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    wait_for(lambda: replicas_started() >= earlier + 2, "replicas never started")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert_released(cluster, groups, ours)

    result = subprocess.run(command + ["-q"], cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    assert len((run / "results.jsonl").read_bytes().splitlines()) == len(inputs)
    manifest = orjson.loads((run / "manifest.json").read_bytes())
    assert manifest["status"] == "complete" and manifest["sessions"] == 3
    assert {n for r in manifest["replica_rounds"] for n in r["busy_seconds"]} == {
        "alpha/alpha-scorer#0",
        "alpha/alpha-scorer#1",
    }
    assert (
        log.read_text().count("=== cordgen engine alpha/alpha-scorer#") >= 4
        and "ray logs actor --id" in log.read_text()
    )
    assert_released(cluster, groups, ours)


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, failure: str, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def assert_released(cluster, groups: set, ours: set[int]) -> None:
    """No engine process but the module's replicas, and no placement group but those there were
    before, within a minute (Ray notices a dead driver within seconds)."""
    from ray.util.placement_group import placement_group_table

    def left() -> tuple[set[int], set]:
        live = {pg for pg, row in placement_group_table().items() if row["state"] != "REMOVED"}
        return engine_actor_processes(cluster) - ours, live - groups

    deadline = time.monotonic() + 60
    while any(left()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == (set(), set())


@pytest.mark.engine
def test_a_replica_that_cannot_come_back_in_time_stops_the_run_with_one_line(
    cluster, tiny_model_dirs, inputs, tmp_path
):
    """A lost node whose replica finds no room elsewhere (the cluster's free CPUs are held) is
    waited for `replica_timeout_s`, then the run stops naming it; nothing hangs. The replicas
    start under a long timeout (a busy machine starts engines slowly), then get 20 s to come back."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from cordgen.engines.pool import EnginePool

    recipe = ray_recipe({"alpha": tiny_model_dirs["alpha"]}, replica_restarts=1, replica_timeout_s=20)
    pool = EnginePool(recipe.placement.model_copy(update={"replica_timeout_s": 600.0}))
    blocker = None
    try:
        from cordgen.engines.roles import build_roles

        build_roles(recipe, pool)
        (alpha,) = pool._models.values()
        alpha.placement = recipe.placement
        doomed = alpha.replicas["alpha/alpha-scorer#0"].node_id
        free = int(ray.available_resources().get("CPU", 0))
        if free:
            blocker = placement_group([{"CPU": 1.0}] * free, strategy="SPREAD")
            ray.get(blocker.ready(), timeout=60)
        cluster.remove_node(
            next(n for n in cluster.worker_nodes if n.node_id == doomed), allow_graceful=False
        )
        wait_until_dead(doomed)
        with pytest.raises(EngineError) as failure:
            execute_with(recipe, pool, tmp_path, inputs)
    finally:
        pool.shutdown()
        if blocker is not None:
            remove_placement_group(blocker)
        cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=100 << 20)
    assert re.fullmatch(
        r"engine for alpha/alpha-scorer \(.*\): replica alpha/alpha-scorer#[01] \(.*\) on node \S+ "
        rf"\({doomed[:8]}\) did not come back within 20 s \(placement.replica_timeout_s\); re-run to resume",
        str(failure.value),
    ), str(failure.value)
    from cordgen.store import RunDirectory

    assert RunDirectory(tmp_path / "run").manifest().status == "failed"
