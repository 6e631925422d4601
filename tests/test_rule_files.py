"""The rule file format: every error names the file, the rule and what is wrong;
files replace, add and switch rules in a fixed order; the environment
overrides offsets, maps and the time scale; the packs ship inside the wheel."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from listener.instants import HOUR, MINUTE, SECOND
from listener.rules import RuleConfigError, load_rules
from listener.rules.loader import shipped_packs

REPO = Path(__file__).resolve().parent.parent
SHIPPED = load_rules({})
SHIPPED_NAMES = [r.name for r in SHIPPED.all_rules]

HOLDS = """
[tables.t_holds]
key = "id"
status = "status"
columns = ["expires_at", "customer_id"]

[tables.t_holds.recipients]
customer = "user:customer_id"
"""

GOOD_RULE = """
[[rule]]
name = "t_hold_expiry"
table = "t_holds"
statuses = ["reserved"]
anchor = ["expires_at"]
offset = "0s"
"""


def write(tmp_path: Path, text: str, name: str = "extra.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def rule_with(**fields: str) -> str:
    """The good rule with some lines replaced or added (`key="..."` as TOML values)."""
    lines = {"name": '"t_hold_expiry"', "table": '"t_holds"', "statuses": '["reserved"]',
             "anchor": '["expires_at"]', "offset": '"0s"'}
    lines.update(fields)
    body = "\n".join(f"{k} = {v}" for k, v in lines.items() if v is not None)
    return HOLDS + "\n[[rule]]\n" + body + "\n"


# (id, file text or None, env, fragments the message must hold besides the file)
FILE_ERRORS = [
    ("unknown key", rule_with(offest='"3m"'), {}, ["rule t_hold_expiry", "unknown key 'offest'"]),
    ("unknown table key", HOLDS.replace('status = "status"', 'statsu = "status"') + GOOD_RULE, {},
     ["table t_holds", "unknown key 'statsu'"]),
    ("unknown top-level key", "[rules]\nx = 1\n", {}, ["unknown key 'rules'"]),
    ("column not declared", rule_with(present='["paid_at"]'), {},
     ["rule t_hold_expiry", "column 'paid_at' is not in table t_holds's columns"]),
    ("bad duration", rule_with(offset='"3 minutes"'), {},
     ["rule t_hold_expiry", "offset '3 minutes' is not a duration",
      "use an optional sign (+ or -) and a number with a unit s, m, h or d"]),
    ("offset not a string", rule_with(offset="3"), {},
     ["rule t_hold_expiry", "offset must be a string"]),
    ("two rules one name", rule_with() + GOOD_RULE, {},
     ["rule t_hold_expiry", "defined twice in this file"]),
    ("undeclared table", rule_with(table='"t_nope"'), {},
     ["rule t_hold_expiry", "table 't_nope' is not declared"]),
    ("set_status without reason", rule_with(set_status='"expired"'), {},
     ["rule t_hold_expiry", "set_status needs a reason"]),
    ("reason without set_status", rule_with(reason='"hold_lapsed"'), {},
     ["rule t_hold_expiry", "reason is only for set_status"]),
    ("bad lateness", rule_with(lateness='"sometimes"'), {},
     ["rule t_hold_expiry", "lateness 'sometimes'", "notify_limit or skip_past_quarter"]),
    ("notify role not declared", rule_with(notify='["owner"]'), {},
     ["rule t_hold_expiry", "notify role 'owner' is not a recipient of table t_holds"]),
    ("bad name", rule_with(name='"Hold-Expiry"'), {},
     ["rule #1", "name 'Hold-Expiry' must match [a-z0-9_]+"]),
    ("bad map values", '[maps.hold_hours]\nvalues = { a = -1 }\n', {},
     ["map hold_hours", "values must map keys to non-negative numbers"]),
    ("no anchor", rule_with(anchor="[]"), {},
     ["rule t_hold_expiry", "anchor must name at least one column"]),
    ("enabled not a boolean", rule_with(enabled='"yes"'), {},
     ["rule t_hold_expiry", "enabled must be true or false"]),
    ("switching an unknown rule", '[[rule]]\nname = "t_nowhere"\nenabled = false\n', {},
     ["rule t_nowhere", "switches a rule that no pack or earlier file defines"]),
    ("status the table does not know", HOLDS.replace(
        'status = "status"', 'status = "status"\nknown_statuses = ["reserved", "expired"]')
     + GOOD_RULE.replace('"reserved"', '"held"'), {},
     ["rule t_hold_expiry", "status 'held' is not one of table t_holds's known_statuses"]),
    ("set_status on every status", rule_with(statuses=None, set_status='"expired"',
                                            reason='"hold_lapsed"'), {},
     ["rule t_hold_expiry", "set_status needs statuses"]),
    ("invalid TOML", "[[rule]\nname = ", {}, ["not valid TOML"]),
]


@pytest.mark.parametrize("text,env,fragments", [c[1:] for c in FILE_ERRORS],
                         ids=[c[0] for c in FILE_ERRORS])
def test_a_bad_file_names_the_file_the_rule_and_the_problem(tmp_path, text, env,
                                                            fragments) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RuleConfigError) as caught:
        load_rules(env, [path])
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_an_unreadable_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(RuleConfigError, match=f"^{missing}: cannot be read"):
        load_rules({}, [missing])
    folder = tmp_path / "a_folder.toml"
    folder.mkdir()
    with pytest.raises(RuleConfigError, match=f"^{folder}: cannot be read"):
        load_rules({}, [folder])


def test_rules_file_variable_lists_files_in_order(tmp_path) -> None:
    first = write(tmp_path, HOLDS + GOOD_RULE, "first.toml")
    second = write(tmp_path, '[[rule]]\nname = "t_hold_expiry"\nenabled = false\n', "second.toml")
    ruleset = load_rules({"RULES_FILE": f"{first}:{second}"})
    assert not ruleset.by_name("t_hold_expiry").enabled


# (id, env, fragments): the environment's errors name the variable, the rule and the problem.
ENV_ERRORS = [
    ("bad PLAN_MINUTES", {"PLAN_MINUTES": "chat10"},
     ["PLAN_MINUTES='chat10' is not valid", "key=number pairs"]),
    ("negative PLAN_MINUTES", {"PLAN_MINUTES": "chat10=-5"}, ["PLAN_MINUTES='chat10=-5'"]),
    ("bad RULE_ value", {"RULE_MECHANIC_NUDGE": "soon"},
     ["RULE_MECHANIC_NUDGE='soon' is not valid", "a number with a unit"]),
    ("RULE_ naming no rule", {"RULE_MECHANIC_NUDGES": "5m"},
     ["RULE_MECHANIC_NUDGES names no rule", "RULE_MECHANIC_NUDGE,"]),
    ("bad RULES_TIME_SCALE", {"RULES_TIME_SCALE": "fast"},
     ["RULES_TIME_SCALE='fast' is not a positive number"]),
    ("zero RULES_TIME_SCALE", {"RULES_TIME_SCALE": "0"}, ["RULES_TIME_SCALE='0'"]),
    ("negative RULES_TIME_SCALE", {"RULES_TIME_SCALE": "-60"}, ["RULES_TIME_SCALE='-60'"]),
    ("infinite RULES_TIME_SCALE", {"RULES_TIME_SCALE": "inf"}, ["RULES_TIME_SCALE='inf'"]),
]


@pytest.mark.parametrize("env,fragments", [c[1:] for c in ENV_ERRORS],
                         ids=[c[0] for c in ENV_ERRORS])
def test_a_bad_variable_names_itself_and_the_problem(env, fragments) -> None:
    with pytest.raises(RuleConfigError) as caught:
        load_rules(env)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


# -- where rules go ------------------------------------------------------------------------

def test_a_replaced_shipped_rule_keeps_its_place(tmp_path) -> None:
    path = write(tmp_path, """
        [[rule]]
        name = "request_expiry"
        table = "sessions"
        statuses = ["pending"]
        absent = ["mechanic_id"]
        anchor = ["status_changed_at"]
        offset = "30m"
        set_status = "expired"
        reason = "no_mechanic_available"
        """)
    ruleset = load_rules({}, [path])
    assert [r.name for r in ruleset.all_rules] == SHIPPED_NAMES
    replaced = ruleset.by_name("request_expiry")
    assert replaced.offset == 30 * MINUTE and replaced.pack == "extra.toml"
    assert replaced.notify == ()  # replaced whole, not merged


def test_new_rules_come_after_every_shipped_rule_in_file_order(tmp_path) -> None:
    first = write(tmp_path, HOLDS + GOOD_RULE.replace("t_hold_expiry", "t_zeta")
                  + GOOD_RULE.replace("t_hold_expiry", "t_alpha"), "first.toml")
    second = write(tmp_path, GOOD_RULE.replace("t_hold_expiry", "t_middle")
                   # Replacing a rule of an earlier file keeps that rule's place too.
                   + GOOD_RULE.replace("t_hold_expiry", "t_zeta").replace('"0s"', '"1m"')
                   # A shipped rule replaced in a later file stays among the shipped ones.
                   + """
