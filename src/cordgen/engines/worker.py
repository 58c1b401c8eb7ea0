"""Every local engine runs in a worker process of its own, which never outlives cordgen.

The worker asks the kernel to SIGKILL it when cordgen dies (`cordgen.lifetime`), and its vLLM
engine runs inside it (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so there is no engine-core process
that could be left behind: a `kill -9` of cordgen frees the engine's memory within moments.
(Tensor-parallel workers that vLLM starts below it watch a pipe to their parent and go too.)
That also makes a start several times faster than vLLM's own engine-core process on CPU builds.

Each worker sets CUDA_VISIBLE_DEVICES before torch or vLLM is imported, so `gpus: [2, 3]` with
`tensor_parallel_size: 2` gives that engine exactly those two GPUs. It starts its own session,
so a Ctrl-C at the terminal reaches the main process alone (which finishes the round in
flight). Its output goes to the run's engine log, and a start that fails comes back as one line.

This module imports neither torch nor vLLM at import time: the spawned worker imports it first.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cordgen.config import EngineSettings
from cordgen.engines import RewardRequest, Sample, SampleRequest, SpanLogprobs, SpanRequest, StepRewards
from cordgen.engines.startup import start_failure
from cordgen.engines.tokenizers import load_tokenizer
from cordgen.errors import EngineError
from cordgen.lifetime import die_with_parent


def send_output_to(log_path: Path) -> None:
    """This process's stdout and stderr, and its children's, append to the engine log."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def own_resource_tracker() -> None:
    """A spawned process shares its parent's multiprocessing resource tracker, so the semaphores
    of an engine killed mid-run would be reported on cordgen's terminal when cordgen exits. The
    worker drops the inherited tracker (a private attribute: the module offers no other way) and
    starts its own on first use, whose report lands in the engine log."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if tracker._fd is not None:
        with contextlib.suppress(OSError):
            os.close(tracker._fd)
        tracker._fd = None


def share_cpu_cores(threads: int | None) -> None:
    """Several CPU engines on few cores: each computes with `threads` threads and no pinning.
    vLLM pins every engine's threads to all the cores it finds, so engines that run at the same
    time (every teacher in every round) oversubscribe them, and their thread barriers spin: three
    demo teachers took 3.5x longer per round that way. A user's own binding is kept."""
    if threads is not None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        os.environ["OMP_NUM_THREADS"] = str(threads)


def devices() -> str:
    """The GPUs this process may use, as its engine log line states them. The worker sets the
    variable itself, after the spawn, so /proc/PID/environ (the environment at exec) never shows it."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "CUDA_VISIBLE_DEVICES unset" if visible is None else f"CUDA_VISIBLE_DEVICES={visible}"


def serve(
    settings: EngineSettings,
    conn: Connection,
    parent_pid: int,
    log_path: Path | None,
    label: str,
    cpu_threads: int | None,
) -> None:
    """The worker's main loop: load the engine, then answer calls until told to stop."""
    os.setsid()
    die_with_parent(parent_pid)
    if settings.gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in settings.gpus)
    if log_path is not None:
        send_output_to(log_path)
        print(f"=== cordgen engine {label} ({settings.model}), pid {os.getpid()}, {devices()}", flush=True)
    own_resource_tracker()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    share_cpu_cores(cpu_threads)
    try:
        from cordgen.engines.vllm_local import VllmModel

        model = VllmModel(settings)
    except Exception as error:  # the full traceback goes to the engine log, the cause to the parent
        traceback.print_exc()
        sys.stderr.flush()
        conn.send(("error", start_failure(error)))
        return
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
            traceback.print_exc()
            conn.send(("error", f"{type(error).__name__}: {error}"))
    model.shutdown()
    conn.send(("ok", None))


class WorkerModel:
    """A VllmModel in a worker process, behind the same EngineModel surface."""

    def __init__(
        self,
        settings: EngineSettings,
        label: str,
        log_path: Path | None = None,
        cpu_threads: int | None = None,
    ) -> None:
        """Starts the worker and returns at once; `wait_ready` waits for its engine. Start it
        from the thread that lives as long as the run: the worker's parent-death signal fires
        when the starting thread ends. `cpu_threads`: see `share_cpu_cores`."""
        self.settings = settings
        self.label = label
        self.log_path = log_path
        self._lock = threading.Lock()
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=serve,
            args=(settings, child, os.getpid(), log_path, label, cpu_threads),
            name=f"cordgen-engine:{label}",
        )
        self.process.start()
        child.close()
        self.max_model_len = 0
        self.tokenizer: Any = None

    @property
    def name(self) -> str:
        return f"engine for {self.label} ({self.settings.model})"

    def wait_ready(self) -> WorkerModel:
        self.tokenizer = load_tokenizer(self.settings)
        self.max_model_len = self._receive("start", failed_to="failed to start")
        return self

    def _receive(self, what: str, failed_to: str = "failed") -> Any:
        see_log = f"; log: {self.log_path}" if self.log_path is not None else ""
        try:
            status, value = self._conn.recv()
        except (EOFError, ConnectionResetError):
            self.process.join(timeout=5)
            self.kill_group()
            raise EngineError(
                f"{self.name} (pid {self.process.pid}) died during {what} "
                f"(exit code {self.process.exitcode}){see_log}"
            ) from None
        if status == "error":
            raise EngineError(f"{self.name} {failed_to}: {value}{see_log}")
        return value

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            with contextlib.suppress(OSError):  # a dead worker: _receive says which
                self._conn.send((method, args))
            return self._receive(method)

    def sample(self, requests: Sequence[SampleRequest]) -> list[Sample]:
        return self._call("sample", list(requests)) if requests else []

    def span_logprobs(self, requests: Sequence[SpanRequest], read_cache: bool) -> list[SpanLogprobs]:
        return self._call("span_logprobs", list(requests), read_cache) if requests else []

    def step_rewards(self, requests: Sequence[RewardRequest]) -> list[StepRewards]:
        return self._call("step_rewards", list(requests)) if requests else []

    def reset_prefix_cache(self) -> None:
        self._call("reset_prefix_cache")

    def shutdown(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(EngineError):
                self._call("shutdown")
        self.process.join(timeout=30)
        self.kill_group()
        self._conn.close()

    def kill(self) -> None:
        """At once, whatever it is doing (a failed start elsewhere, an interrupted load)."""
        self.kill_group()
        self.process.join(timeout=10)
        self._conn.close()

    def kill_group(self) -> None:
        """The worker leads its own process group, any process vLLM started included: a worker
        killed from outside would otherwise leave them running."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
