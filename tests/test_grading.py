"""Answer grading with the real math-verify, in worker processes that can be killed."""

from __future__ import annotations

import time

import pytest

from cordgen.grading import grade_answer, grade_answers

CASES = [
    ("\\frac{1}{2}", "0.5", "correct"),
    ("2\\sqrt{2}", "\\sqrt{8}", "correct"),
    ("$2\\sqrt{2}$", " The final answer is \\sqrt{8}.", "correct"),
    ("255", " The final answer is 255.", "correct"),
    ("255", " The final answer is 254.", "wrong"),
    ("0.75", "So the area is \\boxed{\\frac{3}{4}}", "correct"),
    ("2", " The final answer is 2\\sqrt{2}.", "wrong"),  # math-verify alone reads this as 2
    ("12", "3 boxes of 4.\nSo the answer is 12.", "correct"),
    ("Paris", " The final answer is Paris.", "correct"),
    ("Paris", " The final answer is London.", "wrong"),
    ("Paris", " The final answer is Sirap.", "wrong"),  # same letters, same product of symbols
    ("\\text{New York}", " The final answer is new york.", "correct"),
    ("1", "", "unparsable"),
    ("1", " \n ", "unparsable"),
]

# Exact integer powers: sympy works out 10^(10^10) digit by digit, for far longer than any test.
HANGS = ("1", " The final answer is $10^{10^{10^{10}}}$.")


@pytest.mark.parametrize(("gold", "response", "status"), CASES)
def test_grade_answer(gold, response, status):
    grade = grade_answer(gold, response)
    assert grade.status == status
    assert grade.correct == {"correct": True, "wrong": False, "unparsable": None}[status]


def test_the_prediction_is_the_stated_answer():
    assert grade_answer("0.75", "Thus \\boxed{\\frac{3}{4}}").predicted == "\\frac{3}{4}"
    assert grade_answer("Paris", " The final answer is London.").predicted == "London"
    assert grade_answer("1", "").predicted is None


def test_the_pool_grades_like_the_worker():
    grades = grade_answers([(gold, response) for gold, response, _ in CASES])
    assert [grade.status for grade in grades] == [status for _, _, status in CASES]


def test_a_hanging_item_times_out_and_the_rest_are_still_graded():
    pairs = [
        ("255", " The final answer is 255."),
        HANGS,
        ("\\frac{1}{2}", "0.5"),
        ("3", "The final answer is 4."),
    ]
    start = time.monotonic()
    grades = grade_answers(pairs * 2, timeout_s=2, workers=2)
    assert [grade.status for grade in grades] == ["correct", "timeout", "correct", "wrong"] * 2
    assert grades[1].correct is None and grades[1].predicted is None
    assert time.monotonic() - start < 60  # the hanging item alone would run for many minutes


def test_order_is_kept():
    pairs = [(str(n), f" The final answer is {n if n % 3 else n + 1}.") for n in range(20)]
    grades = grade_answers(pairs, workers=3)
    assert [grade.predicted for grade in grades] == [str(n if n % 3 else n + 1) for n in range(20)]
    assert [grade.correct for grade in grades] == [n % 3 != 0 for n in range(20)]


def test_a_worker_that_raises_is_an_error_and_the_rest_are_graded():
    grades = grade_answers([(None, "1"), ("1", "1")])
    assert [grade.status for grade in grades] == ["error", "correct"]


def test_nothing_to_grade():
    assert grade_answers([]) == []
