"""Data quality on the demo task: CoRD against single teachers and curation, with ablations.

    make quality                                   # 200 shipped problems, seed 0
    python benchmarks/quality.py --problems 50 --seeds 0,1,2
    python benchmarks/quality.py --config RECIPE --pilot OTHER_PROBLEMS.jsonl --variants cord,adaptive
    python benchmarks/quality.py --draw 37 --seeds 0,1,2,3,4,5,6,7,8,9 --variants cord,adaptive

With a recipe of other problems (real models), answer accuracy (the extracted answer equal to the
gold one), tokens and the schedule tables are measured alike; the step checks are the demo's.

Every variant runs on the same problems with the same engines, loaded once, so the figures sit
side by side. Every step of the demo task is checkable, so besides final-answer accuracy the
benchmark reports step validity (share of kept steps whose arithmetic is right) and sound traces
(every step right and following the question), and it reads the scorer's own choices: of the
(correct, wrong) candidate pairs proposed from the same partial trace, the share it ranks right,
by step position. The adaptive schedule's row is warm-started from a pilot `cord` run (every
teacher on every beam) over other problems: generated held-out demo problems for the demo recipe,
`--pilot FILE` for any other. `--draw SEED` replaces the shipped problems by as many other held-out
demo problems (none of the shipped set's or the pilot's, the pilot unchanged): a second problem set
for a check that the shipped set may flatter. Per teacher and phase of the trace, every step-wise
variant reports proposals asked, kept and their tokens. Results go to benchmarks/results/quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "demo_models"))

import task  # noqa: E402
from report_files import RESULTS, ROOT, shown_path, write_report  # noqa: E402

from cordgen.config import Recipe, VerifierSettings, load_recipe  # noqa: E402
from cordgen.engines import Scorer, ScoreRequest, StepScore  # noqa: E402
from cordgen.problems import Problem, load_problems  # noqa: E402
from cordgen.records import TraceRecord  # noqa: E402
from cordgen.schedule import by_phase, phase_labels  # noqa: E402

PILOT_SEED = 19  # the generator's seed for the pilot's demo problems (the shipped ones: 2026)


@dataclass(frozen=True)
class Variant:
    name: str
    group: str
    strategy: str = "cord"
    teachers: tuple[str, ...] = ()  # empty: every teacher of the recipe
    scorer: str = "scorer"  # the recipe's scorer or "scorer-final" (its ablation)
    kind: str = "predictive"  # scorer.kind; on the demo, verifier and hybrid ask its verifier (JUDGE)
    judge: str = "verifier"  # a hybrid's other half: the demo's "verifier", its "prm", or "likelihood"
    beam_width: int | None = None  # None: the recipe's
    curate_samples: int | None = None  # None: the recipe's
    samples: int | None = None  # candidate steps per teacher per beam (sampling.n); None: the recipe's
    schedule: str = "all"  # adaptive: warm-started from the pilot run
    fill_beams: bool = True  # adaptive: every teacher where the frontier could not fill B (the default)


VARIANTS = (
    Variant("cord", "main"),
    Variant("adaptive", "main", schedule="adaptive"),
    Variant("adaptive, no fill", "main", schedule="adaptive", fill_beams=False),
    Variant("single teacher-a", "main", "single", ("teacher-a",)),
    Variant("single teacher-b", "main", "single", ("teacher-b",)),
    Variant("single teacher-c", "main", "single", ("teacher-c",)),
    Variant("curate, 4 per teacher", "main", "curate"),
    Variant("curate, 2 per teacher", "main", "curate", curate_samples=2),
    Variant("curate, 8 per teacher", "main", "curate", curate_samples=8),
    Variant("cord B=1", "beam width", beam_width=1),
    Variant("cord B=2", "beam width", beam_width=2),
    Variant("cord, scorer-final", "scorer", scorer="scorer-final"),
    Variant("cord, random choice", "scorer", kind="random"),
    Variant("cord, verifier", "scorer", kind="verifier"),
    Variant("cord, hybrid", "scorer", kind="hybrid"),
    Variant("cord, prm", "scorer", kind="prm", judge="prm"),
    Variant("cord, hybrid with prm", "scorer", kind="hybrid", judge="prm"),
    Variant("cord, likelihood", "scorer", kind="likelihood"),
    Variant("cord, hybrid with likelihood", "scorer", kind="hybrid", judge="likelihood"),
    # A surer ranking spends fewer proposals on lost beams: the adaptive schedule's savings buy width.
    Variant(
        "adaptive, hybrid with likelihood", "scorer", kind="hybrid", judge="likelihood", schedule="adaptive"
    ),
    Variant(
        "cord B=6, hybrid with likelihood", "beam width", kind="hybrid", judge="likelihood", beam_width=6
    ),
    Variant(
        "adaptive B=6, hybrid with likelihood",
        "beam width",
        kind="hybrid",
        judge="likelihood",
        beam_width=6,
        schedule="adaptive",
    ),
    # Coverage, not ranking, loses the rest: two candidates per teacher per beam.
    Variant("cord n=2, hybrid with likelihood", "beam width", kind="hybrid", judge="likelihood", samples=2),
    Variant(
        "cord B=6 n=2, hybrid with likelihood",
        "beam width",
        kind="hybrid",
        judge="likelihood",
        beam_width=6,
        samples=2,
    ),
    Variant(
        "cord B=6 n=3, hybrid with likelihood",
        "beam width",
        kind="hybrid",
        judge="likelihood",
        beam_width=6,
        samples=3,
    ),
)
# The demo verifier (benchmarks/demo_models/train.py) is asked as it was trained.
JUDGE = {"prompt": "\n\nCheck step {step}:{latest}Correct?", "yes": " Yes", "no": " No"}
JUDGED_KINDS = ("verifier", "hybrid", "prm")


@dataclass
class ScoredCandidate:
    request: ScoreRequest
    score: float
    components: dict[str, float] = field(default_factory=dict)


@dataclass
class RecordingScorer:
    """Keeps every (trajectory, score) the search asked for, for the step-ranking figures."""

    inner: Scorer
    seen: list[ScoredCandidate] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.inner.name

    def score(self, requests: Sequence[ScoreRequest]) -> list[StepScore | None]:
        scores = self.inner.score(requests)
        self.seen.extend(ScoredCandidate(r, s.score, s.components) for r, s in zip(requests, scores) if s)
        return scores


def demo_model(base: Recipe, name: str) -> Path:
    """A shipped demo model next to the recipe's scorer."""
    return Path(base.scorer.engine.model).parent / name


