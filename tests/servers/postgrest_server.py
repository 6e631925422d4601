"""A PostgREST RPC test server (as reached through Supabase), on real PostgreSQL.

Use::

    async with PostgrestServer("host=127.0.0.1 user=postgres dbname=x") as rest:
        client = await acreate_client(rest.url, SERVICE_ROLE_KEY)
        await client.rpc("my_fn", {"arg": 1}).execute()
        rest.fail_status = 500            # knobs, settable at any time

``SupabaseStack`` starts this server, :class:`realtime_server.RealtimeServer`
and a :class:`SupabaseGateway` in front of both, so one URL (``stack.url``)
serves ``/rest/v1`` and ``/realtime/v1`` like a Supabase project URL: that is
the ``SUPABASE_URL`` for the daemon (with ``SUPABASE_SERVICE_ROLE_KEY =
SERVICE_ROLE_KEY``)::

    await setup_supabase_roles(conninfo)      # before creating the app schema
    ...create tables, run migrations...
    async with SupabaseStack(conninfo) as stack:
        env = {"SUPABASE_URL": stack.url, "SUPABASE_SERVICE_ROLE_KEY": SERVICE_ROLE_KEY}
        stack.rest.fail_next(2); stack.realtime.ignore_joins = True; stack.gateway.sever_all()

API: ``PostgrestServer(conninfo, *, keys={ANON_KEY: "anon", SERVICE_ROLE_KEY:
"service_role"}, jwt_secret=DEFAULT_JWT_SECRET, exposed_schemas=("public",
"graphql_public"), extra_search_path=("public", "extensions"), anon_role="anon",
host="127.0.0.1", port=0, pool_size=10, setup_roles=True, grant_existing=False)``;
``await start()`` returns the port; ``await stop()``; ``url``; knobs
``fail_status``, ``fail_next(k, status=500)``, ``hang_seconds``,
``hang_after_commit``; ``calls_total`` and ``calls`` (``CallRecord``: method,
schema, function, args, role, status, injected); ``await wait_for(predicate)``.
``AUTHENTICATED_TOKEN`` is a user JWT (role ``authenticated``) to send as
``Authorization`` with the anon key.

Faithful (checked against PostgREST ``src/library/PostgREST/Query/
QueryBuilder.hs`` (callPlanToQuery), ``Query/SqlFragment.hs`` (fromJsonBodyF,
asJsonF), ``Query/Statements.hs`` (mainCall), ``Plan.hs`` (findProc,
callReadPlan), ``SchemaCache.hs`` (funcsSqlQuery), ``Response.hs``,
``Error.hs`` (mapSQLtoHTTP, NoRpc, UnacceptableSchema, JWT errors),
``docs/references/errors.rst``; supabase/postgres ``migrations/db/
init-scripts/00000000000000-initial-schema.sql``; and the postgrest-py client):

* ``POST /rest/v1/rpc/<fn>`` with a JSON object of named arguments runs, in one
  transaction, ``set_config('role', <role>, true)`` (plus
  ``request.jwt.claims``, ``request.method``, ``request.path``,
  ``request.headers`` and ``search_path``, and the role's own settings from
  ``ALTER ROLE ... SET``, e.g. ``statement_timeout``), then PostgREST's query:
  ``json_to_record($body) AS _(arg type, ...)`` with the types of the function
  signature and ``fn(arg := pgrst_body.arg, ...)`` for the arguments present,
  so defaults apply to the others. ``GET`` (``.rpc(..., get=True)``) passes
  query parameters as ``arg := $n::type``. STABLE/IMMUTABLE functions and GET
  run in a READ ONLY transaction (a write then fails with 25006 -> 405).
* Overloads are resolved as ``findProc`` does (required args = keys, optional
  args a subset; a single unnamed json/jsonb argument takes the whole body);
  none -> 404 ``PGRST202`` ("Could not find the function public.fn(a, b) in the
  schema cache", details "Searched for the function public.fn with parameters
  a, b or with a single unnamed json/jsonb parameter, but no matches were found
  in the schema cache."), several -> 300 ``PGRST203``.
* Result: scalar -> the JSON scalar (``json_agg(..)->0``); SETOF scalar -> JSON
  array; SETOF/TABLE/composite set -> array of objects; single composite (also
  OUT/INOUT params) -> object; ``void`` -> 204, no body (supabase-py: ``data ==
  []``). The body is PostgreSQL's own ``json_agg`` text. ``Content-Range:
  0-<n-1>/*`` (``*/*`` when empty).
* Errors: ``{"code","details","hint","message"}`` with SQLSTATE -> HTTP as
  ``mapSQLtoHTTP``: 08* 503, 09* 500, 0L*/0P* 403, 23503/23505 409, 25006 405,
  25* 500, 28* 403, 2D*/38*/39*/3B* 500, 40* 500 (40001 too), 53400 500, 53*
  503, 54*/55*/57*/58*/F0*/HV*/XX* 500, 57P01 503, P0001 400, other P0* 500,
  42883 404, 42P01 404, 42P17 500, 42501 401 for the anon role else 403,
  22023 "role ... does not exist" 401, ``PTnnn`` -> nnn, SQLSTATE ``PGRST``
  with JSON message/detail -> custom, anything else 400. Every error carries
  ``Proxy-Status: PostgREST; error=<code>``; 401s carry ``WWW-Authenticate``.
* ``Content-Profile`` (POST) / ``Accept-Profile`` (GET) pick the schema; one not
  exposed -> 406 ``PGRST106`` "Invalid schema: x", hint "Only the following
  schemas are exposed: public, graphql_public".
* Keys: the Supabase gateway first checks ``apikey`` (header or query):
  missing -> 401 ``{"message":"No API key found in request","hint":"No
  `apikey` request header or url param was found."}``, unknown -> 401
  ``{"message":"Invalid API key","hint":"Double check your Supabase `anon` or
  `service_role` API key."}``. Then PostgREST takes the role from
  ``Authorization: Bearer``: a configured key maps to its role, any other
  HS256 JWT signed with ``jwt_secret`` to its ``role`` claim; no header -> anon;
  bad token -> 401 ``PGRST301``; expired -> 401 ``PGRST303``.
* Roles: ``anon``, ``authenticated`` (NOLOGIN NOINHERIT) and ``service_role``
  (NOLOGIN NOINHERIT BYPASSRLS) are created in the cluster if missing; in the
  database, ``USAGE`` on schema public and ``ALTER DEFAULT PRIVILEGES IN SCHEMA
  public GRANT ALL ON TABLES, FUNCTIONS, SEQUENCES TO anon, authenticated,
  service_role`` as Supabase's init script does (``setup_supabase_roles``; run
  it before creating the app schema so the default privileges apply, or pass
  ``grant_existing=True`` to also grant ALL on the tables and sequences already
  in public, which would undo REVOKEs on them). Remember PostgreSQL also grants
  EXECUTE on every new function to PUBLIC: revoking from anon alone does not
  lock a function; revoke from PUBLIC, anon and authenticated.

Simplified / not implemented: table endpoints (``/rest/v1/<table>``: 400
``PGRST127``), bulk calls with a JSON array body, filters/select/order on RPC
results, ``Prefer`` (count, tx, return, params, handling), media types other
than JSON, the schema-cache reload delay (functions are looked up afresh on
every call), OpenAPI, the fuzzy hint uses difflib instead of PostgREST's
fuzzyset, and ``Content-Profile`` is not echoed in responses.

Faults (settable at run time): ``fail_status`` (answer every call with that
status), ``fail_next(k, status)``, ``hang_seconds`` (never answer for N seconds
before touching the database) and ``hang_after_commit`` (run and commit, then
sit on the answer for ``hang_seconds``: the client times out although the call
took effect). Injected failures never reach the database.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import difflib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiohttp import web
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

DEFAULT_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"
JSON_CT = "application/json; charset=utf-8"
API_ROLES = ("anon", "authenticated", "service_role")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(role: str, secret: str = DEFAULT_JWT_SECRET, *, exp: int = 1983812996, **claims: Any) -> str:
    """An HS256 JWT like Supabase's API keys (defaults give the CLI demo keys)."""
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = {"iss": "supabase-demo", "role": role, "exp": exp, **claims}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signature = _b64(hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


ANON_KEY = make_jwt("anon")
SERVICE_ROLE_KEY = make_jwt("service_role")
AUTHENTICATED_TOKEN = make_jwt("authenticated", sub="00000000-0000-0000-0000-000000000001")


class _ClientGone(Exception):
    """The client disconnected while the server was hanging: drop the request."""


class _HttpError(Exception):
    def __init__(self, status: int, body: dict[str, Any] | None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _pgrst_error(status: int, code: str, message: str, details: Any = None, hint: Any = None,
                 headers: dict[str, str] | None = None) -> _HttpError:
    return _HttpError(status, {"code": code, "details": details, "hint": hint, "message": message}, headers)


def sqlstate_to_http(code: str, message: str = "", authed: bool = True) -> int:
    """PostgREST's mapSQLtoHTTP (src/library/PostgREST/Error.hs)."""
    exact = {
        "23503": 409, "23505": 409, "25006": 405, "53400": 500, "57P01": 503, "P0001": 400,
        "42P01": 404, "42P17": 500,
    }
    if code == "21000":
        return 400 if message.endswith("requires a WHERE clause") else 500
    if code == "22023":
        return 401 if message.startswith("role") and message.endswith("does not exist") else 400
    if code == "42883":
        return 406 if message.startswith("function xmlagg(") else 404
    if code == "42501":
        return 403 if authed else 401
    if code in exact:
        return exact[code]
    if code.startswith("PT"):
        try:
            status = int(code[2:])
            return status if 100 <= status <= 999 else 500
        except ValueError:
            return 500
    prefix = {
        "08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500, "39": 500,
        "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500, "F0": 500, "HV": 500,
        "P0": 500, "XX": 500,
    }
    return prefix.get(code[:2], 400)


@dataclass
class _Param:
    name: str
    type: str
    required: bool
    variadic: bool


@dataclass
class _Routine:
    schema: str
    name: str
    params: list[_Param]
    returns_set: bool
    returns_composite: bool
    returns_void: bool
    volatility: str  # i, s, v

    @property
    def returns_scalar(self) -> bool:
        return not self.returns_set and not self.returns_composite

    @property
    def returns_setof_scalar(self) -> bool:
        return self.returns_set and not self.returns_composite

    def signature(self) -> str:
        args = ", ".join(f"{p.name} => {p.type}" for p in self.params)
        return f"{self.schema}.{self.name}({args})"


_ROUTINES_SQL = """
SELECT p.proname,
       p.proretset,
       (t.typtype = 'c' OR coalesce(p.proargmodes::text[] && '{t,b,o}', false)) AS ret_composite,
       p.prorettype = 'pg_catalog.void'::regtype AS ret_void,
       p.provolatile::text,
       p.pronargs,
       p.pronargdefaults,
       coalesce(p.proargnames, '{}') AS names,
       coalesce(p.proargmodes::text[], '{}') AS modes,
       ARRAY(
         SELECT CASE a.t
                  WHEN 'bit'::regtype THEN 'bit varying'
                  WHEN 'bit[]'::regtype THEN 'bit varying[]'
                  WHEN 'character'::regtype THEN 'character varying'
                  WHEN 'character[]'::regtype THEN 'character varying[]'
                  ELSE a.t::regtype::text
                END
           FROM unnest(coalesce(p.proallargtypes, p.proargtypes::oid[])) WITH ORDINALITY AS a(t, i)
          ORDER BY a.i) AS types
  FROM pg_proc p
  JOIN pg_namespace n ON n.oid = p.pronamespace
  JOIN pg_type t ON t.oid = p.prorettype
 WHERE n.nspname = %(schema)s
   AND p.prokind = 'f'
   AND p.prorettype <> 'pg_catalog.trigger'::regtype
   AND (%(name)s::text IS NULL OR p.proname = %(name)s)
"""


def _routine_from_row(schema: str, row: tuple) -> _Routine | None:
    name, retset, ret_composite, ret_void, volatility, nargs, ndefaults, names, modes, types = row
    params: list[_Param] = []
    index = 0
    for i, typ in enumerate(types):
        mode = modes[i] if modes else "i"
        if mode not in ("i", "b", "v"):
            continue
        pname = names[i] if i < len(names) and names[i] else ""
        params.append(_Param(pname, typ, index < nargs - ndefaults, mode == "v"))
        index += 1
    unnamed = [p for p in params if not p.name]
    if len(unnamed) > 1 or (unnamed and unnamed[0].type not in ("bytea", "json", "jsonb", "text", "xml")):
        return None  # PostgREST does not expose it ("callable" is false)
    return _Routine(schema, name, params, retset, ret_composite, ret_void, volatility)


def _matches(routine: _Routine, keys: set[str], is_post: bool) -> bool:
    params = routine.params
    if not params:
        return not keys
    required = {p.name for p in params if p.required}
    optional = {p.name for p in params if not p.required}
    if not optional:
        return keys == required
    if not required:
        return keys <= optional
    return keys - optional == required


def _single_unnamed_json(routine: _Routine, is_post: bool) -> bool:
    return (
        is_post
        and len(routine.params) == 1
        and routine.params[0].name == ""
        and routine.params[0].type in ("json", "jsonb")
    )


@dataclass
class CallRecord:
    method: str
    schema: str
    function: str
    args: Any
    role: str | None
    status: int = 0
    injected: bool = False


class PostgrestServer:
    """aiohttp server for ``/rest/v1/rpc/<fn>`` backed by real PostgreSQL.

    Knobs: ``fail_status`` (int or None), :meth:`fail_next`, ``hang_seconds``,
    ``hang_after_commit``. Counters: ``calls_total`` and ``calls``
    (list of :class:`CallRecord`).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        keys: dict[str, str] | None = None,
        jwt_secret: str = DEFAULT_JWT_SECRET,
        exposed_schemas: Iterable[str] = ("public", "graphql_public"),
        extra_search_path: Iterable[str] = ("public", "extensions"),
        anon_role: str = "anon",
        host: str = "127.0.0.1",
        port: int = 0,
        pool_size: int = 10,
        setup_roles: bool = True,
        grant_existing: bool = False,
    ) -> None:
        self.conninfo = conninfo
        self.keys = dict(keys) if keys is not None else {ANON_KEY: "anon", SERVICE_ROLE_KEY: "service_role"}
        self.jwt_secret = jwt_secret
        self.exposed_schemas = list(exposed_schemas)
        self.extra_search_path = list(extra_search_path)
        self.anon_role = anon_role
        self.host = host
        self.port = port
        self.pool_size = pool_size
        self.setup_roles = setup_roles
        self.grant_existing = grant_existing

        self.fail_status: int | None = None
        self.hang_seconds: float = 0.0
        self.hang_after_commit = False
        self._fail_queue: collections.deque[int] = collections.deque()

        self.calls_total = 0
        self.calls: list[CallRecord] = []

        self._pool: AsyncConnectionPool | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> PostgrestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> int:
        if self.setup_roles:
            await setup_supabase_roles(self.conninfo, grant_existing=self.grant_existing)
        self._pool = AsyncConnectionPool(self.conninfo, min_size=1, max_size=self.pool_size, open=False)
        await self._pool.open(wait=True, timeout=10)
        app = web.Application()
        app.router.add_route("*", "/rest/v1/rpc/{fn}", self._handle_rpc)
        app.router.add_route("*", "/{tail:.*}", self._handle_other)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._pool is not None:
            await self._pool.close(timeout=2)
            self._pool = None

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next ``count`` calls with ``status`` (without touching the database)."""
        self._fail_queue.extend([status] * count)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ HTTP

    @staticmethod
    def _error_response(err: _HttpError) -> web.Response:
        headers = dict(err.headers)
        if err.body is None:
            return web.Response(status=err.status, headers=headers)
        if "code" in err.body and err.body.get("code"):
            headers.setdefault("Proxy-Status", f"PostgREST; error={err.body['code']}")
        return web.Response(
            status=err.status, body=json.dumps(err.body).encode(), headers={"Content-Type": JSON_CT, **headers}
        )

    async def _handle_other(self, request: web.Request) -> web.Response:
        return self._error_response(_pgrst_error(
            400, "PGRST127", "Feature not implemented",
            details=f"this test server implements only /rest/v1/rpc/<fn>, not {request.method} {request.path}",
        ))

    def _check_apikey(self, request: web.Request) -> None:
        """What Supabase's API gateway does before the request reaches PostgREST."""
        apikey = request.headers.get("apikey") or request.query.get("apikey")
        if not apikey:
            raise _HttpError(401, {"message": "No API key found in request",
                                   "hint": "No `apikey` request header or url param was found."})
        if apikey not in self.keys:
            raise _HttpError(401, {"message": "Invalid API key",
                                   "hint": "Double check your Supabase `anon` or `service_role` API key."})

    def _authenticate(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        """PostgREST's JWT step: the role comes from ``Authorization: Bearer``."""
        auth = request.headers.get("Authorization")
        if auth is None or not auth[:7].lower() == "bearer ":
            return self.anon_role, {"role": self.anon_role}
        token = auth[7:].strip()

        def jwt_error(code: str, message: str) -> _HttpError:
            return _pgrst_error(401, code, message, headers={
                "WWW-Authenticate": f'Bearer error="invalid_token", error_description={json.dumps(message)}'})

        if not token:
            raise jwt_error("PGRST301", "Empty JWT is sent in Authorization header")
        parts = token.split(".")
        claims: dict[str, Any] | None = None
        if len(parts) == 3:
            expected = _b64(hmac.new(self.jwt_secret.encode(), f"{parts[0]}.{parts[1]}".encode(),
                                     hashlib.sha256).digest())
            if hmac.compare_digest(expected, parts[2]):
                try:
                    claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
                except ValueError:
                    claims = None
        if token in self.keys:
            role = self.keys[token]
            return role, {**(claims or {}), "role": role}
        if len(parts) != 3:
            raise jwt_error("PGRST301", f"Expected 3 parts in JWT; got {len(parts)}")
        if not isinstance(claims, dict):
            raise jwt_error("PGRST301", "JWT cryptographic operation failed")
        exp = claims.get("exp")
        if exp is not None and not isinstance(exp, (int, float)):
            raise jwt_error("PGRST303", "The JWT 'exp' claim must be a number")
        if isinstance(exp, (int, float)) and exp <= time.time():
            raise jwt_error("PGRST303", "JWT expired")
        role = claims.get("role") or self.anon_role
        return str(role), claims

    async def _handle_rpc(self, request: web.Request) -> web.Response:
        fn = request.match_info["fn"]
        method = request.method
        self.calls_total += 1
        record = CallRecord(method, "", fn, None, None)
        self.calls.append(record)
        raw = await request.read() if method == "POST" else b""
        try:
            record.args = json.loads(raw) if raw.strip() else {}
        except ValueError:
            record.args = raw.decode(errors="replace")
        if method != "POST":
            record.args = {k: v for k, v in request.query.items() if k != "apikey"}
        try:
            response = await self._rpc(request, fn, method, record, raw)
        except _HttpError as err:
            response = self._error_response(err)
        except _ClientGone:
            response = web.Response(status=499)  # nobody is left to read it
        record.status = response.status
        return response

    async def _rpc(self, request: web.Request, fn: str, method: str, record: CallRecord,
                   raw: bytes) -> web.Response:
        injected = self._fail_queue.popleft() if self._fail_queue else self.fail_status
        if injected:
            record.injected = True
            raise _pgrst_error(injected, "XX000", "injected fault (test server)")
        if self.hang_seconds and not self.hang_after_commit:
            await asyncio.sleep(self.hang_seconds)
            if request.transport is None or request.transport.is_closing():
                raise _ClientGone()  # the call never reaches the database
        self._check_apikey(request)
        role, claims = self._authenticate(request)
        record.role = role
        if method not in ("GET", "HEAD", "POST"):
            raise _pgrst_error(405, "PGRST101", f"Cannot use the {method} method on RPC")
        is_post = method == "POST"
        profile_header = "Content-Profile" if is_post else "Accept-Profile"
        schema = request.headers.get(profile_header) or self.exposed_schemas[0]
        record.schema = schema
        if schema not in self.exposed_schemas:
            raise _pgrst_error(406, "PGRST106", f"Invalid schema: {schema}",
                               hint="Only the following schemas are exposed: " + ", ".join(self.exposed_schemas))
        body_text: str | None = None
        if is_post:
            body_text = raw.decode() if raw.strip() else "{}"
            try:
                body = json.loads(body_text)
            except ValueError:
                raise _pgrst_error(400, "PGRST102", "Empty or invalid json") from None
            if isinstance(body, list):
                raise _pgrst_error(400, "PGRST127", "Feature not implemented",
                                   details="this test server does not implement bulk RPC calls (JSON array body)")
            if not isinstance(body, dict):
                raise _pgrst_error(400, "PGRST102", "Empty or invalid json")
            args: dict[str, Any] = body
        else:
            args = {k: v for k, v in request.query.items() if k != "apikey"}

        assert self._pool is not None
        async with self._pool.connection() as conn:
            routine, single_json = await self._find_routine(conn, schema, fn, set(args), is_post)
            read_only = not is_post or routine.volatility in ("s", "i")
            query, params = self._build_query(routine, single_json, args, body_text, is_post)
            status, payload, page_total = await self._execute(
                conn, request, schema, role, claims, read_only, query, params, method
            )
        if self.hang_seconds and self.hang_after_commit:
            await asyncio.sleep(self.hang_seconds)
        content_range = f"0-{page_total - 1}/*" if page_total else "*/*"
        if routine.returns_void:
            return web.Response(status=204, headers={"Content-Range": content_range})
        body_bytes = b"" if method == "HEAD" else payload.encode()
        return web.Response(status=status, body=body_bytes,
                            headers={"Content-Type": JSON_CT, "Content-Range": content_range})

    async def _find_routine(self, conn: psycopg.AsyncConnection, schema: str, fn: str, keys: set[str],
                            is_post: bool) -> tuple[_Routine, bool]:
        async with conn.transaction():
            cur = await conn.execute(_ROUTINES_SQL, {"schema": schema, "name": fn})
            rows = await cur.fetchall()
        candidates = [r for r in (_routine_from_row(schema, row) for row in rows) if r is not None]
        named = [r for r in candidates if _matches(r, keys, is_post)]
        fallback = [r for r in candidates if not _matches(r, keys, is_post) and _single_unnamed_json(r, is_post)]
        if len(named) == 1:
            return named[0], False
        if len(named) > 1 or (not named and len(fallback) > 1):
            procs = named or fallback
            raise _pgrst_error(
                300, "PGRST203",
                "Could not choose the best candidate function between: " + ", ".join(p.signature() for p in procs),
                hint="Try renaming the parameters or the function itself in the database so function "
                     "overloading can be resolved",
            )
        if fallback:
            return fallback[0], True
        raise await self._no_rpc(conn, schema, fn, sorted(keys), is_post, candidates)

    async def _no_rpc(self, conn: psycopg.AsyncConnection, schema: str, fn: str, keys: list[str], is_post: bool,
                      overloads: list[_Routine]) -> _HttpError:
        func = f"{schema}.{fn}"
        message = f"Could not find the function {func}" + (f"({', '.join(keys)})" if keys else " without parameters") \
            + " in the schema cache"
        if keys:
            searched = (" with parameter" + ("s " if len(keys) > 1 else " ") + ", ".join(keys))
        else:
            searched = " without parameters"
        if is_post:
            searched += " or with a single unnamed json/jsonb parameter"
        details = f"Searched for the function {func}{searched}, but no matches were found in the schema cache."
        hint = None
        if overloads:
            wanted = "(" + ", ".join(sorted(keys)) + ")"
            options = {"(" + ", ".join(sorted(p.name for p in r.params)) + ")" for r in overloads}
            best = max(options, key=lambda o: difflib.SequenceMatcher(None, o, wanted).ratio(), default=None)
            if best is not None:
                hint = f"Perhaps you meant to call the function {func}{best}"
        else:
            async with conn.transaction():
                cur = await conn.execute(_ROUTINES_SQL, {"schema": schema, "name": None})
                names = sorted({row[0] for row in await cur.fetchall()})
            close = difflib.get_close_matches(fn, names, n=1, cutoff=0.75)
            if close:
                hint = f"Perhaps you meant to call the function {schema}.{close[0]}"
        return _pgrst_error(404, "PGRST202", message, details=details, hint=hint)

    def _build_query(self, routine: _Routine, single_json: bool, args: dict[str, Any], body_text: str | None,
                     is_post: bool) -> tuple[sql.Composable, list[Any]]:
        qi = sql.SQL("{}.{}").format(sql.Identifier(routine.schema), sql.Identifier(routine.name))
        scalar = routine.returns_scalar or routine.returns_setof_scalar
        params: list[Any] = []

        def call_it(argument: sql.Composable) -> sql.Composable:
            if scalar:
                return sql.SQL("(SELECT {}({}) pgrst_scalar) pgrst_call").format(qi, argument)
            return sql.SQL("{}({}) pgrst_call").format(qi, argument)

        specified = [p for p in routine.params if p.name in args]
        if single_json:
            params.append(body_text)
            from_call = sql.SQL("FROM ") + call_it(
                sql.SQL("{}::{}").format(sql.Placeholder(), sql.SQL(routine.params[0].type)))
        elif not specified:
            from_call = sql.SQL("FROM ") + call_it(sql.SQL(""))
        elif is_post:
            params.append(body_text)
            names = sql.SQL(", ").join(sql.Identifier(p.name) for p in specified)
            typed = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(p.name), sql.SQL(p.type))
                                       for p in specified)
            call_args = sql.SQL(", ").join(
                sql.SQL("{}{} := pgrst_body.{}").format(sql.SQL("VARIADIC " if p.variadic else ""),
                                                        sql.Identifier(p.name), sql.Identifier(p.name))
                for p in specified)
            from_call = sql.SQL(
                "FROM (SELECT {}::json AS json_data) pgrst_payload, "
                "LATERAL (SELECT {} FROM json_to_record(pgrst_payload.json_data) AS _({}) LIMIT 1) pgrst_body, "
                "LATERAL "
            ).format(sql.Placeholder(), names, typed) + call_it(call_args)
        else:
            pieces = []
            for p in specified:
                value = args[p.name]
                if p.variadic:
                    params.append(value if isinstance(value, list) else [value])
                    pieces.append(sql.SQL("VARIADIC {} := {}::{}").format(
                        sql.Identifier(p.name), sql.Placeholder(), sql.SQL(p.type)))
                else:
                    params.append(value)
                    pieces.append(sql.SQL("{} := {}::{}").format(
                        sql.Identifier(p.name), sql.Placeholder(), sql.SQL(p.type)))
            from_call = sql.SQL("FROM ") + call_it(sql.SQL(", ").join(pieces))
        select = sql.SQL("pgrst_call.pgrst_scalar" if scalar else "pgrst_call.*")
        if routine.returns_composite and not routine.returns_set:
            agg = "coalesce(json_agg(_postgrest_t)->0, 'null')"
        elif routine.returns_scalar:
            agg = "coalesce(json_agg(_postgrest_t.pgrst_scalar)->0, 'null')"
        elif routine.returns_setof_scalar:
            agg = "coalesce(json_agg(_postgrest_t.pgrst_scalar), '[]')"
        else:
            agg = "coalesce(json_agg(_postgrest_t), '[]')"
        query = sql.SQL(
            "WITH pgrst_source AS (SELECT {} {}) "
            "SELECT pg_catalog.count(*) AS page_total, {}::text AS body "
            "FROM (SELECT * FROM pgrst_source) _postgrest_t"
        ).format(select, from_call, sql.SQL(agg))
        return query, params

    async def _execute(self, conn: psycopg.AsyncConnection, request: web.Request, schema: str, role: str,
                       claims: dict[str, Any], read_only: bool, query: sql.Composable, params: list[Any],
                       method: str) -> tuple[int, str, int]:
        search_path = ", ".join(sql.Identifier(s).as_string(conn) for s in dict.fromkeys([schema, *self.extra_search_path]))
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            async with conn.transaction():
                if read_only:
                    await conn.execute("SET TRANSACTION READ ONLY")
                await conn.execute(
                    "SELECT set_config('search_path', %s, true), set_config('role', %s, true), "
                    "set_config('request.jwt.claims', %s, true), set_config('request.method', %s, true), "
                    "set_config('request.path', %s, true), set_config('request.headers', %s, true)",
                    (search_path, role, json.dumps(claims), method, request.path, json.dumps(headers)),
                )
                cur = await conn.execute(
                    "SELECT s.setting FROM pg_db_role_setting d, unnest(d.setconfig) AS s(setting) "
                    "WHERE d.setrole = (SELECT oid FROM pg_roles WHERE rolname = %s) "
                    "AND d.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database())) "
                    "ORDER BY d.setdatabase", (role,))
                for (setting,) in await cur.fetchall():
                    key, _, value = setting.partition("=")
                    await conn.execute("SELECT set_config(%s, %s, true)", (key, value))
                cur = await conn.execute(query, params)
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise self._pg_error(exc, role) from None
        assert row is not None
        return 200, row[1], int(row[0])

    def _pg_error(self, exc: psycopg.Error, role: str) -> _HttpError:
        diag = exc.diag
        code = diag.sqlstate or "XX000"
        message = diag.message_primary or str(exc)
        details, hint = diag.message_detail, diag.message_hint
        authed = role != self.anon_role
        if code == "PGRST":
            try:
                custom = json.loads(message)
                extra = json.loads(details or "")
                status = int(extra["status"])
                headers = {str(k): str(v) for k, v in (extra.get("headers") or {}).items()}
                return _HttpError(status, {"code": custom["code"], "details": custom.get("details"),
                                           "hint": custom.get("hint"), "message": custom["message"]}, headers)
            except (ValueError, KeyError, TypeError):
                return _pgrst_error(500, "PGRST121", "Could not parse JSON in the \"RAISE SQLSTATE 'PGRST'\" error")
        status = sqlstate_to_http(code, message, authed)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        return _HttpError(status, {"code": code, "details": details, "hint": hint, "message": message}, headers)


async def create_api_roles(conninfo: str) -> None:
    """Create Supabase's API roles, cluster-wide, where missing (no grants: see
    setup_supabase_roles). Several test processes may race to create them."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await _create_api_roles(conn)


async def _create_api_roles(conn: psycopg.AsyncConnection) -> None:
    for role, extra in (("anon", ""), ("authenticated", ""), ("service_role", " BYPASSRLS")):
        for _ in range(3):
            cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
            if await cur.fetchone():
                break
            try:
                await conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT" + extra).format(sql.Identifier(role)))
                break
            except (psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
                continue


async def setup_supabase_roles(conninfo: str, *, grant_existing: bool = False) -> None:
    """Create the API roles (cluster-wide, if missing) and grant them as a Supabase project does.

    Call it before creating the app's tables and functions: the default privileges then give
    them to the API roles exactly as on Supabase. ``grant_existing=True`` also grants ALL on the
    tables and sequences already in ``public`` (and would undo any REVOKE made on them).
    """
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await _create_api_roles(conn)
        cur = await conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        row = await cur.fetchone()
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('_postgrest_test_grants'))")
            if not (row and row[0]):
                await conn.execute("GRANT anon, authenticated, service_role TO CURRENT_USER")
            await conn.execute("GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role")
            for kind in ("TABLES", "FUNCTIONS", "SEQUENCES"):
                await conn.execute(
                    f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON {kind} TO anon, authenticated, service_role"
                )
            if grant_existing:
                await conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO anon, authenticated, service_role")
                await conn.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO anon, authenticated, service_role")


# --------------------------------------------------------------------------- one URL for both


class SupabaseGateway:
    """A TCP router that puts the REST and Realtime test servers under one base URL.

    It reads each connection's request line and pipes the raw bytes to the
    Realtime server (paths under ``/realtime/``) or the REST server (everything
    else), so handshakes, status codes and close frames pass through untouched.
    ``sever_all()`` cuts every proxied connection without a close frame.
    """

    def __init__(self, *, rest_port: int, realtime_port: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self.rest_port = rest_port
        self.realtime_port = realtime_port
        self.host = host
        self.port = port
        self.connections_total = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> SupabaseGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.sever_all()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def sever_all(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            if transport is not None and not transport.is_closing():
                transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.connections_total += 1
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            try:
                first_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            parts = first_line.split(b" ")
            path = parts[1] if len(parts) > 1 else b"/"
            port = self.realtime_port if path.startswith(b"/realtime/") else self.rest_port
            up_reader, upstream_writer = await asyncio.open_connection(self.host, port)
            self._writers.add(upstream_writer)
            upstream_writer.write(first_line)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                except (ConnectionError, asyncio.CancelledError):
                    pass
                finally:
                    try:
                        if dst.can_write_eof():
                            dst.write_eof()
                    except (OSError, RuntimeError):
                        pass

            await asyncio.gather(pipe(reader, upstream_writer), pipe(up_reader, writer))
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the end of this connection's task: nothing to propagate to
        finally:
            for w in (writer, upstream_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            if task is not None:
                self._tasks.discard(task)


@dataclass
class SupabaseStack:
    """Realtime + PostgREST test servers behind one URL: ``stack.url`` is the ``SUPABASE_URL``.

    ``realtime_options`` / ``rest_options`` are passed to the servers.
    """

    conninfo: str
    realtime_options: dict[str, Any] = field(default_factory=dict)
    rest_options: dict[str, Any] = field(default_factory=dict)
    realtime: Any = None
    rest: PostgrestServer | None = None
    gateway: SupabaseGateway | None = None

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    async def start(self) -> str:
        try:
            from .realtime_server import RealtimeServer
        except ImportError:  # loaded as a top-level module
            from realtime_server import RealtimeServer  # type: ignore[no-redef]
        self.rest = PostgrestServer(self.conninfo, **self.rest_options)
        self.realtime = RealtimeServer(self.conninfo, **self.realtime_options)
        await self.rest.start()
        await self.realtime.start()
        self.gateway = SupabaseGateway(rest_port=self.rest.port, realtime_port=self.realtime.port)
        await self.gateway.start()
        return self.url

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        if self.realtime is not None:
            await self.realtime.stop()
        if self.rest is not None:
            await self.rest.stop()

    async def __aenter__(self) -> SupabaseStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
