"""Recipes: every setting of a run, validated before any model is loaded.

All models forbid unknown keys, so a typo in a YAML recipe is an error rather than a silently
ignored default.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cordgen.errors import ConfigError
from cordgen.templates import load_chat_template

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Marks a setting that changes speed or memory but never results: it stays out of the semantic
# hash, so a resumed run may change it.
THROUGHPUT: dict[str, Any] = {"throughput": True}
# Marks a setting added after runs were made with its default: it enters the semantic hash only
# when set to something else, so those runs still resume.
HASHED_UNLESS_DEFAULT: dict[str, Any] = {"hashed_unless_default": True}
# Marks a path whose file's content, not its name, changes results: the semantic hash holds the
# file's digest, so the file may move but not change between sessions.
CONTENT_HASHED: dict[str, Any] = {"content_hashed": True}


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineDefaults(StrictModel):
    """Engine settings without a model: applied to models named directly on the command line."""

    tokenizer: str | None = Field(None, description="defaults to the model's own")
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = Field(None, gt=0)
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=THROUGHPUT)
    gpus: tuple[int, ...] | None = Field(
        None,
        description="device ids of this engine's worker process (CUDA_VISIBLE_DEVICES); placement: workers",
        json_schema_extra=THROUGHPUT,
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vLLM's default (0.9) if unset; on CPU builds the fraction of host memory, and unset "
        "there with kv_cache_memory_bytes unset, cordgen sizes the KV cache from free memory",
        json_schema_extra=THROUGHPUT,
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="explicit KV-cache size; overrides gpu_memory_utilization",
        json_schema_extra=THROUGHPUT,
    )
    enable_prefix_caching: bool = Field(True, json_schema_extra=THROUGHPUT)
    block_size: int | None = Field(
        None,
        gt=0,
        description="KV-cache block (prefix-cache granularity); vLLM's default if unset (32 on CPU builds)",
        json_schema_extra=THROUGHPUT,
    )
    max_num_seqs: int | None = Field(None, gt=0, json_schema_extra=THROUGHPUT)
    enable_chunked_prefill: bool | None = Field(
        None,
        description="vLLM's default on GPUs; off on CPU builds, which crash on split seeded prompts",
        json_schema_extra=THROUGHPUT,
    )
    enforce_eager: bool = Field(False, json_schema_extra=THROUGHPUT)
    replicas: int = Field(
        1,
        ge=1,
        description="copies of this engine, each serving its share of the problems; placement: ray",
        json_schema_extra=THROUGHPUT,
    )
    seed: int = 0
    trust_remote_code: bool = False


class RemoteEndpoint(StrictModel):
    """An OpenAI-compatible vLLM server (`vllm serve`) running the engine elsewhere. The API key
    is read from the named environment variable when the run starts and is never written down."""

    url: str = Field(pattern=r"^https?://\S+$", description="server root, e.g. http://node3:8000 (or .../v1)")
    served_model_name: str | None = Field(
        None, description="the model name the server answers to; asked of the server if unset"
    )
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="environment variable holding the API key"
    )
    max_concurrent_requests: int = Field(128, gt=0, description="requests in flight at once")
    timeout_s: float = Field(600.0, gt=0, description="per request")
    max_retries: int = Field(3, ge=0, description="for lost connections and 502/503/504 answers")


class EngineSettings(EngineDefaults):
    """How one engine is loaded (or reached). Two roles with equal settings share one engine."""

    model: str = Field(
        min_length=1, description="Hugging Face id or local directory (for a remote engine: its tokenizer)"
    )
    remote: RemoteEndpoint | None = Field(
        None, description="serve this engine from a vLLM server instead", json_schema_extra=THROUGHPUT
    )
    runner: Literal["generate", "pooling"] = Field(
        "generate",
        description="vLLM's runner: pooling for a reward model (scorer.prm sets it)",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )

    @classmethod
    def for_model(cls, model: str, defaults: EngineDefaults) -> EngineSettings:
        return cls(model=model, **defaults.model_dump())


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


class StudentSettings(StrictModel):
    """The student COMPACT measures and `cordgen distill` trains: a transformers model in this
    process, because its hidden states and its in-training weights are needed, not just logprobs."""

    model: str = Field(description="a local directory or a hub id")
    tokenizer: str | None = Field(None, description="defaults to the model's own")
    revision: str | None = None
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")
    device: str = Field("auto", description="auto (cuda when present, else cpu) | cpu | cuda | cuda:N")
    trust_remote_code: bool = False
    chat: ChatSettings = ChatSettings()


class CompatConfig(StrictModel):
    """COMPACT's metric choices. The paper's text gave only its framework figure; each detail it
    leaves open is a setting here, with the default documented in the README."""

    answer_suffix: str = "</think> The final answer is "
    pooling: Literal["last", "mean"] = Field(
        "last", description="consensus embedding: the rationale's last token, or the mean over its tokens"
    )
    layer: int = Field(
        -1, description="hidden-state layer for consensus: -1 the final (normed) one, 0 embeddings"
    )
    epiphany_threshold: float = Field(
        1.0,
        ge=0,
        description="a step whose gain in mean log p(gold answer) exceeds this (nats) is an epiphany",
    )
    beta_consensus: float = 1.0
    beta_adaptability: float = 1.0
    beta_difficulty: float = 1.0
    max_batch_tokens: int = Field(
        8192, gt=0, description="packed tokens per student forward pass", json_schema_extra=THROUGHPUT
    )


class LoraSettings(StrictModel):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class DistillConfig(StrictModel):
    """`cordgen distill`: SFT of the student with each example's loss scaled by its weight."""

    weighting: Literal["compat", "uniform"] = "compat"
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="optimizer steps; -1: as many as the epochs take")
    batch_size: int = Field(8, gt=0, description="examples per device per step")
    gradient_accumulation: int = Field(1, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_length: int = Field(4096, gt=0, description="tokens per example; longer ones are cut at the end")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    lora: LoraSettings | None = None
    recompute_every: int = Field(
        0, ge=0, description="recompute alpha from the current student every N steps; 0: never"
    )
    save_steps: int = Field(
        500, gt=0, description="checkpoint interval, for resuming", json_schema_extra=THROUGHPUT
    )
    logging_steps: int = Field(10, gt=0, json_schema_extra=THROUGHPUT)
    seed: int = 0


class SamplingSettings(StrictModel):
    temperature: float = Field(0.6, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    n: int = Field(1, ge=1, description="candidate steps per beam per round")
    max_step_tokens: int = Field(2048, gt=0)
    max_answer_tokens: int = Field(4096, gt=0)


class TeacherConfig(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    engine: EngineSettings
    chat: ChatSettings = ChatSettings()
    sampling: SamplingSettings = SamplingSettings()


ScorerKind = Literal["predictive", "verifier", "prm", "likelihood", "hybrid", "random"]
HybridJudge = Literal["verifier", "prm", "likelihood"]
VERIFIER_FIELDS = re.compile(r"{(\w*)}")


class VerifierSettings(StrictModel):
    """A generative judge: p(yes) against p(no) for a verdict token after the trajectory and a
    question about its latest step. The question follows the trajectory in the same assistant
    turn, so the judge reads the trajectory from its prefix cache, round after round."""

    engine: EngineSettings | None = Field(
        None, description="the judge model; unset: the scorer's own engine (one call reads both kinds)"
    )
    chat: ChatSettings = Field(ChatSettings(), description="the judge's chat rendering, with its own engine")
    prompt: str = Field(
        "\n\nIs step {step} correct?",
        min_length=1,
        description="follows the trajectory; {step} is the latest step's number, {latest} its text",
    )
    yes: str = Field(" Yes", min_length=1, description="a single token of the judge's tokenizer")
    no: str = Field(" No", min_length=1, description="a single token of the judge's tokenizer")

    @field_validator("prompt")
    @classmethod
    def _only_step_field(cls, value: str) -> str:
        unknown = sorted({f for f in VERIFIER_FIELDS.findall(value) if f not in ("step", "latest")})
        if unknown:
            listed = ", ".join("{" + f + "}" for f in unknown)
            raise ValueError(f"unknown field(s) {listed}; only {{step}} and {{latest}}")
        try:
            value.format(step=1, latest="")
        except (ValueError, IndexError, KeyError) as error:
            raise ValueError(f"not a format string with {{step}} and {{latest}}: {error}") from None
        return value

    @model_validator(mode="after")
    def _distinct_verdicts(self) -> VerifierSettings:
        if self.yes == self.no:
            raise ValueError(f"yes and no are the same verdict {self.yes!r}")
        return self


class PrmSettings(StrictModel):
    """A process reward model in the Qwen2.5-Math-PRM style, run by vLLM's pooling runner: the
    question is the user turn, the assistant turn holds the steps, each followed by `separator`,
    and the model's two-class head at each separator gives p(that step is correct)."""

    engine: EngineSettings = Field(description="the reward model; always loaded with the pooling runner")
    chat: ChatSettings = Field(ChatSettings(), description="the reward model's chat rendering")
    separator: str = Field(
        "<extra_0>", min_length=1, description="follows each step; a single token of the PRM's tokenizer"
    )
    correct_label: int = Field(1, ge=0, description="the head's class index that means correct")

    @field_validator("engine")
    @classmethod
    def _pooling_runner(cls, engine: EngineSettings) -> EngineSettings:
        """Its own engine, never shared with a generating role, whatever the recipe wrote."""
        return engine.model_copy(update={"runner": "pooling"})


class ScorerConfig(StrictModel):
    """Scores each candidate trajectory. `predictive` is the paper's meta-prover: how likely the
    trajectory makes the gold answer; `verifier` a judge's p(the latest step is correct); `prm`
    a process reward model's p(correct) at the latest step; `likelihood` the scorer's own
    confidence in the latest step, exp(mean log p(its tokens | the trajectory before it)); `hybrid`
    ranks by log S + w * log(the other part), the part `hybrid_with` names (unset: the PRM when
    `prm` is set, else the verifier); `random` is the ablation."""

    name: str = Field("scorer", pattern=NAME_PATTERN)
    engine: EngineSettings
    chat: ChatSettings = ChatSettings()
    answer_suffix: str = "</think> The final answer is "
    kind: ScorerKind = Field(
        "predictive",
        description="predictive | verifier | prm | likelihood | hybrid | random",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )
    verifier: VerifierSettings = Field(VerifierSettings(), json_schema_extra=HASHED_UNLESS_DEFAULT)
    verifier_weight: float = Field(
        1.0,
        ge=0,
        description="hybrid with the verifier: w in log S + w * log p(correct)",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )
    prm: PrmSettings | None = Field(
        None,
        description="the process reward model of kind prm, and of hybrid when set",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )
    prm_weight: float = Field(
        1.0,
        ge=0,
        description="hybrid with the PRM: w in log S + w * log p(correct)",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )
    likelihood_weight: float = Field(
        1.0,
        ge=0,
        description="hybrid with the likelihood: w in log S + w * mean log p(step tokens)",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )
    hybrid_with: HybridJudge | None = Field(
        None,
        description="hybrid's other part; unset: prm when scorer.prm is set, else verifier",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )
    reuse_prefix_cache: bool = Field(True, json_schema_extra=THROUGHPUT)
    max_requests_per_call: int = Field(
        256,
        gt=0,
        description="bounds the prompt-logprob memory of one engine call",
        json_schema_extra=THROUGHPUT,
    )

    @model_validator(mode="after")
    def _prm_named(self) -> ScorerConfig:
        """A reward model has no default: kind prm must name one."""
        if self.kind == "prm" and self.prm is None:
            raise ValueError("kind prm needs scorer.prm (the reward model's engine)")
        if self.hybrid_with == "prm" and self.prm is None:
            raise ValueError("hybrid_with prm needs scorer.prm (the reward model's engine)")
        if self.hybrid_with is not None and self.kind != "hybrid":
            raise ValueError(f"hybrid_with is read only by kind hybrid, not by kind {self.kind}")
        return self

    @property
    def components(self) -> tuple[str, ...]:
        """The scores this kind reads: a hybrid reads two and ranks by their weighted log sum."""
        if self.kind == "hybrid":
            return ("predictive", self.hybrid_with or ("verifier" if self.prm is None else "prm"))
        return (self.kind,)

    @property
    def judge(self) -> tuple[EngineSettings, ChatSettings] | None:
        """The verifier's engine and chat settings, for the kinds that read one."""
        if "verifier" not in self.components:
            return None
        if self.verifier.engine is None:
            return self.engine, self.chat
        return self.verifier.engine, self.verifier.chat

    def engines(self) -> dict[EngineSettings, str]:
        """The engines this scorer reads, each with the role name it loads under."""
        engines: dict[EngineSettings, str] = {}
        if {"predictive", "likelihood"} & set(self.components):
            engines[self.engine] = self.name
        if self.judge is not None:
            judge = self.judge[0]
            engines.setdefault(judge, self.name if judge == self.engine else f"{self.name}-verifier")
        if "prm" in self.components and self.prm is not None:
            engines.setdefault(self.prm.engine, f"{self.name}-prm")
        return engines


Strategy = Literal["cord", "single", "curate"]


Schedule = Literal["all", "adaptive"]
Credit = Literal["final", "round"]


class AdaptiveSettings(StrictModel):
    """`search.schedule: adaptive`: which teachers propose on a beam, from a Beta posterior of
    "a proposal of this teacher at this phase was kept" (see `cordgen.schedule`)."""

    phases: tuple[int, ...] = Field(
        (1, 2, 4, 8, 16, 32),
        min_length=1,
        description="the last step index of each phase but the open-ended last one: 1, 2, 3-4, 5-8, ...",
    )
    credit: Credit = Field(
        "final",
        description="what counts as a teacher's win: final, a step of a result trace (the warm start's "
        "records tell); round, a step that survived its round's selection (also this problem's own so far)",
    )
    relative_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="a teacher is asked where its sampled keep rate is at least this share of the best one's",
    )
    fill_beams: bool = Field(
        True,
        description="ask every teacher on a problem whose frontier, asking min_teachers per beam, could "
        "not fill beam_width (the first round, mostly): each distinct step becomes a beam, and it is cheap",
    )
    floor: float = Field(
        0.05, ge=0, le=1, description="each teacher is asked at least this often on each beam"
    )
    min_teachers: int = Field(
        2,
        ge=1,
        description="teachers asked on each beam, at the least (every one, where there are fewer): "
        "two keep a choice between candidates on every beam",
    )
    prior_strength: float = Field(
        1.0,
        ge=0,
        description="what one proposal of the warm start counts for: below 1, a large warm start "
        "weighs less against this problem's own counts",
    )
    warm_start: str | None = Field(
        None,
        description="a finished run directory or records JSONL; its per-teacher, per-phase counts: the prior",
        json_schema_extra=CONTENT_HASHED,
    )

    @field_validator("phases")
    @classmethod
    def _increasing(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if value[0] < 1 or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"phases must be increasing step indexes from 1, got {list(value)}")
        return value


class SearchConfig(StrictModel):
    strategy: Strategy = Field("cord", description="cord | single (one teacher) | curate (best whole trace)")
    schedule: Schedule = Field(
        "all",
        description="all: every teacher on every beam (the paper); adaptive: a subset per beam",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )
    adaptive: AdaptiveSettings = Field(AdaptiveSettings(), json_schema_extra=HASHED_UNLESS_DEFAULT)
    beam_width: int = Field(4, ge=1, description="B: partial trajectories kept per problem")
    max_steps: int = Field(64, ge=1, description="rounds before a problem's live beams are closed")
    thinking_budget: int = Field(16384, gt=0, description="tokens of thinking before a beam is closed")
    curate_samples: int = Field(4, ge=1, description="whole traces per teacher under `curate`")
    pipeline_groups: int = Field(
        1,
        ge=1,
        description="groups of problems taking turns, so the scorer reads one while teachers write the next",
        json_schema_extra=THROUGHPUT,
    )


class InputConfig(StrictModel):
    path: str | None = Field(
        None,
        description="JSONL, JSON, Parquet, a folder of them, a save_to_disk folder or hf:NAME[:CONFIG]",
        json_schema_extra=THROUGHPUT,  # the content hash is checked instead
    )
    split: str = Field(
        "train",
        min_length=1,
        description="the split of a dataset (hf: or save_to_disk)",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )
    id_field: str = "id"
    question_field: str = "question"
    answer_field: str = "answer"
    answer_from: str | None = Field(
        None,
        min_length=1,
        description="take the gold answer from the last \\boxed{} of this field's text",
        json_schema_extra=HASHED_UNLESS_DEFAULT,
    )


class OutputConfig(StrictModel):
    path: str | None = Field(None, description="the run directory", json_schema_extra=THROUGHPUT)


Routing = Literal["affinity", "round_robin"]


class PlacementConfig(StrictModel):
    """Which devices engines run on: all of those cordgen sees (`shared`), or each engine on the
    devices its `gpus` names (`workers`), each local engine in a worker process of its own that
    dies with cordgen; or each replica of each engine in a Ray actor anywhere on a Ray cluster
    (`ray`), released when cordgen ends."""

    mode: Literal["shared", "workers", "ray"] = "shared"
    share_gpus: bool = Field(False, description="allow two engines on one device")
    ray_address: str | None = Field(
        None,
        description="placement: ray. The cluster to join (`auto`, host:port, ray://host:port); unset: "
        "RAY_ADDRESS, else a Ray started for this run on this machine, bound to 127.0.0.1",
    )
    cpus_per_replica: int = Field(
        1, ge=1, description="placement: ray. CPUs each replica reserves (its threads on CPU builds)"
    )
    replica_restarts: int = Field(
        3, ge=0, description="placement: ray. Times Ray restarts a replica whose process or node died"
    )
    routing: Routing = Field(
        "affinity",
        description="placement: ray. affinity: each problem to one replica, where its prefixes are "
        "cached; round_robin: spread evenly (for comparison)",
    )
    replica_timeout_s: float = Field(
        600.0,
        gt=0,
        description="placement: ray. How long a replica may take to start, or to come back after a restart",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _former_name(cls, value: Any) -> Any:
        """`in_process` was `shared`'s name before every engine moved into a worker process."""
        return "shared" if value == "in_process" else value


class Recipe(StrictModel):
    seed: int = Field(0, description="base of every per-request sampling seed")
    format: StepFormat = StepFormat()
    engine_defaults: EngineDefaults = EngineDefaults()
    teachers: list[TeacherConfig] = Field(min_length=1)
    scorer: ScorerConfig
    search: SearchConfig = SearchConfig()
    input: InputConfig = InputConfig()
    output: OutputConfig = OutputConfig()
    placement: PlacementConfig = Field(PlacementConfig(), json_schema_extra=THROUGHPUT)

    @model_validator(mode="after")
    def _unique_teacher_names(self) -> Recipe:
        names = [t.name for t in self.teachers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate teacher name(s): {', '.join(duplicates)}")
        if self.search.strategy == "single" and len(self.teachers) != 1:
            raise ValueError(f"strategy 'single' needs exactly one teacher, got {len(self.teachers)}")
        if self.search.schedule == "adaptive" and self.search.strategy == "curate":
            raise ValueError("search.schedule: adaptive schedules step proposals; strategy 'curate' has none")
        return self


INPUT_OVERRIDES = ("split", "id_field", "question_field", "answer_field", "answer_from")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_source(model: str) -> str:
    """A local directory, or a hub id; anything else is a path that does not exist."""
    local = Path(model).expanduser()
    if local.exists():
        return str(local)
    if HUB_ID.match(model) and not model.startswith((".", "~")):
        return model
    raise ConfigError(f"model path does not exist: {model}")


def check_engine_sources(name: str, engine: EngineSettings, chat: ChatSettings) -> None:
    resolve_model_source(engine.model)
    if engine.tokenizer is not None:
        resolve_model_source(engine.tokenizer)
    try:
        load_chat_template(chat.chat_template)
    except ConfigError as error:
        raise ConfigError(f"{name}: {error}") from None


def check_role_sources(role: TeacherConfig | ScorerConfig) -> None:
    """The role's models, tokenizers and chat templates exist, before anything loads."""
    check_engine_sources(role.name, role.engine, role.chat)
    if isinstance(role, ScorerConfig) and role.judge is not None:
        check_engine_sources(f"{role.name}.verifier", *role.judge)
    if isinstance(role, ScorerConfig) and "prm" in role.components and role.prm is not None:
        check_engine_sources(f"{role.name}.prm", role.prm.engine, role.prm.chat)


def check_sources(recipe: Recipe) -> None:
    for role in [*recipe.teachers, recipe.scorer]:
        check_role_sources(role)


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


def _validated(data: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from exc


def _model_teacher(spec: str, recipe_defaults: EngineDefaults, taken: set[str]) -> TeacherConfig:
    """A teacher named on the command line by model id or path, named after its last part."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(spec.rstrip("/")).name).lstrip("-._") or "teacher"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    return TeacherConfig(name=name, engine=EngineSettings.for_model(spec, recipe_defaults))


def looks_like_model(spec: str) -> bool:
    return "/" in spec or Path(spec).expanduser().exists()


def pick_teachers(recipe: Recipe | None, specs: list[str]) -> list[TeacherConfig]:
    """Teachers by recipe name, or by model id / path with the recipe's engine defaults."""
    known = {t.name: t for t in recipe.teachers} if recipe else {}
    defaults = recipe.engine_defaults if recipe else EngineDefaults()
    chosen: list[TeacherConfig] = []
    for spec in specs:
        if spec in known:
            chosen.append(known[spec])
        elif looks_like_model(spec):
            chosen.append(_model_teacher(spec, defaults, {t.name for t in chosen} | set(known)))
        else:
            names = ", ".join(known) or "none (no --config given)"
            raise ConfigError(f"--teachers: unknown teacher {spec!r}; the recipe has: {names}")
    return chosen


def pick_scorer(recipe: Recipe | None, spec: str, teachers: list[TeacherConfig]) -> ScorerConfig:
    """A scorer by name (the recipe's scorer or any teacher, sharing its engine) or by model."""
    template = recipe.scorer if recipe else None
    suffix = {"answer_suffix": template.answer_suffix} if template else {}
    if template is not None and spec == template.name:
        return template
    by_name = {t.name: t for t in [*(recipe.teachers if recipe else []), *teachers]}
    if spec in by_name:
        return ScorerConfig(name=spec, engine=by_name[spec].engine, chat=by_name[spec].chat, **suffix)
    if looks_like_model(spec):
        defaults = recipe.engine_defaults if recipe else EngineDefaults()
        return ScorerConfig(engine=EngineSettings.for_model(spec, defaults), **suffix)
    raise ConfigError(f"--scorer: unknown scorer {spec!r}; name a teacher, the recipe's scorer or a model")


def resolve_recipe(path: str | Path | None, overrides: dict[str, Any]) -> Recipe:
    """The recipe file (if any) with command-line overrides applied and validated again.

    `overrides` keys: teachers (list of names/models), scorer, input, out, beam_width,
    max_steps, strategy, schedule, warm_start, seed, and the `input:` settings split, id_field,
    question_field, answer_field, answer_from; None means "keep the recipe's". Without a recipe, the first
    teacher also scores, as the paper's strongest teacher does.
    """
    recipe = load_recipe(path) if path is not None else None
    given = {k: v for k, v in overrides.items() if v is not None}
    if recipe is None and "teachers" not in given:
        raise ConfigError("give a recipe with --config or the teachers with --teachers")
    teachers = pick_teachers(recipe, given["teachers"]) if "teachers" in given else recipe.teachers
    if "scorer" in given:
        scorer = pick_scorer(recipe, given["scorer"], teachers)
    elif recipe is not None:
        scorer = recipe.scorer
    else:
        scorer = pick_scorer(None, teachers[0].name, teachers)
    data = recipe.model_dump() if recipe else {}
    data["teachers"] = [t.model_dump() for t in teachers]
    data["scorer"] = scorer.model_dump()
    search = data.setdefault("search", {})
    for key in ("beam_width", "max_steps", "strategy", "schedule"):
        if key in given:
            search[key] = given[key]
    if "warm_start" in given:
        search.setdefault("adaptive", {})["warm_start"] = str(given["warm_start"])
    if "seed" in given:
        data["seed"] = given["seed"]
    inputs = data.setdefault("input", {})
    if "input" in given:
        inputs["path"] = str(given["input"])
    for key in INPUT_OVERRIDES:
        if key in given:
            inputs[key] = given[key]
    if "out" in given:
        data.setdefault("output", {})["path"] = str(given["out"])
    return _validated(data, "command line" if recipe is None else f"{path} with command-line overrides")


def semantic_view(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The settings that change results (models, prompts, search, sampling, seeds), as plain data."""
    view: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field.json_schema_extra == THROUGHPUT or (
            field.json_schema_extra == HASHED_UNLESS_DEFAULT and value == field.default
        ):
            continue
        if field.json_schema_extra == CONTENT_HASHED and value is not None:
            value = f"sha256:{content_digest(value, prefix + name)}"
        elif isinstance(value, BaseModel):
            value = semantic_view(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            value = [semantic_view(v) if isinstance(v, BaseModel) else v for v in value]
        view[name] = value
    return view


def records_file(path: str | Path) -> Path:
    """A run directory's records, or the records file itself."""
    path = Path(path)
    return path / "results.jsonl" if path.is_dir() else path


def content_digest(path: str | Path, field: str) -> str:
    file = records_file(path)
    if not file.is_file():
        raise ConfigError(f"{field}: no records at {file}")
    return hashlib.sha256(file.read_bytes()).hexdigest()


def semantic_hash(recipe: Recipe) -> str:
    return hashlib.sha256(orjson.dumps(semantic_view(recipe), option=orjson.OPT_SORT_KEYS)).hexdigest()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def describe_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """`search.beam_width (4 -> 2), ...` for the semantic settings that differ."""
    before, after = flatten(old), flatten(new)
    changed = [k for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
    parts = [f"{k} ({before.get(k, '-')!r} -> {after.get(k, '-')!r})" for k in changed[:limit]]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(parts) + more
