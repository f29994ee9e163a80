"""write_report: a run's tables, figures and index page into one folder.

Each table and figure is written on its own: with a ``failures`` list, one that cannot be written
is recorded there (analysis, part, error, traceback) and the rest is still written, so a finished
run never loses its report to one failing figure. The index page lists what failed and why.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from vit_embedding_lens.report.figures import FIGURES_DIR, save_figures
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
    page. ``analyses`` (the run's) give each section its description, captions and notes.

    Without ``failures`` the first error is raised. With a list, a table or figure that cannot be
    written is appended to it (see :func:`failure_record`) and left out; the page shows every entry
    of ``failures`` (also those recorded before, e.g. by ``summarize_run``).
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    table_paths: Dict[str, Dict[str, Path]] = {}
    figure_paths: Dict[str, Dict[str, Path]] = {}
    written_tables: Dict[str, Dict[str, Any]] = {}
    for analysis, named in tables.items():
        for name, df in named.items():
            try:
                paths = write_tables({analysis: {name: df}}, report_dir)
            except Exception as err:
                if failures is None:
                    raise
                failures.append(failure_record(analysis, f"table:{name}", err))
                continue
            table_paths.setdefault(analysis, {}).update(paths[analysis])
            written_tables.setdefault(analysis, {})[name] = df
    for analysis, named in figures.items():
        for name, fig in named.items():
            try:
                paths = save_figures({analysis: {name: fig}}, report_dir)
            except Exception as err:
                if failures is None:
                    raise
                failures.append(failure_record(analysis, f"figure:{name}", err))
                continue
            figure_paths.setdefault(analysis, {}).update(paths[analysis])
    return write_index(
        report_dir,
        dict(meta or {}),
        written_tables,
        table_paths,
        figure_paths,
        manifest,
        analyses,
        failures=failures or [],
    )
