"""README.md says what the product does, exactly.

The demo's table and lines in the README are what ``gradguard demo`` prints (every cell but the
seconds), the replay verdict is what ``gradguard replay`` prints for the demo's bundle, every
command the README shows exists (make targets, CLI commands and their options, pip extras),
its Python runs, and its links point to files that exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests._docs import ROOT

README = ROOT / "README.md"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
TIMEOUT = 1800  # a hang guard only: the demo takes seconds to a minute on a busy machine


def readme() -> str:
    return README.read_text(encoding="utf-8")


def blocks(lang: str) -> list[str]:
    return [m.group("body") for m in FENCE.finditer(readme()) if m.group("lang") == lang]


def section(title: str) -> str:
    """The README's text from the heading ``## title`` to the next ``## ``."""
    text = readme()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def gradguard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "gradguard", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``gradguard demo`` with its defaults, once per session, in a fresh folder (the README's
    paths are relative to where it ran)."""
    cwd = tmp_path_factory.mktemp("readme-demo")
    res = gradguard("demo", cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    return cwd, res.stdout


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


def _rows(lines: list[str]) -> list[list[str]]:
    """The data rows of a rich table, without the last column (the seconds)."""
    return [_cells(ln)[:-1] for ln in lines if ln.startswith("│")]


# -- the demo ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_readme_shows_what_the_demo_prints(demo: tuple[Path, str]) -> None:
    _, stdout = demo
    printed = [ln.rstrip() for ln in stdout.splitlines()]
    (shown,) = [b for b in blocks("text") if "unguarded vs guarded" in b]
    shown_lines = [ln.rstrip() for ln in shown.splitlines()]
    # row by row: every cell of every run, the seconds left out
    assert _rows(shown_lines) == _rows(printed), "README.md's demo table is not what it prints"
    assert len(_rows(shown_lines)) == 2
    # every other line the README shows is a line the demo prints
    missing = [ln for ln in shown_lines if not ln.startswith("│") and ln not in printed]
    assert not missing, f"README.md shows lines the demo does not print: {missing}"


@pytest.mark.slow
def test_the_readme_replay_verdict_is_what_replay_prints(demo: tuple[Path, str]) -> None:
    cwd, _ = demo
    (shown,) = [b for b in blocks("text") if b.startswith("$ gradguard replay")]
    command, *output = shown.splitlines()
    res = gradguard(*shlex.split(command.removeprefix("$ gradguard ")), cwd=cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    assert " ".join(" ".join(output).split()) == " ".join(res.stdout.split())
    assert f"  why it happened: {command.removeprefix('$ ')}" in demo[1].splitlines()


# -- commands, code and links --------------------------------------------------------------------


def commands() -> list[str]:
    """Every shell command the README shows: bash blocks, ``$ `` lines and inline code."""
    found = []
    for body in blocks("bash"):
        found += [ln.split("#")[0].strip() for ln in body.splitlines() if ln.split("#")[0].strip()]
    for body in blocks("text"):
        found += [ln.removeprefix("$ ") for ln in body.splitlines() if ln.startswith("$ ")]
    inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", readme(), flags=re.S))
    found += [" ".join(c.split()) for c in inline if c.startswith(("make ", "gradguard "))]
    return found


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:", text, re.M))


def test_every_command_the_readme_shows_exists(capsys: pytest.CaptureFixture[str]) -> None:
    from gradguard.app.cli import build_parser, main

    with pytest.raises(SystemExit):
        main(["--help"])
    listed = set(re.findall(r"^\s{4}(\w+)\s", capsys.readouterr().out, re.M))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]
    cmds = commands()
    assert {"make demo", "make test"} <= set(cmds), cmds
    kinds = set()
    for cmd in cmds:
        words = shlex.split(cmd)
        kinds.add(words[0])
        if words[0] == "make":
            assert set(words[1:]) <= make_targets(), f"README.md: {cmd}: no such make target"
        elif words[0] == "gradguard":
            assert words[1] in listed, f"README.md: {cmd}: not in `gradguard --help`"
            if len(words) > 2:  # a whole command line, not the name of a command
                try:
                    build_parser().parse_args(words[1:])
                except SystemExit as e:
                    pytest.fail(f"README.md: {cmd}: the CLI refuses it ({e})")
        elif words[:2] == ["pip", "install"]:
            for spec in words[2:]:
                name, _, extra = spec.partition("[")
                assert name == "gradguard", cmd
                assert not extra or extra.rstrip("]") in extras, f"README.md: {cmd}: no extra"
        else:
            pytest.fail(f"README.md shows a command this test does not know: {cmd}")
    assert kinds == {"make", "gradguard", "pip"}, kinds


def test_the_readme_opens_with_make_demo_and_make_test() -> None:
    first = FENCE.search(readme())
    assert first is not None and first.group("lang") == "bash"
    assert [ln.split("#")[0].strip() for ln in first.group("body").splitlines()] == [
        "make demo",
        "make test",
    ]


def test_the_readme_python_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop, in the docs tests' namespace (a small model, its optimizer, a loader)."""
    from tests.test_docs import fixture_namespace

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    code = blocks("python")
    assert code and "guard.step(loss)" in code[0]
    scope = fixture_namespace(tmp_path)
    for body in code:
        exec(compile(body, "README.md", "exec"), scope)
    assert scope["guard"].step_count > 0
    assert (tmp_path / "report.html").stat().st_size > 0
    scope.clear()


def test_every_link_in_the_readme_exists() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme())
    assert links
    missing = [t for t in links if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
    # every docs page the site builds is listed
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    pages -= {"docs/changelog.md"}  # the site's copy of CHANGELOG.md, which README links
    assert not pages - set(links), f"README.md does not list {sorted(pages - set(links))}"
