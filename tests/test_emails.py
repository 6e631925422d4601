"""Email templates, the composer, the outbox sender and the email deliverer."""
from __future__ import annotations

import html as html_lib
import json
import re
from pathlib import Path

import pytest

from listener.adapters.email_outbox import OutboxSender
from listener.effects import EmailError
from listener.emails import (
    EmailComposer, EmailDeliverer, MissingRecipient, emails_of, human_duration, template_name)
from listener.instants import HOUR, MINUTE, SECOND, parse_instant
from listener.mailer import Mailer
from listener.rules import load_rules
from listener.store import ActionKey, Contact

SESSION_RULES = [r for r in load_rules({}).all_rules if r.table == "sessions"]
EMAILS = {(rule, role) for rule, role in emails_of(load_rules({}))
          if any(r.name == rule for r in SESSION_RULES)}


def Contacts(customer_email: str | None = None, customer_name: str | None = None,  # noqa: N802
             mechanic_email: str | None = None,
             mechanic_name: str | None = None) -> dict[str, Contact]:
    """A session's contacts as the store answers them: per role, its email and name."""
    out = {}
    if customer_email is not None or customer_name is not None:
        out["customer"] = Contact(customer_email, customer_name)
    if mechanic_email is not None or mechanic_name is not None:
        out["mechanic"] = Contact(mechanic_email, mechanic_name)
    return out

APP = "https://app.example.com"
FROM = "The Auto Doctor <noreply@example.com>"
SUPPORT = "support@example.com"
SID = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
SHORT = SID[:8]
DUE = parse_instant("2026-03-02T10:03:00Z")
ROW = {"id": SID, "status": "waiting", "type": "video", "mechanic_id": "m-1"}
CONTACTS = Contacts(customer_email="carla@example.com", customer_name="Carla Diaz",
                    mechanic_email="mo@example.com", mechanic_name="Mo Khan")
EVIL = "<script>alert(1)</script>"
LINKS = {
    "customer": f"{APP}/sessions/{SID}",
    "mechanic": f"{APP}/mechanic/dashboard?session={SID}",
    "support": f"{APP}/admin/sessions/{SID}",
}
# The effective offset, as each subject says it.
SUBJECT_DURATION = {
    "mechanic_nudge": "waiting 3 minutes",
    "support_stuck_alert": "after 5 minutes",
    "support_reconnect_alert": "reconnecting for 2 minutes",
    "support_unassigned_alert": "after 5 minutes",
    "waiting_timeout": "within 1 hour",
    "scheduled_reminder_24h": "starts in 24 hours",
    "scheduled_reminder_1h": "starts in 1 hour",
    "scheduled_reminder_15m": "starts in 15 minutes",
    "scheduled_no_show": "10 minutes after",
    "summary_reminder": "ended 30 minutes ago",
    "summary_overdue": "ended 24 hours ago",
}
TAG = re.compile(r"</?[A-Za-z!][^>]*>")
ENTITY = re.compile(r"&(?:[A-Za-z]+|#\d+|#x[0-9A-Fa-f]+);")
ALL = sorted(EMAILS)


@pytest.fixture(scope="module")
def composer() -> EmailComposer:
    return EmailComposer(load_rules({}), APP + "/", FROM, SUPPORT)


def key(rule: str, sid: str = SID) -> ActionKey:
    return ActionKey(rule, "sessions", sid, DUE)


# -- every email renders ----------------------------------------------------------------

def test_every_emailing_rule_has_its_emails() -> None:
    sent = set()
    for rule in SESSION_RULES:
        for role in rule.notify:
            sent.add((rule.name, role.rstrip("?")))
    assert sent == set(EMAILS)
    assert set(SUBJECT_DURATION) | {"request_expiry"} == {rule for rule, _ in EMAILS}


