"""Which code produced a result: the commit every benchmark and evaluation records (light: no torch import)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["git_commit"]


def git_commit(given: str | None = None) -> str:
    """The commit a result was made with: `given` (a script's --commit argument), else `$SSA_ADAPT_COMMIT` (a copy
    of the tree without .git, as a lent GPU machine gets, cannot say), else the short hash of the checkout
    ssa_adapt runs from, "+dirty" when `ssa_adapt/` has uncommitted changes; "unknown" outside a git checkout."""
    if given:
        return given
    if os.environ.get("SSA_ADAPT_COMMIT"):
        return os.environ["SSA_ADAPT_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ssa_adapt"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
