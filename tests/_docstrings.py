"""What the API reference needs from a public docstring, checked with griffe as mkdocs reads it.

For every public name of ``gradguard`` (and the few other names the API pages show), and every
public method those classes define:

* a docstring;
* every parameter in ``Args:`` (a class's constructor parameters in the class docstring's
  ``Args:`` or ``Attributes:``, as a dataclass documents its fields);
* a ``Returns:`` (or ``Yields:``) section when the function returns something;
* a ``Raises:`` section when its body raises;
* an ``Examples:`` section (``Example:`` reads the same) for the top-level names, errors
  excepted.

``problems()`` lists what is missing, by file.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from typing import Any

from tests._docs import DOCS, ROOT

# Names the API pages show beyond ``gradguard.<name>``.
EXTRA = ("records.sinks.read_csv", "records.sinks.metrics")


def _extension() -> Any:
    spec = importlib.util.spec_from_file_location(
        "_griffe_gradguard", DOCS / "_griffe_gradguard.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_griffe_gradguard", module)
    spec.loader.exec_module(module)
    return module.GradguardDocstrings


def _sections(obj: Any) -> dict[str, Any] | None:
    if obj.docstring is None:
        return None
    return {s.kind.value: s for s in obj.docstring.parse("google", warnings=False)}


def _names(section: Any) -> set[str]:
    return {item.name.lstrip("*") for item in section.value}


def problems() -> dict[str, list[str]]:
    """``{file: [what is missing, ...]}`` over the public API, files relative to the repo."""
    import griffe

    import gradguard

    pkg = griffe.load(
        "gradguard",
        search_paths=[str(ROOT / "src")],
        extensions=griffe.load_extensions(_extension()),
        docstring_parser="google",
    )
    targets = [
        n
        for n, v in vars(gradguard).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith("gradguard")
    ]
    out: dict[str, list[str]] = {}

    def add(obj: Any, what: str) -> None:
        out.setdefault(str(obj.relative_filepath), []).append(f"{obj.path}: {what}")

    def documented(secs: dict[str, Any], *kinds: str) -> set[str]:
        return set().union(*(_names(secs[k]) for k in kinds if k in secs))

    def check_function(f: Any, top: bool) -> None:
        secs = _sections(f)
        if secs is None:
            add(f, "no docstring")
            return
        params = [p.name for p in f.parameters if p.name not in ("self", "cls")]
        have = documented(secs, "parameters", "other parameters")
        missing = [p for p in params if p not in have]
        if missing:
            add(f, f"Args missing: {', '.join(missing)}")
        returns = f.returns is not None and str(f.returns) != "None" and f.name != "__init__"
        if returns and "returns" not in secs and "yields" not in secs:
            add(f, f"no Returns section (returns {f.returns})")
        if re.search(r"^\s+raise \w", f.source, re.M) and "raises" not in secs:
            add(f, "raises, but has no Raises section")
        if top and "examples" not in secs:
            add(f, "no Examples section")

    def check_class(c: Any) -> None:
        secs = _sections(c)
        if secs is None:
            add(c, "no docstring")
            return
        error = any(str(b).endswith(("Error", "Exception", "Abort")) for b in c.bases)
        if "examples" not in secs and not error:
            add(c, "no Examples section")
        init = c.members.get("__init__")
        if init is not None and not init.is_alias and not error:
            have = documented(secs, "parameters", "attributes", "other parameters")
            isecs = _sections(init) or {}
            have |= documented(isecs, "parameters", "other parameters")
            missing = [p.name for p in init.parameters if p.name != "self" and p.name not in have]
            if missing:
                add(c, f"constructor Args missing: {', '.join(missing)}")
        for name, member in c.members.items():
            if name.startswith("_") or member.is_alias or not member.is_function:
                continue
            check_function(member, top=False)

    for path in [*targets, *EXTRA]:
        obj = pkg[path]
        obj = obj.final_target if obj.is_alias else obj
        if obj.is_function:
            check_function(obj, top=True)
        elif obj.is_class:
            check_class(obj)
    return {k: list(dict.fromkeys(v)) for k, v in sorted(out.items())}
