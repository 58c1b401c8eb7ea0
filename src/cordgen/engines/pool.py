"""Every engine a run needs, loaded (or connected to) once: a scorer that is also a teacher is
one copy, and each engine runs where its settings and the placement say."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cordgen.config import EngineSettings, PlacementConfig
from cordgen.engines import EngineModel
from cordgen.engines.placement import vllm_is_cpu_build


def cpu_threads_per_engine(engines: int) -> int | None:
    """On a CPU build, the cores this process may use shared among the engines that start
    together; None (vLLM's own binding) for a single engine."""
    if engines <= 1:
        return None
    return max(1, len(os.sched_getaffinity(0)) // engines)


class EnginePool:
    """Remote engines are clients in this process; every local engine runs in a worker process
    of its own that dies with this one (`engines/worker.py`), its output in `log_path`, or under
    placement `ray` as replicas on a Ray cluster (`engines/ray_replicas.py`).

    Under `workers` placement, and on CPU builds, all workers start at once. Engines that share
    the GPUs this process sees (`shared`) start one after another: vLLM sizes its cache from the
    memory it finds free, which engines loading side by side would change under each other."""

    def __init__(self, placement: PlacementConfig = PlacementConfig(), log_path: Path | None = None) -> None:
        self.placement = placement
        self.log_path = log_path
        self._models: dict[EngineSettings, EngineModel] = {}
        self._labels: dict[EngineSettings, str] = {}
        self._cluster: Any = None  # RayEngines, under placement ray

    def load(self, labels: Mapping[EngineSettings, str]) -> None:
        """Starts the engines not loaded yet, each labelled (by the roles it serves) in its log
        and errors."""
        for engine, label in labels.items():
            self._labels.setdefault(engine, label)
        todo = [e for e in labels if e not in self._models]
        if self.placement.mode == "ray":
            self._models.update(self._start_on_cluster({e: labels[e] for e in todo if e.remote is None}))
        elif self.placement.mode == "workers" or vllm_is_cpu_build():
            from cordgen.engines.worker import WorkerModel

            local = [e for e in todo if e.remote is None]
            threads = cpu_threads_per_engine(len(local)) if vllm_is_cpu_build() else None
            started = {e: WorkerModel(e, labels[e], self.log_path, threads) for e in local}
            try:
                for model in started.values():
                    model.wait_ready()
            except BaseException:  # one failed (or Ctrl-C): the others are still loading
                for model in started.values():
                    model.kill()
                raise
            self._models.update(started)
        for settings in todo:
            self.model(settings)

    def _start_on_cluster(
        self, engines: Mapping[EngineSettings, str]
    ) -> Mapping[EngineSettings, EngineModel]:
        if not engines:
            return {}
        if self._cluster is None:
            from cordgen.engines.ray_replicas import RayEngines

            self._cluster = RayEngines(self.placement, vllm_is_cpu_build(), self.log_path)
        return self._cluster.start(engines)

    def replica_seconds(self) -> dict[str, float]:
        """Busy seconds per Ray replica since the last reading (empty off Ray)."""
        return {} if self._cluster is None else self._cluster.clock.take()

    def model(self, settings: EngineSettings) -> EngineModel:
        if settings not in self._models:
            self._models[settings] = self._start(settings)
        return self._models[settings]

    def _start(self, settings: EngineSettings) -> EngineModel:
        if settings.remote is not None:
            from cordgen.engines.remote import RemoteModel

            return RemoteModel(settings)
        label = self._labels.get(settings, settings.model)
        if self.placement.mode == "ray":
            return self._start_on_cluster({settings: label})[settings]
        from cordgen.engines.worker import WorkerModel

        worker = WorkerModel(settings, label, self.log_path)
        try:
            return worker.wait_ready()
        except BaseException:
            worker.kill()
            raise

    def __len__(self) -> int:
        return len(self._models)

    def reset_prefix_caches(self) -> None:
        """Cold caches, so that measurements do not depend on what ran before them."""
        for model in self._models.values():
            model.reset_prefix_cache()

    def shutdown(self) -> None:
        """All engines at once: each worker gets up to 30 s to close its engine."""
        with ThreadPoolExecutor(max_workers=max(1, len(self._models))) as executor:
            list(executor.map(lambda model: model.shutdown(), self._models.values()))
        self._models.clear()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
