"""Engine replicas on a Ray cluster (placement `ray`): ratios measured side by side in one run.

    make scale                                     # demo teachers, a simulated 2-node cluster, CPU
    python benchmarks/scale.py --config configs/paper-ray.yaml --address auto --input p.jsonl --problems 512

The same problems, search and seeds under three configurations of the recipe's engines, every
engine of the recipe with the same replica count: 1 replica, affinity routing; 2 replicas,
affinity routing (each problem pinned to one replica); 2 replicas, round-robin routing (each
call spread evenly, as a load balancer that does not know the problems would). Measured:

- whether the records are identical across the three (texts, teachers, tokens; scores to a
  relative 1e-3), one boolean per pair;
- scorer prompt tokens computed (not served from the prefix cache) per generated candidate
  token: what affinity routing saves over round-robin;
- each replica's busy share (busy seconds over the run's engine seconds) and the round time
  lost to the slowest replica (per round and engine: its slowest replica's busy time minus the
  mean of its replicas', summed), in seconds and as a share of engine time;
- the controller's overhead: wall time of synthesis minus the time spent waiting on engines;
- actor start time (wall time of the pool's load) and the RSS of each actor's process (only
  where the actor runs on this machine: a remote node's processes cannot be read from here);
- recovery: with 2 replicas, one replica's actor process SIGKILLed after round 2; the seconds
  from the kill until the next round is done, beyond what that round took uninterrupted, and
  whether the records still equal the uninterrupted run's.

Without `--address` the script starts a simulated cluster on this machine
(`ray.cluster_utils.Cluster`: a head with no CPUs and `--nodes` worker nodes of `--node-cpus`
logical CPUs each) and runs the engines' actors there; with `--address` it joins that cluster
and starts none. The recipe is the only difference between a CPU run with the demo teachers and
a GPU run with real models. Results go to benchmarks/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from report_files import RESULTS, ROOT, shown_path, write_report
from throughput import device_name

from cordgen.config import Recipe, Routing, load_recipe
from cordgen.problems import Problem, load_problems
from cordgen.records import TraceRecord
from cordgen.synth import RoundReport

CONFIGS: dict[str, tuple[int, Routing]] = {
    "r1_affinity": (1, "affinity"),
    "r2_affinity": (2, "affinity"),
    "r2_round_robin": (2, "round_robin"),
}
NAMES = {
    "r1_affinity": "1 replica, affinity",
    "r2_affinity": "2 replicas, affinity",
    "r2_round_robin": "2 replicas, round-robin",
}
PAIRS = (("r1_affinity", "r2_affinity"), ("r2_affinity", "r2_round_robin"), ("r1_affinity", "r2_round_robin"))
SCORE_TOLERANCE = 1e-3  # relative: scores may differ in the last bits between batch shapes
KILL_AFTER_ROUND = 2


@dataclass
class Timing:
    """One synthesis on a pool: wall time, engine wait, and every round's replica busy times."""

    pool: Any
    on_round: Callable[[RoundReport, float], None] | None = None
    wall_s: float = 0.0
    engine_s: float = 0.0  # waiting on engines; teachers' concurrent calls count once
    started: float = 0.0
    round_ends: list[float] = field(default_factory=list)  # seconds since the start
    round_engine_s: list[float] = field(default_factory=list)
    replica_busy: list[dict[str, float]] = field(default_factory=list)  # per round
    records: list[TraceRecord] = field(default_factory=list)

    def round_finished(self, report: RoundReport) -> None:
        now = time.perf_counter()
        self.engine_s += report.engine_seconds
        self.round_ends.append(now - self.started)
        self.round_engine_s.append(report.engine_seconds)
        self.replica_busy.append(self.pool.replica_seconds())
        if self.on_round is not None:
            self.on_round(report, now)

    @property
    def round_s(self) -> list[float]:
        ends = [0.0, *self.round_ends]
        return [b - a for a, b in zip(ends, ends[1:])]


