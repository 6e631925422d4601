"""EmailSender on the official Resend SDK (`resend` 2.52, async API).

Facts this adapter relies on (read in the SDK's source):

- `resend.Emails.send_async(params, options)` sends `options["idempotency_key"]`
  as the `Idempotency-Key` header.
- The SDK keeps its configuration in module globals (`resend.api_key`,
  `resend.api_url`), read synchronously when a request is built, before its
  first await. We set both right before every call, so several senders with
  different keys or URLs in one process (tests) never mix them up.
- Errors: the SDK raises `ResendError` subclasses with `.code` (HTTP status,
  int or str), `.error_type` (Resend's `name`) and `.headers` (the HTTP
  response headers, since 2.x). `retry-after` is therefore read from
  `exc.headers`; no transport hook is needed. Network failures are wrapped as
  `ResendError(code=500, error_type="HttpClientError")`.
- `send_async` goes through `resend.default_async_http_client`, whose default
  (`HTTPXClient`) opens a new `httpx.AsyncClient` per call. Building one loads
  the CA bundle into a fresh SSL context: about 65 ms of CPU on this machine,
  on the event loop, for every email (and a new TLS handshake each time). We
  plug in `PooledHTTPXClient` instead: one SSL context per sender, one
  keep-alive connection pool per event loop. Same contract as the SDK's client.
- Each call is bounded by our own timeout (the SDK's default is 30 s).
- `resend.Batch.send_async(list, options)` posts the list to `/emails/batch`
  with `options["idempotency_key"]` as `Idempotency-Key` and
  `options["batch_validation"]` as `x-batch-validation`; it answers
  `{"data": [{"id"}, ...]}`. A strict 422 carries only Resend's message, which
  may name the email at fault (`emails[3]...`); the index is read from it when
  it does.
- A successful answer (a dict) has the response headers under `http_headers`;
  errors have them in `exc.headers`. `ratelimit-limit` (with the window of
  `ratelimit-policy`) is kept as `server_rate_limit` for the mailer to follow.
- Errors are `ProviderError`s (an `EmailError`) with a kind: rate, quota,
  invalid (with the batch index), key reused, in flight, unknown outcome
  (5xx, timeouts, network), refused.
"""
from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx
import resend
from resend.exceptions import RateLimitError, ResendError
from resend.http_client_async import AsyncHTTPClient

from listener.effects import OutgoingEmail
from listener.email_batch import (REF_HEADER, ErrorKind, ProviderError, canonical,
                                  canonical_payload)

# Resend error names (`name` in the error body) that are worth retrying.
_TRANSIENT_409 = {"concurrent_idempotent_requests"}
# 429s that a short backoff cannot fix: the account is out of quota for the day/month.
_QUOTA_429 = {"daily_quota_exceeded", "monthly_quota_exceeded"}
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# How a strict batch 422 names the email at fault: "emails[3]: ..." or "... index 3 ...".
_INVALID_INDEX = re.compile(r"(?:\[(\d+)\]|\bindex\s+(\d+))")
_POLICY_WINDOW = re.compile(r"w=(\d+(?:\.\d+)?)")
MAX_BATCH = 100


