"""A local stand-in for the app's webhook route, for tests.

It checks each request the way the app must: `Listener-Signature` is
`t=<unix seconds>,v1=<64 hex>`, the hex is HMAC-SHA256 of "<t>.<raw body>"
with the shared secret, compared in constant time, and `t` is within
`tolerance_s` of now. The check is written here from that contract, not with
the listener's own helper, so a mistake in the listener cannot hide itself.
Verified requests get 200 `{"ok": true}`, others 401.

Records every request (`requests`: headers, raw body, parsed JSON, verified
or not, the status answered, the fault applied).

Fault knobs, each for the next `count` requests (or only those with a given
Idempotency-Key when `key` is passed), consumed in this order per request:

- `delay_next(count, seconds, key=None)`: wait before answering (a slow app).
- `drop_next(count, key=None)`: read the request, then close the connection
  without an answer.
- `respond_next(count, status, retry_after=None, key=None)`: answer with
  `status` (and a `retry-after` header, seconds or an HTTP date, when given)
  instead of checking the request.

Runs in its own thread and event loop, so its timing does not depend on the
test's loop: `start()` / `stop()` or `with WebhookReceiver(secret) as rx:`,
bound to 127.0.0.1 on a free port; `rx.url` is the URL to POST to.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.servers.threaded import ThreadedServer

_SIGNATURE = re.compile(r"^t=(\d+),v1=([0-9a-f]{64})$")


@dataclass
class ReceivedRequest:
    at: float  # time.monotonic() when it arrived
    headers: dict[str, str]
    body: bytes = field(repr=False)
    payload: Any
    verified: bool
    idempotency_key: str | None
    status: int | None = None  # None when the connection was dropped
    fault: str = ""  # "", delay, drop, respond
    answered_at: float | None = None


@dataclass
class _Fault:
    kind: str  # delay | drop | respond
    key: str | None
    status: int = 0
    retry_after: str | None = None
    seconds: float = 0.0


class WebhookReceiver(ThreadedServer):
    thread_name = "webhook-receiver"

    def __init__(self, secret: str, *, path: str = "/api/listener/webhook",
                 tolerance_s: float = 300, host: str = "127.0.0.1", port: int = 0) -> None:
        self.secret = secret
        self.path = path
        self.tolerance_s = tolerance_s
        super().__init__(host, port)
        self._lock = threading.Lock()
        self._requests: list[ReceivedRequest] = []
        self._faults: list[_Fault] = []

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post(self.path, self._receive)

    # -- knobs --------------------------------------------------------------------------

    def respond_next(self, count: int, status: int, retry_after: float | str | None = None,
                     key: str | None = None) -> None:
        header = None if retry_after is None else (
            retry_after if isinstance(retry_after, str) else f"{retry_after:g}")
        self._add([_Fault("respond", key, status=status, retry_after=header)] * count)

    def delay_next(self, count: int, seconds: float, key: str | None = None) -> None:
        self._add([_Fault("delay", key, seconds=seconds)] * count)

    def drop_next(self, count: int = 1, key: str | None = None) -> None:
        self._add([_Fault("drop", key)] * count)

    def _add(self, faults: list[_Fault]) -> None:
        with self._lock:
            self._faults.extend(faults)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._faults.clear()

    # -- records ------------------------------------------------------------------------

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    def accepted(self) -> list[ReceivedRequest]:
        """Requests answered 2xx after a verified signature."""
        return [r for r in self.requests if r.verified and r.status == 200]

    # -- the route ----------------------------------------------------------------------

    def verify(self, header: str | None, body: bytes, now: float | None = None) -> bool:
        match = _SIGNATURE.match(header or "")
        if match is None:
            return False
        t, digest = match.group(1), match.group(2)
        if abs((time.time() if now is None else now) - int(t)) > self.tolerance_s:
            return False
        expected = hmac.new(self.secret.encode(), t.encode() + b"." + body,
                            hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, digest)

    def _take(self, kind: str, key: str | None) -> _Fault | None:
        with self._lock:
            for i, fault in enumerate(self._faults):
                if fault.kind == kind and (fault.key is None or fault.key == key):
                    return self._faults.pop(i)
        return None

    async def _receive(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = None
        key = request.headers.get("Idempotency-Key")
        record = ReceivedRequest(
            at=time.monotonic(), headers=dict(request.headers), body=body, payload=payload,
            verified=self.verify(request.headers.get("Listener-Signature"), body),
            idempotency_key=key)
        with self._lock:
            self._requests.append(record)

        delay = self._take("delay", key)
        if delay is not None:
            record.fault = "delay"
            await asyncio.sleep(delay.seconds)
        if self._take("drop", key) is not None:
            record.fault = "drop"
            record.answered_at = time.monotonic()
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # aiohttp ends the handler without writing
        respond = self._take("respond", key)
        if respond is not None:
            record.fault = record.fault or "respond"
            record.status = respond.status
            record.answered_at = time.monotonic()
            headers = {} if respond.retry_after is None else {"retry-after": respond.retry_after}
            return web.json_response({"error": f"injected {respond.status}"},
                                     status=respond.status, headers=headers)
        record.status = 200 if record.verified else 401
        record.answered_at = time.monotonic()
        if not record.verified:
            return web.json_response({"error": "bad signature"}, status=401)
        return web.json_response({"ok": True})