def synthesize_timed(
    problems: Sequence[Problem],
    recipe: Recipe,
    pool,
    on_round: Callable[[RoundReport, float], None] | None = None,
) -> Timing:
    from cordgen.engines.roles import build_roles
    from cordgen.synth import synthesize

    timing = Timing(pool, on_round)
    teachers, scorer = build_roles(recipe, pool)
    pool.reset_prefix_caches()  # every measurement starts cold, whatever ran before it
    pool.replica_seconds()  # and its replicas' clocks at zero
    timing.started = time.perf_counter()
    synthesize(problems, teachers, scorer, recipe, timing.records.extend, timing)
    timing.wall_s = time.perf_counter() - timing.started
    timing.records.sort(key=lambda r: r.id)
    return timing


def measured(problems: Sequence[Problem], recipe: Recipe, pool, repeats: int) -> tuple[Timing, dict]:
    """The same synthesis `repeats` times on the same engines, cold caches each time: the run of
    median wall time stands for the configuration (the others only say how noisy it was)."""
    timings = [synthesize_timed(problems, recipe, pool) for _ in range(repeats)]
    chosen = sorted(timings, key=lambda t: t.wall_s)[(len(timings) - 1) // 2]
    walls = [round(t.wall_s, 2) for t in timings]
    same = all(compare_records(t.records, timings[0].records)["identical"] for t in timings[1:])
    return chosen, {"wall_s_each_repeat": walls, "repeats_identical": same}


def with_replicas(recipe: Recipe, replicas: int, routing: Routing, address: str | None) -> Recipe:
    """Every engine of the recipe with `replicas` copies (a scorer that shares a teacher's
    engine still shares it), placed on the Ray cluster."""

    def engine(role):
        return role.model_copy(update={"engine": role.engine.model_copy(update={"replicas": replicas})})

    changes = {"mode": "ray", "routing": routing, "ray_address": address}
    placement = recipe.placement.model_copy(update=changes)
    return recipe.model_copy(
        update={
            "teachers": [engine(t) for t in recipe.teachers],
            "scorer": engine(recipe.scorer),
            "placement": placement,
        }
    )


def replica_sets(pool) -> list:
    return list(pool._models.values())


def route_by(pool, recipe: Recipe) -> None:
    """Switches the started replicas to the recipe's routing: the engines stay, only which
    replica gets each request changes (the pool's placement decides it only at start)."""
    for replica_set in replica_sets(pool):
        replica_set.placement = recipe.placement


def start_pool(recipe: Recipe) -> tuple[Any, float]:
    from cordgen.engines.placement import check_cluster, check_placement, visible_device_count
    from cordgen.engines.pool import EnginePool
    from cordgen.engines.roles import build_roles

    check_placement(recipe, visible_device_count)
    check_cluster(recipe)  # a plan the cluster cannot hold is one line before anything loads
    pool = EnginePool(recipe.placement)
    started = time.perf_counter()
    try:
        build_roles(recipe, pool)
    except BaseException:
        pool.shutdown()
        raise
    return pool, time.perf_counter() - started


# -- what the runs say -----------------------------------------------------------------------


def scores_of(record: TraceRecord) -> list[float | None]:
    return [
        score
        for trajectory in [record.result, *record.alternatives]
        for score in [trajectory.score, *(s.score for s in trajectory.steps)]
    ]


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=SCORE_TOLERANCE)


def compare_records(a: Sequence[TraceRecord], b: Sequence[TraceRecord]) -> dict:
    if [r.id for r in a] != [r.id for r in b]:
        return {"identical": False, "differing_problems": None, "note": "different problem ids"}
    differing = 0
    for x, y in zip(a, b):
        sx, sy = scores_of(x), scores_of(y)
        same = x.without_scores() == y.without_scores() and len(sx) == len(sy) and all(map(close, sx, sy))
        differing += not same
    return {"identical": differing == 0, "differing_problems": differing}


def engine_of(replica: str) -> str:
    return replica.rsplit("#", 1)[0]


def tokens(records: Sequence[TraceRecord]) -> dict:
    generated = sum(sum(r.usage.generated_tokens.values()) for r in records)
    scored = sum(r.usage.scored_tokens for r in records)
    computed = sum(r.usage.scored_tokens_computed for r in records)
    return {
        "generated_tokens": generated,
        "scorer_prompt_tokens": scored,
        "scorer_prompt_tokens_computed": computed,
        "computed_per_generated_token": round(computed / max(1, generated), 3),
    }


