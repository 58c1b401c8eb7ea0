"""A run's export as a Hugging Face dataset folder: Parquet shards under data/ and a README.md card.

The layout is the Hub's own (`data/train-00000-of-00001.parquet`, a card whose YAML header names
the config, the split and the features), so `datasets.load_dataset(DIR)` reads it and
`huggingface-cli upload` publishes it as it is. The rows are the JSONL export's, with their types
stated by `export.features`. The card says where the data came from: what was kept and dropped,
who wrote the steps, how it was scored and filtered, and the recipe. The folder is written beside
its target and renamed into place, so a failure never leaves half a dataset.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cordgen import __version__
from cordgen.errors import CordgenError
from cordgen.export import ExportReport, RowOptions, RowSource, features, open_rows
from cordgen.store import Manifest

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

DATA, CARD = "data", "README.md"
SHARD_BYTES = 500 * 10**6  # Arrow bytes per shard, as `push_to_hub`'s default max_shard_size
BATCH_ROWS = 256  # rows converted to Arrow at a time: one Parquet row group each
TAGS = ["cordgen", "synthetic", "chain-of-thought", "reasoning"]


def export_dataset(
    run_dir: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    shard_rows: int | None = None,
    shard_bytes: int = SHARD_BYTES,
    license: str | None = None,
    **options: Any,
) -> ExportReport:
    """Writes `RowSource.rows` as the dataset folder `out`, all of it or, on any error, nothing.
    `options` are `RowOptions`' fields; format "hf" means messages rows."""
    if options.get("format") == "hf":
        options = {**options, "format": "messages"}
    source, out = open_rows(run_dir, RowOptions(**options)), Path(out)
    if shard_rows is not None and shard_rows < 1:
        raise CordgenError(f"--shard-rows: {shard_rows} is not a positive number of rows")
    check_folder(out, overwrite)
    manifest = source.run.manifest()
    report, counts = ExportReport(kept=0, dropped={}), ExportedCounts()
    row_features = features(source.options.format, weighted=source.compat is not None)
    with atomic_folder(out) as folder:
        shards = ShardWriter(folder / DATA, row_features.arrow_schema, shard_rows, shard_bytes)
        rows = source.rows(report)
        while batch := list(islice(rows, shards.room())):
            shards.write(batch)
            counts.add(batch)
        if not report.kept:
            dropped = report.dropped_summary()
            raise CordgenError(
                f"kept none of {report.total} traces{f' (dropped: {dropped})' if dropped else ''}; "
                "`datasets` cannot load an empty dataset folder"
            )
        shards.finish()
        info = dataset_info(row_features, report.kept, shards)
        card = card_header(info, license) + card_body(out.resolve().name, source, manifest, report, counts)
        (folder / CARD).write_text(card, encoding="utf-8")
        fsync_file(folder / CARD)
    return report


