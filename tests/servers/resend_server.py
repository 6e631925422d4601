"""A local stand-in for the Resend HTTP API (`POST /emails`), for tests.

It checks requests the way Resend does (REFERENCE.md, Resend's error docs):

- `Authorization: Bearer <key>`: missing -> 401 `missing_api_key`, wrong ->
  403 `invalid_api_key`.
- Rate limit: at most `rate_limit` admitted requests in any `rate_window`
  seconds (sliding window); beyond that 429 `rate_limit_exceeded` with
  `retry-after` (whole seconds, at least 1) and `ratelimit-limit`,
  `ratelimit-remaining`, `ratelimit-reset` headers (also sent on success).
- Body: JSON object with `from`, `to` (string or list of strings), `subject`,
  and `html` or `text` -> else 422 `missing_required_field` (absent) or
  `validation_error` (wrong type).
- `Idempotency-Key` (1..256 chars, else 400 `invalid_idempotency_key`): same
  key and same body -> the first id, not sent again; same key and another body
  -> 409 `invalid_idempotent_request`; same key while the first request is
  still being processed -> 409 `concurrent_idempotent_requests`.
- Errors are JSON `{"statusCode": <int>, "name": <type>, "message": <text>}`.

Knobs: `fail_next(k, status=429|500|...)` answers the next k authorised
requests with that error; `hang_next(k, seconds)` makes the next k requests
that get as far as sending wait `seconds` before sending (the send still
happens, as when a client times out but the provider went ahead);
`hold()` makes every request that gets as far as sending wait, unanswered,
until `release()` (`held` lists their idempotency keys meanwhile), so a test
decides when emails go out.

Records every request (`requests`) and every unique email sent
(`delivered`). Runs in its own thread and event loop, so its timing does not
depend on the test's loop: `start()` / `stop()` (or `with ResendServer() as
srv:`), bound to 127.0.0.1 on a free port; `srv.url` is the base URL to give
the SDK (`resend.api_url`).
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class RecordedRequest:
    at: float  # time.monotonic()
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0
    idempotency_key: str | None = None
    outcome: str = ""  # sent | replayed | rate_limited | injected | hang | held | error name


@dataclass
class DeliveredEmail:
    id: str
    at: float
    sender: str
    to: list[str]
    subject: str
    html: str | None
    text: str | None
    headers: dict[str, str]
    tags: list[dict[str, str]]
    idempotency_key: str | None
    body: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class _Idem:
    digest: str
    done: bool = False
    response: dict[str, Any] | None = None


def _err(status: int, name: str, message: str, headers: dict[str, str] | None = None
         ) -> web.Response:
    return web.json_response({"statusCode": status, "name": name, "message": message},
                             status=status, headers=headers)


class ResendServer:
    def __init__(self, api_key: str = "re_test_123456789", *, rate_limit: int | None = 2,
                 rate_window: float = 1.0, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.rate_limit = rate_limit  # None or 0: unlimited
        self.rate_window = rate_window
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._delivered: list[DeliveredEmail] = []
        self._idem: dict[str, _Idem] = {}
        self._window: collections.deque[float] = collections.deque()
        self._faults: collections.deque[tuple[int, float]] = collections.deque()  # (status, retry_after)
        self._hangs: collections.deque[float] = collections.deque()
        self._gate: asyncio.Event | None = None  # set while hold() is on
        self._held: list[str | None] = []
        self._stopping = False  # held sends are dropped, not sent, when the server stops
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ResendServer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="resend-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._astart(), loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._stopping = True
            self.release()
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=15)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> ResendServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _astart(self) -> None:
        app = web.Application()
        app.router.add_post("/emails", self._post_email)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    # -- knobs --------------------------------------------------------------------------

    def fail_next(self, count: int = 1, status: int = 429, retry_after: float = 1) -> None:
        """Answer the next `count` authorised requests with `status` (429, 500, ...)."""
        with self._lock:
            self._faults.extend([(status, retry_after)] * count)

    def hang_next(self, count: int = 1, seconds: float = 5.0) -> None:
        """Hold the next `count` sends for `seconds` before sending them."""
        with self._lock:
            self._hangs.extend([seconds] * count)

    def hold(self) -> None:
        """From now on, hold every send, unanswered, until release()."""
        with self._lock:
            if self._gate is None:
                self._gate = asyncio.Event()

    def release(self) -> None:
        """Let every held send go (and stop holding new ones)."""
        with self._lock:
            gate, self._gate = self._gate, None
        if gate is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(gate.set)

    @property
    def held(self) -> list[str | None]:
        """Idempotency keys of the sends being held now."""
        with self._lock:
            return list(self._held)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._delivered.clear()
            self._idem.clear()
            self._window.clear()
            self._faults.clear()
            self._hangs.clear()

    # -- records ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def delivered(self) -> list[DeliveredEmail]:
        with self._lock:
            return list(self._delivered)

    def count(self, status: int) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.status == status)

    # -- handlers -----------------------------------------------------------------------

    def _ratelimit_headers(self, now: float) -> dict[str, str]:
        if not self.rate_limit:
            return {}
        while self._window and self._window[0] <= now - self.rate_window:
            self._window.popleft()
        remaining = max(0, self.rate_limit - len(self._window))
        reset = (self._window[0] + self.rate_window - now) if self._window else self.rate_window
        return {"ratelimit-limit": str(self.rate_limit),
                "ratelimit-remaining": str(remaining),
                "ratelimit-reset": str(max(1, math.ceil(reset))),
                "ratelimit-policy": f"{self.rate_limit};w={self.rate_window:g}"}

    async def _not_found(self, request: web.Request) -> web.Response:
        return _err(404, "not_found", "The requested endpoint does not exist.")

    async def _post_email(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            body = raw.decode("utf-8", "replace")
        key = request.headers.get("Idempotency-Key")
        rec = RecordedRequest(at=now, method=request.method, path=request.path,
                              headers=dict(request.headers), body=body, idempotency_key=key)
        with self._lock:
            self._requests.append(rec)
        resp = await self._handle(request, rec, body, key, now)
        rec.status = resp.status
        return resp

    async def _handle(self, request: web.Request, rec: RecordedRequest, body: Any,
                      key: str | None, now: float) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip() or auth[7:].strip() == "None":
            rec.outcome = "missing_api_key"
            return _err(401, "missing_api_key", "Missing API key in the authorization header.")
        if auth[7:].strip() != self.api_key:
            rec.outcome = "invalid_api_key"
            return _err(403, "invalid_api_key", "API key is invalid")

        hang = 0.0
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            if fault is None:
                # Rate limit: only admitted requests count.
                if self.rate_limit:
                    headers = self._ratelimit_headers(now)
                    if len(self._window) >= self.rate_limit:
                        wait = self._window[0] + self.rate_window - now
                        retry_after = str(max(1, math.ceil(wait)))
                        headers.update({"retry-after": retry_after, "ratelimit-remaining": "0"})
                        rec.outcome = "rate_limited"
                        return _err(429, "rate_limit_exceeded",
                                    "Too many requests. You can only make "
                                    f"{self.rate_limit} requests per second. See rate limit "
                                    "response headers for more information. Or contact support "
                                    "to increase rate limit.", headers)
                    self._window.append(now)
                    rl_headers = self._ratelimit_headers(now)
                else:
                    rl_headers = {}
        if fault is not None:
            status, retry_after = fault
            rec.outcome = "injected"
            if status == 429:
                return _err(429, "rate_limit_exceeded", "Too many requests (injected).",
                            {"retry-after": f"{retry_after:g}", "ratelimit-limit":
                             str(self.rate_limit or 0), "ratelimit-remaining": "0",
                             "ratelimit-reset": f"{max(1, math.ceil(retry_after))}"})
            if status >= 500:
                return _err(status, "application_error",
                            "Something went wrong (injected). Contact Resend support.")
            return _err(status, "validation_error", "Injected error.")

        if key is not None and not 1 <= len(key) <= 256:
            rec.outcome = "invalid_idempotency_key"
            return _err(400, "invalid_idempotency_key", "The key must be between 1-256 chars.",
                        rl_headers)

        problem = self._validate(body)
        if problem is not None:
            name, message = problem
            rec.outcome = name
            return _err(422, name, message, rl_headers)

        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self._lock:
            if key is not None:
                entry = self._idem.get(key)
                if entry is not None:
                    if entry.digest != digest:
                        rec.outcome = "invalid_idempotent_request"
                        return _err(409, "invalid_idempotent_request",
                                    "Same idempotency key used with a different request payload. "
                                    "Change your idempotency key or payload.", rl_headers)
                    if not entry.done:
                        rec.outcome = "concurrent_idempotent_requests"
                        return _err(409, "concurrent_idempotent_requests",
                                    "Same idempotency key used while original request is still "
                                    "in progress. Try the request again later.", rl_headers)
                    rec.outcome = "replayed"
                    return web.json_response(entry.response, headers=rl_headers)
                self._idem[key] = _Idem(digest=digest)
            hang = self._hangs.popleft() if self._hangs else 0.0
            gate = self._gate
            if gate is not None:
                self._held.append(key)

        if gate is not None:
            rec.outcome = "held"
            try:
                await gate.wait()
            finally:
                with self._lock:
                    self._held.remove(key)
            if self._stopping:
                rec.outcome = "dropped"
                return _err(503, "application_error", "Server stopping.")
        if hang:
            rec.outcome = "hang"
            await asyncio.sleep(hang)  # the client may give up; we send anyway

        email_id = str(uuid.uuid4())
        to = body["to"] if isinstance(body["to"], list) else [body["to"]]
        delivered = DeliveredEmail(
            id=email_id, at=time.monotonic(), sender=body["from"], to=list(to),
            subject=body["subject"], html=body.get("html"), text=body.get("text"),
            headers=dict(body.get("headers") or {}), tags=list(body.get("tags") or []),
            idempotency_key=key, body=body)
        response = {"id": email_id}
        with self._lock:
            self._delivered.append(delivered)
            if key is not None:
                self._idem[key].done = True
                self._idem[key].response = response
        if not hang:
            rec.outcome = "sent"
        return web.json_response(response, headers=rl_headers)

    @staticmethod
    def _validate(body: Any) -> tuple[str, str] | None:
        if not isinstance(body, dict):
            return "validation_error", "Invalid JSON body: expected an object."
        for name in ("from", "to", "subject"):
            if body.get(name) in (None, "", []):
                return "missing_required_field", f"Missing `{name}` field."
        if body.get("html") in (None, "") and body.get("text") in (None, ""):
            return "missing_required_field", "Missing `html` or `text` field."
        if not isinstance(body["from"], str):
            return "validation_error", "Invalid `from` field: expected a string."
        to = body["to"]
        recipients = to if isinstance(to, list) else [to]
        if not all(isinstance(r, str) and "@" in r for r in recipients):
            return "validation_error", "Invalid `to` field. The email address needs to follow " \
                                       "the `email@example.com` or `Name <email@example.com>` format."
        if len(recipients) > 50:
            return "validation_error", "Invalid `to` field: at most 50 recipients."
        if not isinstance(body["subject"], str):
            return "validation_error", "Invalid `subject` field: expected a string."
        for name in ("html", "text"):
            if name in body and body[name] is not None and not isinstance(body[name], str):
                return "validation_error", f"Invalid `{name}` field: expected a string."
        return None