def has_judge(base: Recipe, variant: Variant) -> bool:
    """A judged kind needs the demo verifier (or PRM), or a recipe that set up its own judge; the
    likelihood is the scorer's own."""
    if variant.kind not in JUDGED_KINDS or variant.judge == "likelihood":
        return True
    if variant.judge == "prm":
        return base.scorer.prm is not None or demo_model(base, "prm").is_dir()
    own = base.scorer.kind in ("verifier", "hybrid") or base.scorer.verifier != VerifierSettings()
    return own or demo_model(base, "verifier").is_dir()


def with_demo_judge(scorer: dict, base: Recipe, variant: Variant) -> None:
    """Points a judged kind at the shipped demo verifier or PRM, where the recipe sets none."""
    engine = scorer["engine"]
    if variant.judge == "prm" and scorer["prm"] is None and demo_model(base, "prm").is_dir():
        prm = demo_model(base, "prm")
        scorer["prm"] = {"engine": {**engine, "model": str(prm), "tokenizer": str(prm / "tokenizer")}}
    elif variant.judge == "verifier" and demo_model(base, "verifier").is_dir():
        model = str(demo_model(base, "verifier"))
        scorer["verifier"] = {**scorer["verifier"], **JUDGE, "engine": {**engine, "model": model}}


def variant_recipe(base: Recipe, variant: Variant, seed: int, warm_start: Path | None = None) -> Recipe:
    data = base.model_dump()
    if variant.schedule == "adaptive":
        data["search"]["schedule"] = "adaptive"
        data["search"]["adaptive"]["fill_beams"] = variant.fill_beams
        if warm_start is not None:
            data["search"]["adaptive"]["warm_start"] = str(warm_start)
    if variant.teachers:
        data["teachers"] = [t for t in data["teachers"] if t["name"] in variant.teachers]
    if variant.scorer == "scorer-final":
        data["scorer"]["name"] = "scorer-final"
        data["scorer"]["engine"]["model"] = str(demo_model(base, "scorer-final"))
    data["scorer"]["kind"] = variant.kind  # random: the search keeps random children, not likely ones
    if variant.kind in JUDGED_KINDS:
        with_demo_judge(data["scorer"], base, variant)
    if variant.kind == "hybrid":
        data["scorer"]["hybrid_with"] = variant.judge
    data["search"]["strategy"] = variant.strategy
    if variant.beam_width is not None:
        data["search"]["beam_width"] = variant.beam_width
    if variant.curate_samples is not None:
        data["search"]["curate_samples"] = variant.curate_samples
    if variant.samples is not None:
        for teacher in data["teachers"]:
            teacher["sampling"]["n"] = variant.samples
    data["seed"] = seed
    return Recipe.model_validate(data)