def check_folder(out: Path, overwrite: bool) -> None:
    """Refuses before anything is written: `--overwrite` replaces an earlier export and nothing
    else, so a mistyped --out can never delete a run or anyone's files."""
    if out.exists() and not out.is_dir():
        raise CordgenError(f"{out}: output path is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in entries if name not in (CARD, DATA)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise CordgenError(f"{out}: holds {shown}, not only an exported dataset; choose another --out")
    if entries and not overwrite:
        raise CordgenError(f"{out}: holds an earlier export (use --overwrite to replace it)")


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` that takes `out`'s place (an earlier export moved aside and
    deleted) once the block completes; a failure leaves `out` as it was, and no temporary folder."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary, previous = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (temporary, previous):  # of an export that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        if out.is_dir() and any(out.iterdir()):
            os.rename(out, previous)
        os.replace(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Parquet shards `train-NNNNN.parquet`, a new one once a shard holds `shard_rows` rows or
    `shard_bytes` bytes of Arrow data; `finish` names them `train-NNNNN-of-MMMMM.parquet`, the
    Hub's pattern, once their number is known."""

    def __init__(self, folder: Path, schema: pa.Schema, shard_rows: int | None, shard_bytes: int) -> None:
        folder.mkdir()
        self.folder, self.schema = folder, schema
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.paths: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.shard_size = self.shard_length = 0
        self.num_bytes = 0  # Arrow bytes of every shard

    def room(self) -> int:
        """Rows the next batch may hold without passing the row limit of the shard."""
        return min(BATCH_ROWS, self.shard_rows - self.shard_length) if self.shard_rows else BATCH_ROWS

    def write(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.paths.append(self.folder / f"train-{len(self.paths):05d}.parquet")
            self.writer = pq.ParquetWriter(self.paths[-1], self.schema)
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self.writer.write_table(table)
        self.shard_length += len(rows)
        self.shard_size += table.nbytes
        self.num_bytes += table.nbytes
        if self.shard_length == self.shard_rows or self.shard_size >= self.shard_bytes:
            self.close_shard()

    def close_shard(self) -> None:
        assert self.writer is not None
        self.writer.close()
        fsync_file(self.paths[-1])
        self.writer, self.shard_size, self.shard_length = None, 0, 0

    def finish(self) -> None:
        """Closes the last shard and names them all."""
        if self.writer is not None:
            self.close_shard()
        count = len(self.paths)
        for i, path in enumerate(self.paths):
            self.paths[i] = path.rename(path.with_name(f"train-{i:05d}-of-{count:05d}.parquet"))

    @property
    def download_size(self) -> int:
        return sum(path.stat().st_size for path in self.paths)


@dataclass
class ExportedCounts:
    """What the card says about the rows written, counted as they are written."""

    steps: Counter[str] = field(default_factory=Counter)  # by author
    graded: int = 0
    correct: int = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            meta = row["metadata"]
            self.steps.update(meta["teachers"])
            self.graded += meta["correct"] is not None
            self.correct += meta["correct"] is True


def dataset_info(row_features: datasets.Features, rows: int, shards: ShardWriter) -> datasets.DatasetInfo:
    from datasets import DatasetInfo, SplitDict, SplitInfo

    splits = SplitDict()
    splits.add(SplitInfo("train", num_bytes=shards.num_bytes, num_examples=rows))
    return DatasetInfo(
        features=row_features,
        splits=splits,
        download_size=shards.download_size,
        dataset_size=shards.num_bytes,
    )


def card_header(info: datasets.DatasetInfo, license: str | None) -> str:
    """The card's YAML: the data files as the Hub's default config, the features, and tags."""
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    data = DatasetCardData(
        license=license,
        task_categories=["text-generation"],
        tags=TAGS,
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA}/train-*"}]}],
    )
    DatasetInfosDict({"default": info}).to_dataset_card_data(data)
    return f"---\n{data.to_yaml()}\n---\n"


def card_body(
    name: str, source: RowSource, manifest: Manifest | None, report: ExportReport, counts: ExportedCounts
) -> str:
    layout = "`messages`" if source.options.format == "messages" else "ShareGPT (`system`, `conversations`)"
    intro = (
        f"# {name}\n\nChain-of-thought traces synthesized by cordgen "
        f"from the run `{source.run.path.name}`: one chat example per kept trace, in the {layout} "
        "layout, with per-trace provenance and scores in `metadata`."
    )
    sections = [
        intro,
        kept_section(report),
        teachers_section(manifest, counts),
        scoring_section(manifest, source, counts),
        yaml_section("Export options", "The filters and layout this export used.", asdict(source.options)),
        versions_section(manifest),
        recipe_section(manifest),
    ]
    return "\n\n".join(sections) + "\n"


def table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def kept_section(report: ExportReport) -> str:
    dropped = [(f"dropped: {reason}", count) for reason, count in sorted(report.dropped.items())]
    rows = [("kept", report.kept), *dropped, ("traces in all", report.total)]
    return "## Examples\n\n" + table(("", "traces"), rows)


def teachers_section(manifest: Manifest | None, counts: ExportedCounts) -> str:
    """Every teacher of the run, with its share of the steps in the exported examples."""
    models = {t["name"]: model_of(t) for t in manifest.semantic_config["teachers"]} if manifest else {}
    names = [*models, *sorted(set(counts.steps) - set(models))]
    total = sum(counts.steps.values())
    rows = [(f"`{n}`", models.get(n, "-"), counts.steps[n], share(counts.steps[n], total)) for n in names]
    note = "A step's author is the first teacher that proposed it; shares are of the exported steps."
    return "## Teachers\n\n" + note + "\n\n" + table(("teacher", "model", "steps", "share"), rows)


def model_of(entry: dict[str, Any]) -> str:
    """The model a teacher or scorer of a recipe ran, as the card shows it."""
    model = entry.get("engine", {}).get("model")
    return f"`{model}`" if model else "-"


def share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def scoring_section(manifest: Manifest | None, source: RowSource, counts: ExportedCounts) -> str:
    lines = ["## Scoring", ""]
    if manifest is not None:
        scorer = manifest.semantic_config["scorer"]
        lines += [f"Search scorer: `{scorer['name']}` ({model_of(scorer)}).", ""]
    if source.scores is None:
        lines.append("Not graded: the run has no scores.jsonl (`cordgen score` writes it).")
        return "\n".join(lines)
    scored = list(source.scores.values())
    statuses = Counter(s.grade.status for s in scored)
    judged = statuses["correct"] + statuses["wrong"]
    scorers = ", ".join(f"`{name}`" for name in sorted({s.scorer for s in scored}))
    unjudged = ", ".join(f"{status} {statuses[status]}" for status in ("unparsable", "timeout", "error"))
    rows = [
        ("run results judged", statuses["correct"], judged, share(statuses["correct"], judged)),
        ("exported examples graded", counts.correct, counts.graded, share(counts.correct, counts.graded)),
    ]
    lines += [
        f"Graded by `cordgen score` (math-verify against the gold answer; scorer {scorers or '-'}):",
        "",
        table(("", "correct", "of", "accuracy"), rows),
        "",
        f"Results scored: {len(scored)}; not judged: {unjudged}.",
    ]
    return "\n".join(lines)


def yaml_section(title: str, note: str, data: Any) -> str:
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return f"## {title}\n\n{note}\n\n```yaml\n{text}```"


def versions_section(manifest: Manifest | None) -> str:
    synthesized = f"cordgen {manifest.cordgen_version}" if manifest else "an unrecorded cordgen version"
    return f"## Versions\n\nSynthesized with {synthesized}; exported with cordgen {__version__}."


def recipe_section(manifest: Manifest | None) -> str:
    if manifest is None:
        return "## Recipe\n\nThe run has no manifest.json: its recipe is not recorded."
    note = (
        "The settings that decide the run's results: its manifest's `semantic_config` "
        f"(hash `{manifest.semantic_hash[:12]}`)."
    )
    return yaml_section("Recipe", note, manifest.semantic_config)
