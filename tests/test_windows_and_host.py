"""Beams closed by a context window, one-line engine start failures, engines fitted to a CPU host,
window checks and the recipe settings that came with them: all without an engine."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from pydantic import ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from cordgen.config import EngineSettings, Recipe, SearchConfig, load_recipe, semantic_hash
from cordgen.engines.placement import (
    CPU_BLOCK_MULTIPLE,
    HOST_KV_CAP,
    HOST_KV_SHARE,
    fit_engines_to_host,
    fit_recipe_to_host,
)
from cordgen.engines.startup import start_failure
from cordgen.errors import ConfigError
from cordgen.search import (
    Beam,
    Candidate,
    ClosedBy,
    FinishReason,
    ProblemSearch,
    Step,
    StepCandidate,
    collapse,
    out_of_context,
)
from cordgen.windows import capped_note, engine_window, thinking_room

STEP, END, CONTEXT = FinishReason.STEP, FinishReason.END_OF_THINKING, FinishReason.CONTEXT
MiB, GiB = 1 << 20, 1 << 30


def proposal(teacher: str, text: str, finish=STEP) -> StepCandidate:
    return StepCandidate(teacher, text, 5, finish)


def candidate(parent: int, text: str, finish=STEP) -> Candidate:
    return Candidate(parent, Step(text, ("a",), 5, finish, 2))


def beam(text: str, score: float = 0.1) -> Beam:
    return Beam((Step(text, ("a",), 5, STEP, 1, score),))


def config(**overrides) -> SearchConfig:
    return SearchConfig(**{"beam_width": 2, "max_steps": 10, "thinking_budget": 1000, **overrides})


def two_beams(first: float = 0.1, second: float = 0.1) -> ProblemSearch:
    return ProblemSearch(frontier=(beam(" p0", first), beam(" p1", second)))


class TestContextClosing:
    def test_a_context_proposal_from_any_teacher_drops_its_parent(self):
        proposals = [
            (0, proposal("a", " x")),
            (0, proposal("b", "", CONTEXT)),
            (1, proposal("a", " y")),
            (1, proposal("b", " z")),
        ]
        assert out_of_context(proposals) == frozenset({0})
        assert [(c.parent, c.step.text) for c in collapse(proposals, 2)] == [(1, " y"), (1, " z")]

    def test_full_parents_close_by_context_while_the_others_are_selected(self):
        state = two_beams().advance(
            [candidate(1, " c"), candidate(1, " d")], [0.4, 0.2], config(), full=frozenset({0})
        )
        assert [(b.texts, b.closed_by) for b in state.finished] == [((" p0",), ClosedBy.CONTEXT)]
        assert ClosedBy.CONTEXT.finished
        assert [b.texts for b in state.frontier] == [(" p1", " c"), (" p1", " d")]

    def test_a_parent_whose_only_candidate_is_unscorable_closes_by_context(self):
        state = two_beams().advance([candidate(0, " a"), candidate(1, " b")], [None, 0.3], config())
        assert [(b.texts, b.closed_by) for b in state.finished] == [((" p0",), ClosedBy.CONTEXT)]
        assert [b.texts for b in state.frontier] == [(" p1", " b")]

    def test_a_parent_with_one_scored_candidate_is_not_closed(self):
        state = two_beams().advance([candidate(0, " a"), candidate(0, " b")], [None, 0.3], config())
        assert state.finished == ()
        assert [b.texts for b in state.frontier] == [(" p0", " b")]

    def test_all_candidates_unscorable_close_their_parents_and_end_the_problem(self):
        state = two_beams().advance([candidate(0, " a"), candidate(1, " b")], [None, None], config())
        assert state.frontier == () and not state.stalled and state.rounds == 1
        assert [(b.texts, b.closed_by) for b in state.finished] == [
            ((" p0",), ClosedBy.CONTEXT),
            ((" p1",), ClosedBy.CONTEXT),
        ]
        assert state.done(config())

    def test_no_candidates_at_all_still_stall(self):
        state = two_beams().advance([], [], config())
        assert state.stalled and state.done(config()) and state.finished == ()
        assert state.outcome()[0].closed_by is ClosedBy.STALLED

    def test_a_problem_closed_by_context_yields_its_best_closed_beam(self):
        state = two_beams(0.1, 0.7).advance([], [], config(), full=frozenset({0, 1}))
        result, alternatives = state.outcome()
        assert result.texts == (" p1",) and result.closed_by is ClosedBy.CONTEXT
        assert [b.texts for b in alternatives] == [(" p0",)]

    def test_a_round_of_proposals_closes_the_full_parent_through_collapse(self):
        proposals = [(0, proposal("a", "", CONTEXT)), (0, proposal("b", " x")), (1, proposal("b", " y", END))]
        candidates = collapse(proposals, 2)
        state = two_beams().advance(candidates, [0.9] * len(candidates), config(), out_of_context(proposals))
        assert [(b.texts, b.closed_by) for b in state.finished] == [
            ((" p0",), ClosedBy.CONTEXT),
            ((" p1", " y"), ClosedBy.END_OF_THINKING),
        ]


MAX_LEN = (
    "User-specified max_model_len (4096) is greater than the derived max_model_len "
    "(max_position_embeddings=2048.0 or model_max_length=None in model's config.json)."
)
CPU_MEMORY = (
    "Available memory on node 0 (10.38/11.84 GiB) on startup is less than desired CPU memory utilization "
    "(0.9, 10.65 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the fraction of "
    "CPU memory reserved (despite its name)."
)


@pydantic_dataclass
class ModelConfig:
    """Stands in for vLLM's pydantic ModelConfig, so the error is pydantic's own wrapping."""

    max_model_len: int

    @model_validator(mode="after")
    def _check(self):
        raise ValueError(MAX_LEN + " To allow overriding this maximum, set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1")


def pydantic_error() -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        ModelConfig(max_model_len=4096)
    return caught.value


class TestStartFailure:
    def test_pydantic_wrapped_max_model_len_names_the_models_limit(self):
        error = pydantic_error()
        assert str(error).startswith("1 validation error for ModelConfig\n  Value error, User-specified")
        expected = (
            "max_model_len 4096 exceeds the model's 2048 (max_position_embeddings); lower max_model_len"
        )
        assert start_failure(error) == expected
        text = (
            f"1 validation error for ModelConfig\n  Value error, {MAX_LEN} To allow ... [type=value_error, "
            "input_value=..., input_type=ArgsKwargs]\n    For further information visit "
            "https://errors.pydantic.dev/2.14/v/value_error"
        )
        assert start_failure(ValueError(text)) == expected

    def test_an_unsupported_block_size_says_to_leave_it_unset(self):
        error = ValueError("No common block size for 16 (CPU_ATTN: [MultipleOf(32)]).")
        assert start_failure(error) == (
            "block_size 16 is not supported by the attention backend (CPU_ATTN: [MultipleOf(32)]); "
            "leave block_size unset"
        )

    def test_too_little_host_memory_names_the_free_memory_and_the_utilization(self):
        line = start_failure(ValueError(CPU_MEMORY))
        assert line.startswith(
            "10.38 GiB of host memory is free, less than gpu_memory_utilization 0.9 asks for; "
            "leave gpu_memory_utilization unset"
        )

    def test_no_memory_for_the_cache_blocks(self):
        error = ValueError("No available memory for the cache blocks. Try increasing ...")
        assert start_failure(error).startswith("no memory is left for the KV cache after the weights;")

    def test_busy_gpus_and_a_cache_too_small_for_one_sequence(self):
        busy = ValueError(
            "Free memory on device cuda:0 (3.1/79.2 GiB) on startup is less than desired GPU memory "
            "utilization (0.9, 71.3 GiB). Decrease GPU memory utilization or reduce GPU memory used."
        )
        assert start_failure(busy).startswith("the GPU has less free memory than gpu_memory_utilization 0.9")
        small = ValueError(
            "To serve at least one request with the model's max seq len (4096), (0.5 GiB KV cache is "
            "needed, which is larger than the available KV cache memory (0.06 GiB)."
        )
        assert start_failure(small).startswith("the KV cache cannot hold one 4096-token sequence;")

    def test_a_known_cause_deeper_in_the_chain_wins(self):
        try:
            try:
                raise ValueError("No available memory for the cache blocks. Try increasing ...")
            except ValueError as cause:
                raise RuntimeError("Engine core initialization failed") from cause
        except RuntimeError as error:
            assert start_failure(error).startswith("no memory is left for the KV cache")
        implicit = RuntimeError("Engine core initialization failed")
        implicit.__context__ = pydantic_error()
        assert start_failure(implicit).startswith("max_model_len 4096 exceeds the model's 2048")

    def test_an_unknown_error_is_its_type_and_first_line_cut_to_300_characters(self):
        assert start_failure(KeyError("weights")) == "KeyError: 'weights'"
        assert start_failure(RuntimeError("\n  first line\nsecond line")) == "RuntimeError: first line"
        line = start_failure(RuntimeError("x" * 1000 + "\nmore"))
        assert line == "RuntimeError: " + "x" * 297 + "..." and len(line) == len("RuntimeError: ") + 300
        assert start_failure(RuntimeError()) == "RuntimeError"

    @pytest.mark.parametrize(
        "message", [MAX_LEN, CPU_MEMORY, "No common block size for 16 (X).\nnext", "a\nb\nc", "\n\n"]
    )
    def test_the_line_never_holds_a_newline(self, message):
        assert "\n" not in start_failure(RuntimeError(message))


def engine(model: str = "m0", **settings) -> EngineSettings:
    return EngineSettings(model=model, **settings)


class TestFitEnginesToHost:
    def test_cpu_engines_share_a_part_of_free_memory_rounded_down_to_mib(self):
        available = 10 * GiB + 12345
        fitted = fit_engines_to_host([engine("m0"), engine("m1")], cpu_build=True, available_bytes=available)
        share = int(available * HOST_KV_SHARE / 2) // MiB * MiB
        assert share == 1280 * MiB
        for model in ("m0", "m1"):
            settings = fitted[engine(model)]
            assert settings.kv_cache_memory_bytes == share
            assert settings.block_size == CPU_BLOCK_MULTIPLE == 32
            assert settings.enable_chunked_prefill is False
            assert settings.model == model

    def test_each_ray_replica_counts_as_an_engine_when_sharing_the_host(self):
        three = engine("m0", replicas=3)
        fitted = fit_engines_to_host([three, engine("m1")], cpu_build=True, available_bytes=16 * GiB)
        assert fitted[three].kv_cache_memory_bytes == fitted[engine("m1")].kv_cache_memory_bytes == GiB

    def test_the_share_is_capped(self):
        fitted = fit_engines_to_host([engine()], cpu_build=True, available_bytes=256 * GiB)
        assert fitted[engine()].kv_cache_memory_bytes == HOST_KV_CAP

    def test_engines_that_size_their_cache_keep_it_and_do_not_split_the_share(self):
        explicit = engine("m1", kv_cache_memory_bytes=123 * MiB)
        fraction = engine("m2", gpu_memory_utilization=0.5)
        engines = [engine("m0"), explicit, fraction]
        fitted = fit_engines_to_host(engines, cpu_build=True, available_bytes=8 * GiB)
        assert fitted[engine("m0")].kv_cache_memory_bytes == 2 * GiB
        assert fitted[explicit].kv_cache_memory_bytes == 123 * MiB
        assert fitted[explicit].gpu_memory_utilization is None
        assert fitted[fraction].kv_cache_memory_bytes is None
        assert fitted[fraction].gpu_memory_utilization == 0.5
        assert fitted[fraction].block_size == 32 and fitted[explicit].block_size == 32

    def test_explicit_block_size_and_chunked_prefill_are_kept(self):
        settings = engine(block_size=64, enable_chunked_prefill=True)
        fitted = fit_engines_to_host([settings], cpu_build=True, available_bytes=8 * GiB)[settings]
        assert (fitted.block_size, fitted.enable_chunked_prefill) == (64, True)

    def test_remote_engines_are_untouched(self):
        remote = engine("m1", remote={"url": "http://h:8000"}, block_size=16)
        fitted = fit_engines_to_host([engine("m0"), remote], cpu_build=True, available_bytes=8 * GiB)
        assert fitted[remote] == remote
        assert fitted[engine("m0")].kv_cache_memory_bytes == 2 * GiB

    def test_equal_settings_stay_equal_and_count_once(self):
        fitted = fit_engines_to_host(
            [engine("m0"), engine("m1"), engine("m0")], cpu_build=True, available_bytes=8 * GiB
        )
        assert len(fitted) == 2
        assert fitted[engine("m0")] == fitted[EngineSettings(model="m0")]
        assert fitted[engine("m0")].kv_cache_memory_bytes == 1 * GiB

    def test_a_block_size_the_cpu_backend_cannot_use_names_the_model(self):
        message = r"^m7: block_size 16: vLLM's CPU backend needs a multiple of 32$"
        with pytest.raises(ConfigError, match=message):
            fit_engines_to_host([engine("m7", block_size=16)], cpu_build=True, available_bytes=8 * GiB)

    def test_too_little_free_memory_is_refused(self):
        with pytest.raises(ConfigError, match=r"GiB of memory is free, too little for the KV caches of 2"):
            fit_engines_to_host([engine("m0"), engine("m1")], cpu_build=True, available_bytes=200 * MiB)
        sized = engine(kv_cache_memory_bytes=64 * MiB)
        assert fit_engines_to_host([sized], cpu_build=True, available_bytes=0)[sized].block_size == 32

    def test_a_gpu_build_changes_nothing(self):
        engines = [engine("m0"), engine("m1", block_size=16), engine("m2", remote={"url": "http://h:8000"})]
        assert fit_engines_to_host(engines, cpu_build=False, available_bytes=0) == {e: e for e in engines}

    def test_a_fitted_recipe_keeps_the_scorer_on_its_teachers_engine(self):
        teachers = [{"name": f"t{i}", "engine": {"model": f"m{i}"}} for i in range(2)]
        recipe = Recipe.model_validate({"teachers": teachers, "scorer": {"engine": {"model": "m0"}}})
        fitted = fit_recipe_to_host(recipe, cpu_build=True, available=8 * GiB)
        assert [t.engine.kv_cache_memory_bytes for t in fitted.teachers] == [GiB, GiB]
        assert fitted.scorer.engine == fitted.teachers[0].engine
        assert fitted.teachers[1].engine.model == "m1" and fitted.scorer.name == "scorer"
        assert recipe.teachers[0].engine.kv_cache_memory_bytes is None
        assert fit_recipe_to_host(recipe, cpu_build=False, available=0) == recipe

    def test_a_fitted_recipe_sizes_the_prm_engine_and_keeps_its_pooling_runner(self):
        teachers = [{"name": "t0", "engine": {"model": "m0"}}]
        scorer = {"engine": {"model": "m0"}, "kind": "hybrid", "prm": {"engine": {"model": "p"}}}
        recipe = Recipe.model_validate({"teachers": teachers, "scorer": scorer})
        fitted = fit_recipe_to_host(recipe, cpu_build=True, available=8 * GiB)
        prm = fitted.scorer.prm.engine
        assert (prm.model, prm.runner) == ("p", "pooling")
        assert (prm.block_size, prm.enable_chunked_prefill) == (32, False)
        assert prm.kv_cache_memory_bytes == fitted.teachers[0].engine.kv_cache_memory_bytes == GiB
        assert fitted.scorer.engines() == {fitted.teachers[0].engine: "scorer", prm: "scorer-prm"}


class TestWindows:
    def test_the_room_is_what_the_window_leaves(self):
        assert thinking_room("t0", 1024, 224, "detail") == 800

    def test_budgets_that_fit_give_no_note(self):
        assert capped_note({"t0": 800, "scorer": 900}, 800) == []

    def test_windows_smaller_than_the_budget_give_one_note_with_the_numbers(self):
        (note,) = capped_note({"t0": 524, "t1": 900, "scorer": 700}, 800)
        assert note.startswith(
            "context windows leave less thinking than thinking_budget 800 on the longest question "
            "(t0 524, scorer 700 tokens):"
        )
        assert "closed_by: context" in note

    def test_a_window_with_no_room_left_is_refused_with_the_numbers(self):
        message = (
            r"^t0: max_model_len 1024 leaves no room to think on the longest question "
            r"\(a prompt take 1024\); raise max_model_len"
        )
        with pytest.raises(ConfigError, match=message):
            thinking_room("t0", 1024, 1024, "a prompt")

    @pytest.fixture
    def model_dir(self, tmp_path):
        folder = tmp_path / "tiny"
        folder.mkdir()
        config = {"model_type": "llama", "max_position_embeddings": 1024, "vocab_size": 128}
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    def test_the_window_is_the_models_limit_or_a_smaller_max_model_len(self, model_dir, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert engine_window("t0", engine(model_dir)) == 1024
        assert engine_window("t0", engine(model_dir, max_model_len=512)) == 512
        assert engine_window("t0", engine(model_dir, max_model_len=1024)) == 1024

    def test_a_max_model_len_beyond_the_models_limit_is_refused(self, model_dir, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        expected = f"t0 ({model_dir}): max_model_len 4096 exceeds the model's 1024 (max_position_embeddings)"
        with pytest.raises(ConfigError) as caught:
            engine_window("t0", engine(model_dir, max_model_len=4096))
        assert str(caught.value) == expected

    def test_a_folder_without_a_config_gives_max_model_len_or_nothing(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert engine_window("t0", engine(str(tmp_path))) is None
        assert engine_window("t0", engine(str(tmp_path), max_model_len=4096)) == 4096


# The recipe below hashed to this before `input.split` and `input.answer_from` existed (at the
# commit before the input-forms merge): runs made then must still resume.
OLD_RECIPE = {
    "seed": 3,
    "teachers": [{"name": "a", "engine": {"model": "org/a"}}, {"name": "b", "engine": {"model": "org/b"}}],
    "scorer": {"engine": {"model": "org/a"}},
    "search": {"beam_width": 2},
    "input": {"path": "problems.jsonl", "question_field": "problem"},
}
OLD_HASH = "7c33ad9a842122aa173b2aee22d428dfff3edefb37d2070c7d50eb03bc347f29"


def with_input(**settings) -> Recipe:
    return Recipe.model_validate({**OLD_RECIPE, "input": {**OLD_RECIPE["input"], **settings}})


class TestRecipeSettings:
    def test_placement_in_process_loads_as_shared(self, tmp_path):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump({**OLD_RECIPE, "placement": {"mode": "in_process"}}))
        assert load_recipe(path).placement.mode == "shared"
        assert semantic_hash(load_recipe(path)) == OLD_HASH

    def test_an_old_recipe_hashes_as_before_while_the_new_input_settings_hold_their_defaults(self):
        assert semantic_hash(with_input()) == OLD_HASH
        assert semantic_hash(with_input(split="train", answer_from=None)) == OLD_HASH

    @pytest.mark.parametrize("settings", [{"split": "test"}, {"answer_from": "solution"}])
    def test_setting_a_new_input_setting_changes_the_hash(self, settings):
        assert semantic_hash(with_input(**settings)) != OLD_HASH


class TestCpuCores:
    def test_cpu_engines_starting_together_share_the_cores(self, monkeypatch):
        from cordgen.engines.pool import cpu_threads_per_engine

        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
        assert cpu_threads_per_engine(1) is None
        assert [cpu_threads_per_engine(n) for n in (2, 3, 8, 16)] == [4, 2, 1, 1]

    def test_an_engine_unpins_its_threads_unless_the_user_binds_them(self, monkeypatch):
        from cordgen.engines.worker import share_cpu_cores

        monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
        monkeypatch.setenv("OMP_NUM_THREADS", "8")
        share_cpu_cores(None)
        assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and os.environ["OMP_NUM_THREADS"] == "8"
        share_cpu_cores(2)
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and os.environ["OMP_NUM_THREADS"] == "2"
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3")
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        share_cpu_cores(1)
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-3" and os.environ["OMP_NUM_THREADS"] == "4"
