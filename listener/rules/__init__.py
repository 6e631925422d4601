"""The rules: declarations in `model`, read from TOML packs and files by `loader`,
turned into what the database functions take by `query`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from listener.rules.loader import RuleConfigError, load_ruleset
from listener.rules.model import RuleSet

__all__ = ["RuleConfigError", "RuleSet", "load_rules"]


def load_rules(env: Mapping[str, str] | None = None,
               files: Iterable[str | Path] = ()) -> RuleSet:
    return load_ruleset(os.environ if env is None else env, files)