@pytest.mark.parametrize("rule,role", ALL)
def test_email_renders(composer: EmailComposer, rule: str, role: str) -> None:
    email = composer.compose(key(rule), role, ROW, CONTACTS)
    assert email.to == {"customer": "carla@example.com", "mechanic": "mo@example.com",
                        "support": SUPPORT}[role]
    assert email.sender == FROM
    assert (email.rule, email.session_id, email.role) == (rule, SID, role)
    assert email.idempotency_key == f"listener/{rule}/{SID}/2026-03-02T10:03:00Z/{role}"
    # Subject: one short line naming the session and the duration.
    assert SHORT in email.subject and SID not in email.subject
    assert "\n" not in email.subject and len(email.subject) <= 78
    if rule in SUBJECT_DURATION:
        assert SUBJECT_DURATION[rule] in email.subject
    # HTML links to the role's page, and only to it.
    hrefs = set(re.findall(r'href="([^"]*)"', email.html))
    assert {html_lib.unescape(h) for h in hrefs} == {LINKS[role]}
    assert email.html.startswith("<!DOCTYPE html>")
    # Plain text: no tags, no entities, the link in full, a greeting by name.
    assert not TAG.search(email.text), email.text
    assert not ENTITY.search(email.text), email.text
    assert LINKS[role] in email.text and SHORT in email.text
    greeting = {"customer": "Hi Carla Diaz,", "mechanic": "Hi Mo Khan,",
                "support": "Hi support team,"}[role]
    assert email.text.startswith(greeting + "\n")
    assert greeting in email.html


def test_template_layout_is_shared(composer: EmailComposer) -> None:
    assert template_name("scheduled_reminder_1h", "customer") == "scheduled_reminder.customer.j2"
    assert template_name("mechanic_nudge", "mechanic") == "mechanic_nudge.mechanic.j2"
    a = composer.compose(key("scheduled_reminder_24h"), "customer", ROW, CONTACTS)
    b = composer.compose(key("scheduled_reminder_15m"), "customer", ROW, CONTACTS)
    assert a.subject == f"Session {SHORT} starts in 24 hours"
    assert b.subject == f"Session {SHORT} starts in 15 minutes"
    # The appointment is derived from the claim: due + 24 h and due + 15 min.
    assert "Tue 3 Mar 2026, 10:03 UTC" in a.text
    assert "Mon 2 Mar 2026, 10:18 UTC" in b.text


def test_effective_offsets_come_from_the_rule_table() -> None:
    scaled = EmailComposer(load_rules({"RULES_TIME_SCALE": "60"}), APP, FROM, SUPPORT)
    email = scaled.compose(key("mechanic_nudge"), "mechanic", ROW, CONTACTS)
    assert "waiting 3 seconds" in email.subject
    custom = EmailComposer(load_rules({"RULE_SUMMARY_REMINDER": "90m"}), APP, FROM, SUPPORT)
    email = custom.compose(key("summary_reminder"), "mechanic", ROW, CONTACTS)
    assert "ended 1 hour 30 minutes ago" in email.subject


