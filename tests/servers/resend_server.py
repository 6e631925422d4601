"""A local stand-in for the Resend HTTP API (`POST /emails`, `POST /emails/batch`), for tests.

It checks requests the way Resend does:

- `Authorization: Bearer <key>`: missing -> 401 `missing_api_key`, wrong ->
  403 `invalid_api_key`.
- Rate limit, per team: at most `rate_limit` admitted requests in any
  `rate_window` seconds (sliding window); a batch is ONE request. Beyond that
  429 `rate_limit_exceeded` with `retry-after` (whole seconds, at least 1) and
  `ratelimit-limit`, `ratelimit-remaining`, `ratelimit-reset` headers (also
  sent on success).
- Quota: `daily_quota` emails a day, one per recipient (a batch of 100 emails
  to one address each spends 100). A request that does not fit in what is left
  sends nothing: 429 `daily_quota_exceeded` (no `retry-after`).
- `POST /emails` body: JSON object with `from`, `to` (string or list of at most
  50 strings), `subject`, and `html` or `text` -> else 422
  `missing_required_field` (absent) or `validation_error` (wrong type).
- `POST /emails/batch` body: JSON array of 1 to 100 such objects, no
  `attachments` or `scheduled_at`. `x-batch-validation: strict` (the default)
  sends nothing unless every email is valid: 422 naming the first invalid one
  as `emails[<index>]: <problem>` (`strict_names_index=False` leaves the index
  out); `permissive` sends the valid ones and answers
  `{"data": [{"id"}, ...], "errors": [{"index", "message"}]}`. Success:
  `{"data": [{"id"}, ...]}` in request order.
- `Idempotency-Key` (1..256 chars, else 400 `invalid_idempotency_key`), one
  for a whole batch: same key and same body -> the first answer, nothing sent
  again; same key and another body -> 409 `invalid_idempotent_request`; same
  key while the first request is still being processed -> 409
  `concurrent_idempotent_requests`. A request that failed validation or a
  limit leaves the key unused.
- Errors are JSON `{"statusCode": <int>, "name": <type>, "message": <text>}`.

Knobs:
- `fail_next(k, status=429|500|...)`: the next k authorised requests get that
  error, nothing sent;
- `lose_next(k, how="500"|"drop")`: the next k requests that send are fully
  processed (emails delivered, key used), then the answer is lost: a 500, or
  the connection closed without a response;
- `hang_next(k, seconds)`: the next k sends wait `seconds` before sending (the
  send still happens, as when a client times out but the provider went ahead);
- `latency`: seconds every request waits before it is handled.
- `hold()`: every request that gets as far as sending waits, unanswered,
  until `release()` (`held` lists their idempotency keys meanwhile), so a
  test decides when emails go out.

Records every request (`requests`), every email sent (`delivered`), and
`delivered_per_key()`: emails delivered under each idempotency key, so tests
can assert that nothing went out twice (`duplicates()`: the `X-Entity-Ref-ID`
of every email delivered more than once). Runs in its own thread and event
loop, so its timing does not depend on the test's loop: `start()` / `stop()`
(or `with ResendServer() as srv:`), bound to 127.0.0.1 on a free port;
`srv.url` is the base URL to give the SDK (`resend.api_url`).
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

from tests.servers.threaded import ThreadedServer

MAX_BATCH = 100
MAX_RECIPIENTS = 50


@dataclass
class RecordedRequest:
    at: float  # time.monotonic()
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0
    idempotency_key: str | None = None
    outcome: str = ""  # sent | replayed | rate_limited | injected | hang | lost | held | error name


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
    idempotency_key: str | None  # of the request: the email's, or its batch's
    batch: bool = False
    body: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def ref(self) -> str | None:
        """The sender's own id of the email (the `X-Entity-Ref-ID` header it set)."""
        return self.headers.get("X-Entity-Ref-ID")


@dataclass
class _Idem:
    digest: str
    done: bool = False
    response: Any = None


class _Lost(Exception):
    """Raised by a handler to drop the connection without an answer."""


def _err(status: int, name: str, message: str, headers: dict[str, str] | None = None
         ) -> web.Response:
    return web.json_response({"statusCode": status, "name": name, "message": message},
                             status=status, headers=headers)


def _recipients(email: dict[str, Any]) -> list[Any]:
    to = email.get("to")
    return to if isinstance(to, list) else [to]


