"""The fuzz strategies generate what they promise (not a test of the engine)."""
from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from listener.instants import BadInstant, parse_instant
from tests.fuzz_rows import (EXTREME_TIMESTAMPS, NOTIFY_LIMIT, SESSIONS, deep_json_text,
                             notify_payloads, realtime_payloads, rows)

QUICK = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


@QUICK
@given(rows())
def test_rows_are_json_objects(row: dict) -> None:
    assert isinstance(row, dict)
    json.dumps(row, default=str)  # encodable, as a function's answer would be


@QUICK
@given(rows(well_formed=True))
def test_well_formed_rows_have_every_column(row: dict) -> None:
    assert set(SESSIONS.timestamp_columns) <= set(row) and row["status"] in SESSIONS.known_statuses
    for column in SESSIONS.timestamp_columns:
        assert row[column] is None or parse_instant(row[column]) is not None


@QUICK
@given(notify_payloads())
def test_notify_payloads_fit_a_notify(text: str) -> None:
    assert isinstance(text, str) and len(text.encode()) < NOTIFY_LIMIT


@QUICK
@given(realtime_payloads())
def test_realtime_payloads_generate(payload: object) -> None:
    assert payload is None or isinstance(payload, (dict, list, str))


def reached(strategy, conditions: dict, examples: int = 300) -> set[str]:  # type: ignore[no-untyped-def]
    """Which conditions some generated value met (generation only, no shrinking)."""
    seen: set[str] = set()

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              derandomize=True,  # the same values every run: a coverage check, never flaky
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def sample(value: object) -> None:
        seen.update(name for name, condition in conditions.items() if condition(value))

    sample()
    return seen


ROW_CASES = {
    "an infinite timestamp": lambda r: bool({"infinity", "-infinity"} & set(map(str, r.values()))),
    "a BC timestamp": lambda r: any(str(v).endswith(" BC") for v in r.values()),
    "a year past 9999": lambda r: any(str(v).startswith(("10000-", "294276-"))
                                      for v in r.values()),
    "a row without its key": lambda r: "id" not in r,
    "an unknown status": lambda r: isinstance(r.get("status"), str)
    and r["status"] not in SESSIONS.known_statuses,
    "a status of the wrong type": lambda r: isinstance(r.get("status"), int),
    "huge metadata": lambda r: len(json.dumps(r.get("metadata"), default=str)) > 50_000,
    "an unknown column": lambda r: bool(set(r) - {"id", "status", "_version", "type", "plan",
                                                 "metadata", *SESSIONS.timestamp_columns,
                                                 *SESSIONS.id_columns}),
}
NOTIFY_CASES = {
    "a payload near the NOTIFY limit": lambda t: len(t.encode()) > 7_000,
    "a payload that is not JSON": lambda t: not _is_json(t),
    "a change object": lambda t: _is_json(t) and isinstance(orjson.loads(t), dict),
}
REALTIME_CASES = {
    "a Realtime 413": lambda p: isinstance(p, dict) and isinstance(p.get("data"), dict)
    and bool(p["data"].get("errors")),
    "a change of another table": lambda p: isinstance(p, dict) and isinstance(
        p.get("data"), dict) and p["data"].get("table") == "other_table",
    "not an object": lambda p: not isinstance(p, dict),
}


@pytest.mark.parametrize("strategy, cases", [(rows(), ROW_CASES),
                                             (notify_payloads(), NOTIFY_CASES),
                                             (realtime_payloads(), REALTIME_CASES)],
                         ids=["rows", "notify", "realtime"])
def test_each_hostile_case_is_generated(strategy, cases: dict) -> None:  # type: ignore[no-untyped-def]
    assert reached(strategy, cases) == set(cases)


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def test_deep_json_text_is_deeper_than_parsers_allow() -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(deep_json_text(1_300))
    assert len(deep_json_text(1_300).encode()) < NOTIFY_LIMIT


def test_the_extreme_timestamps_are_bad_instants_or_read() -> None:
    for text in EXTREME_TIMESTAMPS:
        try:
            parse_instant(text)
        except BadInstant:
            pass
