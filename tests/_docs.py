"""The code blocks of the documentation pages, and the markers that say how each one is tested.

A fenced block is *code* when its language is ``python``, ``bash``, ``sh`` or ``console``; a
block without a language or marked ``text`` is output and is not run. The line right before a
code block (blank lines skipped) may be a marker:

* ``<!-- example: NAME -->``: a named example; a dedicated test runs it and checks what it
  does (``code_block(page, NAME)`` finds it). Named examples no dedicated test claims run in
  tests/test_docs.py like any other block.
* ``<!-- docs-test: skip REASON -->``: the block cannot run in the tests (it needs several
  processes, a GPU, the network, minutes); the reason is required and shown in the test report.

Every other ``python`` block runs in tests/test_docs.py, page by page in one namespace (a later
block sees what an earlier one defined, as a reader would), seeded with the names snippets
assume (``model``, ``optimizer``, ``loader``, ...; see ``fixture_namespace``). A ``bash``
block without a skip marker fails the test: shell commands are either quick enough to be
worth a dedicated test or are marked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

CODE_LANGUAGES = {"python", "py", "bash", "sh", "console", "shell"}
_FENCE = re.compile(
    r"^(?P<fence>```+)(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S
)
_MARKER = re.compile(r"^<!--\s*(?P<kind>example|docs-test):\s*(?P<rest>.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # path under docs/, e.g. "guard.md"
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    example: str | None  # the NAME of <!-- example: NAME -->
    skip: str | None  # the REASON of <!-- docs-test: skip REASON --> ("" when given no reason)

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def pages() -> list[str]:
    """Every Markdown page under docs/, as paths relative to it."""
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def blocks(page: str) -> list[Block]:
    """The code blocks of ``page`` (output blocks left out), in page order."""
    text = (DOCS / page).read_text(encoding="utf-8")
    out: list[Block] = []
    for m in _FENCE.finditer(text):
        lang = m.group("lang").lower()
        if lang not in CODE_LANGUAGES:
            continue
        before = [ln.strip() for ln in text[: m.start()].splitlines() if ln.strip()]
        marker = _MARKER.match(before[-1]) if before else None
        example = skip = None
        if marker and marker.group("kind") == "example":
            example = marker.group("rest")
        elif marker:
            word, _, reason = marker.group("rest").partition(" ")
            if word != "skip":
                raise ValueError(f"docs/{page}: unknown marker {before[-1]!r}")
            skip = reason.strip()
        line = text.count("\n", 0, m.start()) + 1
        out.append(Block(page, line, lang, m.group("body"), example, skip))
    return out


def code_block(page: str, name: str) -> str:
    """The code of the example ``<!-- example: name -->`` on ``page``."""
    found = [b.code for b in blocks(page) if b.example == name]
    assert len(found) == 1, f"docs/{page} has {len(found)} examples named {name!r}"
    return found[0]