def replica_load(timing: Timing, replicas: dict[str, list[str]]) -> dict:
    """Busy share per replica, and per round and engine the slowest replica's lead over the mean
    of the engine's replicas (a replica with nothing to do in a round counts as 0 s busy)."""
    busy = {name: 0.0 for names in replicas.values() for name in names}
    lost = {engine: 0.0 for engine in replicas}
    for round_busy in timing.replica_busy:
        for name, seconds in round_busy.items():
            busy[name] = busy.get(name, 0.0) + seconds
        for engine, names in replicas.items():
            times = [round_busy.get(name, 0.0) for name in names]
            lost[engine] += max(times) - statistics.fmean(times)
    engine_s = max(timing.engine_s, 1e-9)
    total_lost = sum(lost.values())
    return {
        "busy_s": {name: round(seconds, 3) for name, seconds in sorted(busy.items())},
        "busy_share": {name: round(seconds / engine_s, 3) for name, seconds in sorted(busy.items())},
        "straggler_s": round(total_lost, 3),
        "straggler_share": round(total_lost / engine_s, 4),
        "straggler_s_by_engine": {engine: round(seconds, 3) for engine, seconds in lost.items()},
    }


def local_addresses() -> set[str]:
    import psutil

    found = {"127.0.0.1", "localhost"}
    for addresses in psutil.net_if_addrs().values():
        found.update(a.address for a in addresses)
    return found


def actor_memory(pool) -> dict:
    """RSS of each replica's actor process (children included: tensor-parallel workers), where
    the replica runs on this machine."""
    import psutil

    here = local_addresses()
    per_replica: dict[str, dict] = {}
    for replica_set in replica_sets(pool):
        for replica in replica_set.replicas.values():
            row: dict[str, Any] = {"node": replica.node, "pid": replica.pid, "rss_mib": None}
            if replica.node in here and psutil.pid_exists(replica.pid):
                process = psutil.Process(replica.pid)
                rss = process.memory_info().rss + sum(
                    child.memory_info().rss for child in process.children(recursive=True)
                )
                row["rss_mib"] = round(rss / 2**20, 1)
            per_replica[replica.name] = row
    measured = [row["rss_mib"] for row in per_replica.values() if row["rss_mib"] is not None]
    return {
        "per_replica": per_replica,
        "actors_measured": len(measured),
        "actors": len(per_replica),
        "total_rss_mib": round(sum(measured), 1) if measured else None,
        "mean_rss_mib": round(statistics.fmean(measured), 1) if measured else None,
        "driver_rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
    }


def summary(timing: Timing, repeats: dict, pool, start_s: float | None, problems: int) -> dict:
    replicas = {rs.label: sorted(rs.replicas) for rs in replica_sets(pool)}
    return {
        "start_s": None if start_s is None else round(start_s, 2),
        "wall_s": round(timing.wall_s, 2),
        **repeats,
        "problems_per_s": round(problems / timing.wall_s, 3),
        "engine_s": round(timing.engine_s, 2),
        "controller_s": round(timing.wall_s - timing.engine_s, 3),
        "controller_share": round((timing.wall_s - timing.engine_s) / timing.wall_s, 4),
        "rounds": len(timing.round_ends),
        "round_s": [round(s, 3) for s in timing.round_s],
        **tokens(timing.records),
        **replica_load(timing, replicas),
        "memory": actor_memory(pool),
    }


# -- recovery --------------------------------------------------------------------------------


