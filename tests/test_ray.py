"""Placement ray: engine replicas as Ray actors on a simulated multi-node cluster
(`ray.cluster_utils.Cluster`, one raylet per "node" on this machine), against the records of
engines in worker processes. One cluster and one set of replicas serve the whole module."""

from __future__ import annotations

import os
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
from tests.test_synth import recipe_data, run, strip_scores

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
    assert [strip_scores(r) for r in got] == [strip_scores(r) for r in reference]
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

    got, manifest = execute_with(recipe, ray_pool, tmp_path, inputs, remove_node_in_round_two)
    assert lost
    assert_same_records(got, reference)
    placed = [r.node_id for s in replica_sets(ray_pool) for r in s.replicas.values()]
    assert len(placed) == 4 and doomed not in placed
    cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=100 << 20)  # for the tests after this one


@pytest.mark.engine
def test_a_replica_that_cannot_start_is_one_line_and_leaves_nothing_behind(
    cluster, tiny_model_dirs, tmp_path
):
    from ray.util.placement_group import placement_group_table
    from ray.util.state import list_actors

    from cordgen.engines.pool import EnginePool
    from cordgen.engines.roles import build_roles

    data = ray_recipe({"alpha": tiny_model_dirs["alpha"]}).model_dump()
    data["teachers"][0]["engine"]["kv_cache_memory_bytes"] = 65536
    data["scorer"]["engine"] = data["teachers"][0]["engine"]
    recipe = Recipe.model_validate(data)
    before = {pg for pg, row in placement_group_table().items() if row["state"] != "REMOVED"}
    pool = EnginePool(recipe.placement)
    started = time.monotonic()
    with pytest.raises(EngineError) as failure:
        build_roles(recipe, pool)
    pool.shutdown()
    message = str(failure.value)
    assert "\n" not in message and time.monotonic() - started < 200
    assert message.startswith("replica alpha/alpha-scorer#") and " failed to start: " in message
    assert "KV cache" in message or "memory" in message, message
    live_pgs = {pg for pg, row in placement_group_table().items() if row["state"] != "REMOVED"}
    assert live_pgs <= before
    for _ in range(50):
        alive = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.class_name == "EngineActor"]
        if len(alive) <= 4:  # the module's replicas only
            break
        time.sleep(0.2)
    assert len(alive) <= 4


@pytest.mark.engine
def test_cordgen_synth_on_a_cluster_writes_the_run_and_a_bad_plan_touches_nothing(
    cluster, tiny_model_dirs, inputs, tmp_path
):
    """The command line, as `ray job submit -- cordgen synth ...` runs it: a plan too large for
    the cluster is one line and exit 2 before anything loads."""
    cordgen = str(Path(sys.executable).with_name("cordgen"))
    data = ray_recipe(tiny_model_dirs, replicas=5, ray_address=cluster.address).model_dump(exclude_none=True)
    data["input"] = {"path": write_inputs(tmp_path / "problems.jsonl", inputs)}
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [cordgen, "synth", "-c", "big.yaml", "-o", "run-big"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: the plan's replicas need 10 CPU; the Ray cluster has 6 CPU (nodes: 4)"
    ]
    assert not (tmp_path / "run-big").exists()
