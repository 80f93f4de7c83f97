"""A griffe extension for the API reference: read gradguard's docstrings as they are written.

Two habits of the code base that griffe's Google parser does not know:

* ``Example:`` (singular) heads the example section. Griffe reads only ``Examples:`` as one and
  would render ``Example:`` as an admonition, so its ``>>>`` lines would become nested block
  quotes instead of code. The singular is renamed to the plural.
* Sphinx roles (``:class:`~gradguard.guard.Guard```, ``:meth:`state_dict```) would show as raw
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


def rewrite(text: str, obj: Any = None) -> str:
    """``text`` with ``Example:`` as ``Examples:`` and roles as optional cross-references."""

    def role(m: re.Match[str]) -> str:
        tilde, name = m.group(1), m.group(2).strip()
        shown = name.rsplit(".", 1)[-1] if tilde else name
        target = name if obj is None else _target(obj, name)
        return (
            f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>"
        )

    return _ROLE.sub(role, _EXAMPLE.sub(r"\1Examples:", text))


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
