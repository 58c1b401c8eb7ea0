"""The run directory: resolved recipe, manifest, and an append-only results file.

Results are one JSON line per finished problem, appended with one write and one fsync per round,
so a crash loses at most the round in flight. A torn last line (power loss, a kill mid-write) is
cut off before the run resumes and that problem is computed again; it is never parsed as data.
Every check runs before the first write, so a refused command leaves the directory as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from cordgen import __version__
from cordgen.config import Recipe, describe_differences, records_file, semantic_hash, semantic_view
from cordgen.errors import ConfigError, CordgenError
from cordgen.records import ScoreRecord, TraceRecord, Usage

RESULTS = "results.jsonl"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
SCORES = "scores.jsonl"  # written by `cordgen score` beside the records
ENGINE_LOG = "engines.log"  # what the run's engines printed: vLLM's logs, a failed start's traceback


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of either."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class InputInfo(BaseModel):
    path: str  # a resolved path, or hf:NAME[:CONFIG]
    sha256: str  # of the file, of a folder's files, or of a Hub dataset's fingerprint
    problems: int
    unanswered: list[str] = []  # ids of rows skipped: no \boxed{} answer in `input.answer_from`


class ReplicaRound(BaseModel):
    """Under placement ray: how long each engine replica computed in one round, against the time
    the round waited on engines; lockstep waits for the slowest replica, so their spread is the
    straggler's cost."""

    round: int
    engine_seconds: float
    busy_seconds: dict[str, float]


class Manifest(BaseModel):
    cordgen_version: str
    semantic_hash: str
    semantic_config: dict[str, Any]
    input: InputInfo
    shard: str | None
    problems: int  # in this run (its shard)
    completed: int
    status: Literal["running", "interrupted", "failed", "complete", "partial"]
    started_at: str
    updated_at: str
    finished_at: str | None = None
    sessions: int = 1  # how many times the run was started or resumed
    wall_seconds: float = 0.0  # synthesis time over all sessions, engine loading included
    replica_rounds: list[ReplicaRound] = []

    @classmethod
    def start(cls, recipe: Recipe, input_info: InputInfo, shard: str | None, problems: int) -> Manifest:
        stamp = now()
        return cls(
            cordgen_version=__version__,
            semantic_hash=semantic_hash(recipe),
            semantic_config=semantic_view(recipe),
            input=input_info,
            shard=shard,
            problems=problems,
            completed=0,
            status="running",
            started_at=stamp,
            updated_at=stamp,
        )


class JsonLine(Protocol):
    def to_json_line(self) -> bytes: ...


class JsonlLog:
    """An append-only JSONL file of rows keyed by "id": whole lines only, one write and one fsync
    per batch, and a torn last line (a crash mid-write) cut off before appending again."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def complete_lines(self) -> tuple[list[bytes], int]:
        """Whole lines, and the size of the file up to the last of them."""
        if not self.path.exists():
            return [], 0
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        return data[:end].splitlines(), end

    def rows(self) -> Iterator[dict[str, Any]]:
        for line_no, line in enumerate(self.complete_lines()[0], start=1):
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise CordgenError(f"{self.path}:{line_no}: corrupt result line")
            yield row

    def ids(self) -> set[str]:
        return {row["id"] for row in self.rows()}

    def repair(self) -> None:
        _, end = self.complete_lines()
        if self.path.exists() and end != self.path.stat().st_size:
            os.truncate(self.path, end)

    @contextmanager
    def appender(self) -> Iterator[Callable[[Sequence[JsonLine]], None]]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

        def append(rows: Sequence[JsonLine]) -> None:
            data = memoryview(b"".join(row.to_json_line() for row in rows))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)

        try:
            yield append
        finally:
            os.close(fd)


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results_path = self.path / RESULTS
        self.results = JsonlLog(self.results_path)
        self.manifest_path = self.path / MANIFEST

    def manifest(self) -> Manifest | None:
        if not self.manifest_path.exists():
            return None
        try:
            return Manifest.model_validate(orjson.loads(self.manifest_path.read_bytes()))
        except (orjson.JSONDecodeError, ValidationError):
            raise CordgenError(f"{self.manifest_path}: corrupt manifest") from None

    def check_resumable(self, recipe: Recipe, shard: str | None) -> Manifest | None:
        """The existing run's manifest if this recipe may continue it; refuses otherwise."""
        if self.path.exists() and not self.path.is_dir():
            raise CordgenError(f"{self.path}: output path is a file, not a run directory")
        manifest = self.manifest()
        if manifest is None:
            if self.results_path.exists():
                raise CordgenError(
                    f"{self.results_path}: results without {MANIFEST}; not a cordgen run "
                    "(use --overwrite or another --out)"
                )
            return None
        if manifest.semantic_hash != semantic_hash(recipe):
            differences = describe_differences(manifest.semantic_config, semantic_view(recipe))
            raise CordgenError(
                f"{self.path}: results come from a different config: {differences} "
                "(use --overwrite to start over, or another --out)"
            )
        if manifest.shard != shard:
            raise CordgenError(
                f"{self.path}: this run is shard {manifest.shard or 'none'}, not {shard or 'none'}"
            )
        return manifest

    def completed_ids(self) -> set[str]:
        return self.results.ids()

    def records(self) -> Iterator[TraceRecord]:
        for row in self.results.rows():
            try:
                yield TraceRecord.model_validate(row)
            except ValidationError:
                raise CordgenError(
                    f"{self.results_path}: record {row['id']!r} does not fit the record schema"
                ) from None

    def begin(self, recipe: Recipe, manifest: Manifest, overwrite: bool) -> None:
        """The first writes of a run: clears it if asked (scores of the old records included),
        drops a torn last line, saves the resolved recipe and the manifest."""
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (RESULTS, MANIFEST, CONFIG, SCORES, ENGINE_LOG):
                (self.path / name).unlink(missing_ok=True)
        self.results.repair()
        text = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        write_atomically(self.path / CONFIG, text.encode())
        self.save(manifest)

    def save(self, manifest: Manifest) -> None:
        manifest.updated_at = now()
        write_atomically(self.manifest_path, manifest.model_dump_json(indent=2).encode())

    def writer(self) -> AbstractContextManager[Callable[[Sequence[JsonLine]], None]]:
        """Appends one round's records in one write, durable before the next round starts."""
        return self.results.appender()


