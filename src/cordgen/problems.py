"""Input problems: questions with gold answers from JSONL, JSON, Parquet, a folder of those, a
`datasets.save_to_disk` folder or a Hugging Face dataset, checked before any model loads.

Every problem in an input is reported as `where: field: what is wrong`, `where` being `path:line`
for JSON Lines and `file row N` (0-based) for the other forms, so a bad row in a large input is
found without bisecting it. JSON Lines are decoded one line at a time so that a stray non-UTF-8
byte, too, is reported with its line.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from cordgen.answers import last_boxed
from cordgen.errors import CordgenError

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")  # the files a folder input is read from
SHOWN_IDS = 10  # skipped rows named in a message


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # the gold final answer the scorer measures trajectories against


@dataclass(frozen=True)
class Unanswered:
    """A row whose `answer_from` text holds no boxed answer: skipped, and counted as such."""

    id: str


@dataclass(frozen=True)
class RowPlace:
    """Where an input row is: `file` (or dataset) and `index`, the 1-based line of JSON Lines or
    the 0-based row within `file`, for messages; `key`, the id of a row without one: the line
    in a JSON Lines file, the 0-based row across the input otherwise, both stable for one input."""

    file: str
    index: int
    key: int
    is_line: bool

    def __str__(self) -> str:
        return f"{self.file}:{self.index}" if self.is_line else f"{self.file} row {self.index}"


Rows = Iterator[tuple[dict[str, Any], RowPlace]]


@dataclass(frozen=True)
class Input:
    """An input opened in whichever form it has: `name` to record, `rows` to read, and `digest`
    of what is read, by which resumed and merged runs tell whether the input changed."""

    name: str
    rows: Callable[[], Rows]
    digest: Callable[[], str]


@dataclass(frozen=True)
class LoadedInput:
    """An input's problems in order, with what a run records of it: its name, the digest of
    what was read and the ids of rows skipped for want of an answer (never dropped unsaid)."""

    name: str
    digest: str
    problems: list[Problem]
    unanswered: list[str]


def problem_rows(
    source: str | Path | Input,
    *,
    split: str = "train",
    id_field: str = "id",
    question_field: str = "question",
    answer_field: str = "answer",
    answer_from: str | None = None,
    unique_ids: bool = True,
) -> Iterator[tuple[Problem | Unanswered, dict[str, Any], RowPlace]]:
    """Each problem with its raw row and place, so fields of other tools (a response to score)
    ride along. A row without an id is named by its `RowPlace.key`; `unique_ids=False` lets several
    rows (several responses to one problem) share an id. With `answer_from`, the gold answer is
    the last `\\boxed{}` of that field's text, and a row without one is `Unanswered`."""
    opened = source if isinstance(source, Input) else open_input(source, split)
    first_seen: dict[str, RowPlace] = {}
    for row, place in opened.rows():
        problem_id = _id(row, id_field, place)
        question = _question(row, question_field, place)
        if answer_from is None:
            answer: str | None = _answer(row, answer_field, place)
        else:
            answer = _boxed_answer(row, answer_from, place)
        if unique_ids and problem_id in first_seen:
            first = _first_seen(first_seen[problem_id], place)
            raise CordgenError(f"{place}: {id_field}: duplicate id {problem_id!r} ({first})")
        first_seen.setdefault(problem_id, place)
        problem = Unanswered(problem_id) if answer is None else Problem(problem_id, question, answer)
        yield problem, row, place


def load_problems(source: str | Path, *, split: str = "train", **fields: Any) -> LoadedInput:
    """All problems of the input, in input order; `fields` as `problem_rows` takes them."""
    opened = open_input(source, split)
    problems, unanswered = [], []
    for problem, _, _ in problem_rows(opened, **fields):
        if isinstance(problem, Unanswered):
            unanswered.append(problem.id)
        else:
            problems.append(problem)
    if not problems:
        skipped = f" ({describe_unanswered(unanswered, fields['answer_from'])})" if unanswered else ""
        raise CordgenError(f"{source}: no problems in input{skipped}")
    return LoadedInput(opened.name, opened.digest(), problems, unanswered)