def step_is_right(problem: task.Problem, steps: Sequence[str]) -> bool | None:
    """Whether the last step applies the next operation correctly; None where the earlier steps
    are not all right (no continuation of a wrong trajectory can reach the gold answer, so the
    scorer has nothing to tell apart there) or past the last operation."""
    if len(steps) > len(problem.ops) or not task.check_trace(problem, steps[:-1]).sound_prefix:
        return None
    value = problem.start
    for op, b in problem.ops[: len(steps) - 1]:
        value = task.apply(value, op, b)
    op, b = problem.ops[len(steps) - 1]
    return task.parse_step(steps[-1]) == (value, op, b, task.apply(value, op, b))


def ranking_accuracy(
    seen: Sequence[ScoredCandidate], problems: dict[str, task.Problem], component: str | None = None
) -> dict:
    """Of (right, wrong) candidate pairs sharing a parent trajectory whose steps are all right, the
    share where the right one scores higher (ties count half), by step position and at each
    problem's last step. `component`: rank by that kind's own value (e.g. a hybrid's verifier
    part) instead of the score the search ranked by."""
    groups: dict[tuple, dict[str, tuple[bool, float]]] = defaultdict(dict)
    for item in seen:
        request = item.request
        problem = problems.get(request.question)
        verdict = None if problem is None else step_is_right(problem, request.steps)
        value = item.score if component is None else item.components.get(component, math.nan)
        if verdict is not None and math.isfinite(value):
            groups[(request.question, request.steps[:-1])][request.steps[-1]] = (verdict, value)
    wins: Counter = Counter()
    pairs: Counter = Counter()
    for (question, parent), children in groups.items():
        position = len(parent) + 1
        keys = [str(position)] + (["last"] if position == len(problems[question].ops) else ["middle"])
        right = [s for ok, s in children.values() if ok]
        wrong = [s for ok, s in children.values() if not ok]
        for r in right:
            for w in wrong:
                for key in keys:
                    pairs[key] += 1
                    wins[key] += 1.0 if r > w else 0.5 if r == w else 0.0
    return {key: {"pairs": pairs[key], "accuracy": round(wins[key] / pairs[key], 4)} for key in sorted(pairs)}


def right_trace_reached(seen: Sequence[ScoredCandidate], problems: dict[str, task.Problem]) -> float | None:
    """The share of the demo problems on which the scorer was ever shown a whole right trace
    (every operation applied, every result right): answers that no final choice could get right
    are lost to the proposals, not to the ranking."""
    asked = {item.request.question for item in seen} & problems.keys()
    reached = set()
    for item in seen:
        problem, steps = problems.get(item.request.question), item.request.steps
        if problem is not None and len(steps) == len(problem.ops):
            check = task.check_trace(problem, steps)
            if check.sound and all(v is True for v in check.valid):
                reached.add(item.request.question)
    return round(len(reached) / len(asked), 4) if asked else None


def proposals_by_phase(records: Sequence[TraceRecord], phases: Sequence[int]) -> dict:
    """{teacher: {phase: {asked, kept, won, tokens}}} summed over the records."""
    labels = phase_labels(phases)
    table: dict = defaultdict(dict)
    for (teacher, phase), c in sorted(by_phase((r.usage for r in records), phases).items()):
        table[teacher][labels[phase]] = {"asked": c.asked, "kept": c.kept, "won": c.won, "tokens": c.tokens}
    return dict(table)


