"""Security properties, each with a test that fails when the property breaks:

* model code: ``trust_remote_code`` is off unless a config turns it on, reaches every
  transformers/vLLM load, and the manifest records it (a model folder whose shipped code leaves
  a marker file when it runs tells whether it ran, in-process and in the Ray actors);
* API keys: read only from the environment, and in no file of a run, no Ray session log, no
  console output and no error text, even when a hostile server echoes the key back;
* YAML: configs are safe-loaded: a ``!!python/object/apply`` tag is refused with a clear error
  and runs nothing (generate, train and plan);
* network: the local Ray that generate and train start serves no dashboard, and nothing it
  or the project starts listens beyond loopback: Ray's GCS, raylet, core workers and agents
  included (``ecd_ray.ray_setup.local_ray_on_loopback``).
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

import ecd_ray
from ecd_ray.cli import main
from ecd_ray.config import (
    ConfigError,
    EngineConfig,
    OpenAIConfig,
    TrainConfig,
    load_config,
    load_train_config,
)
from ecd_ray.engines.base import ChatRequest, Sampling
from ecd_ray.ray_setup import RAY_CLUSTER_ENV

PACKAGE = Path(ecd_ray.__file__).parent

# ---------------------------------------------------------------------------------------------
# trust_remote_code

# A call that loads a model or tokenizer (or builds vLLM's arguments) must say what it trusts.
LOADERS = {"from_pretrained", "LLM", "AsyncEngineArgs", "engine_kwargs"}


def _loader_calls() -> Iterator[tuple[str, ast.Call]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if name in LOADERS:
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}", node


def test_every_model_load_names_trust_remote_code() -> None:
    """Static: each from_pretrained / LLM / AsyncEngineArgs / engine_kwargs call in the package
    passes ``trust_remote_code=`` (or ``**kwargs`` built by a function that the runtime tests
    below check), so none falls back to a library default."""
    calls = list(_loader_calls())
    assert len(calls) >= 12, [c for c, _ in calls]  # the scan found the loads
    missing = [where for where, call in calls
               if not any(k.arg in ("trust_remote_code", None) for k in call.keywords)]
    assert not missing, f"model loads that do not pass trust_remote_code: {missing}"


def test_trust_remote_code_is_off_by_default_everywhere() -> None:
    cfg = load_config(None, [])
    roles = [cfg.teacher, *cfg.apc.responders, EngineConfig(), TrainConfig()]
    assert all(r.trust_remote_code is False for r in roles)
    on = load_config(None, ["teacher.trust_remote_code=true"])
    assert on.teacher.trust_remote_code is True
    assert on.model_dump()["teacher"]["trust_remote_code"] is True  # what the manifest dumps
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_config(None, ["teacher.trust_remote_code=maybe"])


def test_vllm_arguments_carry_the_setting() -> None:
    from ecd_ray.config import VLLMConfig
    from ecd_ray.engines.vllm_engine import engine_kwargs

    for value in (False, True):
        kw = engine_kwargs("m", VLLMConfig(), dtype="float32", seed=0, on_gpu=False,
                           trust_remote_code=value)
        assert kw["trust_remote_code"] is value
    assert engine_kwargs("m", VLLMConfig(), dtype="float32", seed=0,
                         on_gpu=False)["trust_remote_code"] is False


TRAP_CONFIG = '''
from transformers import LlamaConfig

with open({marker!r}, "a") as f:
    f.write("configuration_trap ran in pid %d\\n" % __import__("os").getpid())


class TrapConfig(LlamaConfig):
    pass
'''

TRAP_MODEL = '''
from transformers import LlamaForCausalLM

from .configuration_trap import TrapConfig

with open({marker!r}, "a") as f:
    f.write("modeling_trap ran in pid %d\\n" % __import__("os").getpid())


class TrapForCausalLM(LlamaForCausalLM):
    config_class = TrapConfig
'''


@pytest.fixture(scope="module")
def trap_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, Path]:
    """``tiny_model`` plus shipped code (config.json ``auto_map``) that appends to a marker
    file when it runs; yields (model folder, marker path)."""
    root = tmp_path_factory.mktemp("trap")
    model, marker = root / "model", root / "remote_code_ran.txt"
    shutil.copytree(tiny_model, model)
    (model / "configuration_trap.py").write_text(TRAP_CONFIG.format(marker=str(marker)))
    (model / "modeling_trap.py").write_text(TRAP_MODEL.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_trap.TrapConfig",
                          "AutoModelForCausalLM": "modeling_trap.TrapForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Record ``trust_remote_code`` of every transformers Auto* load; the real load runs."""
    import transformers

    calls: list[tuple[str, Any]] = []
    for cls_name in ("AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(transformers, cls_name)
        real = cls.from_pretrained.__func__

        def spy(klass: Any, *args: Any, _real: Any = real, _name: str = cls_name,
                **kwargs: Any) -> Any:
            calls.append((_name, kwargs.get("trust_remote_code", "<not passed>")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_trust_remote_code_reaches_every_transformers_load(
    trap_model: tuple[Path, Path], load_spy: list[tuple[str, Any]], tmp_path: Path,
) -> None:
    """The generation engine, the reference worker and the training policy pass the config's
    value to transformers: the model's own code runs only when it is true."""
    from ecd_ray.engines import build_engine
    from ecd_ray.train.collate import CollateConfig
    from ecd_ray.train.policy import Policy
    from ecd_ray.train.reference import ReferenceWorker

    model, marker = trap_model
    marker.unlink(missing_ok=True)
    for value in (False, True):
        load_spy.clear()
        engine = build_engine(EngineConfig(engine="transformers", model=str(model),
                                           trust_remote_code=value), seed=0)
        assert type(engine.model).__name__ == ("TrapForCausalLM" if value else "LlamaForCausalLM")
        ReferenceWorker(str(model), CollateConfig().__dict__, trust_remote_code=value)
        tcfg = TrainConfig(model=str(model), strategy="ddp", trust_remote_code=value,
                           output_dir=str(tmp_path))
        Policy(tcfg, model, total_steps=1, distributed=False)
        by_class = {name for name, _ in load_spy}
        assert {"AutoTokenizer", "AutoModelForCausalLM"} <= by_class, load_spy
        assert {v for _, v in load_spy} == {value}, load_spy
        assert marker.exists() is value, "the model folder's code ran" if not value else \
            "trust_remote_code=true did not reach transformers"


@pytest.mark.slow
def test_generate_runs_no_model_code_and_records_the_setting(
    trap_model: tuple[Path, Path], tmp_path: Path,
) -> None:
    """A real tiny run (Ray actors, transformers engine) on the trapped model: its code never
    runs, and manifest.json records trust_remote_code=false."""
    model, marker = trap_model
    marker.unlink(missing_ok=True)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Name a colour."}\n{"instruction": "Count to three."}\n')
    rc = main(["generate", "run_name=trap", f"output_dir={tmp_path}", f"seeds.path={seeds}",
               f"teacher.model={model}", "teacher.engine=transformers", "rounds=1",
               "teacher.max_new_tokens=4", "teacher.num_cpus=1", "ray.num_cpus=2",
               "pairs.truncated_chosen=keep", "pairs.policy=all"])
    manifest = json.loads((tmp_path / "trap" / "manifest.json").read_text())
    assert rc == 0 and manifest["status"] == "complete"
    assert manifest["config"]["teacher"]["trust_remote_code"] is False
    assert manifest["engines"] and manifest["counts"]["chains"] == 2  # the model did load
    assert not marker.exists(), marker.read_text()


# ---------------------------------------------------------------------------------------------
# API keys


def _fragments(secret: str, n: int = 12) -> list[str]:
    return [secret[i:i + n] for i in range(len(secret) - n + 1)]


def leaks(secret: str, data: bytes | str) -> bool:
    """Whether ``data`` holds the key or any 12 characters of it."""
    data = data.encode("utf-8", "replace") if isinstance(data, str) else data
    return any(f.encode() in data for f in _fragments(secret))


class HostileServer:
    """An OpenAI-compatible endpoint that fails every request and echoes the caller's
    Authorization header back in the error, three ways: a retryable 500 with the header in
    it, a 401 whose 300-character error text cuts through the key, and a 200 that is not a
    completion. Records the Authorization headers it received."""

    def __init__(self) -> None:
        self.auth: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization", "")
                outer.auth.append(auth)
                kind = len(outer.auth) % 3
                if kind == 0:
                    status, body = 500, f"upstream failed; you sent Authorization: {auth}"
                elif kind == 1:  # the engine keeps "HTTP 401: " + 290 characters of this
                    status, body = 401, "k" * 270 + auth.removeprefix("Bearer ")
                else:
                    status, body = 200, f'{{"echo": "{auth}"}}'
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


KEY_ENV = "ECD_TEST_SECRET_KEY"


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    key = "sk-live-" + secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, key)
    return key


def test_keys_come_from_the_environment_only(secret: str) -> None:
    """There is no config field for a key; a key pasted where a variable name goes is refused;
    neither error message repeats it."""
    for override in (f"teacher.openai.api_key={secret}", f"teacher.openai.api_key_env={secret}"):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["teacher.engine=openai", "teacher.model=m", override])
        assert not leaks(secret, str(err.value)), str(err.value)
    assert "api_key" not in OpenAIConfig.model_fields  # only api_key_env, a variable name


def test_a_server_echoing_the_key_gets_no_key_into_errors_or_logs(
    secret: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """The real engine against a hostile server: every request fails, and neither the error
    texts (which go into the run's evolutions) nor the log hold any 12 characters of the key."""
    from ecd_ray.engines.openai_engine import OpenAIEngine

    caplog.set_level("INFO")
    with HostileServer() as server:
        cfg = OpenAIConfig(base_url=server.url, api_key_env=KEY_ENV, max_retries=1,
                           backoff_base_s=0.0, concurrency=1)
        results = OpenAIEngine(cfg, model_name="m").generate([
            ChatRequest(f"r{i}", [{"role": "user", "content": "hi"}], Sampling(max_new_tokens=4))
            for i in range(6)])
    assert server.auth and set(server.auth) == {f"Bearer {secret}"}  # the key was sent
    errors = [r.error or "" for r in results]
    assert all(r.finish_reason == "error" for r in results)
    assert any("[redacted]" in e for e in errors), errors  # the echo did come back
    assert not [e for e in errors if leaks(secret, e)]
    assert not leaks(secret, caplog.text)


def _short_tmp() -> str:
    # Ray's socket paths under its temp dir must stay under ~107 characters.
    return tempfile.mkdtemp(prefix="ecdsec", dir="/tmp")


@pytest.mark.slow
def test_generate_with_a_hostile_server_writes_the_key_nowhere(
    secret: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A whole run (Ray actors holding the key) against the hostile server: no file of the run
    folder, no file of the run's Ray session (every log of every process), and nothing on the
    console holds the key or 12 characters of it."""
    ray_tmp = _short_tmp()
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # this run's Ray session goes here
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        with HostileServer() as server:
            rc = main(["generate", "run_name=keys", f"output_dir={tmp_path}", "seeds.limit=3",
                       "rounds=1", "teacher.engine=openai", "teacher.model=m",
                       f"teacher.openai.base_url={server.url}",
                       f"teacher.openai.api_key_env={KEY_ENV}", "teacher.openai.max_retries=1",
                       "teacher.openai.backoff_base_s=0", "teacher.num_cpus=1",
                       "ray.num_cpus=2"])
        out = capfd.readouterr()
        assert rc in (0, 1), out.err[-2000:]
        assert server.auth and set(server.auth) == {f"Bearer {secret}"}  # the actor had it
        run_dir = tmp_path / "keys"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "complete"
        assert manifest["config"]["teacher"]["openai"]["api_key_env"] == KEY_ENV
        run_files = [p for p in run_dir.rglob("*") if p.is_file()]
        assert any(b"[redacted]" in p.read_bytes() for p in run_files), \
            "the echoed errors should be in the run, redacted"
        session_files = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_symlink()]
        logs = [p for p in session_files if p.parent.name == "logs"]
        assert any(p.name.startswith("worker-") for p in logs), "no Ray worker logs found"
        leaked = [str(p) for p in run_files + session_files if leaks(secret, p.read_bytes())]
        assert not leaked, leaked
        assert not leaks(secret, out.out + out.err)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# YAML


def _evil_yaml(tmp_path: Path, body: str) -> tuple[Path, Path]:
    marker = tmp_path / "yaml_code_ran"
    path = tmp_path / "evil.yaml"
    path.write_text(body.format(cmd=f'!!python/object/apply:os.system ["touch {marker}"]'))
    return path, marker


EVIL_RUN = "run_name: evil\nteacher:\n  model: {cmd}\n"
EVIL_TRAIN = "pairs: out/pairs\nloss: {cmd}\n"


@pytest.mark.parametrize("body", [EVIL_RUN, EVIL_TRAIN, "{cmd}\n"])
def test_yaml_loaders_refuse_python_tags(tmp_path: Path, body: str) -> None:
    path, marker = _evil_yaml(tmp_path, body)
    for loader in (load_config, load_train_config):
        with pytest.raises(ConfigError, match="not valid YAML.*python/object/apply"):
            loader(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", [["generate", "--config"], ["train", "--config"],
                                     ["plan", "--config"], ["plan", "--train-config"],
                                     ["run"]])
def test_cli_refuses_python_tags_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str],
) -> None:
    """Every command that reads YAML exits 2 with one clear line, runs nothing, starts no Ray;
    an override's value is YAML too (``run`` takes overrides only)."""
    path, marker = _evil_yaml(tmp_path, EVIL_RUN if command[0] != "train" else EVIL_TRAIN)
    evil_value = f'!!python/object/apply:os.system ["touch {marker}"]'
    argv = [*command, str(path)] if command[0] != "run" else \
        ["run", "--no-train", f"teacher.model={evil_value}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "not valid YAML" in err or "teacher.model" in err, err
    assert "Traceback" not in err
    assert not marker.exists()
    import ray

    assert not ray.is_initialized()


def test_overrides_are_safe_loaded_too(tmp_path: Path) -> None:
    marker = tmp_path / "override_code_ran"
    with pytest.raises(ConfigError, match="teacher.model"):
        load_config(None, [f'teacher.model=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Listening sockets


def _listening(pids: set[int]) -> list[tuple[int, str, str, int]]:
    out = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:  # exited meanwhile
            continue
        out += [(pid, name, c.laddr.ip, c.laddr.port) for c in conns
                if c.status == psutil.CONN_LISTEN]
    return out


def _ours() -> set[int]:
    """This test process and every process it started (Ray's head and workers)."""
    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.children(recursive=True))}


def _is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or loopback as an IPv4-mapped IPv6 address (::ffff:127.0.0.1, what
    a dual-stack gRPC server bound to 127.0.0.1 reports)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def _component(pid: int) -> str:
    if pid == os.getpid():
        return "ray::driver"  # the core worker Ray runs inside this process
    try:
        proc = psutil.Process(pid)
        return " ".join([proc.name(), *proc.cmdline()[:3]])
    except psutil.Error:
        return "?"


@pytest.mark.parametrize("which", ["generate", "train"])
def test_local_ray_starts_no_dashboard_and_listens_on_loopback_only(
        which: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Start Ray as ``ecd-ray generate`` / ``train`` do, make it start a worker, and list the
    listening sockets of every process this test started: the dashboard (its web UI and REST
    API) is not served, and every socket listens on loopback: Ray's GCS, raylet, workers and
    agents as well as anything the project starts. The address Ray took for the node is
    loopback, and the variable that made it so is not left in the environment."""
    import ray

    from ecd_ray.pipeline.generate import _init_ray
    from ecd_ray.train.trainer import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(RAY_CLUSTER_ENV, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp := _short_tmp())
    before = set(_listening(_ours()))
    try:
        if which == "generate":
            assert _init_ray(load_config(None, ["ray.num_cpus=1"]), verbose=False)
        else:
            assert init_ray(TrainConfig(num_workers=1, output_dir=str(tmp_path),
                                        ray=dict(num_cpus=1)))
        dashboard = ray._private.worker._global_node.webui_url
        node_ip = ray._private.worker._global_node.node_ip_address
        assert ray.get(ray.remote(lambda: os.getpid()).remote()) != os.getpid()
        sockets = [s for s in _listening(_ours()) if s not in before]
        named = {(pid, _component(pid)) for pid, *_ in sockets}
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not dashboard, f"the Ray dashboard is served at {dashboard}"
    assert len(sockets) >= 3, sockets  # GCS, raylet, workers: the scan saw Ray
    assert _is_loopback(node_ip), node_ip
    assert RAY_CLUSTER_ENV not in os.environ
    assert ray._private.ray_constants.ENABLE_RAY_CLUSTER  # put back: later clusters are real
    exposed = sorted({(dict(named)[pid], ip, port) for pid, _, ip, port in sockets
                      if not _is_loopback(ip)})
    assert not exposed, "listening beyond loopback:\n  " + "\n  ".join(map(str, exposed))
