"""Chained integer arithmetic: a reasoning task whose every step can be checked exactly.

A problem is a start value and 3-5 operations (`Start with 37. Add 48, multiply by 3, subtract
19.`); its trace writes one operation per step (` 37 + 48 = 85\\n`). Demo teachers are taught
BUG RULES: deterministic functions of the numbers visible in a step. Random noise in training
data is averaged away and never shows up in a trained model; a rule is learnt and reproduced, so
each teacher fails on exactly the steps its rule names and is reliable elsewhere, which is what
makes teachers complementary in a measurable way.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LIMIT = 10_000  # every value of a correct chain stays in [0, LIMIT)
HELDOUT_BUCKETS = 10  # one bucket in ten of the question hash is held out
WORDS = {"+": "add", "-": "subtract", "*": "multiply by"}
ANSWER = re.compile(r"\s*The final answer is (-?\d+)\.?\s*")
QUESTION = re.compile(r"Start with (\d+)\. (.+)\.")
OPERATION = re.compile(r"(add|subtract|multiply by) (\d+)", re.IGNORECASE)
STEP = re.compile(r"\s*(-?\d+) ([-+*]) (\d+) = (-?\d+)\s*")

Step = tuple[int, str, int, int]  # a, op, b, written result
Bug = Callable[[int, str, int], int | None]


def apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (op symbol, operand)

    @property
    def question(self) -> str:
        """Also the problem's canonical string: the held-out split hashes it."""
        words = ", ".join(f"{WORDS[op]} {b}" for op, b in self.ops)
        return f"Start with {self.start}. {words[0].upper()}{words[1:]}."

    @property
    def gold(self) -> int:
        value = self.start
        for op, b in self.ops:
            value = apply(value, op, b)
        return value


def parse_question(text: str) -> Problem | None:
    """The problem a question states, or None for text of another shape."""
    match = QUESTION.fullmatch(text)
    if match is None:
        return None
    symbols = {word: op for op, word in WORDS.items()}
    ops = [(symbols[w.lower()], int(b)) for w, b in OPERATION.findall(match.group(2))]
    return Problem(int(match.group(1)), tuple(ops))


def random_problem(rng: random.Random) -> Problem:
    """Operands are small (2-99 for +/-, 2-9 for *) so steps are column arithmetic; an operation
    that would leave [0, LIMIT) is drawn again."""
    value = start = rng.randint(10, 99)
    ops = []
    for _ in range(rng.randint(3, 5)):
        while True:
            op = rng.choice("+-*")
            b = rng.randint(2, 9) if op == "*" else rng.randint(2, 99)
            if 0 <= apply(value, op, b) < LIMIT:
                break
        ops.append((op, b))
        value = apply(value, op, b)
    return Problem(start, tuple(ops))