def measure(
    records: Sequence[TraceRecord], problems: dict[str, task.Problem], seconds: float, phases: Sequence[int]
) -> dict:
    """Answer accuracy is the extracted answer equal to the gold one. Step validity, sound traces
    and hard problems need the demo task's checker: they count the demo's problems only, and are
    None for a recipe whose problems are others."""
    correct = hard = hard_correct = sound = valid = steps = checked = 0
    kept: Counter = Counter()
    by_teacher: Counter = Counter()
    generated = scored = computed = 0
    for record in records:
        final = record.result.final_answer
        right = final is not None and final.extracted == record.answer
        correct += right
        problem = problems.get(record.question)
        if problem is not None:
            texts = [s.text for s in record.result.steps]
            check = task.check_trace(problem, texts)
            checked += 1
            sound += right and check.sound
            valid += sum(v is True for v in check.valid)
            steps += len(texts)
            if len(task.firing_rules(problem)) >= 2:
                hard += 1
                hard_correct += right
        kept.update(s.teacher for s in record.result.steps)
        generated += sum(record.usage.generated_tokens.values())
        by_teacher.update(record.usage.generated_tokens)
        scored += record.usage.scored_tokens
        computed += record.usage.scored_tokens_computed
    n = len(records)
    return {
        "problems": n,
        "answer_accuracy": round(correct / n, 4),
        "hard_problems": hard,
        "hard_accuracy": round(hard_correct / hard, 4) if hard else None,
        "step_validity": round(valid / max(1, steps), 4) if checked else None,
        "sound_and_correct": round(sound / checked, 4) if checked else None,
        "generated_tokens_per_problem": round(generated / n, 1),
        "scorer_tokens_per_problem": round(scored / n, 1),
        "scorer_tokens_computed_per_problem": round(computed / n, 1),
        "wall_s": round(seconds, 2),
        "kept_step_share": {t: round(c / max(1, sum(kept.values())), 4) for t, c in sorted(kept.items())},
        "generated_tokens_by_teacher": {t: round(c / n, 1) for t, c in sorted(by_teacher.items())},
        "proposals": proposals_by_phase(records, phases),
    }


def run_variant(
    variant: Variant, recipe: Recipe, pool, problems: Sequence[Problem], demo: dict[str, task.Problem]
) -> dict:
    from cordgen.engines.roles import build_roles
    from cordgen.synth import synthesize

    teachers, scorer = build_roles(recipe, pool)
    recorder = RecordingScorer(scorer)
    records: list[TraceRecord] = []
    started = time.perf_counter()
    synthesize(problems, teachers, recorder, recipe, records.extend)
    result = measure(records, demo, time.perf_counter() - started, recipe.search.adaptive.phases)
    result["right_trace_reached"] = right_trace_reached(recorder.seen, demo)
    if variant.strategy != "curate" and variant.kind != "random":
        result["step_ranking"] = ranking_accuracy(recorder.seen, demo)
        components = sorted({c for item in recorder.seen for c in item.components})
        if len(components) > 1:
            result["component_ranking"] = {c: ranking_accuracy(recorder.seen, demo, c) for c in components}
    return result


def mean_over_seeds(runs: Sequence[dict]) -> dict:
    """Means of the per-seed figures (step-ranking pairs pooled), with the spread of accuracy."""
    summary = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            summary[key] = round(statistics.fmean(r[key] for r in runs), 4)
    summary |= {key: None for key, value in runs[0].items() if value is None}  # not a demo problem
    summary["hard_accuracy"] = runs[0]["hard_accuracy"] and round(
        statistics.fmean(r["hard_accuracy"] for r in runs), 4
    )
    summary["answer_accuracy_sd"] = round(statistics.pstdev(r["answer_accuracy"] for r in runs), 4)
    teachers = sorted({t for r in runs for t in r["kept_step_share"]})
    summary["kept_step_share"] = {
        t: round(statistics.fmean(r["kept_step_share"].get(t, 0.0) for r in runs), 4) for t in teachers
    }
    summary["generated_tokens_by_teacher"] = {
        t: round(statistics.fmean(r["generated_tokens_by_teacher"].get(t, 0.0) for r in runs), 1)
        for t in sorted({t for r in runs for t in r["generated_tokens_by_teacher"]})
    }
    summary["proposals"] = summed_proposals(runs)
    if "step_ranking" in runs[0]:
        summary["step_ranking"] = pooled_ranking([r["step_ranking"] for r in runs])
    if "component_ranking" in runs[0]:
        summary["component_ranking"] = {
            c: pooled_ranking([r["component_ranking"][c] for r in runs]) for c in runs[0]["component_ranking"]
        }
    return summary


