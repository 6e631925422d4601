"""Generated session logs with realistic lifecycles, for benchmarks and the demo."""
from __future__ import annotations

import json
import random
import uuid
from datetime import datetime, timedelta, timezone

START = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def lifecycle(rng: random.Random, begin: datetime) -> list[tuple[datetime, str, dict]]:
    """One session's changes: on-demand or booked, accepted or abandoned, extended,
    reconnecting, summary submitted or not."""
    sid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    mechanic = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    row = {"id": sid, "status": "pending", "type": rng.choice(["chat", "video", "diagnostic"]),
           "customer_user_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
           "mechanic_id": None, "created_at": _iso(begin), "updated_at": _iso(begin),
           "started_at": None, "ended_at": None, "scheduled_for": None, "expires_at": None,
           "summary_submitted_at": None, "metadata": {"source": "app"}}
    out: list[tuple[datetime, str, dict]] = []
    now = begin

    def emit(kind: str, **changes) -> None:
        row.update(changes, updated_at=_iso(now))
        out.append((now, kind, dict(row)))

    if rng.random() < 0.25:
        row["status"] = "scheduled"
        row["scheduled_for"] = _iso(begin + timedelta(hours=rng.uniform(2, 72)))
        row["mechanic_id"] = mechanic
    emit("INSERT")
    if rng.random() < 0.1:
        return out  # abandoned: expires or no-shows
    now += timedelta(minutes=rng.uniform(0.5, 12))
    emit("UPDATE", status="waiting", mechanic_id=mechanic)
    now += timedelta(minutes=rng.uniform(0.5, 8))
    emit("UPDATE", status="live", started_at=_iso(now),
         expires_at=_iso(now + timedelta(minutes=rng.choice([15, 30, 45, 60]))))
    if rng.random() < 0.2:
        now += timedelta(minutes=rng.uniform(1, 10))
        emit("UPDATE", status="reconnecting")
        now += timedelta(minutes=rng.uniform(0.2, 4))
        emit("UPDATE", status="live")
    if rng.random() < 0.3:
        now += timedelta(minutes=rng.uniform(1, 10))
        emit("UPDATE", expires_at=_iso(datetime.fromisoformat(
            row["expires_at"].replace("Z", "+00:00")) + timedelta(minutes=15)))
    now += timedelta(minutes=rng.uniform(5, 40))
    emit("UPDATE", status="completed", ended_at=_iso(now))
    if rng.random() < 0.7:
        now += timedelta(minutes=rng.uniform(1, 90))
        emit("UPDATE", summary_submitted_at=_iso(now))
    return out


def generate(sessions: int, seed: int = 7, spread_hours: float = 24.0) -> list[str]:
    """JSON Lines of `sessions` lifecycles spread over `spread_hours`, ordered by time."""
    rng = random.Random(seed)
    changes = []
    for _ in range(sessions):
        begin = START + timedelta(seconds=rng.uniform(0, spread_hours * 3600))
        changes.extend(lifecycle(rng, begin))
    changes.sort(key=lambda c: c[0])
    return [json.dumps({"at": _iso(at), "type": kind, "table": "sessions", "record": record})
            for at, kind, record in changes]
