"""The placement plan, checked before any engine loads: a bad plan is one line, not a CUDA crash
minutes into a start."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from cordgen.config import EngineSettings, Recipe
from cordgen.errors import ConfigError


def distinct_engines(recipe: Recipe) -> dict[EngineSettings, list[str]]:
    """Each distinct engine with the roles it serves (equal settings share one engine)."""
    engines: dict[EngineSettings, list[str]] = {}
    for role in [*recipe.teachers, recipe.scorer]:
        engines.setdefault(role.engine, []).append(role.name)
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
        if settings.gpus is None:
            continue
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
    key_env = settings.remote.api_key_env if settings.remote else None
    if key_env is not None and not os.environ.get(key_env):
        raise ConfigError(f"{name}: remote.api_key_env names {key_env}, which is not set")


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
