"""Data quality on the demo task: CoRD against single teachers and curation, with ablations.

    make quality                                   # 200 shipped problems, seed 0
    python benchmarks/quality.py --problems 50 --seeds 0,1,2

Every variant runs on the same problems with the same engines, loaded once, so the figures sit
side by side. Every step of the demo task is checkable, so besides final-answer accuracy the
benchmark reports step validity (share of kept steps whose arithmetic is right) and sound traces
(every step right and following the question), and it reads the scorer's own choices: of the
(correct, wrong) candidate pairs proposed from the same partial trace, the share it ranks right,
by step position. Results go to benchmarks/results/quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "demo_models"))

import task  # noqa: E402
from report_files import RESULTS, ROOT, shown_path, write_report  # noqa: E402

from cordgen.config import Recipe, load_recipe  # noqa: E402
from cordgen.engines import Scorer, ScoreRequest, StepScore  # noqa: E402
from cordgen.problems import Problem, load_problems  # noqa: E402
from cordgen.records import TraceRecord  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    group: str
    strategy: str = "cord"
    teachers: tuple[str, ...] = ()  # empty: every teacher of the recipe
    scorer: str = "scorer"  # the recipe's scorer or "scorer-final" (its ablation)
    kind: str = "predictive"  # scorer.kind; on the demo, verifier and hybrid ask its verifier (JUDGE)
    beam_width: int | None = None  # None: the recipe's
    curate_samples: int | None = None  # None: the recipe's


VARIANTS = (
    Variant("cord", "main"),
    Variant("single teacher-a", "main", "single", ("teacher-a",)),
    Variant("single teacher-b", "main", "single", ("teacher-b",)),
    Variant("single teacher-c", "main", "single", ("teacher-c",)),
    Variant("curate, 4 per teacher", "main", "curate"),
    Variant("curate, 2 per teacher", "main", "curate", curate_samples=2),
    Variant("cord B=1", "beam width", beam_width=1),
    Variant("cord B=2", "beam width", beam_width=2),
    Variant("cord, scorer-final", "scorer", scorer="scorer-final"),
    Variant("cord, random choice", "scorer", kind="random"),
    Variant("cord, verifier", "scorer", kind="verifier"),
    Variant("cord, hybrid", "scorer", kind="hybrid"),
)
# The demo verifier (benchmarks/demo_models/train.py) is asked as it was trained.
JUDGE = {"prompt": "\n\nCheck step {step}:{latest}Correct?", "yes": " Yes", "no": " No"}
JUDGED_KINDS = ("verifier", "hybrid")


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


def demo_model(base: Recipe, name: str) -> str:
    """A shipped demo model next to the recipe's scorer."""
    return str(Path(base.scorer.engine.model).parent / name)


def variant_recipe(base: Recipe, variant: Variant, seed: int) -> Recipe:
    data = base.model_dump()
    if variant.teachers:
        data["teachers"] = [t for t in data["teachers"] if t["name"] in variant.teachers]
    if variant.scorer == "scorer-final":
        data["scorer"]["name"] = "scorer-final"
        data["scorer"]["engine"]["model"] = demo_model(base, "scorer-final")
    data["scorer"]["kind"] = variant.kind  # random: the search keeps random children, not likely ones
    if variant.kind in JUDGED_KINDS and Path(demo_model(base, "verifier")).is_dir():
        engine = {**data["scorer"]["engine"], "model": demo_model(base, "verifier")}
        data["scorer"]["verifier"] = {**data["scorer"]["verifier"], **JUDGE, "engine": engine}
    data["search"]["strategy"] = variant.strategy
    if variant.beam_width is not None:
        data["search"]["beam_width"] = variant.beam_width
    if variant.curate_samples is not None:
        data["search"]["curate_samples"] = variant.curate_samples
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
        verdict = step_is_right(problems[request.question], request.steps)
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


