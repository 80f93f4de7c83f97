"""A griffe extension for the API reference: read gradguard's docstrings as they are written.

Two habits of the code base that griffe's Google parser does not know:

* ``Example:`` (singular) heads the example section. Griffe reads only ``Examples:`` as one and
  would render ``Example:`` as an admonition, so its ``>>>`` lines would become nested block
  quotes instead of code. The singular is renamed to the plural.
* Several parameters described together (``step, position: where the step was``; ``*args,
  **kwargs: the Trainer's own``) in an ``Args:`` section. Each name gets the shared
  description, so griffe still checks every name against the signature.
* Sphinx roles (``:class:`~gradguard.guard.guard.Guard```, ``:meth:`state_dict```) would show as raw
  text. Each becomes an optional cross-reference: a link where the target is documented, plain
  code where it is not (a private helper, a lab class), so the strict build stays strict about
  the references written as Markdown (``[Guard][gradguard.Guard]``) and about everything else.

mkdocs.yml loads this file through mkdocstrings' ``extensions`` option.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`<>]+?)(?:\(\))?`")


def _target(obj: Any, name: str) -> str:
    """The full path ``name`` means where ``obj``'s docstring is, or ``name`` itself."""
    for scope in (obj, obj.parent, obj.module):
        if scope is None:
            continue
        try:
            return str(scope.resolve(name))
        except Exception:  # griffe's NameResolutionError, or an alias it cannot follow
            continue
    return name


_ARGS_HEADER = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_SHARED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(\s*\([^)]*\))?:(.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_shared_args(text: str) -> str:
    """``a, b: text`` items of an ``Args:`` section as ``a: text`` and ``b: text``."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    section: int | None = None  # the header's indent while inside an Args section
    while i < len(lines):
        line = lines[i]
        header = _ARGS_HEADER.match(line)
        if header:
            section = len(header.group(1))
            out.append(line)
            i += 1
            continue
        if section is not None and line.strip() and _indent(line) <= section:
            section = None
        shared = _SHARED.match(line) if section is not None else None
        if shared is None:
            out.append(line)
            i += 1
            continue
        pad, names, kind, desc = shared.groups()
        body = [desc]
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(pad)):
            body.append(lines[i])
            i += 1
        while len(body) > 1 and not body[-1].strip():  # keep blank lines between items
            i -= 1
            body.pop()
        for name in (n.strip() for n in names.split(",")):
            out.append(f"{pad}{name}{kind or ''}:{body[0]}")
            out.extend(body[1:])
    return "\n".join(out)


def rewrite(text: str, obj: Any = None) -> str:
    """``text`` read as griffe's Google parser expects (see the module docstring)."""

    def role(m: re.Match[str]) -> str:
        tilde, name = m.group(1), m.group(2).strip()
        shown = name.rsplit(".", 1)[-1] if tilde else name
        target = name if obj is None else _target(obj, name)
        return (
            f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>"
        )

    return _ROLE.sub(role, split_shared_args(_EXAMPLE.sub(r"\1Examples:", text)))


class GradguardDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded package once it is complete."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def walk(obj: Any) -> None:
            if id(obj) in seen or obj.is_alias:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj)
            for member in obj.members.values():
                walk(member)

        walk(pkg)
