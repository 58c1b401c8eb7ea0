"""Every engine a run needs, loaded (or connected to) once: a scorer that is also a teacher is
one copy, and each engine runs where its settings and the placement say."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from cordgen.config import EngineSettings
from cordgen.engines import EngineModel


def load_tokenizer(settings: EngineSettings):
    """The engine's tokenizer in this process, for engines whose model lives elsewhere."""
    from transformers import AutoTokenizer

    from cordgen.config import resolve_model_source

    return AutoTokenizer.from_pretrained(
        resolve_model_source(settings.tokenizer or settings.model),
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
    )


class EnginePool:
    """Remote engines are clients in this process; the others load in this process
    (`in_process`) or each in its own worker process (`workers`), all started at once."""

    def __init__(self, placement: str = "in_process") -> None:
        self.placement = placement
        self._models: dict[EngineSettings, EngineModel] = {}

    def load(self, engines: Sequence[EngineSettings]) -> None:
        """Worker processes all start before any is waited for, so their engines load in
        parallel; in-process engines load one after another."""
        todo = [e for e in dict.fromkeys(engines) if e not in self._models]
        if self.placement == "workers":
            from cordgen.engines.worker import WorkerModel

            started = {e: WorkerModel(e) for e in todo if e.remote is None}
            self._models.update(started)
            for model in started.values():
                model.wait_ready()
        for settings in todo:
            self.model(settings)

    def model(self, settings: EngineSettings) -> EngineModel:
        if settings not in self._models:
            self._models[settings] = self._start(settings)
        return self._models[settings]

    def _start(self, settings: EngineSettings) -> EngineModel:
        if settings.remote is not None:
            from cordgen.engines.remote import RemoteModel

            return RemoteModel(settings)
        if self.placement == "workers":
            from cordgen.engines.worker import WorkerModel

            return WorkerModel(settings).wait_ready()
        from cordgen.engines.vllm_local import VllmModel

        return VllmModel(settings)

    def __len__(self) -> int:
        return len(self._models)

    def reset_prefix_caches(self) -> None:
        """Cold caches, so that measurements do not depend on what ran before them."""
        for model in self._models.values():
            model.reset_prefix_cache()

    def shutdown(self) -> None:
        """All engines at once: vLLM waits up to 5 s for each engine process before killing it."""
        with ThreadPoolExecutor(max_workers=max(1, len(self._models))) as executor:
            list(executor.map(lambda model: model.shutdown(), self._models.values()))
        self._models.clear()
