"""Prometheus metrics. One registry per process, served by the ops endpoint."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

TIMERS_ARMED = Gauge("listener_timers_armed", "Deadlines currently armed", registry=REGISTRY)
SESSIONS_TRACKED = Gauge("listener_sessions_tracked", "Sessions held in memory", registry=REGISTRY)
ACTIONS = Counter("listener_actions_total", "Actions by rule and outcome", ["rule", "outcome"],
                  registry=REGISTRY)
FIRING_LATENESS = Histogram(
    "listener_firing_lateness_seconds", "Fired instant minus due instant (claim included)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 60, 300,
             3600),
    registry=REGISTRY)
RECONCILE_DRIFT = Counter("listener_reconcile_drift_total",
                          "Rows found different from memory by a reconcile sweep", registry=REGISTRY)
RECONCILES = Counter("listener_reconciles_total", "Reconcile sweeps run", registry=REGISTRY)
SOURCE_RECONNECTS = Counter("listener_source_reconnects_total", "Change source reconnects",
                            ["source"], registry=REGISTRY)
BAD_INPUT = Counter("listener_bad_input_total", "Malformed changes or rows, by kind", ["kind"],
                    registry=REGISTRY)
EMAIL_ATTEMPTS = Counter("listener_email_attempts_total", "Email send attempts", registry=REGISTRY)
EMAIL_FAILURES = Counter("listener_email_failures_total",
                         "Emails given up on after the last attempt, or refused", registry=REGISTRY)
MQTT_BUFFER = Gauge("listener_mqtt_buffer_depth", "Events waiting for the broker", registry=REGISTRY)
MQTT_DROPPED = Counter("listener_mqtt_dropped_total", "Events dropped from a full MQTT buffer",
                       registry=REGISTRY)
BUGS = Counter("listener_bugs_total",
               "Unexpected exceptions in a part of the daemon (logged with a traceback; the "
               "part restarts)", ["part"], registry=REGISTRY)
CATCH_UPS = Counter("listener_catch_up_rows_total",
                    "Rows the incremental read found that no change had brought",
                    registry=REGISTRY)
LEASE_HELD = Gauge("listener_lease_held", "1 while this instance holds the lease", registry=REGISTRY)


_action_children: dict[tuple[str, str], object] = {}


def action_counter(rule: str, outcome: str):  # type: ignore[no-untyped-def]
    """ACTIONS.labels(...) without its lock and lookup on every action."""
    child = _action_children.get((rule, outcome))
    if child is None:
        child = _action_children[(rule, outcome)] = ACTIONS.labels(rule, outcome)
    return child