def load_scores(path: Path) -> dict[str, ScoreRecord] | None:
    """`cordgen score`'s lines by problem id, or None where the run was never scored. A torn last
    line is a scoring pass cut short, not data; a later line for an id (a re-score) wins."""
    if not path.exists():
        return None
    scores = {}
    for row in JsonlLog(path).rows():
        try:
            scores[row["id"]] = ScoreRecord.model_validate(row)
        except ValidationError:
            raise CordgenError(f"{path}: scores of {row['id']!r} do not fit the score schema") from None
    return scores


class MergeReport(BaseModel):
    sources: int
    problems: int  # distinct problems written
    duplicates: int  # the same problem, identical record, in more than one source
    conflicts: list[str]  # the same problem with different records: the first source's is kept
    missing: list[str]  # problems of the input in no source


def warm_start_usages(path: str | Path) -> list[Usage]:
    """The usage of every record of a finished run (a run directory or a records JSONL), for the
    adaptive schedule's prior; refused where no record counts proposals (made before they were)."""
    file = records_file(path)
    field = "search.adaptive.warm_start"
    if not file.is_file():
        raise ConfigError(f"{field}: no records at {file}")
    usages = []
    for row in JsonlLog(file).rows():
        try:
            usages.append(Usage.model_validate(row.get("usage", {})))
        except ValidationError:
            raise ConfigError(f"{field}: {file}: record {row['id']!r} has no valid usage") from None
    if not any(u.proposals for u in usages):
        raise ConfigError(f"{field}: {file} counts no proposals (records of an older cordgen)")
    return usages


def input_ids(manifest: Manifest) -> list[str] | None:
    """The input's ids in input order, if the input is still where the run read it, unchanged."""
    from cordgen.problems import load_problems

    fields = manifest.semantic_config.get("input", {})
    keys = ("split", "id_field", "question_field", "answer_field", "answer_from")
    try:
        loaded = load_problems(manifest.input.path, **{k: fields[k] for k in keys if k in fields})
    except CordgenError:  # gone, or no longer readable as it was
        return None
    return [p.id for p in loaded.problems] if loaded.digest == manifest.input.sha256 else None


def merge_runs(sources: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> MergeReport:
    """Unions shard runs of one config and one input into a new run directory."""
    runs = [RunDirectory(s) for s in sources]
    manifests = []
    for run in runs:
        manifest = run.manifest()
        if manifest is None:
            raise CordgenError(f"{run.path}: no {MANIFEST}; not a cordgen run directory")
        manifests.append(manifest)
    first = manifests[0]
    for run, manifest in zip(runs[1:], manifests[1:]):
        if manifest.semantic_hash != first.semantic_hash:
            differences = describe_differences(first.semantic_config, manifest.semantic_config)
            raise CordgenError(f"{run.path}: config differs from {runs[0].path}: {differences}")
        if manifest.input.sha256 != first.input.sha256:
            raise CordgenError(f"{run.path}: made from another input than {runs[0].path}")
    target = RunDirectory(out)
    if target.path.exists() and not target.path.is_dir():
        raise CordgenError(f"{target.path}: output path is a file, not a run directory")
    if target.results_path.exists() and not overwrite:
        raise CordgenError(f"{target.path}: already holds results (use --overwrite)")
    merged: dict[str, TraceRecord] = {}
    duplicates, conflicts = 0, []
    for run in runs:
        for record in run.records():
            if record.id not in merged:
                merged[record.id] = record
            elif merged[record.id] == record:
                duplicates += 1
            else:
                conflicts.append(record.id)
    order = input_ids(first)
    ids = [i for i in order if i in merged] if order is not None else sorted(merged)
    missing = [i for i in order if i not in merged] if order is not None else []
    target.path.mkdir(parents=True, exist_ok=True)
    write_atomically(target.results_path, b"".join(merged[i].to_json_line() for i in ids))
    (target.path / CONFIG).write_bytes((runs[0].path / CONFIG).read_bytes())
    manifest = first.model_copy(
        update={
            "shard": None,
            "problems": first.input.problems,
            "completed": len(ids),
            "finished_at": now(),
            "wall_seconds": round(sum(m.wall_seconds for m in manifests), 2),  # machine time, summed
        }
    )
    manifest.status = "complete" if not missing and order is not None else "partial"
    target.save(manifest)
    return MergeReport(
        sources=len(runs), problems=len(ids), duplicates=duplicates, conflicts=conflicts, missing=missing
    )