def _tag(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": _TAG_UNSAFE.sub("_", value)[:256] or "_"}


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from a `retry-after` header (delta-seconds or HTTP date).

    Falls back to `ratelimit-reset` (seconds until the window resets) when
    `retry-after` is absent. Header names are matched case-insensitively.
    """
    if not headers:
        return None
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    for name in ("retry-after", "ratelimit-reset"):
        raw = lower.get(name)
        if raw is None:
            continue
        raw = raw.strip()
        try:
            return max(0.0, float(raw))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            continue
        if when is not None:
            return max(0.0, when.timestamp() - time.time())
    return None


def _status_of(exc: ResendError) -> int | None:
    try:
        return int(exc.code)
    except (TypeError, ValueError):
        return None


def server_rate_limit(headers: Mapping[str, str] | None) -> float | None:
    """Requests per second from `ratelimit-limit` (per `ratelimit-policy` window, default 1 s)."""
    if not headers:
        return None
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        limit = float(lower["ratelimit-limit"])
    except (KeyError, ValueError):
        return None
    window = 1.0
    match = _POLICY_WINDOW.search(lower.get("ratelimit-policy", ""))
    if match:
        window = float(match.group(1)) or 1.0
    return limit / window if limit > 0 else None


def _invalid_index(message: str) -> int | None:
    match = _INVALID_INDEX.search(message or "")
    if not match:
        return None
    return int(match.group(1) or match.group(2))


def map_resend_error(exc: ResendError, *, batch: bool = False) -> ProviderError:
    """Classify an SDK error: what happened, and whether to retry the same request."""
    status = _status_of(exc)
    name = str(getattr(exc, "error_type", "") or "")
    message = f"resend {status or '?'} {name}: {exc.message}"
    headers = getattr(exc, "headers", None)
    retry_after = parse_retry_after(headers)
    if isinstance(exc, RateLimitError) or status == 429:
        if name in _QUOTA_429:
            return ProviderError(message, ErrorKind.QUOTA, status=429, retry_after=retry_after)
        return ProviderError(message, ErrorKind.RATE, status=429, retry_after=retry_after,
                             rate_limit=server_rate_limit(headers))
    if status is None or status >= 500 or status == 408:
        # 5xx, and transport failures (the SDK reports them as 500 HttpClientError):
        # the provider may have sent it.
        return ProviderError(message, ErrorKind.UNKNOWN, status=status, retry_after=retry_after)
    if status == 409 and name in _TRANSIENT_409:
        # The first request with this key is still in flight at Resend: ask again later.
        return ProviderError(message, ErrorKind.IN_FLIGHT, status=409)
    if status == 409 and name == "invalid_idempotent_request":
        # Same key, different payload: a request with this key was already
        # accepted once (with other content). Retrying cannot help.
        what = "batch" if batch else "email"
        return ProviderError(message + f" (an {what} with this idempotency key was already "
                                       "accepted with a different payload)",
                             ErrorKind.KEY_REUSED, status=409)
    if status in (400, 422) and name != "invalid_idempotency_key":
        return ProviderError(message, ErrorKind.INVALID, status=status,
                             invalid_index=_invalid_index(str(exc.message)) if batch else None)
    # 400 invalid_idempotency_key, 401 missing key, 403 invalid key or unverified
    # domain, 404, 405: the account or the call is refused as a whole.
    return ProviderError(message, ErrorKind.REFUSED, status=status)


class PooledHTTPXClient(AsyncHTTPClient):
    """The SDK's async transport, with a reused SSL context and connection pool.

    httpx pools are tied to the event loop that opened them, so one client is
    kept per running loop (tests run one loop per test; the daemon has one).
    """

    def __init__(self, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._ssl = httpx.create_ssl_context()  # once: the expensive part
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None

    def _get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._client.is_closed:
            self._loop = loop
            self._client = httpx.AsyncClient(timeout=self._timeout, verify=self._ssl)
        return self._client

    async def request(self, method: str, url: str, headers: Mapping[str, str],
                      json: dict[str, object] | list[object] | None = None,
                      files: dict[str, Any] | None = None,
                      data: dict[str, str] | None = None) -> tuple[bytes, int, Mapping[str, str]]:
        client = self._get()
        try:
            if files is not None:
                resp = await client.request(method=method, url=url, headers=headers,
                                            files=files, data=data)
            else:
                resp = await client.request(method=method, url=url, headers=headers,
                                            json=json if data is None else None, data=data)
        except httpx.RequestError as exc:
            # Wrapped by the SDK as ResendError(500, "HttpClientError").
            raise RuntimeError(f"Request failed: {type(exc).__name__}: {exc}") from exc
        return resp.content, resp.status_code, resp.headers

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


class ResendSender:
    """Sends one OutgoingEmail through Resend. Implements `EmailSender`."""

    def __init__(self, api_key: str, api_url: str | None = None, *, timeout: float = 15.0) -> None:
        if not api_key:
            raise ValueError("ResendSender needs an API key")
        self._api_key = api_key
        self._api_url = api_url.rstrip("/") if api_url else None
        self.timeout = timeout
        self._http = PooledHTTPXClient(timeout=timeout + 5)
        # What the last answer's `ratelimit-limit` said (requests per second).
        self.server_rate_limit: float | None = None
        self._apply_config()

    def __repr__(self) -> str:  # never show the key
        return f"ResendSender(api_url={self._api_url or resend.api_url!r}, api_key=<redacted>)"

    def _apply_config(self) -> None:
        resend.api_key = self._api_key
        resend.default_async_http_client = self._http
        if self._api_url:
            resend.api_url = self._api_url

    async def aclose(self) -> None:
        """Close the keep-alive connections (optional; on shutdown)."""
        await self._http.aclose()

    @staticmethod
    def params_for(email: OutgoingEmail) -> dict[str, Any]:
        return {
            "from": email.sender,
            "to": [email.to],
            "subject": email.subject,
            "html": email.html,
            "text": email.text,
            # Gmail threads mails with equal subjects; a unique ref keeps each apart.
            "headers": {REF_HEADER: email.idempotency_key},
            # Emails of sessions keep release 1's tags, so one in flight across an
            # upgrade is sent again with the same body under the same key.
            "tags": [
                _tag("rule", email.rule),
                *([_tag("session_id", email.row_id)] if email.table == "sessions"
                  else [_tag("table", email.table), _tag("row_id", email.row_id)]),
                _tag("role", email.role),
            ],
        }

    def payload_item(self, email: OutgoingEmail) -> dict[str, Any]:
        """The email as frozen into a batch: the same fields, keys in canonical order."""
        return canonical(self.params_for(email))

    async def send(self, email: OutgoingEmail) -> str:
        return await self.send_item(self.params_for(email), email.idempotency_key)

    async def send_item(self, item: dict[str, Any], idempotency_key: str) -> str:
        options: dict[str, Any] = {"idempotency_key": idempotency_key}
        resp = await self._call(resend.Emails.send_async, dict(item), options, batch=False)
        provider_id = resp.get("id") if isinstance(resp, Mapping) else None
        if not provider_id:
            raise ProviderError("resend: answer without an id", ErrorKind.UNKNOWN)
        return str(provider_id)

    async def send_batch(self, items: list[dict[str, Any]] | tuple[dict[str, Any], ...],
                         idempotency_key: str) -> list[str]:
        """POST /emails/batch, strict validation: every id in request order, or ProviderError.

        Strict: Resend sends nothing unless every email is valid, so a 422 means
        nothing went out and the batch can be split and sent again.
        """
        if not 1 <= len(items) <= MAX_BATCH:
            raise ValueError(f"a batch has 1 to {MAX_BATCH} emails, not {len(items)}")
        payload = canonical_payload(items)
        options: dict[str, Any] = {"idempotency_key": idempotency_key,
                                   "batch_validation": "strict"}
        resp = await self._call(resend.Batch.send_async, payload, options, batch=True)
        data = resp.get("data") if isinstance(resp, Mapping) else None
        ids = [d.get("id") if isinstance(d, Mapping) else None for d in data or []]
        if len(ids) != len(payload) or not all(ids):
            # Accepted, but not as asked: the same batch under the same key gives
            # the stored answer again, or an error worth reporting.
            raise ProviderError(f"resend: batch answer with {len(ids)} ids for "
                                f"{len(payload)} emails", ErrorKind.UNKNOWN)
        return [str(i) for i in ids]

    async def _call(self, method: Any, params: Any, options: dict[str, Any], *,
                    batch: bool) -> Any:
        # The SDK reads its globals synchronously before its first await, so
        # setting them here cannot race with another sender's call.
        self._apply_config()
        try:
            async with asyncio.timeout(self.timeout):
                resp = await method(params, options)
        except ResendError as exc:
            error = map_resend_error(exc, batch=batch)
            if error.rate_limit:
                self.server_rate_limit = error.rate_limit
            raise error from None
        except TimeoutError:
            raise ProviderError(f"resend: no answer within {self.timeout:g}s",
                                ErrorKind.UNKNOWN) from None
        except (OSError, ConnectionError) as exc:
            raise ProviderError(f"resend: network error: {type(exc).__name__}: {exc}",
                                ErrorKind.UNKNOWN) from None
        except Exception as exc:  # e.g. NoContentError, a malformed answer
            raise ProviderError(f"resend: unexpected {type(exc).__name__}: {exc}",
                                ErrorKind.UNKNOWN) from None
        if isinstance(resp, Mapping):
            limit = server_rate_limit(resp.get("http_headers"))
            if limit:
                self.server_rate_limit = limit
        return resp
