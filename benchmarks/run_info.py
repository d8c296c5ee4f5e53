"""What a benchmark run records about itself (shared by attention.py, attention_real.py and prefill.py)."""

from __future__ import annotations

import subprocess


def git_commit(given: str | None = None) -> str:
    """`given` (the --commit argument: a copy of the tree without .git cannot say), else the short hash of HEAD
    here, else "unknown"."""
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"
