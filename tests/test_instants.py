"""Every timestamp the database can hold is read without raising anything but BadInstant."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone, tzinfo

import psycopg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from listener.instants import (MAX_INSTANT, SECOND, BadInstant, _datetime_of_text, _instant_of,
                               format_instant, parse_instant,
                               to_datetime)
from tests.conftest import scratch_database

NOON = parse_instant("2026-03-02T12:00:00Z")


@pytest.mark.parametrize("text, expected", [
    ("2026-03-02T12:00:00Z", NOON),
    ("2026-03-02T12:00:00+00:00", NOON),           # JSON of timestamptz
    ("2026-03-02 12:00:00+00", NOON),              # PostgreSQL text
    ("2026-03-02 17:30:00+05:30", NOON),
    ("2026-03-02 07:00:00-05", NOON),
    ("2026-03-02T12:00:00", NOON),                 # timestamp without zone: UTC
    ("  2026-03-02T12:00:00Z\n", NOON),
    ("2026-03-02T12:00:00.123456+00:00", NOON + 123_456),
    ("2026-03-02T12:00:00.5Z", NOON + 500_000),
    ("1800-01-01T05:53:28+05:53:28", parse_instant("1800-01-01T00:00:00Z")),  # local mean time
])
def test_timestamps_read(text: str, expected: int) -> None:
    assert parse_instant(text) == expected


@pytest.mark.parametrize("value", [
    "infinity", "-infinity", "+infinity", "Infinity",
    "0001-01-01 00:00:00+00 BC", "0001-01-01T00:00:00+00:00 BC",
    "9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00",
    "2200-01-01T00:00:00Z",                        # past MAX_INSTANT: a sentinel, not a deadline
    "10000-01-01T00:00:00+00:00", "294276-12-31T23:59:59+00:00",  # beyond Python's years
    "", " ", "now", "soon", "2026-02-30T00:00:00Z", "2026-03-02T24:00:00Z", "2026-03-02T12:00:00+25:00",
    "x" * 8192, "2026-03-02T12:00:00Z" * 10, "\x00", "\ud800",
    12, 1.5, True, b"2026-03-02", ["2026-03-02"], {"at": "2026-03-02"},
    datetime(9999, 12, 31, tzinfo=timezone.utc), datetime.min, datetime.max,
    datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))),
])
def test_extreme_and_garbage_values_are_bad_instants(value: object) -> None:
    with pytest.raises(BadInstant):
        parse_instant(value)


def test_none_stays_none() -> None:
    assert parse_instant(None) is None


def test_datetimes_aware_and_naive() -> None:
    aware = datetime(2026, 3, 2, 17, 30, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    assert parse_instant(aware) == NOON
    assert parse_instant(datetime(2026, 3, 2, 12)) == NOON  # naive: UTC
    assert parse_instant(datetime(2026, 3, 2, 12, 0, 0, 7, tzinfo=timezone.utc)) == NOON + 7


class BrokenZone(tzinfo):
    def __init__(self, offset: object) -> None:
        self.offset = offset

    def utcoffset(self, dt: datetime | None) -> timedelta:
        if isinstance(self.offset, BaseException):
            raise self.offset
        return self.offset  # type: ignore[return-value]

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None


@pytest.mark.parametrize("offset", [RuntimeError("zone database gone"), "5h",
                                    timedelta(hours=30)])
def test_a_broken_tzinfo_is_a_bad_instant(offset: object) -> None:
    with pytest.raises(BadInstant):
        parse_instant(datetime(2026, 3, 2, 12, tzinfo=BrokenZone(offset)))


def test_a_zone_that_gives_no_offset_is_utc() -> None:
    assert parse_instant(datetime(2026, 3, 2, 12, tzinfo=BrokenZone(None))) == NOON


# --------------------------------------------------------------------------- properties


@given(st.text(max_size=80) | st.from_regex(r"\A[0-9+\-:TZ .BC]{0,40}\Z") | st.binary().map(
    lambda b: b.decode("latin-1")))
@example("0001-01-01T00:00:00+00:00 BC")
@example("99999-01-01")
def test_any_text_is_an_instant_or_a_bad_instant(text: str) -> None:
    try:
        instant = parse_instant(text)
    except BadInstant:
        return
    assert isinstance(instant, int) and -MAX_INSTANT < instant < MAX_INSTANT


# Offsets in whole seconds, as zones have them (Python's fromisoformat drops
# the microseconds of an offset; no zone has any).
@given(st.datetimes(timezones=st.none() | st.timezones() | st.builds(
    lambda seconds: timezone(timedelta(seconds=seconds)), st.integers(-86_399, 86_399))))
def test_any_datetime_is_an_instant_or_a_bad_instant(value: datetime) -> None:
    try:
        instant = parse_instant(value)
    except BadInstant:
        return
    assert -MAX_INSTANT < instant < MAX_INSTANT
    # the same instant as its ISO text says
    assert parse_instant(value.isoformat()) == instant


@given(st.integers(-MAX_INSTANT + 1, MAX_INSTANT - 1))
@example(0)
@example(-1)
@example(MAX_INSTANT - 1)
@example(-MAX_INSTANT + 1)
def test_format_and_parse_round_trip(instant: int) -> None:
    text = format_instant(instant)
    assert parse_instant(text) == instant
    assert parse_instant(to_datetime(instant)) == instant
    assert text.endswith("Z") and ("." in text) == (instant % SECOND != 0)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def pg(pg_admin: str) -> Iterator[psycopg.Connection]:
    with scratch_database(pg_admin, "listener_inst_") as conninfo:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            yield conn


EXTREMES = ["infinity", "-infinity", "4713-01-01 00:00:00+00 BC", "0001-01-01 00:00:00+00 BC",
            "0001-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00",
            "10000-01-01 00:00:00+00", "294276-12-30 00:00:00+00"]


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns"])
@pytest.mark.parametrize("literal", EXTREMES)
def test_what_postgresql_writes_for_extreme_timestamps_is_a_bad_instant(
        pg: psycopg.Connection, zone: str, literal: str) -> None:
    pg.execute("select set_config('timezone', %s, false)", (zone,))
    text, as_json, naive_text, naive_json = pg.execute(
        "select %(t)s::timestamptz::text, to_jsonb(%(t)s::timestamptz) #>> '{}', "
        "%(t)s::timestamp::text, to_jsonb(%(t)s::timestamp) #>> '{}'", {"t": literal}).fetchone()
    for value in (text, as_json, naive_text, naive_json):
        with pytest.raises(BadInstant):
            parse_instant(value)


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata", "America/St_Johns", "Pacific/Kiritimati"])
@pytest.mark.parametrize("literal", ["2026-03-02 12:00:00+00", "2026-03-02 12:00:00.000001+00",
                                     "1970-01-01 00:00:00+00", "1800-01-01 00:00:00+00",
                                     "2199-12-31 23:59:59.999999+00"])
def test_what_postgresql_writes_for_ordinary_timestamps_reads_back(
        pg: psycopg.Connection, zone: str, literal: str) -> None:
    pg.execute("select set_config('timezone', %s, false)", (zone,))
    text, as_json, loaded, epoch_us = pg.execute(
        "select %(t)s::timestamptz::text, to_jsonb(%(t)s::timestamptz) #>> '{}', "
        "%(t)s::timestamptz, (extract(epoch from %(t)s::timestamptz) * 1000000)::bigint",
        {"t": literal}).fetchone()
    assert parse_instant(text) == parse_instant(as_json) == parse_instant(loaded) == epoch_us


def test_a_timestamp_without_zone_is_utc(pg: psycopg.Connection) -> None:
    pg.execute("set timezone = 'Asia/Kolkata'")
    text, as_json = pg.execute("select '2026-03-02 12:00:00'::timestamp::text, "
                               "to_jsonb('2026-03-02 12:00:00'::timestamp) #>> '{}'").fetchone()
    assert parse_instant(text) == parse_instant(as_json) == NOON


# --------------------------------------------------------------------------- the fast path

def _careful(text: str) -> int:
    """The reading every text had before the fast path: strip, the checks, fromisoformat."""
    return _instant_of(_datetime_of_text(text), text)


@given(st.datetimes(timezones=st.none() | st.just(timezone.utc) | st.builds(
    lambda seconds: timezone(timedelta(seconds=seconds)), st.integers(-86_399, 86_399)))
    .flatmap(lambda d: st.sampled_from([d.isoformat(), d.isoformat(sep=" "),
                                        d.isoformat().replace("+00:00", "Z"),
                                        d.isoformat(timespec="milliseconds"),
                                        d.date().isoformat()]))
    | st.from_regex(r"\A[0-9+\-:TZtz .]{0,40}\Z") | st.text(max_size=70))
@example("2026-03-02T12:00:00z")
@example(" 2026-03-02T12:00:00Z")
@example("2026-03-02T12:00:00.1234567Z")
@example("0001-01-01T00:00:00Z")
@example("2026-03-02T12:00:00." + "0" * 50 + "Z")  # longer than any timestamp written
def test_text_reads_the_same_as_the_careful_reading(text: str) -> None:
    try:
        expected: int | str = _careful(text)
    except BadInstant as exc:
        expected = str(exc)
    try:
        got: int | str = parse_instant(text)  # type: ignore[assignment]
    except BadInstant as exc:
        got = str(exc)
    assert got == expected
