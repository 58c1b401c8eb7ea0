"""Recipes: valid ones load, every invalid value is one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cordgen.config import load_recipe
from cordgen.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

VALID = """
teachers:
  - name: a
    engine: {model: org/model-a, tensor_parallel_size: 2}
    sampling: {temperature: 0.6}
  - name: b
    engine: {model: org/model-b}
scorer:
  engine: {model: org/model-a, tensor_parallel_size: 2}
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_valid_recipe_loads_with_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, VALID))
    assert [t.name for t in recipe.teachers] == ["a", "b"]
    assert recipe.teachers[1].sampling.temperature == 0.6
    assert recipe.teachers[0].engine.enable_prefix_caching is True
    assert recipe.teachers[0].engine.trust_remote_code is False
    assert recipe.scorer.answer_suffix == "</think> The final answer is "
    assert recipe.scorer.engine == recipe.teachers[0].engine  # same settings: one shared engine


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    assert load_recipe(path).teachers


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("temperature: 0.6", "temperature: -1"),
            "teachers.0.sampling.temperature: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            ("temperature: 0.6", "temprature: 0.6"),
            "teachers.0.sampling.temprature: Extra inputs are not permitted",
        ),
        (
            ("tensor_parallel_size: 2}\n    sampling", "tensor_parallel_size: 0}\n    sampling"),
            "teachers.0.engine.tensor_parallel_size: Input should be greater than or equal to 1",
        ),
        (("name: b", "name: a"), "duplicate teacher name(s): a"),
        (("name: b", "name: 'b c'"), "teachers.1.name: String should match pattern"),
        (("scorer:\n  engine: {model: org/model-a, tensor_parallel_size: 2}", ""), "scorer: Field required"),
    ],
)
def test_invalid_values_name_file_and_field(tmp_path, edit, expected):
    path = write(tmp_path, VALID.replace(*edit))
    with pytest.raises(ConfigError) as error:
        load_recipe(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe.yaml: line 3 invalid YAML"):
        load_recipe(write(tmp_path, "teachers:\n  - name: a\n  engine: [\n"))


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (
            "{adaptive: {min_teachers: 0}}",
            "search.adaptive.min_teachers: Input should be greater than or equal to 1",
        ),
        ("{schedule: adaptive, strategy: curate}", "search.schedule: adaptive schedules step proposals"),
        ("{schedule: some}", "search.schedule: Input should be 'all' or 'adaptive'"),
        ("{adaptive: {phases: [2, 2]}}", "search.adaptive.phases: Value error, phases must be increasing"),
        ("{adaptive: {floor: 1.5}}", "search.adaptive.floor: Input should be less than or equal to 1"),
    ],
)
def test_a_bad_schedule_is_one_line_naming_the_field(tmp_path, search, expected):
    path = write(tmp_path, VALID + f"search: {search}\n")
    with pytest.raises(ConfigError) as error:
        load_recipe(path)
    assert expected in str(error.value) and "\n" not in str(error.value)