def pooled_ranking(rankings: Sequence[dict]) -> dict:
    """Step-ranking accuracy over several seeds' pairs."""
    pooled = {}
    for key in sorted({k for r in rankings for k in r}):
        cells = [r[key] for r in rankings if key in r]
        pairs = sum(c["pairs"] for c in cells)
        wins = sum(c["pairs"] * c["accuracy"] for c in cells)
        pooled[key] = {"pairs": pairs, "accuracy": round(wins / pairs, 4)}
    return pooled


def summed_proposals(runs: Sequence[dict]) -> dict:
    """The seeds' proposal counts added up, so keep rates weigh every proposal alike."""
    total: dict = defaultdict(lambda: defaultdict(Counter))
    for r in runs:
        for teacher, phases in r["proposals"].items():
            for phase, counts in phases.items():
                total[teacher][phase].update(counts)
    return {t: {p: dict(c) for p, c in phases.items()} for t, phases in total.items()}


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    head = (
        "| variant | answer acc. | acc. on hard problems | step validity | sound & correct "
        "| tokens generated / problem | scorer tokens (computed) / problem | wall s | kept steps a / b / c "
        "| right trace reached |"
    )
    lines = [head, "|" + "---|" * 10]
    for name, row in report["variants"].items():
        mean = row["mean"]
        shares = " / ".join(
            percent(mean["kept_step_share"].get(t)) for t in ("teacher-a", "teacher-b", "teacher-c")
        )
        spread = f" ± {100 * mean['answer_accuracy_sd']:.1f}" if len(report["seeds"]) > 1 else ""
        lines.append(
            f"| {name} | {percent(mean['answer_accuracy'])}{spread} | {percent(mean['hard_accuracy'])} "
            f"| {percent(mean['step_validity'])} | {percent(mean['sound_and_correct'])} "
            f"| {mean['generated_tokens_per_problem']:.0f} | {mean['scorer_tokens_per_problem']:.0f} "
            f"({mean['scorer_tokens_computed_per_problem']:.0f}) | {mean['wall_s']:.1f} | {shares} "
            f"| {percent(mean.get('right_trace_reached'))} |"
        )
    lines += ["", "Scorer step-ranking accuracy, (right, wrong) pairs from the same parent:", ""]
    lines += [
        "| scorer | "
        + " | ".join(["step 1", "step 2", "step 3", "step 4", "step 5", "middle", "last"])
        + " |"
    ]
    lines.append("|" + "---|" * 8)
    for name, row in report["variants"].items():
        if name in RANKED:
            lines += ranking_lines(name, row)
    lines += schedule_tables(report)
    return "\n".join(lines) + "\n"


# The rows of the step-ranking table: the full recipe under each scorer and kind.
RANKED = (
    "cord",
    "cord, scorer-final",
    "cord, verifier",
    "cord, hybrid",
    "cord, prm",
    "cord, hybrid with prm",
    "cord, likelihood",
    "cord, hybrid with likelihood",
)


def ranking_lines(name: str, row: dict) -> list[str]:
    """The variant's ranking by the score it searched with, then by each of its components."""
    label = row["scorer"] if row.get("kind", "predictive") == "predictive" else name.removeprefix("cord, ")
    tables = [(label, row["mean"].get("step_ranking"))]
    tables += [(f"{label}: {c} part", r) for c, r in row["mean"].get("component_ranking", {}).items()]
    lines = []
    for title, ranking in tables:
        if ranking:
            cells = [ranking.get(k) for k in ("1", "2", "3", "4", "5", "middle", "last")]
            text = [f"{percent(c['accuracy'])} ({c['pairs']})" if c else "-" for c in cells]
            lines.append(f"| {title} | " + " | ".join(text) + " |")
    return lines


def schedule_tables(report: dict) -> list[str]:
    """The pilot, teacher tokens per problem under each schedule, and per phase who wins."""
    variants = report["variants"]
    lines: list[str] = []
    if report["pilot"]:
        pilot = report["pilot"]
        lines += [
            "",
            f"The adaptive rows' warm start: cord (seed 0) on {pilot['problems']} other problems, "
            f"{pilot['generated_tokens_per_problem']:.0f} teacher tokens each, {pilot['wall_s']:.0f} s.",
        ]
    if "cord" in variants and "adaptive" in variants:
        lines += tokens_saved_table(
            variants["cord"]["mean"]["generated_tokens_by_teacher"],
            variants["adaptive"]["mean"]["generated_tokens_by_teacher"],
        )
    for name in ("cord", "adaptive"):
        if variants.get(name, {}).get("mean", {}).get("proposals"):
            lines += phase_wins_table(name, variants[name]["mean"]["proposals"])
    return lines


