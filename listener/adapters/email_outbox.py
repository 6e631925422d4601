"""EmailSender that writes emails to a folder instead of sending them.

Used when `RESEND_API_KEY` is not set (local runs, the demo, tests). Each email
becomes two files with one stem:

    <rule>-<short session id>-<role>-<8 hex of sha256(idempotency key)>.html
    <rule>-<short session id>-<role>-<8 hex of sha256(idempotency key)>.json

The `.json` (from, to, subject, text, idempotency_key, rule, table, row_id, session_id
(rows of sessions), role,
id) is written last and marks the email as sent. Both writes are atomic (a
temporary file in the same folder, then a rename), so a crash never leaves a
half-written email.

Idempotent like Resend: sending the same idempotency key again writes nothing
and returns the same id; the same key with a different payload is refused as
Resend refuses it (409 `invalid_idempotent_request`), which surfaces a
non-deterministic template in development rather than in production.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

from listener.effects import EmailError, OutgoingEmail

_UNSAFE = re.compile(r"[^A-Za-z0-9_]+")


def _part(value: str, limit: int = 40) -> str:
    return _UNSAFE.sub("_", value).strip("_")[:limit] or "_"


class OutboxSender:
    """Writes one `.html` and one `.json` per email into `folder`. Implements `EmailSender`."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()  # check-then-write is one step per process

    def __repr__(self) -> str:
        return f"OutboxSender(folder={str(self.folder)!r})"

    @staticmethod
    def digest(idempotency_key: str) -> str:
        return hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()

    @classmethod
    def provider_id(cls, email: OutgoingEmail) -> str:
        return "outbox-" + cls.digest(email.idempotency_key)[:16]

    def stem(self, email: OutgoingEmail) -> str:
        return "-".join((_part(email.rule), _part(email.row_id[:8], 8), _part(email.role),
                         self.digest(email.idempotency_key)[:8]))

    @staticmethod
    def record(email: OutgoingEmail, provider_id: str) -> dict[str, Any]:
        return {
            "from": email.sender,
            "to": email.to,
            "subject": email.subject,
            "text": email.text,
            "idempotency_key": email.idempotency_key,
            "rule": email.rule,
            "table": email.table,
            "row_id": email.row_id,
            **({"session_id": email.row_id} if email.table == "sessions" else {}),
            "role": email.role,
            "id": provider_id,
        }

    async def send(self, email: OutgoingEmail) -> str:
        try:
            return await asyncio.to_thread(self._write, email)
        except OSError as exc:
            raise EmailError(f"outbox: cannot write to {self.folder}: {exc}",
                             transient=True) from None

    # -- on a worker thread --------------------------------------------------------------

    def _write(self, email: OutgoingEmail) -> str:
        provider_id = self.provider_id(email)
        stem = self.stem(email)
        html_path = self.folder / f"{stem}.html"
        json_path = self.folder / f"{stem}.json"
        record = self.record(email, provider_id)
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            if json_path.exists():
                self._check_same(json_path, html_path, record, email)
                return provider_id
            self._atomic_write(html_path, email.html)
            self._atomic_write(json_path, json.dumps(record, ensure_ascii=False, indent=2) + "\n")
        return provider_id

    @staticmethod
    def _check_same(json_path: Path, html_path: Path, record: dict[str, Any],
                    email: OutgoingEmail) -> None:
        try:
            previous = json.loads(json_path.read_text("utf-8"))
            previous_html = html_path.read_text("utf-8")
        except (OSError, ValueError):
            return  # unreadable (edited by hand): the key was used, do not send again
        if previous != record or previous_html != email.html:
            raise EmailError(
                f"outbox 409 invalid_idempotent_request: idempotency key "
                f"{email.idempotency_key} was already used with a different payload",
                transient=False, status=409)

    def _atomic_write(self, path: Path, content: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