def measure(records: Sequence[TraceRecord], problems: dict[str, task.Problem], seconds: float) -> dict:
    correct = hard = hard_correct = sound = valid = steps = 0
    kept: Counter = Counter()
    generated = scored = computed = 0
    for record in records:
        problem = problems[record.question]
        texts = [s.text for s in record.result.steps]
        check = task.check_trace(problem, texts)
        final = record.result.final_answer
        right = final is not None and final.extracted == record.answer
        correct += right
        sound += right and check.sound
        valid += sum(v is True for v in check.valid)
        steps += len(texts)
        if len(task.firing_rules(problem)) >= 2:
            hard += 1
            hard_correct += right
        kept.update(s.teacher for s in record.result.steps)
        generated += sum(record.usage.generated_tokens.values())
        scored += record.usage.scored_tokens
        computed += record.usage.scored_tokens_computed
    n = len(records)
    return {
        "problems": n,
        "answer_accuracy": round(correct / n, 4),
        "hard_problems": hard,
        "hard_accuracy": round(hard_correct / hard, 4) if hard else None,
        "step_validity": round(valid / max(1, steps), 4),
        "sound_and_correct": round(sound / n, 4),
        "generated_tokens_per_problem": round(generated / n, 1),
        "scorer_tokens_per_problem": round(scored / n, 1),
        "scorer_tokens_computed_per_problem": round(computed / n, 1),
        "wall_s": round(seconds, 2),
        "kept_step_share": {t: round(c / max(1, sum(kept.values())), 4) for t, c in sorted(kept.items())},
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
    result = measure(records, demo, time.perf_counter() - started)
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
    summary["hard_accuracy"] = runs[0]["hard_accuracy"] and round(
        statistics.fmean(r["hard_accuracy"] for r in runs), 4
    )
    summary["answer_accuracy_sd"] = round(statistics.pstdev(r["answer_accuracy"] for r in runs), 4)
    teachers = sorted({t for r in runs for t in r["kept_step_share"]})
    summary["kept_step_share"] = {
        t: round(statistics.fmean(r["kept_step_share"].get(t, 0.0) for r in runs), 4) for t in teachers
    }
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


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict) -> str:
    head = (
        "| variant | answer acc. | acc. on hard problems | step validity | sound & correct "
        "| tokens generated / problem | scorer tokens (computed) / problem | wall s | kept steps a / b / c |"
    )
    lines = [head, "|" + "---|" * 9]
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
            f"({mean['scorer_tokens_computed_per_problem']:.0f}) | {mean['wall_s']:.1f} | {shares} |"
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
    return "\n".join(lines) + "\n"


# The rows of the step-ranking table: the full recipe under each scorer and kind.
RANKED = ("cord", "cord, scorer-final", "cord, verifier", "cord, hybrid")


def ranking_lines(name: str, row: dict) -> list[str]:
    """The variant's ranking by the score it searched with, then by each of its components."""
    label = row["scorer"] if row["kind"] == "predictive" else row["kind"]
    tables = [(label, row["mean"].get("step_ranking"))]
    tables += [(f"{label}: {c} part", r) for c, r in row["mean"].get("component_ranking", {}).items()]
    lines = []
    for title, ranking in tables:
        if ranking:
            cells = [ranking.get(k) for k in ("1", "2", "3", "4", "5", "middle", "last")]
            text = [f"{percent(c['accuracy'])} ({c['pairs']})" if c else "-" for c in cells]
            lines.append(f"| {title} | " + " | ".join(text) + " |")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--problems", type=int, help="the first N problems of the recipe's input")
    parser.add_argument("--seeds", default="0", help="comma-separated sampling seeds")
    parser.add_argument(
        "--variants", help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS)
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from rich.console import Console

    from cordgen.engines.pool import EnginePool

    args = parse_args(argv)
    console = Console(stderr=True)
    base = load_recipe(args.config)
    problems = load_problems(base.input.path).problems[: args.problems]
    demo = {p.question: task.parse_question(p.question) for p in problems}
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = [v for v in VARIANTS if args.variants is None or v.name in args.variants.split(",")]
    pool = EnginePool(base.placement)
    try:
        started = time.perf_counter()
        for variant in chosen:
            recipe = variant_recipe(base, variant, seeds[0])
            for engine in (*(t.engine for t in recipe.teachers), *recipe.scorer.engines()):
                pool.model(engine)
        load_s = time.perf_counter() - started
        console.print(f"{len(pool)} engines loaded in {load_s:.0f} s")
        variants = {}
        for variant in chosen:
            runs = []
            for seed in seeds:
                recipe = variant_recipe(base, variant, seed)
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
    report = {
        "config": shown_path(args.config),
        "problems": len(problems),
        "seeds": seeds,
        "engine_load_s": round(load_s, 1),
        "variants": variants,
    }
    write_report(args.out, "quality", report, markdown(report))
    console.print(markdown(report))


if __name__ == "__main__":
    main()
