"""What a person watching a long synthesis sees: live progress and a closing summary."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cordgen.compat import TeacherSummary
from cordgen.records import ScoreRecord, TraceRecord
from cordgen.schedule import by_phase, phase_labels
from cordgen.scoring import Trace, percentile
from cordgen.synth import RoundReport


def rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:,.0f} tok/s" if seconds > 0 else "-"


def throughput(report: RoundReport) -> str:
    parts = [
        f"{name} {rate(report.generated_tokens.get(name, 0), seconds)}"
        for name, seconds in report.teacher_seconds.items()
    ]
    parts.append(f"scorer {rate(report.scored_tokens, report.scorer_seconds)}")
    return " · ".join(parts + replica_shares(report))


def replica_shares(report: RoundReport) -> list[str]:
    """Per engine with Ray replicas: how many, and the share of the round each one computed
    ("alpha ×2 busy 92%/61%"): a low share beside a high one is a straggler's cost."""
    engines: dict[str, list[float]] = {}
    for name, seconds in sorted(report.replica_seconds.items()):
        engine = name.rsplit("#", 1)[0]
        engines.setdefault(engine, []).append(
            seconds / report.engine_seconds if report.engine_seconds else 0.0
        )
    return [
        f"{engine} ×{len(shares)} busy {'/'.join(f'{share:.0%}' for share in shares)}"
        for engine, shares in engines.items()
    ]


def cleared_on_failure(progress: Progress, failed: bool) -> None:
    """Stops the bar; after a failure it is cleared, so the error is the only line left."""
    progress.live.transient = failed
    progress.stop()


@contextmanager
def progress_bar(progress: Progress) -> Iterator[Progress]:
    progress.start()
    try:
        yield progress
    except BaseException:
        cleared_on_failure(progress, True)
        raise
    cleared_on_failure(progress, False)


