"""A Supabase Realtime (``postgres_changes``) test server, fed by real PostgreSQL.

It speaks the Phoenix channels protocol, V1 JSON serializer (the only one the
Python ``realtime`` 2.34 client speaks), at
``ws://127.0.0.1:<port>/realtime/v1/websocket?apikey=<key>&vsn=1.0.0``, and turns
real row changes of the tables it watches (default ``public.sessions``) into
``postgres_changes`` frames.

Use::

    async with RealtimeServer("host=127.0.0.1 user=postgres dbname=x") as rt:
        client = AsyncRealtimeClient(f"{rt.url}/realtime/v1", SERVICE_ROLE_KEY)
        ...
        rt.ignore_joins = True            # knobs, settable at any time
        await rt.close_all(1011)          # one-shot faults

``rt.url`` (``http://127.0.0.1:<port>``) is a usable ``SUPABASE_URL`` only for
Realtime; to serve REST and Realtime under one URL (what supabase-py needs),
put :class:`postgrest_server.SupabaseGateway` (or ``SupabaseStack``) in front.

API: ``RealtimeServer(conninfo, *, api_keys=(ANON_KEY, SERVICE_ROLE_KEY),
jwt_secret=DEFAULT_JWT_SECRET, tables=("public.sessions",), publication=None,
host="127.0.0.1", port=0, notify_channel="_realtime_test_server",
max_record_bytes=7500, toast_threshold=2000, keep_trigger=False)``;
``await start()`` returns the port (the watched tables must exist: it installs
the trigger, LISTENs, then serves); ``await stop()`` closes sockets (1001) and
drops the trigger unless ``keep_trigger``. Knobs (attributes): ``ignore_joins``,
``fail_subscriptions``, ``drop_changes``, ``duplicate_changes``,
``subscribed_delay``, ``reject_connections``. One-shot faults: ``close_all(code)``,
``abort_all()``, ``send_phx_error(topic=None)``, ``send_system_error(topic=None)``,
``send_postgres_changes(payload, topic=None)`` (one ``postgres_changes`` frame with
a payload of the test's own, hostile or malformed, to every streaming channel;
``binding_ids(schema, table)`` gives the ids such a payload names).
Counters: ``connections_total``, ``connections_open``, ``joins_total``,
``joins_by_topic``, ``leaves_total``, ``heartbeats_total``,
``access_tokens_total``, ``changes_seen``, ``changes_sent``, ``changes_dropped``,
``frames_in``/``frames_out``; ``joined_topics()``; ``await wait_for(predicate)``.
``ANON_KEY``/``SERVICE_ROLE_KEY`` are HS256 JWTs signed with the Supabase CLI's
demo secret (the well-known local-dev keys).

Faithful (checked against supabase/realtime ``lib/realtime_web/channels/
realtime_channel.ex``, ``user_socket.ex``, ``lib/extensions/postgres_cdc_rls/*``,
``priv/repo/tenant_schema/realtime/functions/apply_rls.sql``, phoenixframework/
phoenix ``lib/phoenix/socket.ex``, ``channel/server.ex``,
``socket/serializers/v1_json_serializer.ex``, eulerto/wal2json ``wal2json.c``
and the client in ``realtime/_async/*.py``):

* Frames are ``{"topic","event","payload","ref"}`` (V1 writes no ``join_ref``);
  ``ref`` is always present, ``null`` for pushes.
* Handshake: missing apikey -> HTTP 401 ``{"error": "API key is missing"}``;
  unknown key -> 401 ``{"error": "Failed to validate JWT signature"}`` (or
  "The token provided is not a valid JWT" when it has no JWT shape); the
  client's ``connect()`` then retries and finally raises ``InvalidStatus``.
* ``phx_join`` -> ``phx_reply`` ``{"status":"ok","response":{"postgres_changes":
  [<each binding as sent, plus "id">]}}`` with the join's ``ref``. The id is a
  hash of the binding (Realtime: ``:erlang.phash2(params)``): stable, 27 bits,
  never 0 here. Then, only when there are bindings, a ``system`` push
  ``{"channel": <name without "realtime:">, "extension": "postgres_changes",
  "message": "Subscribed to PostgreSQL", "status": "ok"}`` (``ref`` null).
  Changes are streamed to a channel only after that message.
* A subscription that matches no table of the publication (when
  ``publication=`` is given) gets ``system`` ``status: "error"``, message
  ``Unable to subscribe to changes with given parameters. Please check Realtime
  is enabled for the given connect parameters: [event: *, schema: public, table:
  sessions, filters: [], select: nil]``; the server channel stays open and
  streams nothing (Realtime does not retry that case).
* A ``phx_join`` for a topic already joined on the socket (the client's
  automatic rejoin after an error) is Phoenix's duplicate join: the old channel
  is closed with ``phx_close`` whose ``ref`` is the *old* join ref, then the new
  join is processed normally. The Python client does not compare that ref.
* ``phx_leave`` -> ``phx_reply`` ok ``{}`` (leave's ref), then ``phx_close``
  (join ref). Heartbeat on topic ``phoenix`` -> ``phx_reply`` ok ``{}`` echoing
  the (null) ref. A message for a topic that is not joined ->
  ``phx_reply`` error ``{"reason": "unmatched topic"}``.
* ``access_token``: ignored when null, equal to the current one or ``sb_...``;
  a new valid token re-runs the postgres subscription (a second "Subscribed to
  PostgreSQL"); an invalid one gets ``system`` error (extension ``system``) and
  the channel is closed (``phx_close``).
* Change frames: ``{"event":"postgres_changes","ref":null,"payload":{"ids":[..],
  "data":{"schema","table","commit_timestamp","type","errors","columns",
  "record"?,"old_record"?}}}`` where ``ids`` are the ids of the channel's
  bindings that match; INSERT has no ``old_record`` key, DELETE no ``record``
  key (Realtime's NewRecord/UpdatedRecord/DeletedRecord structs);
  ``columns`` is ``[{"name": attname, "type": pg_type.typname}]`` in attnum
  order (``int4``, ``timestamptz``, ``_text``); values are ``to_jsonb`` of the
  column (timestamps rendered in UTC, as on Supabase); ``commit_timestamp`` is
  ``YYYY-MM-DDTHH:MM:SS.mmmZ``; ``errors`` is null.
* ``old_record``: the replica identity, like wal2json: the primary key with
  ``REPLICA IDENTITY DEFAULT``, the index columns with ``USING INDEX``, the
  whole old row with ``FULL``; DELETE on a table with RLS enabled is cut to
  the primary key. UPDATE/DELETE of a table with no primary key and no FULL
  identity (or identity NOTHING) produce no change at all (wal2json skips
  them).
* Unchanged TOASTed values: wal2json does not send unchanged out-of-line
  values, so an UPDATE ``record`` lacks such columns unless the table has
  ``REPLICA IDENTITY FULL``. Approximated here: an UPDATE omits columns whose
  value did not change and whose stored size (``pg_column_size``) exceeds
  ``toast_threshold`` (default 2000 bytes; ``None`` disables).
* "Payload too large": Realtime's ``apply_rls`` marks a change whose WAL record
  exceeds ``max_record_bytes`` (1 MiB on Supabase) with ``errors: ["Error 413:
  Payload Too Large"]`` and keeps in ``record``/``old_record`` only the values
  whose JSON text is at most 64 bytes (nulls are dropped too); ``columns`` and
  the rest stay. Same here, but the limit is the size of this server's JSON
  payload and defaults to 7500 bytes, because NOTIFY payloads must stay under
  8000 bytes. Should even the reduced payload not fit, record/old_record are
  cut to the primary key (never an error in the writer's transaction).

Simplified / not implemented:

* Changes come from an AFTER ROW trigger (``_realtime_test.notify_change``,
  SECURITY DEFINER so that writes by API roles are captured too) and NOTIFY,
  not logical replication: they arrive at commit, in commit order;
  ``commit_timestamp`` is the row change's ``clock_timestamp()``, not the commit
  time. Rolled-back changes are never sent (as with the WAL). TRUNCATE is not
  sent. Only the tables given in ``tables`` are watched, whatever the
  publication says; ``publication`` is only checked when a channel subscribes.
* No RLS evaluation, column privileges or ``select`` column lists: every
  subscriber sees full rows. Filters (``eq, neq, lt, lte, gt, gte, in, is,
  like, ilike, match, imatch, isdistinct``, ``not.``) are evaluated in Python on
  the JSON values (numbers compared as numbers, others as text), not with the
  column's SQL type.
* No broadcast fan-out, presence, private channels, replay, rate limits, V2
  serializer (``vsn`` other than 1.x gets HTTP 403), tenant lookup, or the 60 s
  idle timeout. The connect-error backoff sleep is not reproduced.
* JWTs are checked against ``jwt_secret`` (HS256) or the configured keys only.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import re
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg import sql
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger(__name__)

DEFAULT_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
SUBSCRIBED_MESSAGE = "Subscribed to PostgreSQL"
PAYLOAD_TOO_LARGE = "Error 413: Payload Too Large"
NOTIFY_HARD_LIMIT = 7900  # PostgreSQL refuses NOTIFY payloads of 8000 bytes or more


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(role: str, secret: str = DEFAULT_JWT_SECRET, *, exp: int = 1983812996, **claims: Any) -> str:
    """An HS256 JWT like Supabase's API keys (defaults give the CLI demo keys)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = {"iss": "supabase-demo", "role": role, "exp": exp, **claims}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = _b64(hmac.new(secret.encode(), signing_input, hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def verify_jwt(token: str, secret: str) -> dict[str, Any] | None:
    """Claims of a valid, unexpired HS256 token carrying ``role`` and ``exp``, else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        expected = _b64(hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, parts[2]):
            return None
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    if not isinstance(claims, dict) or "role" not in claims or not isinstance(claims.get("exp"), int):
        return None
    if claims["exp"] <= time.time():
        return None
    return claims


ANON_KEY = make_jwt("anon")
SERVICE_ROLE_KEY = make_jwt("service_role")


def binding_id(binding: dict[str, Any]) -> int:
    """Stable non-zero id of a postgres_changes binding (Realtime uses phash2)."""
    canonical = json.dumps(binding, sort_keys=True, separators=(",", ":"), default=str)
    return (zlib.crc32(canonical.encode()) & 0x7FFFFFF) or 1


# --------------------------------------------------------------------------- filters


_OPS = ("eq", "neq", "lt", "lte", "gt", "gte", "in", "like", "ilike", "is", "match", "imatch", "isdistinct")


@dataclass(frozen=True)
class _Filter:
    column: str
    op: str
    value: str
    negate: bool


def _split_top_level(text: str) -> list[str]:
    parts, depth, quoted, current = [], 0, False, []
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def _parse_filters(text: str) -> list[_Filter]:
    if not text.strip():
        return []
    filters = []
    for segment in _split_top_level(text.strip()):
        column, sep, rest = segment.partition("=")
        pieces = rest.split(".", 1) if sep else [segment]
        negate = False
        if len(pieces) == 2 and pieces[0] == "not":
            negate = True
            pieces = pieces[1].split(".", 1)
        if not sep or len(pieces) != 2 or pieces[0] not in _OPS or not column:
            raise ValueError(f"Error parsing `filter` params: {json.dumps(pieces)}")
        filters.append(_Filter(column.strip(), pieces[0], pieces[1], negate))
    return filters


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _compare(value: Any, literal: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            other = float(literal)
        except ValueError:
            return None
        return (value > other) - (value < other)
    text = _as_text(value)
    return (text > literal) - (text < literal)


def _like(value: Any, pattern: str, flags: int = 0) -> bool:
    if value is None:
        return False
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, _as_text(value), flags | re.DOTALL) is not None


def _filter_matches(flt: _Filter, row: dict[str, Any] | None) -> bool:
    if not row or flt.column not in row:
        return False
    value, lit, op = row[flt.column], flt.value, flt.op
    if op == "is":
        lowered = lit.lower()
        if lowered in ("null", "unknown"):
            result = value is None
        elif lowered == "not_null":
            result = value is not None
        elif lowered in ("true", "false"):
            result = value is (lowered == "true")
        else:
            result = False
    elif op == "isdistinct":
        result = value is None or _as_text(value) != lit
    elif op == "in":
        items = [i.strip().strip('"') for i in lit.strip().lstrip("(").rstrip(")").split(",") if i.strip()]
        result = value is not None and any(_compare(value, i) == 0 for i in items)
    elif op in ("like", "ilike"):
        result = _like(value, lit, re.IGNORECASE if op == "ilike" else 0)
    elif op in ("match", "imatch"):
        result = value is not None and re.search(lit, _as_text(value), re.IGNORECASE if op == "imatch" else 0) is not None
    else:
        cmp = _compare(value, lit)
        if cmp is None:
            return False  # NULL never passes a comparison, negated or not
        result = {"eq": cmp == 0, "neq": cmp != 0, "lt": cmp < 0, "lte": cmp <= 0, "gt": cmp > 0, "gte": cmp >= 0}[op]
    return not result if flt.negate else result


@dataclass
class _Binding:
    raw: dict[str, Any]
    id: int
    action: str
    schema: str
    table: str
    filters: list[_Filter]

    @classmethod
    def parse(cls, raw: Any) -> _Binding:
        if not isinstance(raw, dict):
            raise ValueError(f"No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {raw!r}")
        event = raw.get("event")
        action = "*"
        if isinstance(event, str) and event.upper() in ("INSERT", "UPDATE", "DELETE"):
            action = event.upper()
        schema, table, flt = raw.get("schema"), raw.get("table"), raw.get("filter")
        filters: list[_Filter] = []
        if isinstance(schema, str) and isinstance(table, str) and isinstance(flt, str):
            filters = _parse_filters(flt)
        elif isinstance(schema, str) and isinstance(table, str) and "filter" not in raw:
            pass
        elif isinstance(schema, str) and "table" not in raw and "filter" not in raw:
            table = "*"
        elif isinstance(table, str) and "schema" not in raw and "filter" not in raw:
            schema = "public"
        else:
            raise ValueError(
                "No subscription params provided. Please provide at least a `schema` or `table` "
                f"to subscribe to: {raw!r}"
            )
        return cls(raw, binding_id(raw), action, schema, table, filters)

    def describe(self) -> str:
        filters = "[" + ", ".join(
            f'{{"{f.column}", "{f.op}", "{f.value}", {str(f.negate).lower()}}}' for f in self.filters
        ) + "]"
        return f"event: {self.action}, schema: {self.schema}, table: {self.table}, filters: {filters}, select: nil"

    def covers(self, schema: str, table: str) -> bool:
        return self.schema in ("*", schema) and self.table in ("*", table)

    def matches(self, change: dict[str, Any]) -> bool:
        if not self.covers(change.get("schema", ""), change.get("table", "")):
            return False
        if self.action != "*" and self.action != change.get("type"):
            return False
        if not self.filters:
            return True
        rows = [change.get("record")]
        if change.get("type") == "DELETE":
            rows = [change.get("old_record")]
        return any(row is not None and all(_filter_matches(f, row) for f in self.filters) for row in rows)


# --------------------------------------------------------------------------- state


@dataclass
class _Channel:
    topic: str
    join_ref: str | None
    bindings: list[_Binding]
    access_token: str | None
    streaming: bool = False
    closed: bool = False
    tasks: set[asyncio.Task] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.topic.removeprefix("realtime:")


@dataclass
class _Conn:
    id: int
    ws: ServerConnection
    apikey: str | None
    channels: dict[str, _Channel] = field(default_factory=dict)


_TRIGGER_FUNCTION = r"""
CREATE OR REPLACE FUNCTION _realtime_test.notify_change() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER -- capture must not depend on the writer's privileges (API roles included)
SET search_path = pg_catalog
SET timezone = 'UTC'
AS $fn$
DECLARE
    channel     text := TG_ARGV[0];
    max_bytes   int  := TG_ARGV[1]::int;
    toast_bytes int  := TG_ARGV[2]::int;
    ident       "char";
    rls         boolean;
    pk          text[];
    idcols      text[];
    cols        jsonb;
    rec         jsonb;
    old_rec     jsonb;
    old_full    jsonb;
    big         text[] := '{}';
    is_big      boolean;
    col         text;
    payload     jsonb;
