"""Throughput of the synthesis loop: ratios measured side by side on the same engines in one run.

    make throughput                                          # demo teachers, CPU
    python benchmarks/throughput.py --config configs/my-gpu-recipe.yaml --counts 64,256,1024

- lockstep (all problems per engine call) against a per-problem loop (the same search, one
  problem at a time), at a few problem counts;
- the scorer reading the prefix cache against not reading it: prompt tokens computed per decoded
  candidate token, and scorer wall time;
- CoRD against curation with the same teachers: wall time and tokens per problem;
- pipelining: problems in 2 or 4 groups taking turns (the scorer reads one group while the
  teachers write the next) against all in one lockstep group;
- the share of wall time spent outside engine calls (controller, tokenization, records).
The recipe is the only difference between a CPU run with the demo teachers and a GPU run with
real models. Results go to benchmarks/results/throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from report_files import RESULTS, ROOT, shown_path, write_report

from cordgen.config import Recipe, load_recipe
from cordgen.problems import Problem, load_problems
from cordgen.records import TraceRecord
from cordgen.synth import RoundReport


@dataclass
class Timing:
    """What one synthesis cost: wall time, time inside engine calls, tokens."""

    wall_s: float = 0.0
    engine_s: float = 0.0  # waiting on engines; teachers' concurrent calls count once
    scorer_s: float = 0.0
    rounds: int = 0
    records: list[TraceRecord] = field(default_factory=list)

    def round_finished(self, report: RoundReport) -> None:
        self.engine_s += report.engine_seconds
        self.scorer_s += report.scorer_seconds
        self.rounds += 1

    @property
    def outside_engines_s(self) -> float:
        return self.wall_s - self.engine_s

    def per_problem(self, field_name: str) -> float:
        usage = [r.usage for r in self.records]
        if field_name == "generated":
            total = sum(sum(u.generated_tokens.values()) for u in usage)
        else:
            total = sum(getattr(u, field_name) for u in usage)
        return total / len(self.records)


def synthesize_timed(
    problems: Sequence[Problem], recipe: Recipe, pool, timing: Timing | None = None
) -> Timing:
    from cordgen.engines.roles import build_roles
    from cordgen.synth import synthesize

    timing = timing or Timing()
    teachers, scorer = build_roles(recipe, pool)
    pool.reset_prefix_caches()  # every measurement starts cold, whatever ran before it
    started = time.perf_counter()
    synthesize(problems, teachers, scorer, recipe, timing.records.extend, timing)
    timing.wall_s += time.perf_counter() - started
    return timing


def with_changes(
    recipe: Recipe,
    strategy: str | None = None,
    reuse_prefix_cache: bool | None = None,
    pipeline_groups: int | None = None,
) -> Recipe:
    data = recipe.model_dump()
    if strategy is not None:
        data["search"]["strategy"] = strategy
    if pipeline_groups is not None:
        data["search"]["pipeline_groups"] = pipeline_groups
    if reuse_prefix_cache is not None:
        data["scorer"]["reuse_prefix_cache"] = reuse_prefix_cache
    return Recipe.model_validate(data)


def lockstep_vs_loop(problems: Sequence[Problem], recipe: Recipe, pool, counts: Sequence[int]) -> list[dict]:
    rows = []
    for count in counts:
        chosen = problems[:count]
        lockstep = synthesize_timed(chosen, recipe, pool)
        loop = Timing()
        for problem in chosen:
            synthesize_timed([problem], recipe, pool, loop)
        rows.append(
            {
                "problems": count,
                "lockstep_problems_per_s": round(count / lockstep.wall_s, 3),
                "loop_problems_per_s": round(count / loop.wall_s, 3),
                "speedup": round(loop.wall_s / lockstep.wall_s, 2),
                "lockstep_engine_calls": lockstep.rounds,
                "loop_engine_rounds": loop.rounds,
                "lockstep_outside_engines_share": round(lockstep.outside_engines_s / lockstep.wall_s, 4),
            }
        )
    return rows


def prefix_cache(problems: Sequence[Problem], recipe: Recipe, pool) -> dict:
    """The same search twice; only whether the scorer may read cached prefixes differs."""
    runs = {}
    for reuse in (True, False):
        timing = synthesize_timed(problems, with_changes(recipe, reuse_prefix_cache=reuse), pool)
        generated = sum(sum(r.usage.generated_tokens.values()) for r in timing.records)
        runs["reuse" if reuse else "no_reuse"] = {
            "scorer_s": round(timing.scorer_s, 2),
            "prompt_tokens_per_problem": round(timing.per_problem("scored_tokens"), 1),
            "computed_tokens_per_problem": round(timing.per_problem("scored_tokens_computed"), 1),
            "computed_per_generated_token": round(
                sum(r.usage.scored_tokens_computed for r in timing.records) / max(1, generated), 2
            ),
        }
    runs["scorer_time_ratio_no_reuse_over_reuse"] = round(
        runs["no_reuse"]["scorer_s"] / runs["reuse"]["scorer_s"], 2
    )
    return runs


def cord_vs_curate(problems: Sequence[Problem], recipe: Recipe, pool) -> dict:
    result = {}
    for strategy in ("cord", "curate"):
        timing = synthesize_timed(problems, with_changes(recipe, strategy=strategy), pool)
        result[strategy] = {
            "wall_s_per_problem": round(timing.wall_s / len(problems), 4),
            "generated_tokens_per_problem": round(timing.per_problem("generated"), 1),
            "scorer_tokens_per_problem": round(timing.per_problem("scored_tokens"), 1),
            "outside_engines_share": round(timing.outside_engines_s / timing.wall_s, 4),
        }
    result["wall_ratio_cord_over_curate"] = round(
        result["cord"]["wall_s_per_problem"] / result["curate"]["wall_s_per_problem"], 2
    )
    return result


def pipelining(problems: Sequence[Problem], recipe: Recipe, pool, groups: Sequence[int] = (1, 2, 4)) -> dict:
    """The same search with its problems in 1, 2 or 4 groups taking turns."""
    rows = {}
    for count in groups:
        timing = synthesize_timed(problems, with_changes(recipe, pipeline_groups=count), pool)
        rows[str(count)] = {
            "problems_per_s": round(len(problems) / timing.wall_s, 3),
            "scorer_s": round(timing.scorer_s, 2),
            "engine_wait_s": round(timing.engine_s, 2),
        }
    one = rows["1"]["problems_per_s"]
    for row in rows.values():
        row["speedup"] = round(row["problems_per_s"] / one, 2)
    return rows


def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; recipe {report['config']}.", ""]
    lines += ["| problems | lockstep problems/s | per-problem loop problems/s | speedup | outside engines |"]
    lines.append("|---|---|---|---|---|")
    for row in report["lockstep_vs_loop"]:
        lines.append(
            f"| {row['problems']} | {row['lockstep_problems_per_s']:.2f} | {row['loop_problems_per_s']:.2f} "
            f"| {row['speedup']:.1f}x | {100 * row['lockstep_outside_engines_share']:.1f}% |"
        )
    cache = report["prefix_cache"]
    lines += [
        "",
        "| scorer | prompt tokens / problem | computed / problem | computed per generated token | scorer s |",
    ]
    lines.append("|---|---|---|---|---|")
    for key, name in (("reuse", "reads the prefix cache"), ("no_reuse", "does not")):
        row = cache[key]
        lines.append(
            f"| {name} | {row['prompt_tokens_per_problem']:.0f} | {row['computed_tokens_per_problem']:.0f} "
            f"| {row['computed_per_generated_token']:.2f} | {row['scorer_s']:.1f} |"
        )
    lines += [
        "",
        f"Scorer time without cache reads / with: {cache['scorer_time_ratio_no_reuse_over_reuse']:.2f}x",
        "",
    ]
    versus = report["cord_vs_curate"]
    lines += [
        "| strategy | wall s / problem | tokens generated / problem | scorer tokens / problem "
        "| outside engines |"
    ]
    lines.append("|---|---|---|---|---|")
    for key in ("cord", "curate"):
        row = versus[key]
        lines.append(
            f"| {key} | {row['wall_s_per_problem']:.3f} | {row['generated_tokens_per_problem']:.0f} "
            f"| {row['scorer_tokens_per_problem']:.0f} | {100 * row['outside_engines_share']:.1f}% |"
        )
    lines += ["", f"CoRD / curate wall time: {versus['wall_ratio_cord_over_curate']:.2f}x (paper: 1.7x)", ""]
    lines += ["| pipeline groups | problems/s | speedup | scorer s | waiting on engines s |"]
    lines.append("|---|---|---|---|---|")
    for count, row in report["pipelining"].items():
        lines.append(
            f"| {count} | {row['problems_per_s']:.2f} | {row['speedup']:.2f}x | {row['scorer_s']:.1f} "
            f"| {row['engine_wait_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from rich.console import Console

    from cordgen.engines.pool import EnginePool

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument("--counts", default="8,32,128", help="problem counts for lockstep vs loop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    recipe = load_recipe(args.config)
    counts = [int(c) for c in args.counts.split(",")]
    problems = load_problems(recipe.input.path).problems[: max(counts)]
    pool = EnginePool(recipe.placement)
    try:
        synthesize_timed(problems[:2], recipe, pool)  # loads the engines and warms them up
        report = {"device": device_name(), "config": shown_path(args.config)}
        report["lockstep_vs_loop"] = lockstep_vs_loop(problems, recipe, pool, counts)
        console.print(report["lockstep_vs_loop"])
        report["prefix_cache"] = prefix_cache(problems, recipe, pool)
        console.print(report["prefix_cache"])
        report["cord_vs_curate"] = cord_vs_curate(problems, recipe, pool)
        console.print(report["cord_vs_curate"])
        report["pipelining"] = pipelining(problems, recipe, pool)
        console.print(report["pipelining"])
    finally:
        pool.shutdown()
    write_report(args.out, "throughput", report, markdown(report))
    console.print(markdown(report))


if __name__ == "__main__":
    main()
