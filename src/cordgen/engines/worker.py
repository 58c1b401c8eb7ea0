"""One engine in its own worker process, on its own devices.

The main process then holds no model: each worker sets CUDA_VISIBLE_DEVICES before torch or
vLLM is imported, so `gpus: [2, 3]` with `tensor_parallel_size: 2` gives that engine exactly
those two GPUs. A worker starts its own session, so a Ctrl-C at the terminal reaches the main
process alone (which finishes the round in flight), and it shuts its engine down when the main
process dies. A worker that dies makes the next call raise an EngineError naming it.

This module imports neither torch nor vLLM at import time: the spawned worker imports it first.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from cordgen.config import EngineSettings
from cordgen.engines import Sample, SampleRequest, SpanLogprobs
from cordgen.errors import EngineError

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: SIGTERM this process when the process that started it dies, even by SIGKILL."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def serve(settings: EngineSettings, conn: Connection) -> None:
    """The worker's main loop: load the engine, then answer calls until told to stop."""
    os.setsid()
    die_with_parent()
    if settings.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in settings.gpus)
    from cordgen.engines.vllm_local import VllmModel

    try:
        model = VllmModel(settings)
    except Exception as error:  # the parent reports it; a traceback here would be lost
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return

    def stop(signum: int, frame: object) -> None:
        model.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    conn.send(("ready", model.max_model_len))
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            break
        if method == "shutdown":
            break
        try:
            conn.send(("ok", getattr(model, method)(*args)))
        except Exception as error:
            conn.send(("error", f"{type(error).__name__}: {error}"))
    model.shutdown()
    conn.send(("ok", None))


class WorkerModel:
    """A VllmModel in a worker process, behind the same EngineModel surface."""

    def __init__(self, settings: EngineSettings) -> None:
        """Starts the worker and returns at once; `wait_ready` waits for its engine. Start it
        from the thread that lives as long as the run: the worker's parent-death signal fires
        when the starting thread ends."""
        self.settings = settings
        self._lock = threading.Lock()
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=serve, args=(settings, child), name=f"cordgen-engine:{settings.model}"
        )
        self.process.start()
        child.close()
        self.max_model_len = 0
        self.tokenizer: Any = None

    def wait_ready(self) -> WorkerModel:
        from cordgen.engines.pool import load_tokenizer

        self.max_model_len = self._receive("start")
        self.tokenizer = load_tokenizer(self.settings)
        return self

    def _receive(self, what: str) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self.process.join(timeout=5)
            self.kill_group()
            raise EngineError(
                f"engine worker for {self.settings.model} (pid {self.process.pid}) died during {what} "
                f"(exit code {self.process.exitcode})"
            ) from None
        if status == "error":
            raise EngineError(f"engine worker for {self.settings.model}: {value}")
        return value

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            with contextlib.suppress(OSError):  # a dead worker: _receive says which
                self._conn.send((method, args))
            return self._receive(method)

    def sample(self, requests: Sequence[SampleRequest]) -> list[Sample]:
        return self._call("sample", list(requests)) if requests else []

    def span_logprobs(
        self, prompts: Sequence[list[int]], starts: Sequence[int], read_cache: bool
    ) -> list[SpanLogprobs]:
        return self._call("span_logprobs", list(prompts), list(starts), read_cache) if prompts else []

    def reset_prefix_cache(self) -> None:
        self._call("reset_prefix_cache")

    def shutdown(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(EngineError):
                self._call("shutdown")
        self.process.join(timeout=30)
        self.kill_group()
        self._conn.close()

    def kill_group(self) -> None:
        """The worker leads its own process group, vLLM's engine processes included: a worker
        killed from outside would otherwise leave them running."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
