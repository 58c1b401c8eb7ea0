"""Engine replicas as Ray actors anywhere on a Ray cluster (placement `ray`).

Each replica is an actor that owns one vLLM engine, its engine core inside the actor's process
as in a worker, on a placement group of its own: `tensor_parallel_size` GPU bundles packed on
one node, or one CPU bundle on a CPU build. The roles see a `ReplicaSet`, an `EngineModel`
that splits every call by the requests' routes (problem ids, `routing.py`), sends ONE call to
each replica, all in flight at once, and puts the answers back in request order.

Faults: Ray restarts a replica whose process or node died (`replica_restarts`) and the call it
lost goes to it again once it is back: requests are seeded, so they sample what they would
have. A replica with no restart left is dropped, and its problems move to the others. A replica
that does not come back within `replica_timeout_s`, or an engine with no replica left, fails
the run with one line naming engine, replica and node; re-running resumes.

The driver (cordgen) writes every file; actors only compute. Actors and placement groups belong
to the driver's job, so Ray removes them when cordgen exits however it exits, and `shutdown`
removes them at once. This module is the only one that imports Ray.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
)
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cordgen.config import EngineSettings, PlacementConfig
from cordgen.engines import RewardRequest, Sample, SampleRequest, SpanLogprobs, SpanRequest, StepRewards
from cordgen.engines.routing import split_by_replica
from cordgen.engines.startup import start_failure
from cordgen.engines.tokenizers import load_tokenizer
from cordgen.engines.worker import share_cpu_cores
from cordgen.errors import ConfigError, EngineError

RETRY_PAUSE_S = 0.5  # between asking a restarting replica whether it is back


class Connection:
    """Whether cordgen joined Ray itself (then it leaves when its engines are released), rather
    than running where a connection already existed (a `ray job`'s driver, a test)."""

    made_here = False


def connect(address: str | None) -> None:
    """Joins the cluster at `address` (else RAY_ADDRESS), or starts a Ray on this machine bound
    to 127.0.0.1. Engine output stays in Ray's logs on each node: forwarded, a few engines would
    bury the progress display."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            ray.init(
                address="local",
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = address or "a local Ray"
        raise ConfigError(f"placement.ray_address: cannot reach {where}: {error}") from None
    Connection.made_here = True


def disconnect() -> None:
    if Connection.made_here:
        ray.shutdown()
        Connection.made_here = False


def bundles_of(settings: EngineSettings, cpus: int, cpu_build: bool) -> list[dict[str, float]]:
    """One replica's placement group: a CPU bundle on CPU builds (vLLM's tensor-parallel
    processes share it), else one GPU per tensor-parallel rank, all on one node."""
    if cpu_build:
        return [{"CPU": float(cpus)}]
    return [{"GPU": 1.0, "CPU": float(cpus)}] + [{"GPU": 1.0}] * (settings.tensor_parallel_size - 1)


def check_cluster_fits(
    engines: Mapping[EngineSettings, str],
    placement: PlacementConfig,
    cpu_build: bool,
    totals: Mapping[str, float],
    per_node: Sequence[Mapping[str, float]],
) -> None:
    """A plan that cannot fit the cluster is one line before anything loads: every replica's
    bundles together against the cluster's resources, each replica against the largest node."""
    need: dict[str, float] = {}
    for settings, label in engines.items():
        bundles = bundles_of(settings, placement.cpus_per_replica, cpu_build)
        replica = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
        if not any(all(node.get(k, 0.0) >= v for k, v in replica.items()) for node in per_node):
            kind = "GPU" if replica["GPU"] else "CPU"
            largest = max((node.get(kind, 0.0) for node in per_node), default=0.0)
            raise ConfigError(
                f"{label}: one replica needs {replica[kind]:g} {kind} on one node; the Ray cluster's "
                f"largest node has {largest:g}"
            )
        for kind, amount in replica.items():
            need[kind] = need.get(kind, 0.0) + amount * settings.replicas
    short = {k: v for k, v in need.items() if v > totals.get(k, 0.0)}
    if short:
        asked = ", ".join(f"{need[k]:g} {k}" for k in sorted(need) if need[k])
        has = ", ".join(f"{totals.get(k, 0.0):g} {k}" for k in sorted(need) if need[k])
        raise ConfigError(
            f"the plan's replicas need {asked}; the Ray cluster has {has} (nodes: {len(per_node)})"
        )