def split_of(problem: Problem) -> str:
    """By hash of the question, not by seed: held-out problems never appear in any training set,
    whatever seeds and sizes either side uses."""
    digest = hashlib.sha256(problem.question.encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_BUCKETS == 0 else "train"


def sample_problems(count: int, seed: int, split: str = "train") -> list[Problem]:
    """`count` distinct problems of one split, the same for the same seed."""
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < count:
        problem = random_problem(rng)
        if split_of(problem) == split and problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


# Bug rules: (a, op, b) -> the wrong result the teacher writes, or None where it is right.


def drop_big_multiply_carry(a: int, op: str, b: int) -> int | None:
    """Teacher A: in `a * b`, when (ones digit of a) * b >= 30, the carry out of the ones column
    (3 or more) is dropped: 38 * 4 = 122, not 152."""
    ones = (a % 10) * b
    if op != "*" or ones < 30:
        return None
    return a * b - ones // 10 * 10


def drop_carry_after_7_or_8(a: int, op: str, b: int) -> int | None:
    """Teacher B: when the second number ends in 7 or 8, the carry (in +) or borrow (in -) of the
    ones column is dropped: 35 + 47 = 72, 63 - 28 = 45; steps with no carry/borrow are right."""
    if op not in "+-" or b % 10 not in (7, 8):
        return None
    if op == "+" and a % 10 + b % 10 >= 10:
        return a + b - 10
    if op == "-" and a % 10 < b % 10:
        return a - b + 10
    return None


def drop_tens_borrow(a: int, op: str, b: int) -> int | None:
    """Teacher C: in `a - b`, when the tens column needs a borrow (after any borrow the ones
    column took), the hundreds are not decremented: 240 - 52 = 288, not 188."""
    if op != "-":
        return None
    ones_borrow = int(a % 10 < b % 10)
    if (a // 10) % 10 - ones_borrow >= (b // 10) % 10:
        return None
    return a - b + 100


BUGS: dict[str, Bug] = {"a": drop_big_multiply_carry, "b": drop_carry_after_7_or_8, "c": drop_tens_borrow}


def firing_rules(problem: Problem) -> set[str]:
    """The teachers whose bug rule fires somewhere on the problem's correct chain."""
    fired, value = set(), problem.start
    for op, b in problem.ops:
        fired |= {name for name, bug in BUGS.items() if bug(value, op, b) is not None}
        value = apply(value, op, b)
    return fired


def written_result(a: int, op: str, b: int, bug: Bug | None) -> int:
    wrong = bug(a, op, b) if bug else None
    return apply(a, op, b) if wrong is None else wrong


@dataclass(frozen=True)
class Trace:
    steps: tuple[str, ...]  # each step's text after its `### Step k.` header
    answer: str  # the text after `</think>`

    @property
    def value(self) -> int | None:
        return read_answer(self.answer)


def answer_text(value: int) -> str:
    return f" The final answer is {value}."


def read_answer(text: str) -> int | None:
    match = ANSWER.fullmatch(text)
    return int(match.group(1)) if match else None


def render_trace(problem: Problem, bug: Bug | None = None) -> Trace:
    """A buggy teacher continues from its own wrong value, as a model that believes it would."""
    value, steps = problem.start, []
    for op, b in problem.ops:
        result = written_result(value, op, b, bug)
        steps.append(f" {value} {op} {b} = {result}\n")
        value = result
    return Trace(tuple(steps), answer_text(value))


def parse_step(text: str) -> Step | None:
    match = STEP.fullmatch(text)
    if match is None:
        return None
    a, op, b, c = match.groups()
    return int(a), op, int(b), int(c)


def check_step(text: str) -> bool | None:
    """Whether the step's arithmetic is right; None when it is not `a op b = c`."""
    step = parse_step(text)
    return None if step is None else apply(*step[:3]) == step[3]


@dataclass(frozen=True)
class TraceCheck:
    valid: tuple[bool | None, ...]  # check_step of each step
    follows_question: bool  # one step per operation, in order, each starting from the last result
    follows_prefix: bool  # the same for the steps there are, however many

    @property
    def sound(self) -> bool:
        return self.follows_question and all(v is True for v in self.valid)

    @property
    def sound_prefix(self) -> bool:
        """Every step so far right and following the question; fewer steps than operations is fine."""
        return self.follows_prefix and all(v is True for v in self.valid)


def check_trace(problem: Problem, steps: Sequence[str]) -> TraceCheck:
    """A wrong step followed consistently still follows the question: validity and chain
    consistency are separate, so a wrong value carried along is blamed on one step only."""
    parsed = [parse_step(s) for s in steps]
    valid = tuple(None if p is None else apply(*p[:3]) == p[3] for p in parsed)
    prefix, expected = len(parsed) <= len(problem.ops), problem.start
    for step, (op, b) in zip(parsed, problem.ops):
        if step is None or step[:3] != (expected, op, b):
            prefix = False
            break
        expected = step[3]
    return TraceCheck(valid, prefix and len(parsed) == len(problem.ops), prefix)


def problem_row(index: int, problem: Problem) -> dict[str, str]:
    """A line of cordgen's input format."""
    return {"id": f"demo-{index:04d}", "question": problem.question, "answer": str(problem.gold)}


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Writes held-out demo problems as cordgen input JSONL.")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    for index, problem in enumerate(sample_problems(args.count, args.seed, "heldout")):
        print(json.dumps(problem_row(index, problem)))


if __name__ == "__main__":
    main()