class RichProgress:
    """Problems done / total with ETA; the status line shows the round, live beams and each
    engine's tokens per second (teachers: generated, scorer: prompt tokens read)."""

    def __init__(self, console: Console, total: int, already_done: int = 0) -> None:
        self.progress = Progress(
            TextColumn("[bold]synth"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
        )
        self.task = self.progress.add_task(
            "synth", total=total, completed=already_done, status="starting engines"
        )

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        cleared_on_failure(self.progress, exc[0] is not None)

    def round_finished(self, report: RoundReport) -> None:
        status = f"round {report.round} · {report.live_beams} beams · {throughput(report)}"
        self.progress.update(self.task, advance=report.finished_problems, status=status)


class RecordTally:
    """Keeps what the summary needs from each record written in this run."""

    def __init__(self) -> None:
        self.records: list[TraceRecord] = []
        self.started = time.perf_counter()

    def __call__(self, records: Sequence[TraceRecord]) -> None:
        self.records.extend(records)

    def table(self) -> Table:
        """Per teacher: steps it wrote in the kept traces (first proposer) and steps it proposed
        identically to an earlier teacher, with the tokens it generated."""
        steps = Counter(s.teacher for r in self.records for s in r.result.steps)
        agreed = Counter(t for r in self.records for s in r.result.steps for t in s.teachers[1:])
        tokens: Counter[str] = Counter()
        for r in self.records:
            tokens.update(r.usage.generated_tokens)
        total_steps = sum(steps.values()) or 1
        matched = sum(
            r.result.final_answer is not None and r.result.final_answer.extracted == r.answer
            for r in self.records
        )
        table = Table(title="cordgen synth", show_header=True)
        for column in ("teacher", "steps kept", "share", "also proposed", "tokens generated"):
            table.add_column(column, justify="right" if column != "teacher" else "left")
        for teacher in sorted(set(steps) | set(tokens)):
            share = f"{steps[teacher] / total_steps:.0%}"
            table.add_row(teacher, str(steps[teacher]), share, str(agreed[teacher]), f"{tokens[teacher]:,}")
        count = len(self.records)
        scored = sum(r.usage.scored_tokens for r in self.records)
        computed = sum(r.usage.scored_tokens_computed for r in self.records)
        table.caption = (
            f"{count} problems · answer equals gold (exact text): {matched}/{count} · "
            f"unfinished: {sum(not r.result.finished for r in self.records)} · "
            f"scorer tokens {scored:,} ({computed:,} computed) · {time.perf_counter() - self.started:.1f} s"
        )
        return table


def short(count: int) -> str:
    """12345 as 12.3k: a table cell that fits a terminal."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def phase_table(records: Sequence[TraceRecord], phases: Sequence[int]) -> Table | None:
    """Per teacher and phase of the trace (step indexes): proposals won (steps of result traces),
    kept (survived their round's selection) and asked, and the tokens they cost; None where
    nothing was proposed step by step (curation, records made before proposals were counted)."""
    cells = by_phase((r.usage for r in records), phases)
    if not cells:
        return None
    labels = phase_labels(phases)
    table = Table(title="proposals by phase (steps): won / kept / asked, tokens", show_header=True)
    table.add_column("teacher")
    used = sorted({phase for _, phase in cells})
    for phase in used:
        table.add_column(f"steps {labels[phase]}", justify="right")
    for teacher in sorted({t for t, _ in cells}):
        row = [teacher]
        for phase in used:
            c = cells.get((teacher, phase))
            row.append(f"{c.won}/{c.kept}/{c.asked} {short(c.tokens)}" if c and c.asked else "-")
        table.add_row(*row)
    return table


def spread_rows(scored: Sequence[ScoreRecord]) -> list[tuple[str, list[float]]]:
    """Per scorer kind present: the final perplexities (predictive) or final scores (any other)."""
    rows = []
    for kind in sorted({s.kind for s in scored}, key=lambda k: (k != "predictive", k)):
        mine = [s for s in scored if s.kind == kind]
        if kind == "predictive":
            rows.append(("perplexity", [s.perplexity for s in mine if s.perplexity is not None]))
        else:
            rows.append((f"{kind} score", [s.score for s in mine if s.score is not None]))
    return [(label, values) for label, values in rows if values]


def score_summary(
    traces: Sequence[Trace],
    scores: dict[str, ScoreRecord],
    computed_tokens: int,
    synthesis_seconds: float | None = None,
) -> Table:
    """Accuracy, the spread of the final scores and who wrote the kept steps, over every trace
    scored so far. The predictive score's spread is shown as the answer's perplexity (1 / S);
    another kind's p(correct) is shown as it is: its inverse is no perplexity."""
    scored = [scores[t.id] for t in traces if t.id in scores]
    statuses = Counter(s.grade.status for s in scored)
    table = Table(title="cordgen score", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    judged = statuses["correct"] + statuses["wrong"]
    table.add_row("traces scored", f"{len(scored)} of {len(traces)}")
    table.add_row("accuracy (of judged)", f"{statuses['correct'] / judged:.1%}" if judged else "-")
    table.add_row(
        "unparsable / timeout / error",
        f"{statuses['unparsable']} / {statuses['timeout']} / {statuses['error']}",
    )
    for label, values in spread_rows(scored):
        table.add_row(f"{label} mean", f"{sum(values) / len(values):.3f}")
        table.add_row(f"{label} p50 / p90", f"{percentile(values, 0.5):.3f} / {percentile(values, 0.9):.3f}")
    authors = Counter(a for t in traces for a in t.teachers)
    for teacher, count in sorted(authors.items()):
        table.add_row(f"steps by {teacher}", f"{count / sum(authors.values()):.0%}")
    generated = sum(t.generated_tokens for t in traces)
    if generated:
        table.add_row("tokens generated in synthesis", f"{generated:,}")
    if synthesis_seconds is not None:
        table.add_row("synthesis wall time", f"{synthesis_seconds:.1f} s")
    table.add_row("scorer tokens computed (this pass)", f"{computed_tokens:,}")
    return table


def compat_table(summaries: Sequence[TeacherSummary], student: str) -> Table:
    """Per teacher: how much weight its rationales earn with this student, and why."""

    def shown(value: float | None, form: str = ".3f") -> str:
        return "-" if value is None else format(value, form)

    table = Table(
        title=f"compatibility with {student}",
        caption="alpha, D (difficulty), A (adaptability): means over rationales; "
        "step NLL and epiphany share: over the teacher's steps",
    )
    table.add_column("teacher", no_wrap=True)
    for column in ("traces", "alpha", "D", "A", "steps", "step NLL", "epiphany"):
        table.add_column(column, justify="right")
    for s in summaries:
        table.add_row(
            s.teacher,
            str(s.rationales),
            shown(s.mean_alpha),
            shown(s.mean_difficulty),
            shown(s.mean_adaptability),
            str(s.steps),
            shown(s.mean_step_nll),
            shown(s.epiphany_rate, ".1%"),
        )
    return table
