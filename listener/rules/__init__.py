"""The rule table: declarations in `defaults`, their interpretation in `table`."""
from __future__ import annotations

import os
from typing import Mapping

from listener.rules.defaults import DEFAULT_RULES
from listener.rules.table import RuleConfigError, RuleTable, build_table

__all__ = ["DEFAULT_RULES", "RuleConfigError", "RuleTable", "load_rules"]


def load_rules(env: Mapping[str, str] | None = None) -> RuleTable:
    return build_table(DEFAULT_RULES, os.environ if env is None else env)
