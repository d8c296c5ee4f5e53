"""Names that look like local paths: a missing one is reported at once, not turned into a Hub lookup."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["looks_local", "require_local_path"]


def looks_local(name: str, extensions: tuple[str, ...] = ()) -> bool:
    """Whether `name` can only mean a local path: it starts with '/', '.', '~' or holds a backslash, it has more
    than one '/' (Hub ids are 'name' or 'org/name'), its first folder exists here, or it ends with one of
    `extensions` (lower case, with the dot: '.jsonl')."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if "/" in name and os.path.isdir(os.path.expanduser(name.split("/", 1)[0])):
        return True
    return name.lower().endswith(extensions) if extensions else False


def require_local_path(name: str, what: str, extensions: tuple[str, ...] = ()) -> None:
    """Raise FileNotFoundError naming `name` when it looks local (see `looks_local`) and does not exist; `what`
    says what it is for ('model', 'dataset')."""
    if not looks_local(name, extensions) or os.path.exists(os.path.expanduser(name)):
        return
    resolved = Path(name).expanduser().resolve()
    raise FileNotFoundError(
        f"The {what} {name!r} looks like a local path, but {str(resolved)!r} does not exist (working directory "
        f"{os.getcwd()!r}). Check the path; a Hub id is written 'name' or 'org/name'."
    )
