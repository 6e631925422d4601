"""The Supabase backend: PostgREST RPC for reads and writes, Realtime for changes.

`RpcStore` is the Store port over supabase-py's `.rpc()`, calling the same SQL
functions as `SqlStore` (listener/adapters/calls.py) with the same argument
names. `RealtimeSource` is the ChangeSource over Realtime `postgres_changes`,
watched from outside: the client's own recovery has traps (a raising callback ends its listen task), so
any doubt about the stream tears the client down and builds a new one, and the
daemon sweeps once the server says "Subscribed to PostgreSQL" again.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
import orjson
import structlog
from postgrest.exceptions import APIError

from listener import metrics
from listener.errors import Refusal, StoreError, StoreRefused, StoreUnavailable
from listener.adapters.calls import (
    COMPLETE, FIRE, PAGE, BadAnswer, Call, CallingStore, fired_from_json)
from listener.changes import CHANGE_TYPES, BadChange, Change, key_of
from listener.instants import BadInstant, Instant, parse_instant
from listener.retry import retrying
from listener.source import Backoff, BadInputKind, ChangeSink
from listener.rules.model import Recipient
from listener.rules.query import TableQuery
from listener.store import (
    CLAIMED, CONFLICT, DONE, FENCED, STALE, ActionKey, Fence, FireRequest, Fired)

T = TypeVar("T")

log = structlog.get_logger("listener.supabase")

NIL_UUID = "00000000-0000-0000-0000-000000000000"
MIGRATE_HINT = ("run `listener migrate --print` and paste the output into the Supabase "
                "SQL editor")


# --------------------------------------------------------------------------- errors


class RpcError(StoreError):
    """A PostgREST RPC failed. The message names the function, never the key."""

    def __init__(self, function: str, message: str, *, status: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, sqlstate=code, status=status, operation=function)
        self.function = function
        self.code = code


class RpcUnavailable(RpcError, StoreUnavailable):
    """5xx, timeout or connection error: transient, and the outcome may be unknown."""

    retry_after: float | None = None


class RpcConfigError(RpcError, StoreRefused):
    """The project is not set up for the listener (missing function, grant, key, schema)."""

    reason = Refusal.MISSING


class RpcCallError(RpcError, StoreRefused):
    """Any other 4xx: the call itself was refused (a bug or bad input); not retried."""

    reason = Refusal.OTHER


class _HttpStatus(Exception):
    """Raised by the response hook for every non-2xx answer, with its status."""

    def __init__(self, status: int, body: bytes, path: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.path = path


async def _raise_on_error(response: httpx.Response) -> None:
    # postgrest-py's APIError drops the HTTP status; we classify by it.
    if response.status_code >= 300 and not response.is_redirect:
        await response.aread()
        raise _HttpStatus(response.status_code, response.content[:4000], response.url.path)


def _error_body(body: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {"message": body[:200].decode(errors="replace").strip() or None}
    return obj if isinstance(obj, dict) else {"message": str(obj)[:200]}


def _classify(fn: str, params: Mapping[str, Any], err: _HttpStatus) -> RpcError:
    body = _error_body(err.body)
    code = body.get("code") if isinstance(body.get("code"), str) else None
    message = str(body.get("message") or f"HTTP {err.status}")
    what = f"public.{fn}"
    if err.status >= 500 or err.status in (408, 429):
        return RpcUnavailable(fn, f"{what}: HTTP {err.status} {code or ''} {message}".strip(),
                              status=err.status, code=code)
    if code == "PGRST202":
        args = ", ".join(params)
        return RpcConfigError(
            fn, f"{what}({args}) does not exist (PGRST202): the listener's functions are "
            f"missing or out of date: apply the listener's migrations ({MIGRATE_HINT}); "
            "if you just did, reload the API schema cache (NOTIFY pgrst, 'reload schema')",
            status=err.status, code=code)
    if code == "PGRST203":
        return RpcConfigError(
            fn, f"{what}: more than one function matches ({message}): drop the old overload, "
            f"then re-apply the listener's migrations", status=err.status, code=code)
    if code == "PGRST106":
        return RpcConfigError(
            fn, f"{what}: schema public is not exposed by the project's API ({message}): add "
            "it back under API settings, exposed schemas", status=err.status, code=code)
    if code == "42501" or (err.status in (401, 403) and code not in (
            "PGRST301", "PGRST302", "PGRST303") and "API key" not in message):
        return RpcConfigError(
            fn, f"{what}: permission denied ({code or err.status}): the key's role may not "
            "EXECUTE it; SUPABASE_SERVICE_ROLE_KEY must be the service_role key (not anon), "
            "and the listener's migrations grant EXECUTE to service_role (re-run them "
            f"if the role was created after: {MIGRATE_HINT})", status=err.status, code=code)
    if err.status in (401, 403):
        return RpcConfigError(
            fn, f"{what}: SUPABASE_SERVICE_ROLE_KEY was rejected ({code or err.status}: "
            f"{message})", status=err.status, code=code)
    return RpcCallError(fn, f"{what}: HTTP {err.status} {code or ''} {message}".strip(),
                        status=err.status, code=code)


def _redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 6:
        text = text.replace(secret, "***")
    return text


def key_expiry(key: str) -> int | None:
    """The `exp` claim (Unix seconds) of a JWT-shaped key, else None. Not verified."""
    parts = key.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return exp if isinstance(exp, int) else None


# --------------------------------------------------------------------------- the store


class RpcStore(CallingStore):
    """The Store port over PostgREST RPC: one call of one SQL function per method,
    the same calls as SqlStore (listener/adapters/calls.py).

    Reads and idempotent calls are retried (bounded, exponential backoff with
    jitter) on 5xx, timeouts and connection errors. `fire` (which may change a
    row's status) is not: when its outcome is unknown, the ledger says whether
    it committed before anything is sent again.
    """

    def __init__(self, url: str, key: str, queries: Mapping[str, TableQuery], *,
                 recipients: Mapping[str, Mapping[str, Recipient]] | None = None,
                 timeout: httpx.Timeout | float = httpx.Timeout(10.0, connect=5.0),
                 max_attempts: int = 5, max_retry_s: float = 30.0,
                 retry_initial_s: float = 0.1, retry_max_s: float = 2.0,
                 page: int = PAGE) -> None:
        super().__init__(queries, recipients=recipients, page=page)
        self.url = url.rstrip("/")
        self._key = key
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.max_attempts = max_attempts
        self.max_retry_s = max_retry_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.client: Any = None
        self._http: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never the key
        return f"RpcStore({self.url!r})"

    async def open(self) -> None:
        from supabase import AsyncClientOptions, acreate_client

        self._http = httpx.AsyncClient(timeout=self.timeout, http2=True, follow_redirects=True,
                                       event_hooks={"response": [_raise_on_error]})
        options = AsyncClientOptions(httpx_client=self._http, postgrest_client_retry=False,
                                     auto_refresh_token=False, persist_session=False)
        try:
            self.client = await acreate_client(self.url, self._key, options)
        except Exception:
            await self._http.aclose()
            self._http = None
            raise

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- calls ---------------------------------------------------------------------------

    async def _once(self, fn: str, params: dict[str, Any]) -> Any:
        assert self.client is not None, "RpcStore.open() first"
        try:
            response = await self.client.rpc(fn, params).execute()
        except _HttpStatus as err:
            raise _classify(fn, params, err) from None
        except httpx.TimeoutException as exc:
            raise RpcUnavailable(fn, f"public.{fn}: timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            detail = _redact(str(exc) or type(exc).__name__, self._key)
            raise RpcUnavailable(fn, f"public.{fn}: {type(exc).__name__}: {detail}") from None
        except APIError as exc:  # a non-JSON 2xx body, or anything the hook let through
            raise RpcCallError(fn, f"public.{fn}: {exc.code} {exc.message}", code=exc.code) from None
        return response.data

    async def _with_retries(self, fn: str, once: Callable[[], Awaitable[T]]) -> T:
        """`once()` again while the service is unreachable, within the budget."""
        return await retrying(once, attempts=self.max_attempts, give_up_after=self.max_retry_s,
                              retry_on=lambda exc: isinstance(exc, RpcUnavailable),
                              initial=self.retry_initial_s, maximum=self.retry_max_s,
                              event="rpc_retry", context={"function": fn})

    async def _retried(self, fn: str, params: dict[str, Any]) -> tuple[Any, bool]:
        """Call with retries; also say whether an attempt failed with an unknown outcome."""
        uncertain = False

        async def once() -> Any:
            nonlocal uncertain
            try:
                return await self._once(fn, params)
            except RpcUnavailable:
                uncertain = True
                raise

        return await self._with_retries(fn, once), uncertain

    async def invoke(self, call: Call, args: dict[str, Any]) -> Any:
        return (await self._retried(call.function, call.json_args(args)))[0]

    async def _call(self, call: Call, args: dict[str, Any]) -> Any:
        try:
            return await super()._call(call, args)
        except BadAnswer as exc:
            raise RpcCallError(call.function, str(exc)) from None

    # -- the Store port --------------------------------------------------------------------

    async def check(self) -> None:
        """Reachable, key accepted, functions there (with the signatures used here)
        and executable: a description of no table, and a fire as a holder of no
        lease (answered 'fenced' before it touches anything)."""
        await self.describe([])
        nobody = Fence("", -1)
        answer = await self.invoke(FIRE, self.fire_args(
            FireRequest(ActionKey("_check", "_check", NIL_UUID, 0), 0), nobody))
        if not isinstance(answer, dict) or answer.get("outcome") != FENCED:
            raise RpcCallError(FIRE.function, f"public.{FIRE.function}: unexpected answer to "
                               f"a check ({str(answer)[:200]}): are the listener's migrations "
                               "current?")

    async def ping(self) -> bool:
        await self.check()
        return True

    async def fire(self, request: FireRequest, fence: Fence) -> Fired:
        """One call of listener_fire_v2 (version check, claim, compare-and-set, finish).

        Not blindly retried: after a lost answer (timeout, 5xx, dropped
        connection) the first attempt may have committed, and a repeat would
        find the row changed by it ('stale') and record the action as skipped.
        The ledger settles it first (see `_settle`)."""
        fn = FIRE.function
        params = FIRE.json_args(self.fire_args(request, fence))
        uncertain = False
        attempts = 0

        async def once() -> Fired:
            nonlocal uncertain, attempts
            attempts += 1
            try:
                answer = fired_from_json(await self._once(fn, params))
            except RpcUnavailable as exc:
                uncertain = True
                log.warning("rpc_fire_unknown", rule=request.key.rule, table=request.key.table,
                            row_id=request.key.row_key, attempt=attempts, error=str(exc)[:300])
                settled = await self._settle(request, fence)
                if settled is not None:
                    return settled
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise RpcCallError(fn, f"public.{fn}: unexpected answer ({exc!r})") from None
            if uncertain and answer.outcome in (STALE, CONFLICT, DONE):
                # An earlier attempt may have committed after the ledger was looked at.
                settled = await self._settle(request, fence)
                if settled is not None:
                    return settled
            return answer

        return await self._with_retries(fn, once)

    async def _probe(self, key: ActionKey, fence: Fence, at: Instant) -> Fired:
        """A bare fire (no row check, no status, no finish): claims the episode,
        or takes our own claim over again (attempts + 1), and says where the
        ledger stands. Idempotent, so retried like a read."""
        bare = FireRequest(key, at)
        return fired_from_json(await self.invoke(FIRE, self.fire_args(bare, fence)))

    async def _settle(self, request: FireRequest, fence: Fence) -> Fired | None:
        """After a lost answer: the answer the ledger implies, or None when the
        request did not take effect (and sending it again is safe)."""
        probe = await self._probe(request.key, fence, request.fired_at)
        key = request.key
        if probe.outcome == FENCED:
            return Fired(FENCED)
        if probe.outcome == DONE:
            if request.finish is not None:
                # Finished by the lost attempt, or before it: either way nothing is
                # left to do, and the ledger holds the record.
                log.warning("rpc_fire_settled_done", rule=key.rule, table=key.table,
                            row_id=key.row_key)
            return Fired(DONE)
        if probe.outcome != CLAIMED:
            return None
        bare = (request.version is None and request.status is None
                and not request.set_columns and request.finish is None)
        if bare:
            return probe  # the probe was that very request
        changes = request.status is not None or bool(request.set_columns)
        if changes and probe.status_applied and request.finish is None:
            # The compare-and-set committed (status_applied is set in its transaction).
            log.info("rpc_fire_settled_applied", rule=key.rule, table=key.table,
                     row_id=key.row_key)
            row = await self.read_row(key.table, key.row_key)
            return Fired(CLAIMED, True, probe.attempts, row)
        return None

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any],
                       timeline: dict[str, Any] | None = None) -> bool:
        params = COMPLETE.json_args(self.complete_args(key, fence, outcome, fired_at,
                                                       lateness_ms, detail, timeline))
        done, uncertain = await self._retried(COMPLETE.function, params)
        if not done and uncertain:
            # A conditional update: false after a lost answer may mean "already done".
            probe = await self._probe(key, fence, fired_at)
            if probe.outcome == CLAIMED:  # still open and ours: the lease came back between
                return bool(await self._once(COMPLETE.function, params))
            return probe.outcome == DONE
        return bool(done)


# --------------------------------------------------------------------------- changes

SUBSCRIBED_MESSAGE = "Subscribed to PostgreSQL"


def change_from_realtime(payload: Any, query: TableQuery, schema: str = "public") -> Change:
    """A `postgres_changes` payload ({"ids", "data": {...}}) of the query's table
    as a Change, keyed by the query's key column. Raises BadChange. A change
    Realtime marked with `errors` (413 Payload Too Large) or whose record lacks
    a column the rules read (an unchanged TOASTed value) comes without a
    record: the daemon reads the row."""
    if not isinstance(payload, Mapping):
        raise BadChange("payload is not an object")
    data = payload.get("data")
    if not isinstance(data, Mapping):
        raise BadChange("payload has no data object")
    kind = data.get("type")
    kind = getattr(kind, "value", kind)
    if kind not in CHANGE_TYPES:
        raise BadChange(f"type must be one of {', '.join(CHANGE_TYPES)}, not {kind!r:.40}")
    table = query.table
    if data.get("schema") != schema or data.get("table") != table:
        raise BadChange(f"change of {data.get('schema')!r:.40}.{data.get('table')!r:.40}, "
                        f"not {schema}.{table}")
    at = None
    try:
        at = parse_instant(data.get("commit_timestamp"))
    except BadInstant:
        pass  # informative only
    record, old = data.get("record"), data.get("old_record")
    if kind == "DELETE":
        return Change(kind, table, key_of(old if old else record, query.key, table), None, at)
    if not isinstance(record, Mapping) or not record:
        return Change(kind, table, key_of(old, query.key, table), None, at)
    key = key_of(record, query.key, table)
    if data.get("errors") or any(c not in record for c in query.columns):
        return Change(kind, table, key, None, at)
    return Change(kind, table, key, dict(record), at)


# --------------------------------------------------------------------------- the source


class _Attempt:
    """One client, one channel, one topic: what the callbacks saw."""

    def __init__(self, number: int, topic: str, started: float) -> None:
        self.number = number
        self.topic = topic
        self.started = started
        self.current = True
        self.failure: str | None = None
        self.joined_at: float | None = None
        self.streaming_at: float | None = None
        self.not_joined_since: float | None = None
        self.backoff_reset = False
        self.wake = asyncio.Event()

    def fail(self, reason: str) -> None:
        if self.current and self.failure is None:
            self.failure = reason
        self.wake.set()


class RealtimeSource:
    """Row changes of every watched table through Supabase Realtime
    `postgres_changes`: one channel, one binding per table.

    One AsyncRealtimeClient per attempt, with the client's own reconnect off:
    a watchdog decides, and every recovery is the same path (tear down, back
    off, new client, new topic, wait for "Subscribed to PostgreSQL", sweep).
    """

    name = "realtime"

    def __init__(self, url: str, key: str, queries: Mapping[str, TableQuery], *,
                 schema: str = "public",
                 join_timeout: float = 10.0, connect_timeout: float = 10.0,
                 subscribed_timeout: float = 20.0, join_grace: float = 10.0,
                 watch_interval: float = 1.0, stable_after: float = 10.0,
                 hb_interval: int = 25, backoff: Backoff | None = None,
                 quiet_client_logs: bool = True) -> None:
        self.realtime_url = url.rstrip("/") + "/realtime/v1"
        self._key = key
        self.schema = schema
        self.queries = dict(queries)
        self.join_timeout = join_timeout
        self.connect_timeout = connect_timeout
        self.subscribed_timeout = subscribed_timeout
        self.join_grace = join_grace
        self.watch_interval = watch_interval
        self.stable_after = stable_after
        self.hb_interval = hb_interval
        self.backoff = backoff or Backoff()
        self.tag = uuid.uuid4().hex[:6]
        # Observability (and tests): attempts made, reconnects, times subscribed.
        self.attempts = 0
        self.reconnects = 0
        self.subscriptions = 0
        self.last_reason: str | None = None
        self.client: Any = None
        self.channel: Any = None
        self._attempt: _Attempt | None = None
        if quiet_client_logs:
            # The client logs every close and retry as plain text on stderr; the
            # watchdog reports them as structured lines instead.
            client_log = logging.getLogger("realtime")
            if client_log.level == logging.NOTSET:
                client_log.setLevel(logging.CRITICAL)

    def use(self, queries: Mapping[str, TableQuery]) -> None:
        """Follow these tables (the rules as active in this database), from the
        next subscription on."""
        self.queries = dict(queries)

    def __repr__(self) -> str:  # never the key
        return f"RealtimeSource({self.realtime_url!r})"

    def _table_names(self) -> str:
        return ", ".join(f"{self.schema}.{t}" for t in self.queries) or "the tables"

    async def run(self, sink: ChangeSink) -> None:
        while True:
            try:
                reason = await self._run_attempt(sink)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the source must outlive any surprise
                reason = f"unexpected {type(exc).__name__}: {exc}"
            reason = _redact(reason, self._key)
            self.last_reason = reason
            self.reconnects += 1
            metrics.SOURCE_RECONNECTS.labels(self.name).inc()
            sink.unsubscribed(self.name, reason)
            delay = await self.backoff.sleep()
            log.info("source_reconnecting", source=self.name, after_s=round(delay, 2),
                     reason=reason[:300])

    async def _run_attempt(self, sink: ChangeSink) -> str:
        from realtime import AsyncRealtimeClient

        self.attempts += 1
        topic = f"listener-{self.tag}-{self.attempts}"
        attempt = self._attempt = _Attempt(self.attempts, topic, time.monotonic())
        client = self.client = AsyncRealtimeClient(
            self.realtime_url, self._key, auto_reconnect=False, max_retries=1,
            hb_interval=self.hb_interval, timeout=self.join_timeout)  # type: ignore[arg-type]
        try:
            try:
                await asyncio.wait_for(client.connect(), self.connect_timeout)
            except (Exception, TimeoutError) as exc:  # noqa: BLE001
                return f"connect failed: {_describe_connect_error(exc)}"
            channel = self.channel = client.channel(topic)
            for query in self.queries.values():
                channel.on_postgres_changes(
                    "*", callback=lambda payload, q=query: self._on_change(attempt, sink, q,
                                                                           payload),
                    schema=self.schema, table=query.table)
            channel.on_system(lambda payload: self._on_system(attempt, sink, payload))
            try:
                await asyncio.wait_for(
                    channel.subscribe(lambda state, error: self._on_state(attempt, state, error)),
                    self.join_timeout + 5)
            except TimeoutError:
                return f"no answer to the join of {topic} within {self.join_timeout + 5:g} s"
            return await self._watch(attempt, client, channel)
        finally:
            attempt.current = False
            await self._teardown(client)

    # -- callbacks: they run inside the client's listen task and must never raise --------

    def _on_change(self, attempt: _Attempt, sink: ChangeSink, query: TableQuery,
                   payload: Any) -> None:
        try:
            change = change_from_realtime(payload, query, self.schema)
        except BadChange as exc:
            with contextlib.suppress(Exception):
                sink.bad_input(BadInputKind.REALTIME_PAYLOAD, f"{exc}: {str(payload)[:200]}", query.table)
            return
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(Exception):
                sink.bad_input(BadInputKind.REALTIME_PAYLOAD,
                               f"unreadable ({exc!r}): {str(payload)[:200]}", query.table)
            return
        try:
            sink.put(change)
        except Exception as exc:  # noqa: BLE001
            log.error("realtime_put_failed", error=repr(exc), table=change.table,
                      row_id=change.key)

    def _on_system(self, attempt: _Attempt, sink: ChangeSink, payload: Any) -> None:
        try:
            message = getattr(payload, "message", None)
            status = getattr(payload, "status", None)
            if isinstance(payload, Mapping):
                message, status = payload.get("message"), payload.get("status")
            if not attempt.current:
                return
            if status == "ok" and message == SUBSCRIBED_MESSAGE:
                # Only now does the server stream: changes before this message are lost.
                attempt.streaming_at = time.monotonic()
                self.subscriptions += 1
                log.info("source_subscribed", source=self.name, topic=attempt.topic,
                         attempt=attempt.number)
                sink.subscribed(self.name)
            elif status != "ok":
                attempt.fail(f"system error: {str(message)[:300]}")
            attempt.wake.set()
        except Exception as exc:  # noqa: BLE001
            with contextlib.suppress(Exception):
                attempt.fail(f"system message not understood: {exc!r}")

    def _on_state(self, attempt: _Attempt, state: Any, error: Exception | None) -> None:
        try:
            value = getattr(state, "value", state)
            if value == "SUBSCRIBED":
                attempt.joined_at = time.monotonic()
                attempt.wake.set()
            else:
                detail = str(error)[:300] if error else ""
                if "Unable to subscribe" in detail:
                    detail += (f" (are {self._table_names()} in the supabase_realtime "
                               "publication? listener migrate adds them)")
                attempt.fail(f"channel {value}" + (f": {detail}" if detail else ""))
        except Exception:  # noqa: BLE001
            with contextlib.suppress(Exception):
                attempt.fail("channel state not understood")

    # -- the watchdog ------------------------------------------------------------------------

    def diagnose(self, attempt: _Attempt, client: Any, channel: Any, now: float) -> str | None:
        """Why this attempt's stream cannot be trusted any more, or None."""
        if attempt.failure is not None:
            return attempt.failure
        listen = getattr(client, "_listen_task", None)
        if listen is None or listen.done():
            detail = ""
            if listen is not None and not listen.cancelled() and listen.exception() is not None:
                detail = f": {listen.exception()!r}"[:300]
            return "the client's listen task ended" + detail
        if not client.is_connected:
            return "socket closed"
        heartbeat = getattr(client, "_heartbeat_task", None)
        if heartbeat is not None and heartbeat.done():
            return "the client's heartbeat task ended"
        if client.channels.get(channel.topic) is not channel:
            return "channel closed by the server"
        state = getattr(channel.state, "value", channel.state)
        if state != "joined":
            if attempt.not_joined_since is None:
                attempt.not_joined_since = now
            elif now - attempt.not_joined_since > self.join_grace:
                return f"channel {state} for more than {self.join_grace:g} s"
        else:
            attempt.not_joined_since = None
        if attempt.streaming_at is None:
            since = attempt.joined_at if attempt.joined_at is not None else attempt.started
            if now - since > self.subscribed_timeout:
                return (f"no \"{SUBSCRIBED_MESSAGE}\" within {self.subscribed_timeout:g} s "
                        f"(are {self._table_names()} in the supabase_realtime publication?)")
        return None

    async def _watch(self, attempt: _Attempt, client: Any, channel: Any) -> str:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(attempt.wake.wait(), self.watch_interval)
            attempt.wake.clear()
            now = time.monotonic()
            reason = self.diagnose(attempt, client, channel, now)
            if reason is not None:
                return reason
            if (attempt.streaming_at is not None and not attempt.backoff_reset
                    and now - attempt.streaming_at >= self.stable_after):
                # Healthy for a while: the next failure starts from a short delay.
                # (Not at once: a server that drops us right after each subscribe
                # must not get a reconnect, and a sweep, every 200 ms.)
                self.backoff.reset()
                attempt.backoff_reset = True

    async def _teardown(self, client: Any) -> None:
        for channel in list(getattr(client, "channels", {}).values()):
            with contextlib.suppress(Exception):
                channel.rejoin_timer.reset()
                channel.join_push.destroy()
        ws = getattr(client, "_ws_connection", None)
        try:
            await asyncio.wait_for(asyncio.shield(client.close()), 2.0)
        except (Exception, TimeoutError):  # noqa: BLE001
            if ws is not None and getattr(ws, "transport", None) is not None:
                ws.transport.abort()
        finally:
            for name in ("_listen_task", "_heartbeat_task"):
                task = getattr(client, name, None)
                if task is not None and not task.done():
                    task.cancel()


def _describe_connect_error(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        body = getattr(response, "body", b"") or b""
        text = body[:200].decode(errors="replace") if isinstance(body, bytes) else str(body)[:200]
        hint = " (SUPABASE_SERVICE_ROLE_KEY expired or wrong?)" if status in (401, 403) else ""
        return f"HTTP {status} {text}{hint}".strip()
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:300]


# --------------------------------------------------------------------------- the backend


async def open_supabase_backend(settings: Any, queries: Mapping[str, TableQuery],
                                recipients: Mapping[str, Mapping[str, Recipient]] | None = None
                                ) -> Any:
    """RpcStore + RealtimeSource from SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY,
    checked: reachable, key accepted, functions present and executable."""
    from listener.logs import register_secret
    from listener.backend import Backend, ConfigError

    if not settings.supabase_url or settings.supabase_service_role_key is None:
        raise ConfigError("SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are both required")
    url = settings.supabase_url.strip().rstrip("/")
    key = settings.supabase_service_role_key.get_secret_value().strip()
    register_secret(key)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"SUPABASE_URL must start with https:// (got {url[:60]!r})")
    exp = key_expiry(key)
    if exp is not None:
        left = exp - time.time()
        if left <= 0:
            raise ConfigError("SUPABASE_SERVICE_ROLE_KEY has expired: copy the current "
                              "service_role key from the project's API settings")
        if left < 30 * 86400:
            log.warning("service_key_expires_soon", days=round(left / 86400, 1))
    store = RpcStore(url, key, queries, recipients=recipients, max_attempts=3, max_retry_s=10)
    try:
        await store.open()
    except Exception as exc:  # noqa: BLE001 - supabase-py's own URL/key validation
        raise ConfigError(f"Supabase client: {_redact(str(exc), key)}") from None
    try:
        await store.check()
    except RpcConfigError as exc:
        await store.close()
        if exc.code == "PGRST202":
            raise ConfigError("functions missing: run listener migrate --print and paste into "
                              "the Supabase SQL editor") from None
        raise ConfigError(_redact(str(exc), key)) from None
    except RpcError as exc:
        await store.close()
        raise ConfigError(f"Supabase unreachable: {_redact(str(exc), key)}") from None
    store.max_attempts, store.max_retry_s = 5, 30.0
    log.info("supabase_backend", url=url, realtime=f"{url}/realtime/v1")
    return Backend("supabase", store, RealtimeSource(url, key, queries), None, [store.close])
