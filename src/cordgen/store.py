"""The run directory: the resolved recipe beside an append-only results file.

Results are one JSON line per finished problem, appended and fsynced once per round, so a crash
loses at most the round in flight. A torn last line (a crash mid-write) is cut off on open and
that problem is computed again; it is never parsed as data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import orjson
import yaml

from cordgen.config import Recipe
from cordgen.errors import CordgenError
from cordgen.records import TraceRecord

RESULTS = "results.jsonl"
CONFIG = "config.yaml"


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of either."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class ResultsWriter:
    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle

    def append(self, records: Sequence[TraceRecord]) -> None:
        """One round's finished problems, durable before the next round starts."""
        if not records:
            return
        self.handle.write(b"".join(record.to_json_line() for record in records))
        self.handle.flush()
        os.fsync(self.handle.fileno())


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results_path = self.path / RESULTS

    @classmethod
    def create(cls, path: str | Path, recipe: Recipe) -> RunDirectory:
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise CordgenError(f"{run.path}: output path is a file, not a run directory")
        run.path.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        write_atomically(run.path / CONFIG, text.encode())
        return run

    def completed_ids(self) -> set[str]:
        """Ids already written; drops a torn last line left by a crash."""
        if not self.results_path.exists():
            return set()
        data = self.results_path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(self.results_path, "r+b") as handle:
                handle.truncate(len(complete))
        ids = set()
        for line_no, line in enumerate(complete.splitlines(), start=1):
            try:
                ids.add(orjson.loads(line)["id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise CordgenError(f"{self.results_path}:{line_no}: corrupt result line") from None
        return ids

    def records(self) -> Iterator[TraceRecord]:
        if not self.results_path.exists():
            return
        with open(self.results_path, "rb") as handle:
            for line in handle:
                if line.endswith(b"\n"):
                    yield TraceRecord.model_validate(orjson.loads(line))

    @contextmanager
    def writer(self) -> Iterator[ResultsWriter]:
        with open(self.results_path, "ab") as handle:
            yield ResultsWriter(handle)
