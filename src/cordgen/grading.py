"""Final answers judged against gold answers with math-verify, in a pool of worker processes.

math-verify bounds its own work with SIGALRM, which only works on a main thread, waits out a long
C-level computation, and reports a timeout as a wrong or missing answer; so its timeouts are off here
and the parent enforces one per item, killing the worker that overran.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from math_verify import parse, verify
from sympy import Basic, MatrixBase

from cordgen.answers import extract_answer
from cordgen.lifetime import exit_with
from cordgen.records import Grade

TEXT_COMMAND = re.compile(r"\\text(?:bf|rm)?\{([^{}]*)\}")
WORDS = re.compile(r"[^\W\d_]{2,}(?:\s+[^\W\d_]+)*")


def grade_answer(gold: str, response: str) -> Grade:
    """Correct when math-verify finds the answers equal, or when they read the same as text (answers
    like "Paris" are not math, and their letters would otherwise compare as a product of symbols)."""
    candidate = extract_answer(response)
    if candidate is None:
        return Grade(status="unparsable", correct=None, predicted=None)
    predicted, answer = _response_math(response, candidate)
    gold_text = _normalize(gold)
    correct = gold_text == _normalize(candidate) or (
        WORDS.fullmatch(gold_text) is None and _same_math(gold, answer)
    )
    return Grade(status="correct" if correct else "wrong", correct=correct, predicted=predicted)


def _same_math(gold: str, answer: list[Any]) -> bool:
    expected = _parse_stated(gold)
    return _is_math(expected) and _is_math(answer) and verify(expected, answer, timeout_seconds=None)


def _response_math(response: str, candidate: str) -> tuple[str, list[Any]]:
    """(predicted, parsed) for a response. An answer stated after "final answer is" or in `\\boxed{}`
    is parsed on its own; anything else is left to math-verify's search of the whole text, and
    only its last line parsed on its own when that search finds nothing (a bare `\\sqrt{8}`)."""
    lines = response.strip().splitlines()
    if candidate != lines[-1].strip():
        return candidate, _parse_stated(candidate)
    found = parse(response, parsing_timeout=None)
    if _is_math(found):
        return str(found[-1]), found
    return candidate, _parse_stated(candidate)


def _parse_stated(answer: str) -> list[Any]:
    """An answer on its own is LaTeX even without `$`, which math-verify needs: without them it
    reads `2\\sqrt{2}` as 2 and finds nothing in `\\sqrt{8}`."""
    return parse(f"${answer.strip().strip('$')}$", parsing_timeout=None)


def _is_math(parsed: list[Any]) -> bool:
    """math-verify also returns the matched text alone when it could not parse it."""
    return any(isinstance(item, Basic | MatrixBase) for item in parsed)


def _normalize(answer: str) -> str:
    answer = TEXT_COMMAND.sub(r"\1", answer.strip().rstrip(".").strip("$"))
    return " ".join(answer.split()).rstrip(" .").casefold()


def grade_answers(
    pairs: Sequence[tuple[str, str]], *, timeout_s: float = 5.0, workers: int | None = None
) -> list[Grade]:
    """Grades of (gold, response) pairs, in order; an item still running after `timeout_s` is a
    "timeout", one whose worker raised or died an "error"."""
    workers = workers or min(4, os.cpu_count() or 1)
    grades: dict[int, Grade] = {}
    todo = list(range(len(pairs)))
    while todo:
        todo = _grade_in_one_pool(pairs, todo, grades, timeout_s, workers)
    return [grades[i] for i in range(len(pairs))]


def _grade_in_one_pool(
    pairs: Sequence[tuple[str, str]],
    todo: list[int],
    grades: dict[int, Grade],
    timeout_s: float,
    workers: int,
) -> list[int]:
    """Fills `grades` from one pool and returns the items left for a fresh one. At most one item per
    worker is in flight, so an item's clock starts when it does; once one overruns (or the pool
    breaks) the pool is killed and the items it still held go back to be retried."""
    queue = deque(todo)
    running: dict[Future[Grade], tuple[int, float]] = {}
    pool = _start_pool(workers)
    try:
        while queue or running:
            while queue and len(running) < workers:
                future = pool.submit(grade_answer, *pairs[queue[0]])  # the first waits for the forkserver
                running[future] = (queue.popleft(), time.monotonic() + timeout_s)
            soonest = min(deadline for _, deadline in running.values())
            done, _ = wait(running, timeout=max(0.0, soonest - time.monotonic()), return_when=FIRST_COMPLETED)
            for future in done:
                grades[running.pop(future)[0]] = _outcome(future)
            now = time.monotonic()
            expired = [f for f, (_, deadline) in running.items() if deadline <= now and not f.done()]
            for future in expired:
                grades[running.pop(future)[0]] = Grade(status="timeout", correct=None, predicted=None)
            if expired or any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                return [i for i, _ in running.values()] + list(queue)
    except BrokenProcessPool:  # a worker died since the last wait, and `submit` was first to notice
        return [i for i, _ in running.values()] + list(queue)
    finally:
        _kill(pool)
    return []


def _start_pool(workers: int) -> ProcessPoolExecutor:
    """Forkserver, not fork: the parent may hold vLLM's threads. The server imports this module
    (and so sympy) once, so a fresh worker is ready at once and its startup does not eat into the
    first item's time."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_grader, initargs=(os.getpid(),)
    )


def _start_grader(cordgen_pid: int) -> None:
    """A grader's parent is the fork server, which lives as long as any grader holds its pipe to
    cordgen: so each grader watches cordgen itself and goes with it. math-verify's only warnings
    are that its own timeouts are off, which is deliberate here."""
    exit_with(cordgen_pid)
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _outcome(future: Future[Grade]) -> Grade:
    try:
        return future.result()
    except Exception:
        return Grade(status="error", correct=None, predicted=None)


def _kill(pool: ProcessPoolExecutor) -> None:
    """`shutdown` waits for the calls in progress, so a worker stuck in one is killed; the executor
    exposes its processes only through a private attribute."""
    processes = list(pool._processes.values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.kill()
    for process in processes:
        process.join()