BEGIN
    SELECT c.relreplident, c.relrowsecurity INTO ident, rls FROM pg_class c WHERE c.oid = TG_RELID;
    SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}') INTO pk
      FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = TG_RELID AND i.indisprimary;
    IF ident = 'i' THEN
        SELECT coalesce(array_agg(a.attname::text ORDER BY a.attnum), '{}') INTO idcols
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = TG_RELID AND i.indisreplident;
    ELSE
        idcols := pk;
    END IF;
    -- wal2json emits no UPDATE/DELETE without a usable replica identity
    IF TG_OP <> 'INSERT' AND ident <> 'f' AND (ident = 'n' OR cardinality(idcols) = 0) THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object('name', a.attname, 'type', t.typname) ORDER BY a.attnum), '[]')
      INTO cols
      FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        rec := to_jsonb(NEW);
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_full := to_jsonb(OLD);
        IF ident = 'f' AND NOT (TG_OP = 'DELETE' AND rls) THEN
            old_rec := old_full;
        ELSE
            SELECT jsonb_object_agg(e.key, e.value) INTO old_rec FROM jsonb_each(old_full) e
             WHERE e.key = ANY (CASE WHEN TG_OP = 'DELETE' AND rls THEN pk ELSE idcols END);
        END IF;
    END IF;
    -- unchanged out-of-line (TOASTed) values are not in the WAL of an UPDATE
    IF TG_OP = 'UPDATE' AND ident <> 'f' AND toast_bytes > 0 THEN
        FOR col IN
            SELECT n.key FROM jsonb_each(rec) n JOIN jsonb_each(old_full) o ON o.key = n.key
             WHERE n.value = o.value AND octet_length(n.value::text) > toast_bytes / 2
        LOOP
            EXECUTE format('SELECT pg_column_size(($1).%I) > $2', col) INTO STRICT is_big USING NEW, toast_bytes;
            IF is_big THEN
                big := big || col;
            END IF;
        END LOOP;
        rec := rec - big;
    END IF;
    payload := jsonb_build_object(
        'schema', TG_TABLE_SCHEMA,
        'table', TG_TABLE_NAME,
        'type', TG_OP,
        'commit_timestamp', to_char(clock_timestamp() AT TIME ZONE 'utc', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
        'columns', cols,
        'errors', NULL);
    IF TG_OP <> 'DELETE' THEN payload := payload || jsonb_build_object('record', rec); END IF;
    IF TG_OP <> 'INSERT' THEN payload := payload || jsonb_build_object('old_record', old_rec); END IF;
    IF octet_length(payload::text) > max_bytes THEN
        -- Realtime's apply_rls: errors = 413, keep only values of at most 64 bytes
        payload := payload || jsonb_build_object('errors', jsonb_build_array('Error 413: Payload Too Large'));
        IF TG_OP <> 'DELETE' THEN
            payload := payload || jsonb_build_object('record', (SELECT jsonb_object_agg(e.key, e.value)
                FROM jsonb_each(rec) e WHERE e.value <> 'null'::jsonb AND octet_length(e.value::text) <= 64));
        END IF;
        IF TG_OP <> 'INSERT' THEN
            payload := payload || jsonb_build_object('old_record', (SELECT jsonb_object_agg(e.key, e.value)
                FROM jsonb_each(old_rec) e WHERE e.value <> 'null'::jsonb AND octet_length(e.value::text) <= 64));
        END IF;
        IF octet_length(payload::text) > max_bytes THEN
            IF TG_OP <> 'DELETE' THEN
                payload := payload || jsonb_build_object('record', (SELECT jsonb_object_agg(e.key, e.value)
                    FROM jsonb_each(rec) e WHERE e.key = ANY (pk)));
            END IF;
            IF TG_OP <> 'INSERT' THEN
                payload := payload || jsonb_build_object('old_record', (SELECT jsonb_object_agg(e.key, e.value)
                    FROM jsonb_each(old_rec) e WHERE e.key = ANY (pk)));
            END IF;
        END IF;
    END IF;
    payload := payload || jsonb_build_object('_seq', nextval('_realtime_test.change_seq'));
    IF octet_length(payload::text) < 7990 THEN
        PERFORM pg_notify(channel, payload::text);
    END IF;
    RETURN NULL;
END
$fn$;
"""


class RealtimeServer:
    """Phoenix/Realtime websocket server driven by real PostgreSQL changes.

    Knobs (plain attributes, read at the moment they matter):

    * ``ignore_joins``: phx_join gets no reply (client: TIMED_OUT, then rejoins).
    * ``fail_subscriptions``: joins get the ok reply, then a ``system`` error
      ("Unable to subscribe to changes with given parameters...") instead of
      "Subscribed to PostgreSQL"; the channel streams nothing.
    * ``drop_changes``: changes are silently lost while set.
    * ``duplicate_changes``: every change frame is sent twice.
    * ``subscribed_delay``: seconds between the join reply and "Subscribed to
      PostgreSQL" (changes committed in between are lost, as with Realtime).
    * ``reject_connections``: an HTTP status (e.g. 503) answered to every
      websocket handshake, or None.

    One-shot faults: :meth:`close_all`, :meth:`abort_all`, :meth:`send_phx_error`,
    :meth:`send_system_error`. Counters: ``connections_total``, ``joins_total``,
    ``joins_by_topic``, ``leaves_total``, ``heartbeats_total``,
    ``access_tokens_total``, ``changes_seen``, ``changes_sent``,
    ``changes_dropped``; ``frames_in`` / ``frames_out`` keep every frame as
    ``(connection id, dict)``.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        api_keys: Iterable[str] | None = None,
        jwt_secret: str = DEFAULT_JWT_SECRET,
        tables: Iterable[str] = ("public.sessions",),
        publication: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        notify_channel: str = "_realtime_test_server",
        max_record_bytes: int = 7500,
        toast_threshold: int | None = 2000,
        keep_trigger: bool = False,
    ) -> None:
        self.conninfo = conninfo
        self.api_keys = set(api_keys) if api_keys is not None else {ANON_KEY, SERVICE_ROLE_KEY}
        self.jwt_secret = jwt_secret
        self.tables = [self._split_table(t) for t in tables]
        self.publication = publication
        self.host = host
        self.port = port
        self.notify_channel = notify_channel
        self.max_record_bytes = min(max_record_bytes, NOTIFY_HARD_LIMIT - 200)
        self.toast_threshold = toast_threshold
        self.keep_trigger = keep_trigger

        # knobs
        self.ignore_joins = False
        self.fail_subscriptions = False
        self.drop_changes = False
        self.duplicate_changes = False
        self.subscribed_delay = 0.0
        self.reject_connections: int | None = None

        # counters and logs
        self.connections_total = 0
        self.joins_total = 0
        self.joins_by_topic: collections.Counter[str] = collections.Counter()
        self.leaves_total = 0
        self.heartbeats_total = 0
        self.access_tokens_total = 0
        self.changes_seen = 0
        self.changes_sent = 0
        self.changes_dropped = 0
        self.frames_in: list[tuple[int, dict[str, Any]]] = []
        self.frames_out: list[tuple[int, dict[str, Any]]] = []

        self._conns: dict[int, _Conn] = {}
        self._server: Server | None = None
        self._listen_task: asyncio.Task | None = None
        self._listening = asyncio.Event()
        self._next_conn_id = 0

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _split_table(name: str) -> tuple[str, str]:
        schema, _, table = name.rpartition(".")
        return (schema or "public", table)

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:<port>``); Realtime lives at ``/realtime/v1``."""
        return f"http://{self.host}:{self.port}"

    @property
    def websocket_url(self) -> str:
        return f"ws://{self.host}:{self.port}/realtime/v1/websocket"

    @property
    def connections_open(self) -> int:
        return len(self._conns)

    def joined_topics(self) -> list[str]:
        return sorted({t for c in self._conns.values() for t in c.channels})

    async def __aenter__(self) -> RealtimeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> int:
        await self.install_trigger()
        self._listening.clear()
        self._listen_task = asyncio.create_task(self._listen_loop(), name="realtime-test-listen")
        waiter = asyncio.create_task(self._listening.wait())
        done, _ = await asyncio.wait({waiter, self._listen_task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if self._listen_task.done():
                self._listen_task.result()  # raise the connection error
            raise TimeoutError("LISTEN did not start")
        self._server = await serve(
            self._handler,
            self.host,
            self.port,
            process_request=self._process_request,
            ping_interval=None,
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass
            self._server = None
        for conn in list(self._conns.values()):
            self._drop_channels(conn)
        if self._listen_task is not None:
            self._listen_task.cancel()
            try:
                await self._listen_task
            except (asyncio.CancelledError, Exception):
                pass
            self._listen_task = None
        if not self.keep_trigger:
            try:
                await self.remove_trigger()
            except psycopg.Error:
                log.warning("could not remove the change trigger", exc_info=True)

    async def install_trigger(self) -> None:
        """Create (idempotently) the NOTIFY trigger on every watched table."""
        async with await psycopg.AsyncConnection.connect(self.conninfo) as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('_realtime_test'))")
                await conn.execute("CREATE SCHEMA IF NOT EXISTS _realtime_test")
                await conn.execute("CREATE SEQUENCE IF NOT EXISTS _realtime_test.change_seq")
                await conn.execute(_TRIGGER_FUNCTION)
                toast = str(self.toast_threshold or 0)
                for schema, table in self.tables:
                    target = sql.Identifier(schema, table)
                    await conn.execute(
                        sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(self.notify_channel), target)
                    )
                    await conn.execute(
                        sql.SQL(
                            "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW "
                            "EXECUTE FUNCTION _realtime_test.notify_change({}, {}, {})"
                        ).format(
                            sql.Identifier(self.notify_channel),
                            target,
                            sql.Literal(self.notify_channel),
                            sql.Literal(str(self.max_record_bytes)),
                            sql.Literal(toast),
                        )
                    )

    async def remove_trigger(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            for schema, table in self.tables:
                await conn.execute(
                    sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                        sql.Identifier(self.notify_channel), sql.Identifier(schema, table)
                    )
                )

    async def _listen_loop(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.notify_channel)))
                    self._listening.set()
                    async for notify in conn.notifies():
                        try:
                            await self._on_change(notify.payload)
                        except Exception:
                            log.exception("failed to deliver a change")
            except asyncio.CancelledError:
                raise
            except psycopg.OperationalError:
                if not self._listening.is_set():
                    raise
                log.warning("LISTEN connection lost; reconnecting", exc_info=True)
                await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ helpers for tests

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def close_all(self, code: int = 1011, reason: str = "") -> None:
        """Close every websocket with a close frame (1000 and 1011 are what Realtime uses)."""
        conns = list(self._conns.values())
        for conn in conns:
            self._drop_channels(conn)
        await asyncio.gather(*(c.ws.close(code, reason) for c in conns), return_exceptions=True)

    def abort_all(self) -> None:
        """Drop every TCP connection without a close frame (client sees 1006)."""
        for conn in list(self._conns.values()):
            self._drop_channels(conn)
            conn.ws.transport.abort()

    async def send_phx_error(self, topic: str | None = None) -> int:
        """Crash matching channels: ``phx_error`` (ref = join ref), as when a channel process dies."""
        count = 0
        for conn in list(self._conns.values()):
            for ch in list(conn.channels.values()):
                if topic is None or ch.topic in (topic, f"realtime:{topic}"):
                    self._remove_channel(conn, ch)
                    await self._send(conn, ch.topic, "phx_error", {"reason": "channel_crash"}, ch.join_ref)
                    count += 1
        return count

    async def send_system_error(self, topic: str | None = None, message: str | None = None) -> int:
        """Push the "Unable to subscribe" ``system`` error on matching channels; they stop streaming."""
        count = 0
        for conn in list(self._conns.values()):
            for ch in list(conn.channels.values()):
                if topic is None or ch.topic in (topic, f"realtime:{topic}"):
                    ch.streaming = False
                    await self._push_system(conn, ch, "error", message or self._unable_message(ch.bindings[:1]))
                    count += 1
        return count

    def binding_ids(self, schema: str = "public", table: str = "sessions") -> list[int]:
        """Ids of the streaming channels' bindings that cover ``schema.table``: what the
        ``ids`` of a change of that table would name."""
        return sorted({b.id for conn in self._conns.values() for ch in conn.channels.values()
                       if ch.streaming for b in ch.bindings if b.covers(schema, table)})

    async def send_postgres_changes(self, payload: Any, topic: str | None = None) -> int:
        """Push one ``postgres_changes`` frame carrying ``payload`` exactly as given (any
        JSON value: Realtime itself never sends a malformed one) to every streaming
        channel, or only ``topic``'s; the number of frames sent. Test-only."""
        count = 0
        for conn in list(self._conns.values()):
            for ch in list(conn.channels.values()):
                if ch.streaming and (topic is None or ch.topic in (topic, f"realtime:{topic}")):
                    await self._send(conn, ch.topic, "postgres_changes", payload, None)
                    count += 1
        return count

    # ------------------------------------------------------------------ protocol

    def _json_response(self, connection: ServerConnection, status: int, body: Any) -> Response:
        response = connection.respond(status, json.dumps(body) if body is not None else "")
        if body is not None:
            response.headers["Content-Type"] = "application/json; charset=utf-8"
        return response

    def _token_error(self, token: str) -> str | None:
        if token in self.api_keys or token.startswith("sb_"):
            return None
        if len(token.split(".")) != 3:
            return "The token provided is not a valid JWT"
        if verify_jwt(token, self.jwt_secret) is None:
            return "Failed to validate JWT signature"
        return None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path.rstrip("/") != "/realtime/v1/websocket":
            return connection.respond(404, "Not Found\n")
        if self.reject_connections:
            return self._json_response(connection, self.reject_connections, {"error": "Error connecting to Realtime"})
        query = parse_qs(parts.query)
        vsn = query.get("vsn", ["1.0.0"])[0]
        if not vsn.startswith("1."):
            return self._json_response(connection, 403, None)
        apikey = request.headers.get("x-api-key") or query.get("apikey", [None])[0]
        if not apikey:
            return self._json_response(connection, 401, {"error": "API key is missing"})
        error = self._token_error(apikey)
        if error:
            return self._json_response(connection, 401, {"error": error})
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path).query) if ws.request else {}
        self._next_conn_id += 1
        conn = _Conn(self._next_conn_id, ws, query.get("apikey", [None])[0])
        self._conns[conn.id] = conn
        self.connections_total += 1
        try:
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(msg, dict) or not isinstance(msg.get("topic"), str):
                    continue
                self.frames_in.append((conn.id, msg))
                await self._dispatch(conn, msg)
        except ConnectionClosed:
            pass
        finally:
            self._drop_channels(conn)
            self._conns.pop(conn.id, None)

    async def _send(self, conn: _Conn, topic: str, event: str, payload: Any, ref: str | None) -> None:
        frame = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        self.frames_out.append((conn.id, frame))
        try:
            await conn.ws.send(json.dumps(frame, separators=(",", ":")))
        except ConnectionClosed:
            pass

    async def _reply(self, conn: _Conn, msg: dict[str, Any], status: str, response: Any) -> None:
        await self._send(conn, msg["topic"], "phx_reply", {"status": status, "response": response}, msg.get("ref"))

    async def _dispatch(self, conn: _Conn, msg: dict[str, Any]) -> None:
        topic, event = msg["topic"], msg.get("event")
        if topic == "phoenix" and event == "heartbeat":
            self.heartbeats_total += 1
            await self._reply(conn, msg, "ok", {})
            return
        if event == "phx_join":
            await self._handle_join(conn, msg)
            return
        ch = conn.channels.get(topic)
        if ch is None:
            if event == "phx_leave":
                await self._reply(conn, msg, "ok", {})
            else:
                await self._reply(conn, msg, "error", {"reason": "unmatched topic"})
            return
        join_ref = msg.get("join_ref")
        if join_ref is not None and join_ref != ch.join_ref:
            return  # stale message for an earlier join: Phoenix ignores it
        if event == "phx_leave":
            self.leaves_total += 1
            self._remove_channel(conn, ch)
            await self._reply(conn, msg, "ok", {})
            await self._send(conn, topic, "phx_close", {}, ch.join_ref)
        elif event == "access_token":
            self.access_tokens_total += 1
            await self._handle_access_token(conn, ch, msg.get("payload") or {})
        elif event == "presence":
            await self._reply(conn, msg, "ok", {})
        # broadcast and anything else: no reply (not implemented)

    async def _handle_join(self, conn: _Conn, msg: dict[str, Any]) -> None:
        topic = msg["topic"]
        self.joins_total += 1
        self.joins_by_topic[topic] += 1
        if self.ignore_joins:
            return
        old = conn.channels.get(topic)
        if old is not None:  # Phoenix duplicate join: close the existing channel first
            self._remove_channel(conn, old)
            await self._send(conn, topic, "phx_close", {}, old.join_ref)
        if not topic.startswith("realtime:"):
            await self._reply(conn, msg, "error", {"reason": "unmatched topic"})
            return
        if topic == "realtime:":
            await self._reply(conn, msg, "error", {"reason": "TopicNameRequired: You must provide a topic name"})
            return
        payload = msg.get("payload") if isinstance(msg.get("payload"), dict) else {}
        token = payload.get("access_token") or payload.get("user_token") or conn.apikey
        error = self._token_error(token) if isinstance(token, str) else "The token provided is not a valid JWT"
        if error:
            code = "MalformedJWT" if "not a valid JWT" in error else "JwtSignatureError"
            await self._reply(conn, msg, "error", {"reason": f"{code}: {error}"})
            return
        config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
        raw_bindings = [b for b in (config.get("postgres_changes") or []) if b is not None]
        bindings: list[_Binding] = []
        parse_error = None
        for raw in raw_bindings:
            try:
                bindings.append(_Binding.parse(raw))
            except ValueError as exc:
                parse_error = str(exc)
                bindings.append(_Binding(raw if isinstance(raw, dict) else {}, binding_id(raw), "*", "", "", []))
        ch = _Channel(topic, msg.get("ref"), bindings, token)
        conn.channels[topic] = ch
        echo = [{**b.raw, "id": b.id} for b in bindings]
        await self._reply(conn, msg, "ok", {"postgres_changes": echo})
        if bindings:
            self._spawn(ch, self._subscribe(conn, ch, parse_error))

    async def _handle_access_token(self, conn: _Conn, ch: _Channel, payload: dict[str, Any]) -> None:
        token = payload.get("access_token")
        if token is None or token == ch.access_token or (isinstance(token, str) and token.startswith("sb_")):
            return
        error = self._token_error(token) if isinstance(token, str) else "The token provided is not a valid JWT"
        if error:
            await self._push_system(conn, ch, "error", error, extension="system")
            self._remove_channel(conn, ch)
            await self._send(conn, ch.topic, "phx_close", {}, ch.join_ref)
            return
        ch.access_token = token
        if ch.bindings:
            ch.streaming = False
            self._spawn(ch, self._subscribe(conn, ch, None))

    def _spawn(self, ch: _Channel, coro: Any) -> None:
        task = asyncio.create_task(coro)
        ch.tasks.add(task)
        task.add_done_callback(ch.tasks.discard)

    def _unable_message(self, bindings: list[_Binding]) -> str:
        params = bindings[0].describe() if bindings else "event: *, schema: public, table: *, filters: [], select: nil"
        return (
            "Unable to subscribe to changes with given parameters. Please check Realtime is enabled "
            f"for the given connect parameters: [{params}]"
        )

    async def _publication_tables(self) -> set[tuple[str, str]]:
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as db:
            cur = await db.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (self.publication,)
            )
            return {(r[0], r[1]) for r in await cur.fetchall()}

    async def _subscribe(self, conn: _Conn, ch: _Channel, parse_error: str | None) -> None:
        if self.subscribed_delay:
            await asyncio.sleep(self.subscribed_delay)
        if ch.closed:
            return
        error = parse_error
        if error is None and self.fail_subscriptions:
            error = self._unable_message(ch.bindings)
        if error is None and self.publication is not None:
            published = await self._publication_tables()
            for b in ch.bindings:
                if not any(b.covers(s, t) for s, t in published):
                    error = self._unable_message([b])
                    break
        if ch.closed:
            return
        if error is not None:
            await self._push_system(conn, ch, "error", error)
            return
        ch.streaming = True
        await self._push_system(conn, ch, "ok", SUBSCRIBED_MESSAGE)

    async def _push_system(
        self, conn: _Conn, ch: _Channel, status: str, message: str, extension: str = "postgres_changes"
    ) -> None:
        payload = {"channel": ch.name, "extension": extension, "message": message, "status": status}
        await self._send(conn, ch.topic, "system", payload, None)

    def _remove_channel(self, conn: _Conn, ch: _Channel) -> None:
        ch.closed = True
        ch.streaming = False
        for task in list(ch.tasks):
            task.cancel()
        if conn.channels.get(ch.topic) is ch:
            del conn.channels[ch.topic]

    def _drop_channels(self, conn: _Conn) -> None:
        for ch in list(conn.channels.values()):
            self._remove_channel(conn, ch)

    async def _on_change(self, raw: str) -> None:
        change = json.loads(raw)
        change.pop("_seq", None)
        self.changes_seen += 1
        if self.drop_changes:
            self.changes_dropped += 1
            return
        for conn in list(self._conns.values()):
            for ch in list(conn.channels.values()):
                if not ch.streaming:
                    continue
                ids = [b.id for b in ch.bindings if b.matches(change)]
                if not ids:
                    continue
                for _ in range(2 if self.duplicate_changes else 1):
                    self.changes_sent += 1
                    await self._send(conn, ch.topic, "postgres_changes", {"ids": ids, "data": change}, None)
