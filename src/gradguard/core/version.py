"""The installed gradguard's version, read from its package metadata.

Modules inside the package read it here instead of importing the package's face
(``gradguard.__version__``), which would make a lower layer depend on the top one.
"""

from __future__ import annotations

import importlib.metadata

__all__ = ["version"]


def version() -> str:
    """The version of the installed ``gradguard`` distribution (``"unknown"`` when the package
    runs from a source tree that was never installed).

    Example:
        >>> version()
        '0.2.0.dev0'
    """
    try:
        return importlib.metadata.version("gradguard")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
