"""Input problems: a JSONL file of questions with gold answers, checked before any model loads.

Every problem in a file is reported as `path:line: field: what is wrong`, so a bad row in a large
input is found without bisecting it. Lines are decoded one at a time so that a stray non-UTF-8
byte, too, is reported with its line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from cordgen.errors import CordgenError


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # the gold final answer the scorer measures trajectories against


def problem_rows(
    path: str | Path,
    *,
    id_field: str = "id",
    question_field: str = "question",
    answer_field: str = "answer",
    unique_ids: bool = True,
) -> Iterator[tuple[Problem, dict[str, Any], int]]:
    """Each problem with its raw row and line number, so fields of other tools (a response to
    score) ride along. A row without an id is named by its line number; `unique_ids=False` lets
    several rows (several responses to one problem) share an id."""
    path = Path(path)
    first_line: dict[str, int] = {}
    for line_no, row in json_rows(path):
        where = f"{path}:{line_no}"
        problem = Problem(
            id=_id(row, id_field, line_no, where),
            question=_question(row, question_field, where),
            answer=_answer(row, answer_field, where),
        )
        if unique_ids and problem.id in first_line:
            raise CordgenError(
                f"{where}: {id_field}: duplicate id {problem.id!r} (first on line {first_line[problem.id]})"
            )
        first_line.setdefault(problem.id, line_no)
        yield problem, row, line_no


def load_problems(path: str | Path, **fields: str) -> list[Problem]:
    """All problems of the file, in file order."""
    problems = [problem for problem, _, _ in problem_rows(path, **fields)]
    if not problems:
        raise CordgenError(f"{path}: no problems in input")
    return problems


def shard_of(problem_id: str, num_shards: int) -> int:
    """The shard a problem belongs to, from its id alone: adding or removing problems never moves
    the others between shards, and unlike `hash()` it is the same in every process and run."""
    digest = hashlib.blake2b(problem_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line as a JSON object, with its 1-based physical line number."""
    if path.is_dir():
        raise CordgenError(f"{path}: input path is a directory, not a JSONL file")
    if not path.is_file():
        raise CordgenError(f"{path}: input file not found")
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CordgenError(f"{path}:{line_no}: not valid UTF-8") from None
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise CordgenError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise CordgenError(f"{path}:{line_no}: expected a JSON object, got {_kind(row)}")
        yield line_no, row


def _id(row: dict[str, Any], field: str, line_no: int, where: str) -> str:
    if field not in row:
        return str(line_no)
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _wrong_type(where, field, "a string or an integer", value)
    return _non_empty(str(value), field, where)


def _question(row: dict[str, Any], field: str, where: str) -> str:
    value = _required(row, field, where)
    if not isinstance(value, str):
        raise _wrong_type(where, field, "a string", value)
    return _non_empty(value, field, where)


def _answer(row: dict[str, Any], field: str, where: str) -> str:
    """Numeric gold answers are common in math sets; they are compared as text downstream."""
    value = _required(row, field, where)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _wrong_type(where, field, "a string or a number", value)
    return _non_empty(str(value).strip(), field, where)


def _required(row: dict[str, Any], field: str, where: str) -> Any:
    if field not in row:
        raise CordgenError(f"{where}: {field}: missing field '{field}'")
    return row[field]


def _non_empty(text: str, field: str, where: str) -> str:
    if not text.strip():
        raise CordgenError(f"{where}: {field}: empty")
    return text


def _wrong_type(where: str, field: str, expected: str, value: Any) -> CordgenError:
    return CordgenError(f"{where}: {field}: expected {expected}, got {_kind(value)}")


def _kind(value: Any) -> str:
    """JSON's name for null, Python's for the rest (`list`, `dict`, `float`, ...)."""
    return "null" if value is None else type(value).__name__


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): the problems whose id hashes there."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, problem: Problem) -> bool:
        return shard_of(problem.id, self.count) == self.index


def parse_shard(spec: str) -> Shard:
    index, slash, count = spec.partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit()):
        raise CordgenError(f"--shard: {spec!r} is not of the form i/N (e.g. 0/4)")
    shard = Shard(int(index), int(count))
    if shard.count < 1 or shard.index >= shard.count:
        raise CordgenError(f"--shard: {spec!r} needs 0 <= i < N")
    return shard


def file_digest(path: str | Path) -> str:
    """sha256 of a file, read in blocks: inputs can be large."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
