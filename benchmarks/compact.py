"""COMPACT on the demo task: does weighting each teacher's rationale by the student's compatibility
alpha beat uniform weighting and the best single teacher, with the same data and steps?

    make compact                                   # seeds 0,1,2; work files in /tmp/cordgen-compact
    python benchmarks/compact.py --seeds 0,1,2,3,4 --arms uniform,compat,single,recomputed

Everything after the student runs through cordgen's own commands, in order:
1. a weak student: the demo architecture and ChatML tokenizer from random weights, trained on
   correct traces (train.py's clean-model recipe) but stopped early, so that it writes the format
   and gets most answers wrong; kept in the work directory and reused for the same step count;
2. teacher data: `cordgen synth` under curation with one whole trace per teacher, so every training
   problem has exactly three rationales (the kept one as `result`, the others as `alternatives`);
3. `cordgen compat RUN --student STUDENT`: alpha of every rationale as this student sees it;
4. `cordgen export RUN --weights compat`: every rationale an example; the best single teacher's
   rows filtered out of it (the teacher whose traces most often end in the gold answer);
5. `cordgen distill` per arm and seed, from the same student, with the same steps, batch and lr;
6. greedy evaluation of every student on train.py's held-out problems: final-answer accuracy, the
   share of arithmetically valid steps, and sound traces (every step valid and on the question).
The teacher data is one sample (the recipe's seed); the seeds vary the distillation's data order.
Results go to benchmarks/results/compact.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "demo_models"))
# Before torch loads, and inherited by every cordgen command: on 2 cores shared with another busy
# process, OpenMP threads spinning while they wait made 100 training steps take 572 s, not 64 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import task  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from report_files import RESULTS, ROOT, shown_path, write_report  # noqa: E402
from tokenizers_and_templates import STYLES, build_tokenizer, model_config  # noqa: E402
from train import (  # noqa: E402
    BUDGETS,
    CLEAN_STYLE,
    FMT,
    SEEDS,
    THREADS,
    Source,
    batches,
    evaluate,
    generate,
    save,
    train,
)
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402

from cordgen.compat import COMPAT, authors, load_compat  # noqa: E402
from cordgen.config import ChatSettings  # noqa: E402
from cordgen.distill import example_scales  # noqa: E402
from cordgen.export import exported  # noqa: E402
from cordgen.prompts import ChatPrompt, split_trace  # noqa: E402
from cordgen.store import RunDirectory  # noqa: E402

STUDENT_STEPS = 1200  # of the clean model's 2000: 27% held-out answers (17% at 1000, 8.5% at 800)
TEACHER_PROBLEMS_SEED = 2027  # training-split problems the teachers solve
DEFAULT_ARMS = ("uniform", "compat", "single")
EVAL_TOKENS = 160  # a whole 5-step trace with its answer is ~100 tokens; a looping student is cut here


@dataclass(frozen=True)
class Arm:
    key: str
    name: str
    data: str  # "all": every rationale of every teacher; "single": the best teacher's only
    weighting: str  # cordgen distill --weighting
    recompute_every: int = 0  # cordgen distill --recompute-every


ARMS = (
    Arm("uniform", "uniform", "all", "uniform"),
    Arm("compat", "compat", "all", "compat"),
    Arm("single", "best single teacher", "single", "uniform"),
    Arm("recomputed", "compat, alpha recomputed every 25 steps", "all", "compat", recompute_every=25),
)


@dataclass(frozen=True)
class DistillSettings:
    steps: int
    batch_size: int
    lr: float


# ~5.3 passes over the 1,800 rationales of 600 problems (the best teacher's 600: ~16), ~2 min a
# run. The student must also relearn to copy its result into the exported answer form
# (`</think>\n\nThe final answer is N.`, a new string in its tokens): at 150 steps compat-weighted
# runs had not in 2 of 3 seeds (5% and 4% answers beside 27-28% sound traces); at 300 all had.
DISTILL = DistillSettings(steps=300, batch_size=32, lr=1e-3)


@dataclass(frozen=True)
class Rationale:
    """One trace of the run, numbered as `cordgen compat` and `cordgen export` number them."""

    problem: str
    source: int  # 0: the record's result, k: alternatives[k-1]
    teacher: str
    correct: bool  # its own final answer is the gold one


def cordgen(*args: object) -> None:
    """The real command line, from the repository root (the demo recipe's paths are relative to it)."""
    subprocess.run([sys.executable, "-m", "cordgen", *map(str, args)], cwd=ROOT, check=True)


def build_student(directory: Path, steps: int) -> dict:
    """train.py's clean model (random weights, its seed, data and 2000-step schedule) stopped after
    `steps`. A schedule of its own that short never leaves the plateau where the model cannot copy
    operands (measured with seed 7: 0.5% answers after 800 or 1500 steps; train.py notes the same at
    600); the long schedule keeps the rate high and is past it by step ~600. Kept and reused: the
    same seed and steps give the same weights."""
    record_path = directory / "student.json"
    schedule, seed = BUDGETS["clean"], SEEDS["clean"]
    settings = {"steps": steps, "schedule": asdict(schedule), "seed": seed, "style": CLEAN_STYLE}
    if record_path.exists() and json.loads(record_path.read_text())["settings"] == settings:
        return json.loads(record_path.read_text())
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(STYLES[CLEAN_STYLE])
    model = LlamaForCausalLM(model_config(tokenizer))
    problems = task.sample_problems(schedule.problems, seed)
    data = batches(Source(tokenizer), problems, steps, seed, truncated=0.0)
    record = {"settings": settings, **train("student", model, data, schedule)}
    save(model, tokenizer, directory, None)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def write_teacher_inputs(work: Path, config: Path, count: int) -> tuple[Path, Path]:
    """(recipe, run directory): the demo recipe under curation with ONE whole trace per teacher, so
    each problem gets exactly one rationale from each teacher for COMPACT to weigh."""
    problems, recipe, run = (
        work / f"problems-{count}.jsonl",
        work / f"curate-{count}.yaml",
        work / f"run-{count}",
    )
    rows = [task.problem_row(i, p) for i, p in enumerate(task.sample_problems(count, TEACHER_PROBLEMS_SEED))]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = yaml.safe_load(config.read_text())
    data["search"] = data.get("search", {}) | {"strategy": "curate", "curate_samples": 1}
    data["input"] = data.get("input", {}) | {"path": str(problems)}
    data["output"] = data.get("output", {}) | {"path": str(run)}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe, run


def run_rationales(run: Path) -> list[Rationale]:
    """Every trace of the run with its teacher and whether its own final answer is the gold one,
    read with the demo task's exact answer reader."""
    out = []
    for record in RunDirectory(run).records():
        for source, trajectory in exported(record, every_rationale=True):
            final = trajectory.final_answer
            value = task.read_answer(final.text) if final is not None else None
            teacher = authors([step.teacher for step in trajectory.steps])
            out.append(
                Rationale(record.id, source, teacher, value is not None and str(value) == record.answer)
            )
    return out


def teacher_accuracy(rationales: Sequence[Rationale]) -> dict[str, float]:
    """Share of each teacher's traces (one per training problem) that end in the gold answer."""
    by_teacher: dict[str, list[bool]] = defaultdict(list)
    for r in rationales:
        by_teacher[r.teacher].append(r.correct)
    return {t: round(statistics.fmean(v), 4) for t, v in sorted(by_teacher.items())}


def mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def alpha_summary(run: Path, rationales: Sequence[Rationale]) -> dict:
    """Does alpha prefer correct traces? Mean alpha per teacher and by correctness, and on the
    problems whose rationales disagree in correctness, how often the top-alpha rationale is a
    correct one, beside the scorer's pick (the run's result) and a random pick."""
    records = load_compat(run / COMPAT) or {}
    alpha = {(r.id, c.source): c.alpha for r in records.values() for c in r.rationales}
    measured = [r for r in rationales if (r.problem, r.source) in alpha]
    by_problem: dict[str, list[Rationale]] = defaultdict(list)
    for r in measured:
        by_problem[r.problem].append(r)
    mixed = [group for group in by_problem.values() if len({r.correct for r in group}) == 2]
    top = [max(group, key=lambda r: alpha[(r.problem, r.source)]) for group in mixed]
    return {
        "rationales_measured": len(measured),
        "mean_alpha_by_teacher": {
            t: mean([alpha[(r.problem, r.source)] for r in measured if r.teacher == t])
            for t in sorted({r.teacher for r in measured})
        },
        "mean_alpha_correct": mean([alpha[(r.problem, r.source)] for r in measured if r.correct]),
        "mean_alpha_wrong": mean([alpha[(r.problem, r.source)] for r in measured if not r.correct]),
        "mixed_problems": len(mixed),
        "mixed_top_alpha_correct": mean([r.correct for r in top]),
        "mixed_scorer_pick_correct": mean([next(r for r in g if r.source == 0).correct for g in mixed]),
        "mixed_random_pick_correct": mean([statistics.fmean(r.correct for r in g) for g in mixed]),
    }


def export_data(run: Path, work: Path, best: str) -> tuple[Path, Path]:
    """(every rationale weighted by alpha, the best teacher's rows of the same file)."""
    every, single = work / "all.jsonl", work / f"single-{best}.jsonl"
    cordgen("export", run, "--jsonl", every, "--weights", "compat")
    lines = every.read_text().splitlines(keepends=True)
    single.write_text(
        "".join(line for line in lines if set(json.loads(line)["metadata"]["teachers"]) == {best})
    )
    return every, single


def training_mass(path: Path, rationales: Sequence[Rationale]) -> dict:
    """Share of the loss weight that lands on correct rationales, uniform vs compat: the scales
    `cordgen distill` gives each example (alpha renormalized within its problem, mean 1)."""
    correct = {(r.problem, r.source): r.correct for r in rationales}
    rows = [json.loads(line)["metadata"] for line in path.read_text().splitlines()]
    right = [correct[(m["id"], m["rationale"])] for m in rows]
    scales = example_scales([m["id"] for m in rows], [m["weight"] for m in rows])
    return {
        "examples": len(rows),
        "correct_share_uniform": round(sum(right) / len(rows), 4),
        "correct_share_compat": round(sum(s for s, ok in zip(scales, right) if ok) / sum(scales), 4),
    }


def distill(arm: Arm, data: Path, student: Path, out: Path, seed: int, settings: DistillSettings) -> dict:
    """One checkpoint, at the end; --overwrite because cordgen would resume a finished run of the
    same student path and settings even where the student there has been rebuilt since."""
    started = time.perf_counter()
    cordgen(
        "distill", data, "--student", student, "--out", out, "--weighting", arm.weighting,
        "--recompute-every", arm.recompute_every, "--max-steps", settings.steps,
        "--batch-size", settings.batch_size, "--lr", settings.lr, "--seed", seed,
        "--save-steps", settings.steps, "--logging-steps", max(1, settings.steps // 10),
        "--device", "cpu", "--overwrite", "-q",
    )  # fmt: skip
    manifest = json.loads((out / "distill.json").read_text())
    losses = manifest["losses"]
    return {
        "distill_s": round(time.perf_counter() - started, 1),
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "recomputed": manifest["recomputed"],
    }


def answer_is_last_step(model, tokenizer, problems: Sequence[task.Problem]) -> float:
    """Share of greedy traces whose final answer is their own last step's result. The exported
    answer form is new to the student, which must learn again to copy its result into it: this
    tells a student that misreads its own (maybe right) result from one that reasons wrongly."""
    chat = ChatPrompt(tokenizer, ChatSettings(), FMT)
    texts = generate(model, tokenizer, [chat.step_prompt_ids(p.question, ()) for p in problems], EVAL_TOKENS)
    copied = 0
    for text in texts:
        steps, answer = split_trace(FMT, text)
        last = task.parse_step(steps[-1]) if steps else None
        copied += answer is not None and last is not None and task.read_answer(answer) == last[3]
    return round(copied / len(problems), 4)


def evaluate_student(directory: Path, heldout: Sequence[task.Problem]) -> dict:
    """Greedy from cordgen's step prompt, with train.py's grader (answers after `</think>` with
    any leading whitespace, as exported traces write them)."""
    model = LlamaForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    result = evaluate(model, tokenizer, heldout, None, EVAL_TOKENS)
    return result | {"answer_is_last_step": answer_is_last_step(model, tokenizer, heldout)}


def arm_summary(runs: Sequence[dict]) -> dict:
    accuracy = [r["answer_accuracy"] for r in runs]
    return {
        "answer_accuracy": mean(accuracy),
        "answer_accuracy_sd": round(statistics.pstdev(accuracy), 4),
        "step_validity": mean([r["step_validity"] for r in runs]),
        "sound_traces": mean([r["sound_traces"] for r in runs]),
        "answer_is_last_step": mean([r["answer_is_last_step"] for r in runs]),
        "distill_s": mean([r["distill_s"] for r in runs]),
    }


def run_arms(
    arms: Sequence[Arm],
    data: dict[str, Path],
    student: Path,
    args: argparse.Namespace,
    heldout: Sequence[task.Problem],
) -> dict:
    """Every arm from the same student, seed by seed; each distilled student evaluated at once."""
    settings = DistillSettings(args.distill_steps, args.batch_size, args.lr)
    results = {}
    for arm in arms:
        runs = []
        for seed in args.seeds:
            out = args.work / "distilled" / f"{arm.key}-seed-{seed}"
            record = {"seed": seed, **distill(arm, data[arm.data], student, out, seed, settings)}
            record |= evaluate_student(out, heldout)
            log(f"{arm.name} (seed {seed}): {json.dumps(record)}")
            runs.append(record)
        results[arm.name] = {**asdict(arm), "mean": arm_summary(runs), "seeds": runs}
    return results


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def arms_table(report: dict) -> list[str]:
    examples, start = report["teacher_data"]["examples"], report["student"]["eval"]
    lines = [
        "| arm | examples | answer acc. (mean ± sd) | step validity | sound traces "
        "| answer = own last step | per-seed acc. | distill s |",
        "|---|---|---|---|---|---|---|---|",
        f"| starting student | - | {percent(start['answer_accuracy'])} | {percent(start['step_validity'])} "
        f"| {percent(start['sound_traces'])} | {percent(start['answer_is_last_step'])} | - | - |",
    ]
    for name, arm in report["arms"].items():
        m = arm["mean"]
        seeds = " / ".join(percent(r["answer_accuracy"]) for r in arm["seeds"])
        lines.append(
            f"| {name} | {examples[arm['data']]} | {percent(m['answer_accuracy'])} "
            f"± {100 * m['answer_accuracy_sd']:.1f} | {percent(m['step_validity'])} "
            f"| {percent(m['sound_traces'])} | {percent(m['answer_is_last_step'])} | {seeds} "
            f"| {m['distill_s']:.0f} |"
        )
    return lines


def teachers_table(report: dict) -> list[str]:
    teachers, alpha = report["teacher_data"], report["alpha"]["mean_alpha_by_teacher"]
    lines = ["| teacher | final-answer acc. of its traces | mean alpha |", "|---|---|---|"]
    for teacher, accuracy in teachers["accuracy"].items():
        best = " (best single)" if teacher == teachers["best"] else ""
        lines.append(f"| {teacher}{best} | {percent(accuracy)} | {alpha.get(teacher)} |")
    return lines


def alpha_text(report: dict) -> str:
    alpha, mass = report["alpha"], report["teacher_data"]["training_mass"]
    return (
        f"Mean alpha of rationales with a correct final answer: {alpha['mean_alpha_correct']}, with a "
        f"wrong one: {alpha['mean_alpha_wrong']}. On the {alpha['mixed_problems']} problems whose "
        f"rationales disagree in correctness, the top-alpha rationale is a correct one "
        f"{percent(alpha['mixed_top_alpha_correct'])} of the time (the scorer's pick: "
        f"{percent(alpha['mixed_scorer_pick_correct'])}, a random pick: "
        f"{percent(alpha['mixed_random_pick_correct'])}). Share of the training loss weight on correct "
        f"rationales: uniform {percent(mass['correct_share_uniform'])}, compat "
        f"{percent(mass['correct_share_compat'])}."
    )


def markdown(report: dict) -> str:
    student, distilled = report["student"], report["distill"]
    summary = (
        f"Student: demo architecture and ChatML tokenizer from random weights, train.py's clean model "
        f"stopped at step {student['settings']['steps']} of {student['settings']['schedule']['steps']} "
        f"({student['train_s']:.0f} s). Teacher data: {report['teacher_data']['problems']} training "
        f"problems, one curated trace per teacher. Distillation: {distilled['steps']} steps, batch "
        f"{distilled['batch_size']}, lr {distilled['lr']:g}, seeds {', '.join(map(str, report['seeds']))}; "
        f"{report['heldout_problems']} held-out problems, greedy."
    )
    stages = ", ".join(
        f"{name.removesuffix('_s')} {seconds:.0f} s" for name, seconds in report["stages"].items()
    )
    timing = (
        f"Wall time {report['wall_s']:.0f} s ({stages}); a student reused from the work directory "
        f"skips its {student['train_s']:.0f} s of training, a finished synthesis run its engines."
    )
    parts = [
        summary,
        "",
        *arms_table(report),
        "",
        *teachers_table(report),
        "",
        alpha_text(report),
        "",
        timing,
    ]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "cordgen-compact", help="weights and data"
    )
    parser.add_argument("--student-steps", type=int, default=STUDENT_STEPS)
    parser.add_argument("--train-problems", type=int, default=600, help="problems the teachers solve")
    parser.add_argument("--heldout-problems", type=int, default=200)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
    parser.add_argument("--distill-steps", type=int, default=DISTILL.steps)
    parser.add_argument("--batch-size", type=int, default=DISTILL.batch_size)
    parser.add_argument("--lr", type=float, default=DISTILL.lr)
    parser.add_argument(
        "--arms", default=",".join(DEFAULT_ARMS), help=f"subset of {','.join(a.key for a in ARMS)}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(args.arms.split(",")) - {a.key for a in ARMS}
    if unknown:
        parser.error(f"--arms: unknown {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    args.work.mkdir(parents=True, exist_ok=True)
    started, stages = time.perf_counter(), {}
    heldout = task.sample_problems(args.heldout_problems, SEEDS["heldout"], "heldout")
    student_dir = args.work / f"student-{args.student_steps}"
    student = build_student(student_dir, args.student_steps)
    student["eval"] = evaluate_student(student_dir, heldout)
    stages["student_s"] = round(time.perf_counter() - started, 1)
    log(f"student: {json.dumps(student)}")
    recipe, run = write_teacher_inputs(args.work, args.config, args.train_problems)
    cordgen("synth", "--config", recipe, "-q")
    stages["synth_s"] = round(time.perf_counter() - started - stages["student_s"], 1)
    cordgen("compat", run, "--student", student_dir, "--device", "cpu", "--overwrite", "-q")
    rationales = run_rationales(run)
    accuracy = teacher_accuracy(rationales)
    best = max(accuracy, key=accuracy.__getitem__)
    every, single = export_data(run, args.work, best)
    data = {"all": every, "single": single}
    teacher_data = {
        "problems": args.train_problems,
        "accuracy": accuracy,
        "best": best,
        "examples": {k: len(p.read_text().splitlines()) for k, p in data.items()},
        "training_mass": training_mass(every, rationales),
    }
    stages["compat_export_s"] = round(time.perf_counter() - started - sum(stages.values()), 1)
    arms = run_arms([a for a in ARMS if a.key in args.arms.split(",")], data, student_dir, args, heldout)
    stages["distill_eval_s"] = round(time.perf_counter() - started - sum(stages.values()), 1)
    report = {
        "config": shown_path(args.config),
        "work": shown_path(args.work),
        "seeds": args.seeds,
        "heldout_problems": args.heldout_problems,
        "student": student,
        "teacher_data": teacher_data,
        "alpha": alpha_summary(run, rationales),
        "distill": asdict(DistillSettings(args.distill_steps, args.batch_size, args.lr)),
        "arms": arms,
        "stages": stages,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_report(args.out, "compact", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
