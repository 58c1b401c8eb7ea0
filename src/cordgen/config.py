"""Recipes: every setting of a run, validated before any model is loaded.

All models forbid unknown keys, so a typo in a YAML recipe is an error rather than a silently
ignored default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cordgen.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSettings(StrictModel):
    """How one vLLM engine is loaded. Two roles with equal settings share one engine."""

    model: str = Field(min_length=1, description="Hugging Face id or local directory")
    tokenizer: str | None = Field(None, description="defaults to the model's own")
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = Field(None, gt=0)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="on CPU builds of vLLM: the fraction of host memory"
    )
    kv_cache_memory_bytes: int | None = Field(
        None, gt=0, description="explicit KV-cache size; overrides gpu_memory_utilization"
    )
    enable_prefix_caching: bool = True
    block_size: int | None = Field(
        None, gt=0, description="KV-cache block (prefix-cache granularity); vLLM's default if unset"
    )
    max_num_seqs: int | None = Field(None, gt=0)
    enforce_eager: bool = False
    seed: int = 0
    trust_remote_code: bool = False


class StepFormat(StrictModel):
    """The prompt-guided step segmentation shared by every teacher and the scorer."""

    marker: str = Field("### Step", min_length=1)
    think_open: str = Field("<think>", min_length=1)
    think_close: str = Field("</think>", min_length=1)


class ChatSettings(StrictModel):
    """Per-model chat rendering: heterogeneous teachers each keep their own template."""

    system_prompt: str | None = None
    chat_template: str | None = Field(
        None, description="a Jinja template (inline or a file path) replacing the tokenizer's"
    )


class SamplingSettings(StrictModel):
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    n: int = Field(1, ge=1, description="candidate steps per beam per round")
    max_step_tokens: int = Field(2048, gt=0)
    max_answer_tokens: int = Field(4096, gt=0)
    seed: int = Field(0, description="base of the per-request seeds")


class TeacherConfig(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    engine: EngineSettings
    chat: ChatSettings = ChatSettings()
    sampling: SamplingSettings = SamplingSettings()


class ScorerConfig(StrictModel):
    """The paper's meta-prover: scores a partial trajectory by how likely it makes the gold answer."""

    name: str = Field("scorer", pattern=NAME_PATTERN)
    engine: EngineSettings
    chat: ChatSettings = ChatSettings()
    answer_suffix: str = "</think> The final answer is "
    reuse_prefix_cache: bool = True
    max_requests_per_call: int = Field(
        256, gt=0, description="bounds the prompt-logprob memory of one engine call"
    )


class Recipe(StrictModel):
    format: StepFormat = StepFormat()
    teachers: list[TeacherConfig] = Field(min_length=1)
    scorer: ScorerConfig

    @model_validator(mode="after")
    def _unique_teacher_names(self) -> Recipe:
        names = [t.name for t in self.teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate teacher name(s): {', '.join(duplicates)}")
        return self


def describe_validation_error(error: ValidationError) -> str:
    """The first problem of a pydantic error, as `field.path: message (got value)`."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] not in {"missing", "extra_forbidden"} and "input" in first:
        given = first["input"]
        if not isinstance(given, (dict, list)):
            message = f"{message} (got {given!r})"
    more = len(error.errors()) - 1
    suffix = f" [+{more} more]" if more else ""
    return f"{location}: {message}{suffix}"


def load_recipe(path: str | Path) -> Recipe:
    """Reads a YAML recipe; any problem becomes a one-line ConfigError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from exc
