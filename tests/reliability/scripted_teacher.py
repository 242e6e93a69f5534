"""A scripted OpenAI-compatible teacher: a real HTTP server that misbehaves on cue.

:class:`ScriptedTeacher` serves on 127.0.0.1 (a free port the OS picks) from a background
thread with its own event loop, as :class:`fault_proxy.FaultProxy` does, and answers

* ``POST /v1/chat/completions`` with what ``script(messages, seen)`` returns for the request's
  messages (``seen``: how many earlier requests carried the very same messages, so a script can
  hang on a first attempt and answer the retry),
* ``GET /v1/models`` with the one served model, and ``GET /health`` with 200.

A :class:`Reply` is a completion (text and finish reason: an empty answer, one cut at the token
limit, a refusal, an echo, any language), a raw body sent as is (bytes that are not UTF-8), an
HTTP error status, or a hang (``hang_s`` before the answer; the client's timeout ends it first).
Every chat request is recorded (messages, the reply, when it arrived and when it ended) so
tests can check what the client asked and how long each answer took.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Reply:
    """What the server does with one chat request."""

    text: str = ""
    finish_reason: str = "stop"  # "length": cut at the request's max_tokens
    body: bytes | None = None  # sent instead of a completion (e.g. bytes that are not UTF-8)
    status: int = 200
    hang_s: float = 0.0  # wait this long before answering (past the client's timeout: a hang)
    label: str = "ok"  # what the test calls this behaviour (recorded, never sent)


Script = Callable[[list[dict[str, str]], int], Reply]


@dataclass
class Record:
    """One chat request and what the server did with it."""

    n: int
    messages: list[dict[str, str]]
    body: dict[str, Any]
    reply: Reply
    started: float
    ended: float | None = None  # None while the request is open
    completed: bool = False  # the reply was written (not cut short by the client leaving)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""


@dataclass
class ScriptedTeacher:
    script: Script
    model: str = "scripted"
    records: list[Record] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None

    # -- what tests read ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The server's OpenAI base URL (with ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def settled(self, timeout_s: float = 5.0) -> list[Record]:
        """The records once every request has ended: a client that gives up returns at once,
        and the server notices the closed connection a moment later."""
        deadline = time.monotonic() + timeout_s
        while any(r.ended is None for r in self.snapshot()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.snapshot()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> ScriptedTeacher:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._startup())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="scripted-teacher", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("scripted teacher did not start in 30 s")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        """End open hangs at once, then stop serving."""
        if self._loop is None or self._thread is None:
            return
        assert self._stopping is not None
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = self._thread = None

    def __enter__(self) -> ScriptedTeacher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _startup(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        # handler_cancellation: a client that gives up (its timeout) ends the hang it waited on
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- the endpoints ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": "tests"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        messages = body["messages"]
        key = json.dumps(messages, sort_keys=True)
        with self._lock:
            seen = self._seen.get(key, 0)
            self._seen[key] = seen + 1
            reply = self.script(messages, seen)
            record = Record(len(self.records), messages, body, reply, time.monotonic())
            self.records.append(record)
        try:
            if reply.hang_s > 0:
                assert self._stopping is not None
                try:
                    await asyncio.wait_for(self._stopping.wait(), reply.hang_s)
                    return web.Response(status=503, text="shutting down")
                except asyncio.TimeoutError:
                    pass
            response = self._response(body, reply)
            record.completed = True
            return response
        finally:
            record.ended = time.monotonic()

    def _response(self, body: dict[str, Any], reply: Reply) -> web.Response:
        if reply.body is not None:
            return web.Response(body=reply.body, status=reply.status,
                                content_type="application/json")
        if reply.status != 200:
            return web.json_response({"error": {"message": f"scripted {reply.label}",
                                                "code": reply.status}}, status=reply.status)
        prompt_words = sum(len(m["content"].split()) for m in body["messages"])
        return web.json_response({
            "id": "chatcmpl-scripted", "object": "chat.completion", "model": self.model,
            "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                         "message": {"role": "assistant", "content": reply.text}}],
            "usage": {"prompt_tokens": prompt_words,
                      "completion_tokens": len(reply.text.split()),
                      "total_tokens": prompt_words + len(reply.text.split())},
        })


def completion_bytes(content: bytes, finish_reason: str = "stop") -> bytes:
    """A chat completion body whose message content is ``content`` as raw bytes, inserted
    as is (so bytes that are not UTF-8 stay that way)."""
    head = b'{"id": "chatcmpl-scripted", "object": "chat.completion", "choices": [{"index": 0, '
    return (head + b'"finish_reason": "' + finish_reason.encode() + b'", "message": '
            b'{"role": "assistant", "content": "' + content + b'"}}], '
            b'"usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}')