def test_human_duration() -> None:
    assert human_duration(3 * MINUTE) == "3 minutes"
    assert human_duration(1 * MINUTE) == "1 minute"
    assert human_duration(HOUR) == "1 hour"
    assert human_duration(24 * HOUR) == "24 hours"
    assert human_duration(72 * HOUR) == "3 days"
    assert human_duration(90 * SECOND) == "1 minute 30 seconds"
    assert human_duration(15 * SECOND) == "15 seconds"
    assert human_duration(SECOND // 4) == "0.25 seconds"


# -- escaping and missing values -----------------------------------------------------------

@pytest.mark.parametrize("rule,role", ALL)
def test_database_values_are_escaped_in_html(composer: EmailComposer, rule: str,
                                             role: str) -> None:
    contacts = Contacts("c@example.com", EVIL, "m@example.com", EVIL + " & 'co'")
    email = composer.compose(key(rule), role, {**ROW, "type": EVIL}, contacts)
    assert "<script" not in email.html
    # Every email shows the customer's name (greeting, text or support details).
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert EVIL in email.text  # literal in plain text
    assert "&amp;amp;" not in email.html and "&amp;lt;" not in email.html  # no double escaping


def test_greeting_escaped_in_html_literal_in_text(composer: EmailComposer) -> None:
    email = composer.compose(key("request_expiry"), "customer", ROW,
                             Contacts("c@example.com", EVIL))
    assert "Hi &lt;script&gt;alert(1)&lt;/script&gt;," in email.html
    assert email.text.startswith(f"Hi {EVIL},\n")
    assert EVIL not in email.html


def test_missing_names_fall_back(composer: EmailComposer) -> None:
    bare = Contacts(customer_email="c@example.com", mechanic_email="m@example.com",
                    customer_name="   ")
    for rule, role in ALL:
        email = composer.compose(key(rule), role, {"id": SID}, bare)
        if role != "support":
            assert email.text.startswith("Hi there,\n")
            assert "Hi there," in email.html
        assert "None" not in email.text and "None" not in email.html


def test_missing_addresses_raise(composer: EmailComposer) -> None:
    with pytest.raises(MissingRecipient, match=f"no mechanic email for session {SID}"):
        composer.compose(key("mechanic_nudge"), "mechanic", ROW, Contacts("c@example.com"))
    with pytest.raises(MissingRecipient, match=f"no customer email for session {SID}"):
        composer.compose(key("request_expiry"), "customer", ROW, Contacts(customer_email=" "))
    with pytest.raises(MissingRecipient, match="not a valid address"):
        composer.compose(key("request_expiry"), "customer", ROW,
                         Contacts(customer_email="a@b.c\r\nBcc: x@y.z"))
    no_support = EmailComposer(load_rules({}), APP, FROM, None)
    with pytest.raises(MissingRecipient, match="SUPPORT_EMAIL is not set"):
        no_support.compose(key("summary_overdue"), "support", ROW, CONTACTS)


# -- determinism ------------------------------------------------------------------------

def test_same_claim_composes_byte_identical_email(composer: EmailComposer) -> None:
    other = EmailComposer(load_rules({}), APP, FROM, SUPPORT)
    for rule, role in ALL:
        a = composer.compose(key(rule), role, dict(ROW), CONTACTS)
        b = other.compose(key(rule), role, dict(ROW), CONTACTS)
        assert a == b
        assert (a.html.encode(), a.text.encode()) == (b.html.encode(), b.text.encode())


# -- the outbox -----------------------------------------------------------------------------

async def test_outbox_writes_one_pair_per_key(composer: EmailComposer, tmp_path: Path) -> None:
    folder = tmp_path / "nested" / "outbox"
    outbox = OutboxSender(folder)
    email = composer.compose(key("mechanic_nudge"), "mechanic", ROW, CONTACTS)
    first = await outbox.send(email)
    again = await outbox.send(email)
    assert first == again and first.startswith("outbox-")
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2, files
    stem = files[0].rsplit(".", 1)[0]
    assert re.fullmatch(rf"mechanic_nudge-{SHORT}-mechanic-[0-9a-f]{{8}}", stem)
    assert files == [f"{stem}.html", f"{stem}.json"]
    assert (folder / f"{stem}.html").read_text("utf-8") == email.html
    record = json.loads((folder / f"{stem}.json").read_text("utf-8"))
    assert record == {"from": FROM, "to": "mo@example.com", "subject": email.subject,
                      "text": email.text, "idempotency_key": email.idempotency_key,
                      "rule": "mechanic_nudge", "table": "sessions", "row_id": SID,
                      "session_id": SID, "role": "mechanic",
                      "id": first}


async def test_outbox_refuses_a_reused_key_with_another_body(composer: EmailComposer,
                                                             tmp_path: Path) -> None:
    outbox = OutboxSender(tmp_path)
    email = composer.compose(key("summary_reminder"), "mechanic", ROW, CONTACTS)
    await outbox.send(email)
    changed = composer.compose(key("summary_reminder"), "mechanic", ROW,
                               Contacts(mechanic_email="mo@example.com", mechanic_name="Other"))
    assert changed.idempotency_key == email.idempotency_key
    with pytest.raises(EmailError) as err:
        await outbox.send(changed)
    assert err.value.status == 409 and not err.value.transient
    assert len(list(tmp_path.iterdir())) == 2


# -- the deliverer --------------------------------------------------------------------------

class FakeStore:
    """Only the store port's `contacts()`: the deliverer needs nothing else."""

    def __init__(self, contacts: dict[str, Contact]) -> None:
        self._contacts = contacts
        self.calls: list[str] = []

    async def contacts(self, table: str, key: str) -> dict[str, Contact]:
        self.calls.append(key)
        return self._contacts


def deliverer(tmp_path: Path, contacts: dict[str, Contact],
              support: str | None = SUPPORT) -> tuple[EmailDeliverer, FakeStore]:
    store = FakeStore(contacts)
    composer = EmailComposer(load_rules({}), APP, FROM, support)
    mail = Mailer(OutboxSender(tmp_path), rate_per_second=1000.0, max_attempts=2,
                  base_delay=0.001, max_delay=0.01)
    return EmailDeliverer(store, composer, mail), store  # type: ignore[arg-type]


def written(folder: Path) -> list[dict]:
    return [json.loads(p.read_text("utf-8")) for p in sorted(folder.glob("*.json"))]


async def test_deliverer_sends_every_role_once(tmp_path: Path) -> None:
    d, store = deliverer(tmp_path, CONTACTS)
    errors = await d.deliver(key("scheduled_reminder_1h"), ("customer", "mechanic"), ROW)
    assert errors == {}
    assert store.calls == [SID]  # contacts fetched once
    assert sorted(r["role"] for r in written(tmp_path)) == ["customer", "mechanic"]
    # The same claim again (a retry after a crash): nothing new is written.
    assert await d.deliver(key("scheduled_reminder_1h"), ("customer", "mechanic"), ROW) == {}
    assert len(list(tmp_path.iterdir())) == 4


async def test_deliverer_records_a_missing_mechanic_email(tmp_path: Path) -> None:
    d, _ = deliverer(tmp_path, Contacts(customer_email="c@example.com", customer_name="C"))
    errors = await d.deliver(key("scheduled_reminder_24h"), ("customer", "mechanic"), ROW)
    assert errors == {"mechanic": f"no mechanic email for session {SID}"}
    assert [r["role"] for r in written(tmp_path)] == ["customer"]  # the customer still got it


async def test_deliverer_records_missing_support_email(tmp_path: Path) -> None:
    d, _ = deliverer(tmp_path, CONTACTS, support=None)
    errors = await d.deliver(key("support_stuck_alert"), ("support",), ROW)
    assert errors == {"support": "SUPPORT_EMAIL is not set"}
    assert list(tmp_path.iterdir()) == []


async def test_deliverer_records_a_failed_contacts_lookup(tmp_path: Path) -> None:
    d, store = deliverer(tmp_path, CONTACTS)

    async def broken(table: str, key: str) -> dict[str, Contact]:
        raise ConnectionError("database unreachable")

    store.contacts = broken  # type: ignore[method-assign]
    errors = await d.deliver(key("mechanic_nudge"), ("mechanic",), ROW)
    assert errors == {"mechanic": "contacts lookup failed: ConnectionError: database unreachable"}


async def test_deliverer_retries_a_transient_contacts_lookup(tmp_path: Path) -> None:
    # A connection the pooler recycled mid-lookup is not a missing address: the
    # lookup is asked again and the email goes out once.
    from listener.errors import StoreUnavailable

    d, store = deliverer(tmp_path, CONTACTS)
    real = store.contacts
    failures = [StoreUnavailable("AdminShutdown: terminating connection")]

    async def flaky(table: str, key: str) -> dict[str, Contact]:
        if failures:
            raise failures.pop()
        return await real(table, key)

    store.contacts = flaky  # type: ignore[method-assign]
    assert await d.deliver(key("mechanic_nudge"), ("mechanic",), ROW) == {}
    assert [r["role"] for r in written(tmp_path)] == ["mechanic"]
