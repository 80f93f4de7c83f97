"""Print the mutation score of each module after ``make mutate`` (``mutmut run``).

    python scripts/mutation_report.py              # the table, then every mutant not killed
    python scripts/mutation_report.py --json PATH  # also write the counts as JSON

mutmut keeps one verdict per mutant in ``mutants/<source path>.meta``; this script reads them and
counts per module. A mutant counts as killed when a test failed with it in place, or when the
tests ran out of their CPU-time limit (the mutant made a loop run forever: a test noticed).
"No tests" (no selected test calls the mutated function) and "survived" count against the
score. The commit and whether the mutated files differ from it head the table, since the
numbers are only true of the code they were measured on. ``mutmut show NAME`` prints a
mutant's diff.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# mutmut's exit codes (mutmut/stats.py), folded into the four verdicts the score needs.
KILLED = {1: "killed", 3: "killed"}
TIMEOUT = {
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    -9: "timeout",
}
NO_TESTS = {5: "no tests", 33: "no tests"}


def verdict(code: int | None) -> str:
    """One mutant's verdict from mutmut's exit code."""
    if code is None:
        return "not run"
    if code in KILLED or code in TIMEOUT:
        return "killed"
    if code in NO_TESTS:
        return "no tests"
    if code == 0:
        return "survived"
    return "suspicious"


def modules(root: Path) -> list[str]:
    """The mutated modules, as ``[tool.mutmut] only_mutate`` lists them."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


def measured_at(root: Path, paths: list[str]) -> str:
    """The commit, and the mutated files that differ from it (uncommitted edits)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.rstrip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", *paths).splitlines()
    if not dirty:
        return head
    return f"{head} + uncommitted edits to " + ", ".join(line[3:] for line in dirty)


def collect(root: Path) -> dict[str, dict[str, str]]:
    """``{module path: {mutant name: verdict}}`` for every mutated module with results."""
    out: dict[str, dict[str, str]] = {}
    for path in modules(root):
        meta = root / "mutants" / f"{path}.meta"
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        verdicts = {name: verdict(code) for name, code in codes.items()}
        # A run over a subset (`make mutate MUTANTS=...`) leaves the others unrun.
        verdicts = {name: v for name, v in verdicts.items() if v != "not run"}
        if verdicts:
            out[path] = verdicts
    return out


def table(results: dict[str, dict[str, str]]) -> tuple[str, dict[str, dict[str, int]]]:
    """The score table as text, and its counts by module (``"all"`` for the total)."""
    counts: dict[str, dict[str, int]] = {}
    total: Counter[str] = Counter()
    for path, verdicts in results.items():
        c = Counter(verdicts.values())
        total.update(c)
        counts[path] = {**c, "total": len(verdicts)}
    counts["all"] = {**total, "total": sum(total.values())}
    width = max(len(p) for p in counts)
    head = (
        f"{'module':<{width}}  {'killed':>6}  {'survived':>8}  {'no tests':>8}  {'total':>5}  score"
    )
    lines = [head, "-" * len(head)]
    for path, c in counts.items():
        n = c["total"]
        score = f"{100 * c.get('killed', 0) / n:5.1f}%" if n else "    -"
        lines.append(
            f"{path:<{width}}  {c.get('killed', 0):>6}  {c.get('survived', 0):>8}  "
            f"{c.get('no tests', 0):>8}  {n:>5}  {score}"
        )
    return "\n".join(lines), counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="also write the counts (and the mutants not killed)")
    ap.add_argument("--min-score", type=float, help="exit 1 when the total is below this %%")
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    results = collect(args.root)
    if not results:
        print("no mutation results under mutants/: run `make mutate` first", file=sys.stderr)
        return 1
    text, counts = table(results)
    print(f"mutation score of the decision core at {measured_at(args.root, list(results))}")
    print(text)
    left = {
        path: {name: v for name, v in verdicts.items() if v != "killed"}
        for path, verdicts in results.items()
    }
    for path, mutants in left.items():
        if mutants:
            print(f"\n{path}: not killed (`mutmut show NAME` prints the change)")
            for name, v in sorted(mutants.items()):
                print(f"  {v:<10}  {name}")
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "not_killed": left}, indent=2) + "\n")
    total = counts["all"]
    score = 100 * total.get("killed", 0) / max(total["total"], 1)
    if args.min_score is not None and score < args.min_score:
        print(f"\nmutation score {score:.1f}% < {args.min_score:g}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
