"""The product speaks of itself only.

Its code, documentation, tests, benchmarks and scripts say what a thing is and which situation
of a user it covers; they do not cite the tickets or reproduction files that asked for it, the
people who wrote it or the machine it was written on. This test reads every text file of the
product (git's tracked and untracked files, ignored ones left out) and names each line that
does, as ``file:line``.

The patterns below are assembled from pieces, so that this file does not hold the words it
looks for; it is skipped by name all the same.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCOPE = ("src", "docs", "tests", "benchmarks", "scripts", "README.md", "CHANGELOG.md", "Makefile")
SKIP_PARTS = {"__pycache__", ".venv", "build", "dist", ".git"}
THIS = Path(__file__).resolve()

_TICKET = "iss" + "ue"
_REPRO = "rep" + "ro"
_SHARED = "sha" + "red"
_ENG = "engi" + "neer"

# (what it is, pattern, re flags)
RULES: list[tuple[str, str, int]] = [
    ("a ticket number", rf"\b{_TICKET}(?:s|'s)?\s*#?\d+", re.I),
    ("a ticket", rf"\b{_TICKET}'s\b|\bthe {_TICKET}\b|\bti" + r"cket\b", re.I),
    ("a reproduction file", rf"{_SHARED}/{_REPRO}|\.\./{_SHARED}\b", re.I),
    ("a reproduction", rf"\b{_REPRO}s?\b|_{_REPRO}(?![a-z])|\b{_REPRO}_", re.I),
    (
        "a reproduction's number",
        r"\(r\d{1,2}\)|\br\d{1,2}:|\br\d{1,2}\s+(?:regression|case)\b"
        r"|\br(?:[2-9]|\d\d),\s*r\d{1,2}\b|\btest_r\d+_|\br\d+_\w+\.py\b",
        0,
    ),
    ("a work round", r"\bro" + r"und\s?\d+\b", re.I),
    ("a colleague", rf"\b{_ENG}s?\b|\b(?:their|its) own" + r"ers? (?:is|are)\b", re.I),
    (
        "the machine it was built on",
        r"\bother jobs loaded\b|\bloaded the machine\b|\b(?:busy|shared) \d-core\b"
        r"|\d-core box\b|\bthis project's (?:shared|machine|box)",
        re.I,
    ),
    ("how it was written", r"\bwhile writ" + r"ing these tests\b", re.I),
    ("the texts it started from", r"\s\(se" + r"ed\)|\bseed texts?\b|\bseed vectors\b", re.I),
]
_COMPILED = [(what, re.compile(pattern, flags)) for what, pattern, flags in RULES]


def product_files(root: Path = ROOT) -> list[Path]:
    """The product's files under SCOPE: git's tracked and untracked ones, ignored ones left out."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SCOPE],
            cwd=root, capture_output=True, check=True, timeout=60,
        ).stdout.decode()  # fmt: skip
        files = [root / f for f in sorted(set(listed.split("\0"))) if f]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        files = []
        for entry in SCOPE:
            path = root / entry
            files += sorted(path.rglob("*")) if path.is_dir() else [path]
    return [
        f for f in files
        if f.is_file() and not SKIP_PARTS & set(f.relative_to(root).parts)
        and not any(p.endswith(".egg-info") for p in f.parts)
    ]  # fmt: skip


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def offenders(files: Iterable[Path], root: Path = ROOT) -> list[str]:
    """``file:line: what: the line`` for every line that speaks of how the product was built."""
    found = []
    for path in files:
        if path.resolve() == THIS:
            continue
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for what, pattern in _COMPILED:
                if pattern.search(line):
                    where = path.relative_to(root).as_posix()
                    found.append(f"{where}:{number}: {what}: {line.strip()[:160]}")
                    break
    return found


def test_the_product_speaks_of_itself_only() -> None:
    files = product_files()
    assert any(f.name == "README.md" for f in files) and len(files) > 50, files[:5]
    found = offenders(files)
    assert not found, "say what the thing is instead:\n" + "\n".join(found)


def test_the_matcher_flags_planted_lines_and_leaves_plain_ones(tmp_path: Path) -> None:
    planted = [
        f"# the fix for {_TICKET} 11, section 4",
        f"Targets ({_TICKET} 2)",
        f"the {_TICKET}'s setting",
        f"after {_SHARED}/{_REPRO}/early_explosion.py",
        f"see ../{_SHARED}/notes.md",
        f"def test_mha_{_REPRO}_works():",
        "# --- r4, r5, r6: the sync-free mode undoes a guess",
        "# --- r1: module buffers",
        "def test_r12_skip_sampler():",
        "a rollback before the first snapshot (r10 regression)",
        f"which another {_ENG} owns",
        "Their own" + "ers are rewriting them",
        "when eight other jobs loaded the machine",
        "3 min on a busy 2-core box",
        "r / ||r|| when ||r|| > 10 (se" + "ed)",
    ]
    plain = [
        "r0, r1 = results[0][name], results[1][name]",
        "from gradguard.insight.replay import NotReproducible",
        "the run is reproducible: every seed fixes the data (see test_repros)",
        "own" + "er = type(self).__name__",
        "torch.manual_seed(seed)  # per-seed values, the seed spread",
        "a rollback before the first periodic snapshot",
        "round(x, 3) for x in rounds of 15 steps",
        "tensor " + "help" + "ers",
    ]
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "page.md"
    bad.write_text("\n".join(plain + planted) + "\n", encoding="utf-8")
    (tmp_path / "figure.png").write_bytes(b"\x89PNG\0" + planted[0].encode())  # binary: skipped
    found = offenders([bad, tmp_path / "figure.png"], root=tmp_path)
    lines = [int(f.split(":")[1]) for f in found]
    assert lines == list(range(len(plain) + 1, len(plain) + len(planted) + 1)), found
    assert all(f.startswith("sub/page.md:") for f in found)
