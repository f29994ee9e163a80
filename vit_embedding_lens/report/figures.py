"""Figures of a run as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

FIGURES_DIR = "figures"


def save_figures(
    figures: Mapping[str, Mapping[str, Any]], report_dir: Path, dpi: int = 110
) -> Dict[str, Dict[str, Path]]:
    """``report_dir/figures/<analysis>__<figure>.png`` for every figure; returns the paths.

    A figure is a matplotlib Figure or an interactive view
    (:class:`~vit_embedding_lens.viz.interactive.InteractiveView`, saved as its static figure; the
    page embeds its HTML, see :func:`interactive_html`). Figures made with ``pyplot`` are closed
    after saving, so long sessions do not accumulate them.
    """
    folder = Path(report_dir) / FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Dict[str, Path]] = {}
    for analysis, named in figures.items():
        for name, fig in named.items():
            if not hasattr(fig, "savefig"):
                raise TypeError(
                    f"{analysis}.figures returned {type(fig).__name__} for {name!r}; figures are "
                    "matplotlib Figures"
                )
            path = folder / f"{analysis}__{name}.png"
            fig.savefig(path, dpi=dpi)
            _close(fig)
            paths.setdefault(analysis, {})[name] = path
    return paths


def interactive_html(figures: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, str]]:
    """The offline HTML of every interactive figure (one with ``offline_html()``), by analysis and
    figure name; matplotlib Figures have none."""
    out: Dict[str, Dict[str, str]] = {}
    for analysis, named in figures.items():
        for name, fig in named.items():
            if callable(getattr(fig, "offline_html", None)):
                out.setdefault(analysis, {})[name] = str(fig.offline_html())
    return out


def _close(fig: Any) -> None:
    import sys

    from matplotlib.figure import Figure

    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and isinstance(fig, Figure):
        pyplot.close(fig)
