"""Griffe extension for the API pages: Sphinx roles in docstrings rendered as inline code.

The package's docstrings use Sphinx-style references (``:func:`name```, ``:class:`~a.b.C```) that
read well in ``help()``; Markdown would show the role names literally. This turns each role into
inline code (``~`` keeps the last dotted component, as Sphinx does).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _replace(match: re.Match) -> str:
    short, target = match.group(1), match.group(2).strip()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite Sphinx cross-reference roles in every docstring as Markdown inline code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_replace, obj.docstring.value)
