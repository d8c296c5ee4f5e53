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


def markdown_header(title: str, result: dict) -> str:
    """The top of a benchmark's markdown: the title, then the card, date, commit and command of `result` (its
    "device", "date", "commit" and "command" entries)."""
    return (
        f"# {title}\n\n{result['device']}, {result['date']}, commit {result.get('commit', 'not recorded')}.\n\n"
        f"Command: `{result['command']}`\n"
    )
