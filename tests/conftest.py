"""Session fixtures: tiny models are built once, and each vLLM engine starts once (25-50 s)."""

from __future__ import annotations

import pytest

from tests.tiny_models import Problem, build_tiny_model, make_problems
from tests.tiny_prm import build_tiny_prm

ENGINE_DEFAULTS = dict(
    dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 * 2**20, seed=0, block_size=32
)


@pytest.fixture(scope="session")
def problems() -> list[Problem]:
    return make_problems(12, seed=7)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, problems) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: str(build_tiny_model(name, root / name, problems)) for name in ("alpha", "beta")}


@pytest.fixture(scope="session")
def engine_pool():
    from cordgen.engines.pool import EnginePool

    pool = EnginePool()
    yield pool
    pool.shutdown()


def engine_settings(path: str, **overrides):
    from cordgen.config import EngineSettings

    return EngineSettings(model=path, **{**ENGINE_DEFAULTS, **overrides})


@pytest.fixture(scope="session")
def alpha_model(engine_pool, tiny_model_dirs):
    return engine_pool.model(engine_settings(tiny_model_dirs["alpha"]))


@pytest.fixture(scope="session")
def beta_model(engine_pool, tiny_model_dirs):
    return engine_pool.model(engine_settings(tiny_model_dirs["beta"]))


@pytest.fixture(scope="session")
def tiny_prm_dir(tmp_path_factory, problems) -> str:
    return str(build_tiny_prm(tmp_path_factory.mktemp("tiny-prm") / "prm", problems))


@pytest.fixture(scope="session")
def prm_model(engine_pool, tiny_prm_dir):
    """The tiny process reward model's one engine for the whole session, with the settings a
    recipe's PRM gets on a CPU build (the pooling runner, chunked prefill off), so that planned
    runs find it loaded."""
    return engine_pool.model(engine_settings(tiny_prm_dir, runner="pooling", enable_chunked_prefill=False))


@pytest.fixture(scope="session")
def unseen_records(tiny_model_dirs, engine_pool, alpha_model, beta_model):
    """Seed 3's records of problems the tiny teachers never saw, which each path must reproduce."""
    from tests.test_synth import run, short_recipe, unseen_inputs

    return run(short_recipe(tiny_model_dirs, 3), engine_pool, unseen_inputs())