class ResendServer(ThreadedServer):
    thread_name = "resend-server"
    app_options = {"client_max_size": 64 * 1024 * 1024}

    def __init__(self, api_key: str = "re_test_123456789", *, rate_limit: int | None = 5,
                 rate_window: float = 1.0, daily_quota: int | None = None,
                 strict_names_index: bool = True, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.api_key = api_key
        self.rate_limit = rate_limit  # None or 0: unlimited
        self.rate_window = rate_window
        self.daily_quota = daily_quota  # None: unlimited
        self.strict_names_index = strict_names_index
        self.latency = 0.0
        super().__init__(host, port)
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._delivered: list[DeliveredEmail] = []
        self._idem: dict[str, _Idem] = {}
        self._quota_used = 0
        self._window: collections.deque[float] = collections.deque()
        self._faults: collections.deque[tuple[int, float]] = collections.deque()  # (status, retry_after)
        self._hangs: collections.deque[float] = collections.deque()
        self._losses: collections.deque[str] = collections.deque()
        self._gate: asyncio.Event | None = None  # set while hold() is on
        self._held: list[str | None] = []
        self._stopping = False  # held sends are dropped, not sent, when the server stops

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def before_stop(self) -> None:
        self._stopping = True
        self.release()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/emails", self._post_email)
        app.router.add_post("/emails/batch", self._post_batch)
        app.router.add_route("*", "/{tail:.*}", self._not_found)

    # -- knobs --------------------------------------------------------------------------

    def fail_next(self, count: int = 1, status: int = 429, retry_after: float = 1) -> None:
        """Answer the next `count` authorised requests with `status` (429, 500, ...)."""
        with self._lock:
            self._faults.extend([(status, retry_after)] * count)

    def hang_next(self, count: int = 1, seconds: float = 5.0) -> None:
        """Hold the next `count` sends for `seconds` before sending them."""
        with self._lock:
            self._hangs.extend([seconds] * count)

    def lose_next(self, count: int = 1, how: str = "500") -> None:
        """Send the next `count` requests, then lose the answer: a 500, or `drop` the connection."""
        if how not in ("500", "drop"):
            raise ValueError("how is '500' or 'drop'")
        with self._lock:
            self._losses.extend([how] * count)
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
            self._losses.clear()
            self._quota_used = 0

    # -- records ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def delivered(self) -> list[DeliveredEmail]:
        with self._lock:
            return list(self._delivered)

    @property
    def quota_used(self) -> int:
        with self._lock:
            return self._quota_used

    def count(self, status: int) -> int:
        with self._lock:
            return sum(1 for r in self._requests if r.status == status)

    def delivered_per_key(self) -> dict[str | None, int]:
        """Emails actually delivered under each idempotency key."""
        with self._lock:
            return dict(collections.Counter(d.idempotency_key for d in self._delivered))

    def duplicates(self) -> dict[str, int]:
        """`X-Entity-Ref-ID` (else recipients and subject) of every email delivered more than once."""
        with self._lock:
            seen = collections.Counter(d.ref or f"{','.join(d.to)}|{d.subject}"
                                       for d in self._delivered)
        return {ref: n for ref, n in seen.items() if n > 1}

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
        return await self._serve(request, batch=False)

    async def _post_batch(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, batch=True)

    async def _serve(self, request: web.Request, *, batch: bool) -> web.StreamResponse:
        raw = await request.read()
        if self.latency:
            await asyncio.sleep(self.latency)
        now = time.monotonic()
        try:
            body: Any = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            body = raw.decode("utf-8", "replace")
        key = request.headers.get("Idempotency-Key")
        rec = RecordedRequest(at=now, method=request.method, path=request.path,
                              headers=dict(request.headers), body=body, idempotency_key=key)
        with self._lock:
            self._requests.append(rec)
        try:
            resp = await self._handle(request, rec, body, key, now, batch)
        except _Lost:
            rec.outcome, rec.status = "lost", 0
            if request.transport is not None:
                request.transport.abort()  # no answer at all: the client sees a dead connection
            raise asyncio.CancelledError() from None
        rec.status = resp.status
        return resp

    def _admit(self, rec: RecordedRequest, now: float
               ) -> tuple[web.Response | None, dict[str, str]]:
        """Injected faults and the rate limit: (an error answer or None, rate-limit headers)."""
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            if fault is None:
                if not self.rate_limit:
                    return None, {}
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
                                "to increase rate limit.", headers), {}
                self._window.append(now)
                return None, self._ratelimit_headers(now)
        status, retry_after = fault
        rec.outcome = "injected"
        if status == 429:
            return _err(429, "rate_limit_exceeded", "Too many requests (injected).",
                        {"retry-after": f"{retry_after:g}", "ratelimit-limit":
                         str(self.rate_limit or 0), "ratelimit-remaining": "0",
                         "ratelimit-reset": f"{max(1, math.ceil(retry_after))}"}), {}
        if status >= 500:
            return _err(status, "application_error",
                        "Something went wrong (injected). Contact Resend support."), {}
        return _err(status, "validation_error", "Injected error."), {}

    async def _handle(self, request: web.Request, rec: RecordedRequest, body: Any,
                      key: str | None, now: float, batch: bool) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip() or auth[7:].strip() == "None":
            rec.outcome = "missing_api_key"
            return _err(401, "missing_api_key", "Missing API key in the authorization header.")
        if auth[7:].strip() != self.api_key:
            rec.outcome = "invalid_api_key"
            return _err(403, "invalid_api_key", "API key is invalid")

        refused, rl_headers = self._admit(rec, now)
        if refused is not None:
            return refused

        if key is not None and not 1 <= len(key) <= 256:
            rec.outcome = "invalid_idempotency_key"
            return _err(400, "invalid_idempotency_key", "The key must be between 1-256 chars.",
                        rl_headers)

        # Which emails go out, and the errors reported for the others (permissive).
        errors: list[dict[str, Any]] = []
        if batch:
            mode = request.headers.get("x-batch-validation", "strict").strip().lower()
            if mode not in ("strict", "permissive"):
                rec.outcome = "validation_error"
                return _err(422, "validation_error",
                            "Invalid `x-batch-validation` header: expected `strict` or "
                            "`permissive`.", rl_headers)
            shape = self._validate_batch_shape(body)
            if shape is not None:
                rec.outcome = "validation_error"
                return _err(422, "validation_error", shape, rl_headers)
            sending: list[int] = []
            for index, item in enumerate(body):
                problem = self._validate(item, in_batch=True)
                if problem is None:
                    sending.append(index)
                    continue
                name, message = problem
                if mode == "strict":
                    rec.outcome = name
                    where = f"emails[{index}]: " if self.strict_names_index else ""
                    return _err(422, name, where + message, rl_headers)
                errors.append({"index": index, "message": message})
            emails = [body[i] for i in sending]
        else:
            problem = self._validate(body, in_batch=False)
            if problem is not None:
                name, message = problem
                rec.outcome = name
                return _err(422, name, message, rl_headers)
            emails = [body]

        digest = hashlib.sha256(json.dumps([request.path, body], sort_keys=True).encode()
                                ).hexdigest()
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
            spend = sum(len(_recipients(e)) for e in emails)
            if self.daily_quota is not None and self._quota_used + spend > self.daily_quota:
                rec.outcome = "daily_quota_exceeded"
                return _err(429, "daily_quota_exceeded",
                            "You have reached your daily email sending quota.", rl_headers)
            self._quota_used += spend
            if key is not None:
                self._idem[key] = _Idem(digest=digest)
            hang = self._hangs.popleft() if self._hangs else 0.0
            lose = self._losses.popleft() if self._losses else None
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

        sent = [self._deliver(e, key, batch) for e in emails]
        ids = iter(d.id for d in sent)
        if batch:
            data = [{"id": next(ids)} for _ in sending]
            response: Any = {"data": data, "errors": errors} if errors else {"data": data}
        else:
            response = {"id": sent[0].id}
        with self._lock:
            self._delivered.extend(sent)
            if key is not None:
                self._idem[key].done = True
                self._idem[key].response = response
        if lose == "drop":
            raise _Lost()
        if lose == "500":
            rec.outcome = "lost"
            return _err(500, "application_error",
                        "Something went wrong (the emails were sent; the answer is lost).")
        if not hang:
            rec.outcome = "sent"
        return web.json_response(response, headers=rl_headers)

    @staticmethod
    def _deliver(email: dict[str, Any], key: str | None, batch: bool) -> DeliveredEmail:
        return DeliveredEmail(
            id=str(uuid.uuid4()), at=time.monotonic(), sender=email["from"],
            to=list(_recipients(email)), subject=email["subject"], html=email.get("html"),
            text=email.get("text"), headers=dict(email.get("headers") or {}),
            tags=list(email.get("tags") or []), idempotency_key=key, batch=batch, body=email)

    @staticmethod
    def _validate_batch_shape(body: Any) -> str | None:
        if not isinstance(body, list):
            return "Invalid JSON body: expected an array of emails."
        if not body:
            return "The batch is empty: send 1 to 100 emails."
        if len(body) > MAX_BATCH:
            return f"Too many emails in the batch: at most {MAX_BATCH}."
        return None

    @staticmethod
    def _validate(body: Any, *, in_batch: bool) -> tuple[str, str] | None:
        if not isinstance(body, dict):
            return "validation_error", "Invalid JSON body: expected an object."
        for name in ("from", "to", "subject"):
            if body.get(name) in (None, "", []):
                return "missing_required_field", f"Missing `{name}` field."
        if body.get("html") in (None, "") and body.get("text") in (None, ""):
            return "missing_required_field", "Missing `html` or `text` field."
        if not isinstance(body["from"], str):
            return "validation_error", "Invalid `from` field: expected a string."
        recipients = _recipients(body)
        if not all(isinstance(r, str) and "@" in r for r in recipients):
            return "validation_error", "Invalid `to` field. The email address needs to follow " \
                                       "the `email@example.com` or `Name <email@example.com>` format."
        if len(recipients) > MAX_RECIPIENTS:
            return "validation_error", f"Invalid `to` field: at most {MAX_RECIPIENTS} recipients."
        if not isinstance(body["subject"], str):
            return "validation_error", "Invalid `subject` field: expected a string."
        for name in ("html", "text"):
            if name in body and body[name] is not None and not isinstance(body[name], str):
                return "validation_error", f"Invalid `{name}` field: expected a string."
        if in_batch:
            for name in ("attachments", "scheduled_at"):
                if body.get(name) is not None:
                    return "validation_error", f"The `{name}` field is not supported in batches."
        return None