def check_cluster_room(
    engines: Mapping[EngineSettings, str], placement: PlacementConfig, cpu_build: bool
) -> None:
    connect(placement.ray_address)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    check_cluster_fits(engines, placement, cpu_build, ray.cluster_resources(), nodes)


class EngineActor:
    """One replica's engine, built in `__init__` so that a restarted actor builds it again. A
    failed start is kept and reported by `ready`, so the driver gets one line, not a traceback."""

    def __init__(self, settings: EngineSettings, threads: int | None, engine_args: dict[str, Any]) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        share_cpu_cores(threads)
        self.model: Any = None
        self.failure: str | None = None
        try:
            from cordgen.engines.vllm_local import VllmModel

            self.model = VllmModel(settings, **engine_args)
        except Exception as error:  # the traceback stays in this actor's log
            traceback.print_exc()
            self.failure = start_failure(error)

    def ready(self) -> dict[str, Any]:
        """Whether the engine started (`failure`), its window, and where it runs."""
        return {
            "failure": self.failure,
            "max_model_len": 0 if self.model is None else self.model.max_model_len,
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "actor_id": ray.get_runtime_context().get_actor_id(),
        }

    def sample(self, requests: list[SampleRequest]) -> list[Sample]:
        return self.model.sample(requests)

    def span_logprobs(self, requests: list[SpanRequest], read_cache: bool) -> list[SpanLogprobs]:
        return self.model.span_logprobs(requests, read_cache)

    def step_rewards(self, requests: list[RewardRequest]) -> list[StepRewards]:
        return self.model.step_rewards(requests)

    def reset_prefix_cache(self) -> None:
        self.model.reset_prefix_cache()

    def shutdown(self) -> None:
        if self.model is not None:
            self.model.shutdown()


@dataclass
class Replica:
    name: str  # the engine's label and its index: "alpha/scorer#1"
    model: str
    actor: Any
    group: PlacementGroup
    node: str = "?"
    pid: int = 0
    actor_id: str = ""
    node_id: str = ""

    @property
    def where(self) -> str:
        node = f"{self.node} ({self.node_id[:8]})" if self.node_id else self.node
        return f"replica {self.name} ({self.model}) on node {node}"

    def update(self, info: Mapping[str, Any]) -> str | None:
        """Where `ready` says the replica runs now (a restart may move it); its start failure."""
        self.node, self.node_id, self.pid, self.actor_id = (
            info["node"],
            info["node_id"],
            info["pid"],
            info["actor_id"],
        )
        return info["failure"]


