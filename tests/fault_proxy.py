"""A fault-injecting HTTP proxy for tests of clients of OpenAI-compatible servers.

:class:`FaultProxy` serves on 127.0.0.1 (a free port the OS picks) from a background thread
with its own event loop, and forwards ``/v1/*`` to an upstream base URL. For each incoming
request (numbered from 0 in arrival order) it decides, deterministically, to

* ``"429"``: answer 429 with ``Retry-After: 0`` (and not forward),
* ``"500"``: answer 500 (and not forward),
* ``"drop"``: close the connection without any response (and not forward),
* ``"forward"``: pass the request on and relay the upstream's answer.

The decision comes from ``decide(n, body)`` when given, else from the fault rates and a
``random.Random(seed)``. Every request is recorded (its number, path, JSON body, headers,
action and, for forwards, the upstream status and JSON answer) so tests can check what the
client sent and got; ``max_in_flight`` is the most requests it held open at once.
Faults are injected before forwarding, so the upstream sees only the forwarded requests.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

ACTIONS = ("forward", "429", "500", "drop")


@dataclass
class Record:
    """One request the proxy received and what it did with it."""

    n: int
    path: str
    body: Any
    headers: dict[str, str]
    action: str
    upstream_status: int | None = None  # forwards only
    response: Any = None  # forwards only: the upstream's JSON answer (None if not JSON)

    @property
    def messages(self) -> Any:
        return self.body.get("messages") if isinstance(self.body, dict) else None

    @property
    def ok(self) -> bool:
        """A forward the upstream answered with 200 (a successful generation)."""
        return self.action == "forward" and self.upstream_status == 200


@dataclass
class FaultProxy:
    upstream: str  # e.g. "http://127.0.0.1:8000" (no /v1)
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_drop: float = 0.0
    seed: int = 0
    decide: Callable[[int, Any], str] | None = None
    records: list[Record] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        if self.rate_429 + self.rate_500 + self.rate_drop > 1.0:
            raise ValueError("fault rates add up to more than 1")
        self.upstream = self.upstream.rstrip("/")
        self._rng = random.Random(self.seed)
        self._next = 0  # the number of the next request
        self._in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    # -- what tests read ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The proxy's OpenAI base URL (with ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def counts(self) -> Counter[str]:
        """How many requests met each action (``forward``, ``429``, ``500``, ``drop``)."""
        with self._lock:
            return Counter(r.action for r in self.records)

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def reset(self) -> None:
        """Forget the records (the request numbering and the random stream go on)."""
        with self._lock:
            self.records.clear()

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
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

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("fault proxy did not start in 30 s")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _startup(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/v1/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- the proxy ----------------------------------------------------------------------------

    def _action(self, n: int, body: Any) -> str:
        if self.decide is not None:
            action = self.decide(n, body)
            if action not in ACTIONS:
                raise ValueError(f"decide returned {action!r}; valid: {ACTIONS}")
            return action
        x = self._rng.random()
        for action, rate in (("429", self.rate_429), ("500", self.rate_500),
                             ("drop", self.rate_drop)):
            if x < rate:
                return action
            x -= rate
        return "forward"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._in_flight += 1  # only touched on the proxy's own event loop
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            return await self._serve(request)
        finally:
            self._in_flight -= 1

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self._lock:
            n = self._next
            self._next += 1
            action = self._action(n, body)
            record = Record(n, request.path, body, dict(request.headers), action)
            self.records.append(record)
        if action == "429":
            return web.json_response({"error": {"message": "rate limited (injected)",
                                                "code": 429}},
                                     status=429, headers={"Retry-After": "0"})
        if action == "500":
            return web.json_response({"error": {"message": "server error (injected)",
                                                "code": 500}}, status=500)
        if action == "drop":
            assert request.transport is not None
            request.transport.abort()  # no status line, no headers: the client sees EOF
            return web.Response(status=500)  # never written: the transport is gone
        assert self._session is not None
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         data=raw, headers=headers) as up:
            payload = await up.read()
            record.upstream_status = up.status
            try:
                record.response = json.loads(payload)
            except ValueError:
                record.response = None
            return web.Response(body=payload, status=up.status,
                                content_type=up.content_type or "application/json")
