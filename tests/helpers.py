"""Run directories and records made without engines, for store and CLI tests."""

from __future__ import annotations

from pathlib import Path

import orjson
import yaml

from cordgen.config import Recipe
from cordgen.records import TraceRecord, Usage, trajectory_record
from cordgen.search import Beam, ClosedBy, FinalAnswer, FinishReason, Step


def write_problems(path: Path, count: int = 6) -> Path:
    rows = [
        {"id": f"q{i}", "question": f"Start with {i}. Add 1.", "answer": str(i + 1)} for i in range(count)
    ]
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


def write_recipe(tmp_path: Path, **search) -> Path:
    """A recipe over two stand-in model directories: enough for every check made before a model
    loads, which is all the tests using it need."""
    models = {}
    for name in ("a", "b"):
        models[name] = tmp_path / "models" / name
        models[name].mkdir(parents=True, exist_ok=True)
    data = {
        "seed": 3,
        "teachers": [
            {"name": n, "engine": {"model": str(m)}, "sampling": {"temperature": 0.6}}
            for n, m in models.items()
        ],
        "scorer": {"name": "a", "engine": {"model": str(models["a"])}},
        "search": {"beam_width": 2, **search},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_record(problem_id: str, answer: str = "1", text: str = " 1 + 1 = 2\n") -> TraceRecord:
    beam = Beam((Step(text, ("a",), 6, FinishReason.END_OF_THINKING, 1, 0.5),), ClosedBy.END_OF_THINKING)
    final = FinalAnswer("a", f" The final answer is {answer}.", 7, FinishReason.EOS)
    return TraceRecord(
        cordgen_version="test",
        id=problem_id,
        question=f"question {problem_id}",
        answer=answer,
        strategy="cord",
        teachers=["a", "b"],
        result=trajectory_record(beam, final),
        alternatives=[],
        usage=Usage(rounds=1, generated_tokens={"a": 13}, scored_requests=1, scored_tokens=20),
    )


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes, to prove a command changed nothing."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def resolved(recipe_path: Path, **overrides) -> Recipe:
    from cordgen.config import resolve_recipe

    return resolve_recipe(recipe_path, overrides)
