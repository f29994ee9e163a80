"""write_report: a run's tables, figures and index page into one folder.

Each table and figure is written on its own: with a ``failures`` list, one that cannot be written
is recorded there (analysis, part, error, traceback) and the rest is still written, so a finished
run never loses its report to one failing figure. The index page lists what failed and why.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from vit_embedding_lens.report.figures import FIGURES_DIR, interactive_html, save_figures
from vit_embedding_lens.report.html import write_index
from vit_embedding_lens.report.tables import TABLES_DIR, table_file, write_tables

INDEX_FILE = "index.html"


def failure_record(analysis: str, part: str, err: BaseException) -> Dict[str, str]:
    """One entry of a report's ``failures`` list: what failed (``analysis``, ``part``: ``tables``,
    ``figures``, ``headline``, ``table:<name>`` or ``figure:<name>``), the ``error`` as
    ``Type: message``, and the ``traceback`` text (for bug reports)."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {
        "analysis": analysis,
        "part": part,
        "error": f"{type(err).__name__}: {err}",
        "traceback": text[-6000:],
    }


def report_files(
    tables: Mapping[str, Mapping[str, Any]], figures: Mapping[str, Mapping[str, Any]]
) -> List[str]:
    """The files :func:`write_report` writes for these tables and figures, relative to the report
    folder (POSIX paths)."""
    files = [
        f"{TABLES_DIR}/{table_file(analysis, name)}"
        for analysis, named in tables.items()
        for name in named
    ]
    files += [
        f"{FIGURES_DIR}/{analysis}__{name}.png"
        for analysis, named in figures.items()
        for name in named
    ]
    return files + [INDEX_FILE]


def write_report(
    report_dir: Path,
    tables: Mapping[str, Mapping[str, Any]],
    figures: Mapping[str, Mapping[str, Any]],
    meta: Optional[Mapping[str, Any]] = None,
    manifest: Optional[Mapping[str, Any]] = None,
    analyses: Sequence[Any] = (),
    failures: Optional[List[Dict[str, str]]] = None,
) -> Path:
    """Write ``tables/*.csv``, ``figures/*.png`` and ``index.html`` into ``report_dir``; returns the
    page. ``analyses`` (the run's) give each section its description, captions and notes. An
    interactive figure (a view with ``offline_html()``) is saved as PNG and embedded in the page
    with its JavaScript inlined (offline), the PNG as its no-script fallback.

    Without ``failures`` the first error is raised. With a list, a table or figure that cannot be
    written is appended to it (see :func:`failure_record`) and left out; the page shows every entry
    of ``failures`` (also those recorded before, e.g. by ``summarize_run``).
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    table_paths, written_tables = _write_each(tables, write_tables, "table", report_dir, failures)
    figure_paths, written_figures = _write_each(
        figures, save_figures, "figure", report_dir, failures
    )
    interactive: Dict[str, Dict[str, str]] = {}
    for analysis, named in written_figures.items():  # each view's HTML on its own, as above
        for name, fig in named.items():
            try:
                interactive.update(interactive_html({analysis: {name: fig}}))
            except Exception as err:
                if failures is None:
                    raise
                failures.append(failure_record(analysis, f"interactive:{name}", err))
    return write_index(
        report_dir,
        dict(meta or {}),
        written_tables,
        table_paths,
        figure_paths,
        manifest,
        analyses,
        failures=failures or [],
        interactive=interactive,
    )


def _write_each(
    items: Mapping[str, Mapping[str, Any]],
    write: Callable[[Dict[str, Dict[str, Any]], Path], Mapping[str, Mapping[str, Path]]],
    kind: str,
    report_dir: Path,
    failures: Optional[List[Dict[str, str]]],
) -> Tuple[Dict[str, Dict[str, Path]], Dict[str, Dict[str, Any]]]:
    """Write each table or figure on its own (``write``: :func:`write_tables` or
    :func:`save_figures`): the paths written and the items that were, per analysis. One that fails
    is recorded in ``failures`` as ``kind:<name>`` and left out (raised without a list)."""
    paths: Dict[str, Dict[str, Path]] = {}
    written: Dict[str, Dict[str, Any]] = {}
    for analysis, named in items.items():
        for name, item in named.items():
            try:
                path = write({analysis: {name: item}}, report_dir)
            except Exception as err:
                if failures is None:
                    raise
                failures.append(failure_record(analysis, f"{kind}:{name}", err))
                continue
            paths.setdefault(analysis, {}).update(path[analysis])
            written.setdefault(analysis, {})[name] = item
    return paths, written