[[rule]]
name = "mechanic_nudge"
table = "sessions"
statuses = ["waiting"]
present = ["mechanic_id"]
anchor = ["status_changed_at"]
offset = "4m"
""", "second.toml")
    ruleset = load_rules({}, [first, second])
    names = [r.name for r in ruleset.all_rules]
    assert names == SHIPPED_NAMES + ["t_zeta", "t_alpha", "t_middle"]
    assert ruleset.by_name("t_zeta").offset == MINUTE
    tables = ruleset.rule_tables()
    assert tables[0] == "sessions" and tables[-1] == "t_holds"  # shipped packs between


def test_a_disabling_entry_needs_only_name_and_enabled(tmp_path) -> None:
    path = write(tmp_path, '[[rule]]\nname = "support_stuck_alert"\nenabled = false\n')
    ruleset = load_rules({}, [path])
    assert [r.name for r in ruleset.all_rules] == SHIPPED_NAMES
    assert "support_stuck_alert" not in [r.name for r in ruleset.rules]
    kept = ruleset.by_name("support_stuck_alert")
    assert kept.offset == 5 * MINUTE and not kept.enabled  # the rest is the shipped rule


def test_rule_on_enables_a_default_off_rule(tmp_path) -> None:
    path = write(tmp_path, rule_with(enabled="false"))
    assert "t_hold_expiry" not in [r.name for r in load_rules({}, [path]).rules]
    ruleset = load_rules({"RULE_T_HOLD_EXPIRY": "on"}, [path])
    assert "t_hold_expiry" in [r.name for r in ruleset.rules]
    assert "mechanic_nudge" not in [r.name for r in load_rules({"RULE_MECHANIC_NUDGE": "off"})]


def test_rule_variables_keep_the_offsets_sign() -> None:
    ruleset = load_rules({"RULE_SCHEDULED_REMINDER_24H": "48h", "RULE_MECHANIC_NUDGE": "10m",
                          "RULE_SCHEDULED_NO_SHOW": "0"})
    assert SHIPPED.by_name("scheduled_reminder_24h").offset == -24 * HOUR
    assert ruleset.by_name("scheduled_reminder_24h").offset == -48 * HOUR
    assert ruleset.by_name("mechanic_nudge").offset == 10 * MINUTE
    assert ruleset.by_name("scheduled_no_show").offset == 0


def test_time_scale_divides_offsets_and_derived_units_after_overrides() -> None:
    ruleset = load_rules({"RULES_TIME_SCALE": "60", "RULE_SCHEDULED_REMINDER_1H": "2h"})
    assert ruleset.time_scale == 60
    assert ruleset.by_name("request_expiry").offset == 15 * SECOND
    assert ruleset.by_name("scheduled_reminder_24h").offset == -24 * MINUTE
    assert ruleset.by_name("scheduled_reminder_1h").offset == -2 * MINUTE
    plan_end = ruleset.tables["sessions"].derived["plan_end"]
    assert [t.unit for t in plan_end.lookups] == [SECOND]  # plan minutes
    assert [t.unit for t in plan_end.sums] == [SECOND]  # extension minutes
    assert ruleset.maps["plan_minutes"]["chat10"] == 30  # the values are not scaled twice


def test_plan_minutes_replaces_the_map_entirely() -> None:
    assert SHIPPED.maps["plan_minutes"] == {"chat10": 30, "video15": 45, "diagnostic": 60,
                                            "free": 5, "trial": 5, "trial-free": 5}
    ruleset = load_rules({"PLAN_MINUTES": " chat10=20, gold=90 ,"})
    assert ruleset.maps["plan_minutes"] == {"chat10": 20, "gold": 90}


def test_a_shipped_table_may_be_redeclared_with_defaults(tmp_path) -> None:
    path = write(tmp_path, '[tables.sessions]\nkey = "id"\nstatus = "status"\n')
    sessions = load_rules({}, [path]).tables["sessions"]
    assert sessions == SHIPPED.tables["sessions"]


def test_declared_columns_need_not_list_status_changed_at(tmp_path) -> None:
    # The listener keeps that column on every table a rule anchors on it.
    path = write(tmp_path, rule_with(anchor='["status_changed_at"]'))
    assert load_rules({}, [path]).by_name("t_hold_expiry").anchor == ("status_changed_at",)


def test_packs_come_sessions_first() -> None:
    labels = [label for label, _ in shipped_packs()]
    assert labels[0] == "sessions.toml" and labels == labels[:1] + sorted(labels[1:])


@pytest.mark.slow
def test_packs_are_found_in_a_non_editable_install(tmp_path) -> None:
    """Build the wheel, install it without its dependencies into a fresh venv that
    sees this one's packages, and load the rules there, away from the source tree."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(wheels), str(REPO)], check=True, capture_output=True, timeout=240,
                   cwd=tmp_path)
    (wheel,) = wheels.glob("listener-*.whl")
    target = tmp_path / "venv"
    venv.create(target, with_pip=False, system_site_packages=False)
    python = target / "bin" / "python"
    # The dependencies come from this venv's site-packages; the listener from the wheel only.
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "deps.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site,
                    str(wheel)], check=True, capture_output=True, timeout=240)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RULES_FILE") and not k.startswith("RULE")}
    probe = ("import listener, listener.rules as r; rs = r.load_rules({}); "
             "print(listener.__file__); print(len(rs.all_rules))")
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    where, count = result.stdout.split()
    assert where.startswith(site) and "__editable__" not in where, where
    assert int(count) == len(SHIPPED.all_rules)