def tokens_saved_table(every: dict[str, float], adaptive: dict[str, float]) -> list[str]:
    lines = ["", "Teacher tokens generated per problem, every teacher on every beam (cord) and adaptive:", ""]
    lines += ["| teacher | cord | adaptive | saved |", "|---|---|---|---|"]
    for teacher in sorted(every):
        before, after = every[teacher], adaptive.get(teacher, 0.0)
        lines.append(f"| {teacher} | {before:.0f} | {after:.0f} | {percent(1 - after / before)} |")
    total, spent = sum(every.values()), sum(adaptive.values())
    return [*lines, f"| all | {total:.0f} | {spent:.0f} | {percent(1 - spent / total)} |"]


def phase_wins_table(name: str, proposals: dict) -> list[str]:
    """Per teacher and phase: its share of the result traces' steps (the paper's who-wins-when
    figure), its win rate (those steps / proposals asked) and keep rate (survived their round / asked)."""
    phases = sorted(
        {p for t in proposals.values() for p in t}, key=lambda p: int(p.split("-")[0].rstrip("+"))
    )
    won = {p: sum(proposals[t].get(p, {}).get("won", 0) for t in proposals) for p in phases}
    lines = ["", f"{name}: share of the result traces' steps per phase (win rate, keep rate):", ""]
    lines += [
        "| teacher | " + " | ".join(f"steps {p}" for p in phases) + " |",
        "|" + "---|" * (len(phases) + 1),
    ]
    for teacher in sorted(proposals):
        cells = []
        for p in phases:
            c = proposals[teacher].get(p)
            if not c or not c["asked"]:
                cells.append("-")
                continue
            share = c["won"] / won[p] if won[p] else 0.0
            cells.append(
                f"{percent(share)} ({percent(c['won'] / c['asked'])}, {percent(c['kept'] / c['asked'])})"
            )
        lines.append(f"| {teacher} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--problems", type=int, help="the first N problems of the recipe's input")
    parser.add_argument("--seeds", default="0", help="comma-separated sampling seeds")
    parser.add_argument(
        "--variants",
        help="a subset, names joined by ',' with no space after it (names hold ', '): "
        + "; ".join(v.name for v in VARIANTS),
    )
    parser.add_argument(
        "--pilot",
        type=Path,
        help="problems for the adaptive rows' warm start; default (demo recipe): generated",
    )
    parser.add_argument("--pilot-problems", type=int, default=50, help="problems in the pilot run")
    parser.add_argument(
        "--draw",
        type=int,
        metavar="SEED",
        help="demo recipe: other held-out problems drawn with this seed instead of the shipped ones",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def chosen_variants(names: str | None) -> list[Variant]:
    """`names` joined by commas not followed by a space, since names such as "cord, verifier"
    hold one; None: every variant."""
    if names is None:
        return list(VARIANTS)
    wanted = re.split(r",(?! )", names)
    known = {v.name for v in VARIANTS}
    if unknown := [n for n in wanted if n not in known]:
        sys.exit(f"--variants: no variant named {unknown[0]!r}; the names: " + "; ".join(sorted(known)))
    return [v for v in VARIANTS if v.name in wanted]


def is_demo_input(base: Recipe) -> bool:
    return Path(base.input.path).resolve() == (ROOT / "benchmarks/demo_models/problems.jsonl").resolve()


def pilot_problems(args: argparse.Namespace, base: Recipe, taken: Sequence[Problem]) -> list[Problem]:
    """Problems none of the benchmark's: the --pilot file's, or held-out demo problems the shipped
    set does not hold (drawn with another seed) for the demo recipe."""
    questions = {p.question for p in taken}
    if args.pilot is not None:
        chosen = [p for p in load_problems(args.pilot).problems if p.question not in questions]
        return chosen[: args.pilot_problems]
    if not is_demo_input(base):
        sys.exit("give --pilot PROBLEMS (other problems of the same kind) for the adaptive rows' warm start")
    return drawn_problems(PILOT_SEED, args.pilot_problems, taken, "pilot")


def drawn_problems(seed: int, count: int, taken: Sequence[Problem], prefix: str) -> list[Problem]:
    """`count` held-out demo problems drawn with `seed`, none of whose questions `taken` holds."""
    questions = {p.question for p in taken}
    drawn = task.sample_problems(count + len(questions), seed, "heldout")
    fresh = [p for p in drawn if p.question not in questions][:count]
    return [Problem(f"{prefix}-{i:04d}", p.question, str(p.gold)) for i, p in enumerate(fresh)]


def benchmark_and_pilot(
    args: argparse.Namespace, base: Recipe, adaptive: bool
) -> tuple[list[Problem], list[Problem]]:
    """The benchmark's problems (the recipe's, or --draw's) and, for adaptive rows, the pilot's;
    they never overlap, and the pilot is the same for the shipped set and any drawn one."""
    problems = load_problems(base.input.path).problems[: args.problems]
    if args.draw is None:
        return problems, pilot_problems(args, base, problems) if adaptive else []
    if not is_demo_input(base):
        sys.exit("--draw draws demo problems: it needs the demo recipe's input")
    pilot = pilot_problems(args, base, problems)
    drawn = drawn_problems(args.draw, len(problems), (*problems, *pilot), f"draw{args.draw}")
    return drawn, pilot if adaptive else []


def run_pilot(base: Recipe, pool, problems: Sequence[Problem], path: Path) -> dict:
    """Every teacher on every beam (seed 0) over the pilot problems; its records are the warm start."""
    from cordgen.engines.roles import build_roles
    from cordgen.synth import synthesize

    recipe = variant_recipe(base, VARIANTS[0], 0)
    teachers, scorer = build_roles(recipe, pool)
    records: list[TraceRecord] = []
    started = time.perf_counter()
    synthesize(problems, teachers, scorer, recipe, records.extend)
    path.write_bytes(b"".join(r.to_json_line() for r in records))
    generated = sum(sum(r.usage.generated_tokens.values()) for r in records)
    return {
        "problems": len(records),
        "generated_tokens_per_problem": round(generated / len(records), 1),
        "wall_s": round(time.perf_counter() - started, 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from rich.console import Console

    from cordgen.engines.pool import EnginePool

    args = parse_args(argv)
    console = Console(stderr=True)
    base = load_recipe(args.config)
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = chosen_variants(args.variants)
    for variant in [v for v in chosen if not has_judge(base, v)]:
        judge = variant.judge
        console.print(
            f"{variant.name}: skipped, no judge (no demo {judge}; the recipe sets no scorer.{judge})"
        )
        chosen.remove(variant)
    problems, pilot = benchmark_and_pilot(args, base, any(v.schedule == "adaptive" for v in chosen))
    demo = {p.question: parsed for p in problems if (parsed := task.parse_question(p.question)) is not None}
    scratch = tempfile.TemporaryDirectory(prefix="quality-pilot-")
    warm_start = Path(scratch.name) / "pilot.jsonl"
    pilot_report = None
    pool = EnginePool(base.placement)
    try:
        started = time.perf_counter()
        for variant in chosen:
            recipe = variant_recipe(base, variant, seeds[0])
            for engine in (*(t.engine for t in recipe.teachers), *recipe.scorer.engines()):
                pool.model(engine)
        load_s = time.perf_counter() - started
        console.print(f"{len(pool)} engines loaded in {load_s:.0f} s")
        if pilot:
            pilot_report = run_pilot(base, pool, pilot, warm_start)
            console.print(f"pilot (warm start): {json.dumps(pilot_report)}")
        variants = {}
        for variant in chosen:
            runs = []
            for seed in seeds:
                recipe = variant_recipe(base, variant, seed, warm_start)
                runs.append(run_variant(variant, recipe, pool, problems, demo))
                console.print(f"{variant.name} (seed {seed}): {json.dumps(runs[-1])}")
            variants[variant.name] = {
                "group": variant.group,
                "strategy": variant.strategy,
                "scorer": variant.scorer,
                "kind": variant.kind,
                "beam_width": recipe.search.beam_width,
                "mean": mean_over_seeds(runs),
                "seeds": runs,
            }
    finally:
        pool.shutdown()
        scratch.cleanup()
    report = {
        "config": shown_path(args.config),
        "problems": len(problems),
        "drawn_with_seed": args.draw,  # None: the recipe's own problems
        "seeds": seeds,
        "engine_load_s": round(load_s, 1),
        "pilot": pilot_report,
        "variants": variants,
    }
    name = "quality" if args.draw is None else f"quality-draw{args.draw}"
    write_report(args.out, name, report, markdown(report))
    console.print(markdown(report))


if __name__ == "__main__":
    main()
