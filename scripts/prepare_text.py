"""Produce a long plain-English text file from Debian's `debian-handbook` package.

Why: vllm-sink's tests and benchmarks need long, natural token streams (50k+ tokens) and no
dataset hub is reachable. The Debian Administrator's Handbook (CC-BY-SA / GPL) is in the
Debian archive as HTML; this script downloads the .deb with `apt-get download` (no system
install), extracts it with `dpkg-deb -x`, converts the en-US HTML pages to plain prose with the
stdlib HTML parser, and concatenates them in book order.

Usage: python scripts/prepare_text.py [OUTPUT_FILE]   (default: data/debian-handbook.txt)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "debian-handbook.txt"
TOKENIZER_DIR = (
    REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
)  # written by scripts/build_smollm2.py
PACKAGE = "debian-handbook"
BOOK_TITLE = "The Debian Administrator's Handbook"

VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "param",
    "source",
    "wbr",
}
BLOCK = {
    "address", "blockquote", "body", "dd", "div", "dl", "dt", "h1", "h2", "h3", "h4", "h5", "h6",
    "li", "ol", "p", "pre", "table", "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip
# Subtrees that are not prose: page chrome, tables of contents, code/terminal listings
# (examples, `pre`), figures and tables (captions without their content read badly).
SKIP_TAGS = {"head", "script", "style", "pre", "table", "img", "object", "svg"}
SKIP_CLASSES = {
    "docnav", "toc", "example", "informalexample", "figure", "informalfigure", "mediaobject",
    "table", "informaltable", "indexterm", "legalnotice", "calloutlist",
}  # fmt: skip
SKIP_IDS = {"banner", "title", "site_footer"}


class ProseExtractor(HTMLParser):
    """Collects the prose of one Publican/DocBook XHTML page as a list of paragraphs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip_depth = 0  # >0 while inside a skipped subtree
        self._prefix = ""

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
        self._buf = []
        if text:  # an empty flush (e.g. <li><div class="para">) keeps the pending "- " prefix
            self.paragraphs.append(self._prefix + text)
            self._prefix = ""

    def _skipped(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        return tag in SKIP_TAGS or bool(classes & SKIP_CLASSES) or a.get("id") in SKIP_IDS

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        void = tag in VOID
        if self._skip_depth:
            self._skip_depth += 0 if void else 1
            return
        if self._skipped(tag, attrs):
            if not void:
                self._skip_depth = 1
            return
        if tag in BLOCK or tag == "br":
            self._flush()
            if tag == "li":
                self._prefix = "- "
        elif tag in ("td", "th"):
            self._buf.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # XHTML `<x/>`: an element with no content; never changes nesting depth.
        if not self._skip_depth and not self._skipped(tag, attrs) and (tag in BLOCK or tag == "br"):
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if self._skip_depth:
            self._skip_depth -= 1
            return
        if tag in BLOCK:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def page_to_text(path: Path) -> str:
    parser = ProseExtractor()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return "\n\n".join(parser.paragraphs)


def next_page(path: Path) -> str | None:
    """The page's `<link rel="next" href="...">` (Publican's reading order)."""
    head = path.read_text(encoding="utf-8").split("</head>", 1)[0]
    for tag in re.findall(r"<link\b[^>]*>", head):
        if re.search(r'\brel="next"', tag):
            m = re.search(r'\bhref="([^"#]+)', tag)
            return m.group(1) if m else None
    return None


def book_order(html_dir: Path) -> list[Path]:
    """Pages in reading order, following rel=next from index.html; stragglers appended sorted."""
    pages = sorted(html_dir.glob("*.html"))
    order: list[Path] = []
    seen: set[str] = set()
    name: str | None = "index.html"
    while name and name not in seen and (html_dir / name).is_file():
        seen.add(name)
        order.append(html_dir / name)
        name = next_page(html_dir / name)
    order += [p for p in pages if p.name not in seen]
    return order


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def download_deb(workdir: Path) -> Path:
    """`apt-get download` the package into workdir; one `apt-get update` and retry on failure."""
    proc = run(["apt-get", "download", PACKAGE], workdir)
    if proc.returncode != 0:
        print(
            f"apt-get download failed ({proc.stderr.strip().splitlines()[-1:]}); running apt-get update once"
        )
        upd = run(["apt-get", "update"], workdir)
        if upd.returncode != 0:
            sys.exit(f"error: apt-get update failed:\n{upd.stderr}")
        proc = run(["apt-get", "download", PACKAGE], workdir)
        if proc.returncode != 0:
            sys.exit(f"error: apt-get download {PACKAGE} failed:\n{proc.stderr}")
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        sys.exit(f"error: apt-get download produced no .deb in {workdir}")
    return debs[0]


def find_en_html(root: Path) -> Path:
    """The en-US HTML directory (usr/share/doc/debian-handbook/html/en-US in the package)."""
    for index in sorted(root.rglob("index.html")):
        if index.parent.name == "en-US":
            return index.parent
    sys.exit(f"error: no en-US/index.html inside the extracted {PACKAGE} package")


def build_text() -> str:
    with tempfile.TemporaryDirectory(prefix="debian-handbook-") as tmp:
        work = Path(tmp)
        deb = download_deb(work)
        print(f"downloaded {deb.name} ({deb.stat().st_size / 1e6:.1f} MB)")
        extract = work / "x"
        proc = run(["dpkg-deb", "-x", str(deb), str(extract)], work)
        if proc.returncode != 0:
            sys.exit(f"error: dpkg-deb -x failed:\n{proc.stderr}")
        html_dir = find_en_html(extract)
        pages = book_order(html_dir)
        print(f"converting {len(pages)} pages from {html_dir.relative_to(extract)}")
        chapters = [BOOK_TITLE]
        for page in pages:
            # index.html is the title page + table of contents; its prose is metadata.
            text = "" if page.name == "index.html" else page_to_text(page)
            if text:
                chapters.append(text)
    return "\n\n".join(chapters) + "\n"


def count_tokens(text: str) -> int | None:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        print(
            f"(no tokenizer at {TOKENIZER_DIR}; run scripts/build_smollm2.py to get a token count)"
        )
        return None
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    out = out if out.is_absolute() else (Path.cwd() / out)
    if out.is_file() and out.stat().st_size > 0:
        print(f"reusing existing {out} ({out.stat().st_size / 1e6:.2f} MB)")
        return 0

    start = time.perf_counter()
    text = build_text()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(
        f"wrote {out}: {len(text):,} characters, {len(text.encode()):,} bytes in {time.perf_counter() - start:.1f}s"
    )
    tokens = count_tokens(text)
    if tokens is not None:
        print(f"SmolLM2 tokens: {tokens:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
