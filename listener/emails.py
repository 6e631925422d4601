"""The emails the rules send: composing them from templates, delivering them.

Templates live in `listener/templates/`, one file per email,
`<rule>.<role>.j2` (the three scheduled reminders share
`scheduled_reminder.<role>.j2`: only the duration differs). Each file extends
the shared HTML layout `_layout.html.j2` and defines blocks:

- `subject`: one line (whitespace is collapsed);
- `content`: the HTML paragraphs, placed in the layout;
- `text`: the plain-text paragraphs, placed in `_layout.txt.j2`;
- `action` (optional): the label of the link to the session's page.

The HTML is rendered by an environment with autoescape on, so every value
taken from the database arrives as text; the subject and the plain text by an
environment with autoescape off (no `&lt;` garbage in plain text).

Determinism: an email is a pure function of the claim (rule, row, due
instant), the recipient role, the row and the contacts. No clock, no
randomness: a retry after a crash sends byte-identical content under the same
Resend idempotency key (Resend answers 409 to a reused key with another body).
Times shown are derived from the claim's due instant, not from "now".
"""
from __future__ import annotations

import asyncio
import functools
import re
from typing import Any, Mapping
from urllib.parse import quote

import structlog
from jinja2 import Environment, PackageLoader, StrictUndefined, Template

from listener.effects import OutgoingEmail
from listener.errors import is_transient
from listener.retry import retrying
from listener.executor import Deliverer
from listener.instants import DAY, HOUR, MINUTE, SECOND, Instant, format_instant, to_datetime
from listener.mailer import Mailer
from listener.rules.model import RuleSet, Table
from listener.store import ActionKey, Contact, Store

log = structlog.get_logger("listener.emails")

CUSTOMER, MECHANIC, SUPPORT = "customer", "mechanic", "support"

# Rules whose emails share one template per role.
_SHARED_TEMPLATE = {
    "scheduled_reminder_24h": "scheduled_reminder",
    "scheduled_reminder_1h": "scheduled_reminder",
    "scheduled_reminder_15m": "scheduled_reminder",
}


def emails_of(ruleset: RuleSet) -> frozenset[tuple[str, str]]:
    """Every (rule, role) the rules may email: each needs its template."""
    return frozenset((rule.name, role.rstrip("?")) for rule in ruleset.all_rules
                     for role in rule.notify)

_SESSION_TYPES = {"chat", "video", "diagnostic"}
_MAX_NAME = 80
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class EmailCompositionError(Exception):
    """An email that cannot be composed; recorded as that recipient's failure."""


class MissingRecipient(EmailCompositionError):
    """No (usable) address for the role: a failure recorded in the ledger, never skipped."""


def template_name(rule: str, role: str) -> str:
    return f"{_SHARED_TEMPLATE.get(rule, rule)}.{role}.j2"


# -- formatting helpers (pure) -----------------------------------------------------------

def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def human_duration(micros: int) -> str:
    """An offset for people: '3 minutes', '1 hour', '1 hour 30 minutes', '24 hours'.

    At most two units; days only from 2 days on ('24 hours' reads better than
    '1 day' in 'starts in ...'). Scaled-down offsets (RULES_TIME_SCALE) give
    seconds, and under a second a decimal number of seconds.
    """
    micros = abs(int(micros))
    if micros == 0:
        return "0 minutes"
    if micros < SECOND:
        return f"{micros / SECOND:g} seconds"
    if micros >= 2 * DAY:
        big, small = (DAY, "day"), (HOUR, "hour")
    elif micros >= HOUR:
        big, small = (HOUR, "hour"), (MINUTE, "minute")
    elif micros >= MINUTE:
        big, small = (MINUTE, "minute"), (SECOND, "second")
    else:
        return _plural(round(micros / SECOND), "second")
    n_big, rest = divmod(micros, big[0])
    n_small = round(rest / small[0])
    if n_small * small[0] == big[0]:  # rounding carried over
        n_big, n_small = n_big + 1, 0
    text = _plural(n_big, big[1])
    return f"{text} {_plural(n_small, small[1])}" if n_small else text


def human_instant(instant: Instant) -> str:
    """'Mon 2 Mar 2026, 10:00 UTC' (seconds when not zero); locale-independent."""
    dt = to_datetime(instant)
    clock = f"{dt.hour:02d}:{dt.minute:02d}" + (f":{dt.second:02d}" if dt.second else "")
    return (f"{_WEEKDAYS[dt.weekday()]} {dt.day} {_MONTHS[dt.month - 1]} {dt.year}, "
            f"{clock} UTC")