def describe_unanswered(ids: Sequence[str], answer_from: str) -> str:
    """One line counting the skipped rows and naming the first few by id."""
    shown = ", ".join(ids[:SHOWN_IDS]) + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")
    rows = "row" if len(ids) == 1 else "rows"
    return f"skipped {len(ids)} {rows} without a \\boxed{{}} answer in '{answer_from}': ids {shown}"


def shard_of(problem_id: str, num_shards: int) -> int:
    """The shard a problem belongs to, from its id alone: adding or removing problems never moves
    the others between shards, and unlike `hash()` it is the same in every process and run."""
    digest = hashlib.blake2b(problem_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def open_input(source: str | Path, split: str = "train") -> Input:
    """The one reader of every input form: `hf:NAME[:CONFIG]` (a Hub dataset, or a local dataset
    repository folder) and `save_to_disk` folders by their `split`, a folder of `.jsonl`, `.json`
    and `.parquet` files in name order, or one such file (any other name is read as JSON Lines)."""
    text = str(source)
    if text.startswith("hf:"):
        return _hub_input(text.removeprefix("hf:"), split)
    path = Path(source)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _saved_input(path, split)
        files = _input_files(path)
        return Input(str(path.resolve()), lambda: _input_wide_keys(files), lambda: folder_digest(path, files))
    if not path.is_file():
        raise CordgenError(f"{path}: input file not found")
    return Input(str(path.resolve()), lambda: _file_rows(path), lambda: file_digest(path))


def _input_files(folder: Path) -> list[Path]:
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix in INPUT_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        hint = f" (a dataset repository? give hf:{folder})" if (folder / "README.md").is_file() else ""
        raise CordgenError(f"{folder}: no .jsonl, .json or .parquet files in the input folder{hint}")
    return files


def _input_wide_keys(files: Iterable[Path]) -> Rows:
    """The rows of several files, keyed by their row index across all of them: line numbers
    would repeat from file to file."""
    rows = (row for path in files for row in _file_rows(path))
    for key, (row, place) in enumerate(rows):
        yield row, replace(place, key=key)


def _file_rows(path: Path) -> Rows:
    if path.suffix == ".parquet":
        yield from _parquet_rows(path)
    elif path.suffix == ".json" and _holds_an_array(path):
        yield from _json_array_rows(path)
    else:  # JSON Lines, also under `.json` as `datasets` reads them
        for line_no, row in json_rows(path):
            yield row, RowPlace(str(path), line_no, line_no, is_line=True)


def _holds_an_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        return re.match(rb"\s*\[", handle.read(4096)) is not None


def _json_array_rows(path: Path) -> Rows:
    try:
        rows = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise CordgenError(
            f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    for index, row in enumerate(rows):
        place = RowPlace(str(path), index, index, is_line=False)
        if not isinstance(row, dict):
            raise CordgenError(f"{place}: expected a JSON object, got {_kind(row)}")
        yield row, place


def _parquet_rows(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise CordgenError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    rows = (row for batch in parquet.iter_batches(batch_size=1024) for row in batch.to_pylist())
    for index, row in enumerate(rows):
        yield row, RowPlace(str(path), index, index, is_line=False)


def _saved_input(folder: Path, split: str) -> Input:
    """A `save_to_disk` folder: one dataset, or a dataset dict of which `split` is read."""
    import datasets

    with _dataset_errors(str(folder)):
        saved = datasets.load_from_disk(str(folder))
    label = str(folder)
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise CordgenError(f"{folder}: no split {split!r} (splits: {', '.join(saved)})")
        saved, label = saved[split], f"{folder} ({split})"
    return Input(
        str(folder.resolve()),
        lambda: _dataset_rows(saved, label),
        lambda: folder_digest(folder, _tree(folder)),
    )


def _hub_input(spec: str, split: str) -> Input:
    """`load_dataset(NAME, CONFIG, split=split)`: from the Hub, or its cache when offline. A local
    dataset repository folder is read afresh and digested by its files, as `datasets` caches it
    by path, not contents; a Hub dataset's fingerprint names the revision it was built from."""
    import datasets

    name, _, config = spec.partition(":")
    local = Path(name).expanduser()
    fresh = {"download_mode": "force_redownload", "verification_mode": "no_checks"} if local.is_dir() else {}
    with _dataset_errors(f"hf:{spec}"):
        dataset = datasets.load_dataset(str(local) if fresh else name, config or None, split=split, **fresh)
    label = f"hf:{spec} ({split})"
    if fresh:
        recorded = f"hf:{local.resolve()}" + (f":{config}" if config else "")
        return Input(
            recorded, lambda: _dataset_rows(dataset, label), lambda: folder_digest(local, _tree(local))
        )
    fingerprint = dataset._fingerprint.encode()
    return Input(
        f"hf:{spec}", lambda: _dataset_rows(dataset, label), lambda: hashlib.sha256(fingerprint).hexdigest()
    )


def _dataset_rows(dataset: Any, label: str) -> Rows:
    rows = (row for table in dataset.with_format("arrow").iter(batch_size=1024) for row in table.to_pylist())
    for index, row in enumerate(rows):
        yield row, RowPlace(label, index, index, is_line=False)


@contextmanager
def _dataset_errors(label: str) -> Iterator[None]:
    """What `datasets` raises for a missing dataset, config or split, as one line."""
    from datasets.exceptions import DatasetsError

    try:
        yield
    except (OSError, ValueError, DatasetsError) as exc:
        raise CordgenError(f"{label}: {_first_line(exc)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _tree(folder: Path) -> list[Path]:
    """Every file under `folder` but hidden ones (a clone's `.git`)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


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


def _id(row: dict[str, Any], field: str, place: RowPlace) -> str:
    if field not in row:
        return str(place.key)
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _wrong_type(place, field, "a string or an integer", value)
    return _non_empty(str(value), field, place)


def _question(row: dict[str, Any], field: str, place: RowPlace) -> str:
    value = _required(row, field, place)
    if not isinstance(value, str):
        raise _wrong_type(place, field, "a string", value)
    return _non_empty(value, field, place)


def _answer(row: dict[str, Any], field: str, place: RowPlace) -> str:
    """Numeric gold answers are common in math sets; they are compared as text downstream."""
    value = _required(row, field, place)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _wrong_type(place, field, "a string or a number", value)
    return _non_empty(str(value).strip(), field, place)


def _boxed_answer(row: dict[str, Any], field: str, place: RowPlace) -> str | None:
    """The last `\\boxed{}` of a solution text, for sets that state their answer only there; None
    (the row is skipped and counted) where there is none, or no text."""
    value = _required(row, field, place)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _wrong_type(place, field, "a string", value)
    return last_boxed(value) or None


def _required(row: dict[str, Any], field: str, place: RowPlace) -> Any:
    """A table's rows all have the same fields, so a missing one is told with those there are;
    JSON Lines keep their shorter message."""
    if field not in row:
        available = "" if place.is_line else f" (fields: {', '.join(row)})"
        raise CordgenError(f"{place}: {field}: missing field '{field}'{available}")
    return row[field]


def _non_empty(text: str, field: str, place: RowPlace) -> str:
    if not text.strip():
        raise CordgenError(f"{place}: {field}: empty")
    return text


def _wrong_type(place: RowPlace, field: str, expected: str, value: Any) -> CordgenError:
    return CordgenError(f"{place}: {field}: expected {expected}, got {_kind(value)}")


def _kind(value: Any) -> str:
    """JSON's name for null, Python's for the rest (`list`, `dict`, `float`, ...)."""
    return "null" if value is None else type(value).__name__


def _first_seen(first: RowPlace, here: RowPlace) -> str:
    if first.file != here.file:
        return f"first at {first}"
    return f"first on {'line' if first.is_line else 'row'} {first.index}"


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


def folder_digest(folder: Path, files: Iterable[Path]) -> str:
    """sha256 over the (name within `folder`, file sha256) pairs of the files read, in name order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()
