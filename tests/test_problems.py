"""Input problems: valid files load in order, every bad row is one line naming file, line and field."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cordgen.errors import CordgenError
from cordgen.problems import Problem, load_problems, shard_of

OK = '{"question": "Q", "answer": "a"}'  # a valid row without an id


def write(tmp_path, content: str | bytes) -> Path:
    path = tmp_path / "problems.jsonl"
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def load_error(path: Path, **fields: str) -> str:
    with pytest.raises(CordgenError) as error:
        load_problems(path, **fields)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            '{"id": "a", "question": "What is  1+1?\\n", "answer": " 2 "}\n'
            '{"id": "b", "question": "Q", "answer": "x"}\n',
            [Problem("a", "What is  1+1?\n", "2"), Problem("b", "Q", "x")],
        ),
        (
            '{"id": 7, "question": "Q1", "answer": "a"}\n{"id": 0, "question": "Q2", "answer": "b"}',
            [Problem("7", "Q1", "a"), Problem("0", "Q2", "b")],
        ),
        (
            '\n{"question": "Q2", "answer": "a"}\n  \t\n{"question": "Q4", "answer": "b"}\n\n',
            [Problem("2", "Q2", "a"), Problem("4", "Q4", "b")],
        ),
        (
            '{"question": "Q", "answer": 42}\r\n{"question": "Q", "answer": 2.5}\r\n'
            '{"question": "Q", "answer": -3}',
            [Problem("1", "Q", "42"), Problem("2", "Q", "2.5"), Problem("3", "Q", "-3")],
        ),
        ('{"id": "é", "question": "∫ x dx", "answer": "x²/2"}', [Problem("é", "∫ x dx", "x²/2")]),
    ],
    ids=["string-ids", "int-ids", "ids-from-line-numbers", "numeric-answers", "unicode"],
)
def test_valid_files_load_in_order(tmp_path, content, expected):
    assert load_problems(write(tmp_path, content)).problems == expected


def test_configured_field_names(tmp_path):
    path = write(tmp_path, '{"uid": "u1", "problem": "Q", "solution": "4", "id": "ignored"}')
    loaded = load_problems(path, id_field="uid", question_field="problem", answer_field="solution")
    assert loaded.problems == [Problem("u1", "Q", "4")]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"{OK}\n{OK[:-1]},}}", "2: invalid JSON (trailing comma is not allowed at column 32)"),
        (f"{OK}\n{OK} x", "2: invalid JSON (unexpected content after document at column 34)"),
        (f"\n{OK}\n[1, 2]", "3: expected a JSON object, got list"),
        ('"text"', "1: expected a JSON object, got str"),
        ('{"answer": "a"}', "1: question: missing field 'question'"),
        ('{"question": "Q"}', "1: answer: missing field 'answer'"),
        ('{"question": "  \\n ", "answer": "a"}', "1: question: empty"),
        ('{"question": "Q", "answer": " "}', "1: answer: empty"),
        ('{"id": "", "question": "Q", "answer": "a"}', "1: id: empty"),
        ('{"id": " ", "question": "Q", "answer": "a"}', "1: id: empty"),
        ('{"question": 3, "answer": "a"}', "1: question: expected a string, got int"),
        ('{"question": null, "answer": "a"}', "1: question: expected a string, got null"),
        ('{"question": "Q", "answer": true}', "1: answer: expected a string or a number, got bool"),
        ('{"question": "Q", "answer": ["a"]}', "1: answer: expected a string or a number, got list"),
        ('{"id": 1.5, "question": "Q", "answer": "a"}', "1: id: expected a string or an integer, got float"),
        ('{"id": false, "question": "Q", "answer": "a"}', "1: id: expected a string or an integer, got bool"),
        ('{"id": null, "question": "Q", "answer": "a"}', "1: id: expected a string or an integer, got null"),
        ('{"id": {}, "question": "Q", "answer": "a"}', "1: id: expected a string or an integer, got dict"),
        ('{"id": [], "question": "Q", "answer": "a"}', "1: id: expected a string or an integer, got list"),
        (
            '{"id": 9, "question": "Q", "answer": "a"}\n{"id": "7", "question": "Q", "answer": "a"}\n'
            '\n{"id": 7, "question": "Q", "answer": "a"}',
            "4: id: duplicate id '7' (first on line 2)",
        ),
        (
            f'{{"id": "3", "question": "Q", "answer": "a"}}\n\n{OK}',
            "3: id: duplicate id '3' (first on line 1)",
        ),
        (f"{OK}\n".encode() + b'{"question": "caf\xe9", "answer": "a"}', "2: not valid UTF-8"),
    ],
)
def test_invalid_rows_name_file_line_and_field(tmp_path, content, expected):
    path = write(tmp_path, content)
    assert load_error(path) == f"{path}:{expected}"


def test_errors_use_configured_field_names(tmp_path):
    path = write(tmp_path, '{"problem": "Q"}')
    message = load_error(path, question_field="problem", answer_field="solution")
    assert message == f"{path}:1: solution: missing field 'solution'"


@pytest.mark.parametrize("content", ["", "\n", "  \n\t\n\n"], ids=["empty", "newline", "blank-lines"])
def test_no_problems_is_an_error(tmp_path, content):
    path = write(tmp_path, content)
    assert load_error(path) == f"{path}: no problems in input"


def test_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    assert load_error(path) == f"{path}: input file not found"


def test_folder_without_input_files(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert load_error(tmp_path) == f"{tmp_path}: no .jsonl, .json or .parquet files in the input folder"


def test_accepts_a_string_path(tmp_path):
    path = write(tmp_path, OK)
    assert load_problems(str(path)).problems == [Problem("1", "Q", "a")]


def test_shard_of_is_pinned_across_processes_and_versions():
    assert shard_of("problem-42", 1000) == 336
    assert shard_of("7", 4) == 2


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 64])
def test_shard_of_is_in_range(num_shards):
    assert {shard_of(f"p{i}", num_shards) for i in range(200)} <= set(range(num_shards))


def test_shard_of_is_roughly_balanced():
    counts = Counter(shard_of(str(i), 4) for i in range(1000))
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(200 <= count <= 300 for count in counts.values()), counts