def recovery(problems: Sequence[Problem], recipe: Recipe, pool, uninterrupted: Timing) -> dict:
    """The 2-replica affinity run again, one replica's actor process SIGKILLed when round 2 is
    done: Ray restarts it and the round's lost call goes to it again once it is back."""
    victim = replica_sets(pool)[0].replicas[sorted(replica_sets(pool)[0].replicas)[0]]
    killed: dict[str, Any] = {}

    def kill_after_round_two(report: RoundReport, now: float) -> None:
        if report.round == KILL_AFTER_ROUND and not killed:
            killed["pid"] = victim.pid
            os.kill(victim.pid, signal.SIGKILL)
            killed["at"] = time.perf_counter()
        elif report.round == KILL_AFTER_ROUND + 1 and "at" in killed:
            killed["next_round_done"] = now

    timing = synthesize_timed(problems, recipe, pool, kill_after_round_two)
    result: dict[str, Any] = {
        "killed_replica": victim.name,
        "killed": "at" in killed,
        "after_round": KILL_AFTER_ROUND,
        "records_equal_uninterrupted": compare_records(timing.records, uninterrupted.records),
        "wall_s": round(timing.wall_s, 2),
        "uninterrupted_wall_s": round(uninterrupted.wall_s, 2),
    }
    if "next_round_done" not in killed:
        return result
    index = KILL_AFTER_ROUND  # round 3, 0-based
    took = killed["next_round_done"] - killed["at"]
    others = [s for i, s in enumerate(timing.round_engine_s) if i != index]
    replicas = {rs.label: sorted(rs.replicas) for rs in replica_sets(pool)}
    result |= {
        "restarted_as_new_process": victim.pid != killed["pid"],
        "replicas_after": replicas,
        "kill_to_next_round_done_s": round(took, 2),
        "same_round_uninterrupted_s": round(uninterrupted.round_s[index], 3),
        "recovery_s": round(took - uninterrupted.round_s[index], 2),
        "next_round_engine_s": round(timing.round_engine_s[index], 2),
        "next_round_busy_s": {name: round(t, 3) for name, t in sorted(timing.replica_busy[index].items())},
        "median_other_rounds_engine_s": round(statistics.median(others), 3) if others else None,
        "recovery_s_vs_median_round": round(timing.round_engine_s[index] - statistics.median(others), 2)
        if others
        else None,
    }
    return result


# -- the cluster -----------------------------------------------------------------------------


def start_cluster(nodes: int, node_cpus: int, object_store_mib: int):
    """A head that runs no engine and `nodes` worker nodes, each a raylet on this machine. The
    actors must import the cordgen this script imports, wherever the checkout is: PYTHONPATH
    reaches them through the raylets' environment (Ray workers do not see sys.path edits)."""
    import ray
    from ray.cluster_utils import Cluster

    import cordgen

    source = str(Path(cordgen.__file__).resolve().parents[1])
    paths = [source, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    store = {"object_store_memory": object_store_mib << 20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **store})
    for _ in range(nodes):
        cluster.add_node(num_cpus=node_cpus, **store)
    cluster.wait_for_nodes()
    env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=env)
    return cluster


def absolute_models(recipe: Recipe) -> Recipe:
    """Model paths relative to the repository (the demo's) as absolute ones: actors on another
    node's raylet may not start where this script did."""

    def fix(role):
        path = ROOT / role.engine.model
        if Path(role.engine.model).is_absolute() or not path.exists():
            return role
        return role.model_copy(update={"engine": role.engine.model_copy(update={"model": str(path)})})

    teachers = [fix(t) for t in recipe.teachers]
    return recipe.model_copy(update={"teachers": teachers, "scorer": fix(recipe.scorer)})