class ReplicaClock:
    """Busy seconds per replica since it was last read: one reading per round gives the
    manifest's per-replica round times, and the slowest replica's lead is the straggler cost."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy: dict[str, float] = {}

    def add(self, replica: str, seconds: float) -> None:
        with self._lock:
            self._busy[replica] = self._busy.get(replica, 0.0) + seconds

    def take(self) -> dict[str, float]:
        with self._lock:
            busy, self._busy = self._busy, {}
        return busy


class ReplicaSet:
    """An engine's replicas behind the EngineModel surface the roles use."""

    def __init__(
        self,
        settings: EngineSettings,
        label: str,
        replicas: list[Replica],
        placement: PlacementConfig,
        clock: ReplicaClock,
        max_model_len: int,
    ) -> None:
        self.settings = settings
        self.label = label
        self.replicas = {r.name: r for r in replicas}
        self.placement = placement
        self.clock = clock
        self.max_model_len = max_model_len
        self.tokenizer = load_tokenizer(settings)
        self._lock = threading.Lock()  # roles sharing the engine may call it from two threads

    @property
    def name(self) -> str:
        return f"engine for {self.label} ({self.settings.model})"

    def sample(self, requests: Sequence[SampleRequest]) -> list[Sample]:
        return self._fan_out(requests, lambda actor, batch: actor.sample.remote(batch))

    def span_logprobs(self, requests: Sequence[SpanRequest], read_cache: bool) -> list[SpanLogprobs]:
        return self._fan_out(requests, lambda actor, batch: actor.span_logprobs.remote(batch, read_cache))

    def step_rewards(self, requests: Sequence[RewardRequest]) -> list[StepRewards]:
        return self._fan_out(requests, lambda actor, batch: actor.step_rewards.remote(batch))

    def _fan_out(self, requests: Sequence[Any], submit: Callable[[Any, list[Any]], Any]) -> list[Any]:
        """ONE call per replica that holds any of the requests, all in flight at once; a call a
        fault lost goes again (to its replica once it is back, or to the survivors)."""
        results: list[Any] = [None] * len(requests)
        with self._lock:
            pending = self._split(requests, range(len(requests)))
            while pending:
                pending = self._send(requests, pending, submit, results)
        return results

    def _split(self, requests: Sequence[Any], indices: Sequence[int]) -> dict[str, list[int]]:
        indices = list(indices)
        shares = split_by_replica(
            [requests[i].route for i in indices], list(self.replicas), self.placement.routing
        )
        return {name: [indices[i] for i in share] for name, share in shares.items()}

    def _send(
        self,
        requests: Sequence[Any],
        shares: dict[str, list[int]],
        submit: Callable[[Any, list[Any]], Any],
        results: list[Any],
    ) -> dict[str, list[int]]:
        """Sends one round of calls; returns what must be sent again."""
        started = time.perf_counter()
        calls = {
            submit(self.replicas[name].actor, [requests[i] for i in share]): name
            for name, share in shares.items()
        }
        again: dict[str, list[int]] = {}
        remaining = list(calls)
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            name = calls[done[0]]
            try:
                answers = ray.get(done[0])
            except RayTaskError as error:  # the engine raised: a bug or bad request, not a fault
                raise EngineError(f"{self.name}, {self.replicas[name].where}: {error.cause!r}") from None
            except OutOfMemoryError as error:  # Ray's memory monitor killed it: a restart would too
                raise EngineError(
                    f"{self.replicas[name].where} ran out of memory: {first_line(error)}"
                ) from None
            except RayActorError as error:
                for target, share in self._recover(name, shares[name], error, requests).items():
                    again.setdefault(target, []).extend(share)
                continue
            self.clock.add(name, time.perf_counter() - started)
            for index, answer in zip(shares[name], answers):
                results[index] = answer
        return again

    def _recover(
        self, name: str, share: list[int], error: RayActorError, requests: Sequence[Any]
    ) -> dict[str, list[int]]:
        """Where a lost call's requests go next: back to their replica once Ray has restarted
        it, else (no restart left) to the surviving replicas."""
        replica = self.replicas[name]
        if not isinstance(error, ActorDiedError) and self._comes_back(replica):
            return {name: share}
        del self.replicas[name]
        release([replica])
        if not self.replicas:
            raise EngineError(
                f"{self.name}: no replica left ({replica.where} died: {first_line(error)}); re-run to resume"
            ) from None
        return self._split(requests, share)

    def _comes_back(self, replica: Replica) -> bool:
        """Waits for a restarting replica; False when it died for good or restarted broken."""
        deadline = time.monotonic() + self.placement.replica_timeout_s
        while time.monotonic() < deadline:
            try:
                info = ray.get(replica.actor.ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return replica.update(info) is None
            except ActorUnavailableError:
                time.sleep(RETRY_PAUSE_S)
            except (ActorDiedError, RayActorError):
                return False
            except GetTimeoutError:
                break
        raise EngineError(
            f"{self.name}: {replica.where} did not come back within {self.placement.replica_timeout_s:g} s "
            "(placement.replica_timeout_s); re-run to resume"
        )

    def reset_prefix_cache(self) -> None:
        ray.get([r.actor.reset_prefix_cache.remote() for r in self.replicas.values()])

    def shutdown(self) -> None:
        """Closes each engine (30 s at most), then removes actors and placement groups."""
        replicas = list(self.replicas.values())
        with contextlib.suppress(Exception):
            ray.get([r.actor.shutdown.remote() for r in replicas], timeout=30)
        release(replicas)
        self.replicas.clear()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def release(replicas: Sequence[Replica]) -> None:
    for replica in replicas:
        with contextlib.suppress(Exception):
            ray.kill(replica.actor, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(replica.group)


class RayEngines:
    """Every local engine of a run as replicas on the cluster: placed, started and released
    together."""

    def __init__(self, placement: PlacementConfig, cpu_build: bool, log_path: Path | None) -> None:
        self.placement = placement
        self.cpu_build = cpu_build
        self.log_path = log_path
        self.clock = ReplicaClock()
        self.tag = uuid.uuid4().hex[:8]  # placement-group names are unique per cluster namespace
        connect(placement.ray_address)
        self._actor_class = ray.remote(EngineActor)
        self.sets: list[ReplicaSet] = []

    def start(self, engines: Mapping[EngineSettings, str]) -> dict[EngineSettings, ReplicaSet]:
        """All replicas of all engines at once; on any failure (or Ctrl-C) none is left."""
        placed: dict[EngineSettings, list[Replica]] = {}
        try:
            for settings, label in engines.items():
                placed[settings] = [self._place(settings, f"{label}#{i}") for i in range(settings.replicas)]
            self._wait_placed([r for group in placed.values() for r in group])
            lengths = {settings: self._wait_started(replicas) for settings, replicas in placed.items()}
        except BaseException:
            release([r for group in placed.values() for r in group])
            raise
        started = {
            settings: ReplicaSet(
                settings, label, placed[settings], self.placement, self.clock, lengths[settings]
            )
            for settings, label in engines.items()
        }
        self.sets.extend(started.values())
        return started

    def _place(self, settings: EngineSettings, name: str) -> Replica:
        bundles = bundles_of(settings, self.placement.cpus_per_replica, self.cpu_build)
        group = placement_group(bundles, strategy="STRICT_PACK", name=f"cordgen-{self.tag}:{name}")
        gpu_executor = not self.cpu_build and settings.tensor_parallel_size > 1
        options = dict(
            num_cpus=self.placement.cpus_per_replica,
            num_gpus=0 if self.cpu_build or gpu_executor else 1,
            max_restarts=self.placement.replica_restarts,
            max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            ),
        )
        threads = self.placement.cpus_per_replica if self.cpu_build else None
        engine_args = {"distributed_executor_backend": "ray"} if gpu_executor else {}
        actor = self._actor_class.options(**options).remote(settings, threads, engine_args)
        return Replica(name, settings.model, actor, group)

    def _wait_placed(self, replicas: Sequence[Replica]) -> None:
        timeout = self.placement.replica_timeout_s
        waits = {r.group.ready(): r for r in replicas}
        _, unplaced = ray.wait(list(waits), num_returns=len(waits), timeout=timeout)
        if unplaced:
            free = ray.available_resources()
            room = ", ".join(f"{free.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))
            raise EngineError(
                f"replica {waits[unplaced[0]].name}: the Ray cluster found no room for it within "
                f"{timeout:g} s (free now: {room}); other jobs may hold the resources"
            )

    def _wait_started(self, replicas: Sequence[Replica]) -> int:
        """Waits for one engine's replicas (the others start meanwhile); its window."""
        calls = {r.actor.ready.remote(): r for r in replicas}
        timeout = self.placement.replica_timeout_s
        done, late = ray.wait(list(calls), num_returns=len(calls), timeout=timeout)
        if late:
            raise EngineError(f"{calls[late[0]].where}: its engine did not start within {timeout:g} s")
        lengths = set()
        for ref in done:
            replica = calls[ref]
            try:
                info = ray.get(ref)
            except RayActorError as error:
                raise EngineError(f"{replica.where} failed to start: {first_line(error)}") from None
            failure = replica.update(info)
            if failure is not None:
                log = f"ray logs actor --id {replica.actor_id}"
                raise EngineError(f"{replica.where} failed to start: {failure}; its log: {log}")
            lengths.add(info["max_model_len"])
            self._note(
                f"=== cordgen engine {replica.name}: node {replica.node}, pid {replica.pid}; "
                f"its output: ray logs actor --id {replica.actor_id}"
            )
        return min(lengths)

    def _note(self, line: str) -> None:
        """The driver's account of where each replica runs, in the run's engine log."""
        if self.log_path is None:
            return
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def shutdown(self) -> None:
        for replica_set in self.sets:
            replica_set.shutdown()
        self.sets.clear()
        disconnect()