def _clean_name(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    if not text:
        return None
    return text if len(text) <= _MAX_NAME else text[:_MAX_NAME - 1].rstrip() + "…"


def _address(value: object, what: str, label: str, row_id: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MissingRecipient(f"no {what} email for {label} {row_id}")
    address = value.strip()
    if "@" not in address or any(c in address for c in "\r\n\t ,;"):
        # The address itself is not logged: it is personal data.
        raise MissingRecipient(f"the {what} email of {label} {row_id} is not a valid address")
    return address


_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def _tidy_text(text: str) -> str:
    text = _TRAILING_SPACE.sub("", text.replace("\r\n", "\n"))
    text = text.replace("\n--\n", "\n-- \n")  # keep the signature delimiter
    return _BLANK_LINES.sub("\n\n", text).strip() + "\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- composing -----------------------------------------------------------------------------

@functools.cache
def _compiled_templates(emails: frozenset[tuple[str, str]]
                        ) -> tuple[dict[str, tuple[Template, Template]], Template]:
    """Every email's template, compiled once per process for HTML and for text.

    Loading them all up front syntax-checks them at start-up, not at the first send.
    """
    common: dict[str, Any] = dict(
        loader=PackageLoader("listener", "templates"), undefined=StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False, auto_reload=False)
    html_env = Environment(autoescape=True, **common)
    text_env = Environment(autoescape=False, **common)
    templates: dict[str, tuple[Template, Template]] = {}
    for rule, role in sorted(emails):
        name = template_name(rule, role)
        if name not in templates:
            templates[name] = (html_env.get_template(name), text_env.get_template(name))
    return templates, text_env.get_template("_layout.txt.j2")


class EmailComposer:
    """Builds the OutgoingEmail of one (claim, role). Pure and deterministic."""

    def __init__(self, ruleset: RuleSet, app_url: str, sender: str,
                 support_email: str | None) -> None:
        self.ruleset = ruleset
        self.app_url = app_url.strip().rstrip("/")
        self.sender = sender
        self.support_email = (support_email or "").strip() or None
        self.emails = emails_of(ruleset)
        self._templates, self._text_layout = _compiled_templates(self.emails)

    @classmethod
    def from_settings(cls, settings: Any, ruleset: RuleSet) -> "EmailComposer":
        return cls(ruleset, settings.next_public_app_url, settings.email_from,
                   settings.support_email)

    # -- links ------------------------------------------------------------------------

    def link(self, role: str, table: Table, row_id: str) -> str:
        rid = quote(row_id, safe="")
        if table.name == "sessions":
            if role == MECHANIC:
                return f"{self.app_url}/mechanic/dashboard?session={rid}"
            if role == SUPPORT:
                return f"{self.app_url}/admin/sessions/{rid}"
            return f"{self.app_url}/sessions/{rid}"
        if table.link:
            return self.app_url + table.link.replace("{key}", rid)
        return f"{self.app_url}/admin"

    # -- the email ----------------------------------------------------------------------

    def recipient(self, role: str, label: str, row_id: str,
                  contacts: Mapping[str, Contact]) -> str:
        if role == SUPPORT:
            if self.support_email is None:
                raise MissingRecipient("SUPPORT_EMAIL is not set")
            return self.support_email
        contact = contacts.get(role)
        return _address(contact.email if contact else None, role, label, row_id)

    def context(self, key: ActionKey, role: str, row: Mapping[str, Any],
                contacts: Mapping[str, Contact]) -> dict[str, Any]:
        try:
            rule = self.ruleset.by_name(key.rule)
        except KeyError:
            raise EmailCompositionError(f"rule {key.rule} is not in the rule table") from None
        table = self.ruleset.tables.get(key.table)
        if table is None:
            raise EmailCompositionError(f"table {key.table} is not in the rule table")
        rid = key.row_key
        # The rule's anchor instant (e.g. scheduled_for, ended_at), from the claim:
        # due = anchor + offset.
        anchor = key.due_at - rule.offset
        session_type = row.get("type") if row.get("type") in _SESSION_TYPES else None
        names = {r: _clean_name(c.name) for r, c in contacts.items()}
        label = table.label or key.table.rstrip("s").replace("_", " ")
        return {
            "rule": key.rule,
            "role": role,
            "table": key.table,
            "row_id": rid,
            "row": dict(row),
            "label": label,
            "session_id": rid,
            "short_id": rid[:8],
            "session_type": session_type,
            "session_label": f"{session_type} session" if session_type else "session",
            "duration": human_duration(rule.offset),
            "anchor_at": human_instant(anchor),
            "due_at": format_instant(key.due_at),
            "link": self.link(role, table, rid),
            "customer_name": names.get(CUSTOMER),
            "mechanic_name": names.get(MECHANIC),
            "has_mechanic": bool(row.get("mechanic_id") or names.get(MECHANIC)
                                 or (contacts.get(MECHANIC) and contacts[MECHANIC].email)),
            "recipient_name": names.get(role),
        }

    def compose(self, key: ActionKey, role: str, row: Mapping[str, Any],
                contacts: Mapping[str, Contact]) -> OutgoingEmail:
        if (key.rule, role) not in self.emails:
            raise EmailCompositionError(f"no email template for rule {key.rule} to {role}")
        ctx = self.context(key, role, row, contacts)
        to = self.recipient(role, ctx["label"], key.row_key, contacts)
        html_tmpl, text_tmpl = self._templates[template_name(key.rule, role)]
        subject = _one_line(self._block(text_tmpl, "subject", ctx))
        body = self._block(text_tmpl, "text", ctx).strip()
        action = _one_line(self._block(text_tmpl, "action", ctx) or f"Open the {ctx['label']}")
        text = _tidy_text(self._text_layout.render(ctx, body=body, action=action))
        html = html_tmpl.render(ctx).strip() + "\n"
        return OutgoingEmail(
            to=to, sender=self.sender, subject=subject, html=html, text=text,
            idempotency_key=f"{key.idempotency_key}/{role}",
            rule=key.rule, table=key.table, row_id=key.row_key, role=role)

    @staticmethod
    def _block(template: Template, name: str, ctx: dict[str, Any]) -> str:
        render = template.blocks.get(name)
        if render is None:
            return ""
        return "".join(render(template.new_context(ctx)))


# -- delivering ----------------------------------------------------------------------------

class EmailDeliverer(Deliverer):
    """The executor's email port: the emails of one action, through the Mailer.

    Returns {role: error} for every role that did not get its email, a missing
    or invalid address included (a failure recorded in the ledger, never a
    silent skip). Cancellation (shutdown) propagates. An action's emails go to
    the mailer in one call, so they travel in one batch; the batch is frozen
    in the ledger (`freeze`) under this term's fence before it is sent.
    """

    def __init__(self, store: Store, composer: EmailComposer, mail: Mailer) -> None:
        self.store = store
        self.composer = composer
        self.mail = mail
        # Set by the executor of each lease term: a batch is recorded only by
        # the instance that holds the lease.
        self.fence: Any = None
        if getattr(store, "freeze_batch", None) is not None and mail.freeze is None:
            mail.freeze = self.freeze

    async def freeze(self, batch_key: str, payload: Any, members: Any,
                     supersedes: str | None = None) -> Any:
        from listener.email_batch import FreezeRefused, frozen_batches

        if self.fence is None:
            raise FreezeRefused("no lease held")
        fence = self.fence
        # A batch not frozen is not sent, and its emails fail for good: a dropped
        # connection must not do that. Freezing is fenced and idempotent (the same
        # key again answers "frozen"; a commit whose answer was lost is found), so
        # an unavailable database is retried like the contacts lookup.
        answer = await retrying(
            lambda: self.store.freeze_batch(  # type: ignore[attr-defined]
                batch_key, list(payload), list(members), fence, supersedes),
            give_up_after=30.0, retry_on=is_transient, event="freeze_retry",
            context={"batch_key": batch_key})
        return frozen_batches(answer)

    async def deliver(self, key: ActionKey, recipients: tuple[str, ...],
                      row: dict[str, Any]) -> dict[str, str]:
        roles = tuple(dict.fromkeys(recipients))  # once each, in order
        if not roles:
            return {}
        try:
            # A dropped connection is not a missing address: retried like a
            # transient email error, and the action fails only if it persists.
            contacts = await retrying(lambda: self.store.contacts(key.table, key.row_key),
                                      attempts=5, give_up_after=30.0, retry_on=is_transient,
                                      event="contacts_retry",
                                      context={"rule": key.rule, "table": key.table,
                                               "row_id": key.row_key})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded per recipient
            error = f"contacts lookup failed: {type(exc).__name__}: {exc}"
            return {role: error for role in roles}
        errors: dict[str, str] = {}
        emails: list[OutgoingEmail] = []
        sent_roles: list[str] = []
        for role in roles:
            try:
                emails.append(self.composer.compose(key, role, row, contacts))
                sent_roles.append(role)
            except EmailCompositionError as exc:
                log.warning("email_not_composed", rule=key.rule, table=key.table,
                            row_id=key.row_key, role=role, error=str(exc))
                errors[role] = str(exc)
            except Exception as exc:  # noqa: BLE001 - a template bug fails this email only
                log.error("email_template_error", rule=key.rule, table=key.table,
                          row_id=key.row_key, role=role, error=repr(exc))
                errors[role] = f"email template error: {type(exc).__name__}: {exc}"
        if emails:
            results = await self.mail.send(key, emails)
            for role, error in zip(sent_roles, results):
                if error is not None:
                    errors[role] = error
        return errors