# -- the report ------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    runs = report["runs"]
    cluster = report["cluster"]
    lines = [
        f"Device: {report['device']}; recipe {report['config']}; {report['problems']} problems; "
        f"cluster: {cluster['kind']}, worker nodes: {cluster['worker_nodes']} "
        f"({cluster['cpus']:g} logical CPUs, {cluster['gpus']:g} GPUs); whole benchmark "
        f"{report['benchmark_s']:.0f} s. Runs per configuration: {report['repeats']}, on the same actors "
        "with cold prefix caches; the run of median wall time is shown.",
        "",
        "| configuration | actors start s | wall s (each run) | problems/s | engine wait s "
        "| controller share | scorer computed per generated token | straggler s (share of engine time) "
        "| actor RSS MiB (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in runs.items():
        start = "(same actors)" if row["start_s"] is None else f"{row['start_s']:.1f}"
        rss = row["memory"]["mean_rss_mib"]
        each = " / ".join(map(str, row["wall_s_each_repeat"]))
        lines.append(
            f"| {NAMES[key]} | {start} | {row['wall_s']:.2f} ({each}) "
            f"| {row['problems_per_s']:.2f} "
            f"| {row['engine_s']:.2f} | {100 * row['controller_share']:.1f}% "
            f"| {row['computed_per_generated_token']:.3f} "
            f"| {row['straggler_s']:.2f} ({100 * row['straggler_share']:.1f}%) "
            f"| {'-' if rss is None else f'{rss:.0f}'} |"
        )
    lines += ["", "| records | identical |", "|---|---|"]
    for key, row in runs.items():
        count = len(row["wall_s_each_repeat"])
        lines.append(f"| {NAMES[key]}: its {count} run(s) with each other | {row['repeats_identical']} |")
    for pair, row in report["records_equal"].items():
        differing = row["differing_problems"]
        note = "" if row["identical"] else f" ({differing} problems differ)"
        lines.append(f"| {pair} | {row['identical']}{note} |")
    cache = report["cache_affinity"]
    lines += [
        "",
        f"Scorer prompt tokens computed per generated token: affinity {cache['affinity']:.3f}, "
        f"round-robin {cache['round_robin']:.3f}, 1 replica {cache['one_replica']:.3f}; "
        f"round-robin / affinity: {cache['round_robin_over_affinity']:.2f}x.",
        f"Wall time, 2 replicas / 1 (affinity): {report['wall_ratio_r2_over_r1']:.2f}x.",
        "",
        "| configuration | replica | busy s | busy share of engine time |",
        "|---|---|---|---|",
    ]
    for key, row in runs.items():
        for name, seconds in row["busy_s"].items():
            lines.append(f"| {NAMES[key]} | {name} | {seconds:.2f} | {100 * row['busy_share'][name]:.1f}% |")
    lines += ["", "| configuration | engine | time lost to its slowest replica, s |", "|---|---|---|"]
    for key, row in runs.items():
        for engine, seconds in row["straggler_s_by_engine"].items():
            lines.append(f"| {NAMES[key]} | {engine} | {seconds:.3f} |")
    rec = report["recovery"]
    lines += [""]
    if "recovery_s" in rec:
        lines.append(
            f"Recovery: replica {rec['killed_replica']} SIGKILLed after round {rec['after_round']}; "
            f"round {rec['after_round'] + 1} was done {rec['kill_to_next_round_done_s']:.1f} s after the "
            f"kill (uninterrupted {rec['same_round_uninterrupted_s']:.2f} s): {rec['recovery_s']:.1f} s "
            "to recover "
            f"({rec['recovery_s_vs_median_round']:.1f} s by engine wait against the median round); "
            f"restarted as a new process: {rec['restarted_as_new_process']}; records equal the "
            f"uninterrupted run's: {rec['records_equal_uninterrupted']['identical']}."
        )
    else:
        lines.append(f"Recovery: no kill happened (the run had fewer than {KILL_AFTER_ROUND + 1} rounds).")
    lines += ["", report["caveat"]]
    return "\n".join(lines) + "\n"


def show(console, key: str, row: dict) -> None:
    console.print(NAMES[key], {k: v for k, v in row.items() if k != "memory"})
    console.print({name: m["rss_mib"] for name, m in row["memory"]["per_replica"].items()})


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--problems", type=int, default=40, help="the first N problems of the recipe's input")
    parser.add_argument("--input", default=None, help="the problems; unset: the recipe's input.path")
    parser.add_argument("--address", default=None, help="a Ray cluster to use; unset: start a simulated one")
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes of the simulated cluster")
    parser.add_argument(
        "--node-cpus",
        type=int,
        default=4,
        help="logical CPUs per simulated node: 2 replicas of the demo's 4 engines reserve 8",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is kept")
    parser.add_argument("--object-store-mib", type=int, default=100, help="per simulated node")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    began = time.perf_counter()

    import ray

    from cordgen.engines.placement import fit_recipe_to_host

    recipe = fit_recipe_to_host(absolute_models(load_recipe(args.config)))  # as `cordgen synth` does
    source = args.input or recipe.input.path
    if source is None:
        parser.error(f"{args.config} names no input.path: give --input")
    problems = load_problems(source).problems[: args.problems]
    cluster = None
    if args.address is None:
        cluster = start_cluster(args.nodes, args.node_cpus, args.object_store_mib)
    else:
        ray.init(address=args.address, log_to_driver=False)
    try:
        resources = ray.cluster_resources()
        report: dict[str, Any] = {
            "device": device_name(),
            "config": shown_path(args.config),
            "problems": len(problems),
            "repeats": args.repeats,
            "cluster": {
                "kind": "simulated on this machine" if cluster else args.address,
                "worker_nodes": sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")),
                "cpus": resources.get("CPU", 0.0),
                "gpus": resources.get("GPU", 0.0),
                "physical_cpus_here": os.cpu_count(),
            },
        }
        console.print(report["cluster"])
        recipes = {key: with_replicas(recipe, *how, args.address) for key, how in CONFIGS.items()}
        runs: dict[str, dict] = {}
        timings: dict[str, Timing] = {}

        # 1 replica per engine: a pool of its own.
        pool, start_s = start_pool(recipes["r1_affinity"])
        try:
            synthesize_timed(problems[:2], recipes["r1_affinity"], pool)  # warms the engines up
            timings["r1_affinity"], repeats = measured(problems, recipes["r1_affinity"], pool, args.repeats)
            runs["r1_affinity"] = summary(timings["r1_affinity"], repeats, pool, start_s, len(problems))
            show(console, "r1_affinity", runs["r1_affinity"])
        finally:
            pool.shutdown()

        # 2 replicas per engine: one pool for both routings and the recovery run.
        pool, start_s = start_pool(recipes["r2_affinity"])
        try:
            route_by(pool, recipes["r2_round_robin"])  # every replica gets some of the warm-up
            synthesize_timed(problems[:2], recipes["r2_round_robin"], pool)
            for key in ("r2_affinity", "r2_round_robin"):
                route_by(pool, recipes[key])
                timings[key], repeats = measured(problems, recipes[key], pool, args.repeats)
                started = start_s if key == "r2_affinity" else None  # the same actors for both
                runs[key] = summary(timings[key], repeats, pool, started, len(problems))
                show(console, key, runs[key])
            route_by(pool, recipes["r2_affinity"])
            report["recovery"] = recovery(problems, recipes["r2_affinity"], pool, timings["r2_affinity"])
            console.print("recovery", report["recovery"])
        finally:
            pool.shutdown()
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()

    report["runs"] = runs
    report["records_equal"] = {
        f"{NAMES[a]} vs {NAMES[b]}": compare_records(timings[a].records, timings[b].records) for a, b in PAIRS
    }
    affinity = runs["r2_affinity"]["computed_per_generated_token"]
    spread = runs["r2_round_robin"]["computed_per_generated_token"]
    report["cache_affinity"] = {
        "one_replica": runs["r1_affinity"]["computed_per_generated_token"],
        "affinity": affinity,
        "round_robin": spread,
        "round_robin_over_affinity": round(spread / max(affinity, 1e-9), 3),
    }
    report["wall_ratio_r2_over_r1"] = round(runs["r2_affinity"]["wall_s"] / runs["r1_affinity"]["wall_s"], 3)
    report["benchmark_s"] = round(time.perf_counter() - began, 1)
    report["caveat"] = (
        f"Every replica of the simulated cluster shares this machine's {os.cpu_count()} CPU cores "
        "(the nodes' logical CPUs are bookkeeping), so times, busy shares and the straggler cost are "
        "noisy and say nothing about speedup from more hardware; the token ratios and the record "
        "comparisons are the point. Teacher engines run at the same time, so straggler seconds "
        "summed over engines can exceed the wall time they cost."
    )
    write_report(args.out, "scale", report, markdown(report))
    console.print(markdown(report))


if __name__ == "__main__":
    main()
