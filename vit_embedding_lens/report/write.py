"""write_report: a run's tables, figures and index page into one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from vit_embedding_lens.report.figures import save_figures
from vit_embedding_lens.report.html import write_index
from vit_embedding_lens.report.tables import write_tables


def write_report(
    report_dir: Path,
    tables: Mapping[str, Mapping[str, Any]],
    figures: Mapping[str, Mapping[str, Any]],
    meta: Optional[Mapping[str, Any]] = None,
    manifest: Optional[Mapping[str, Any]] = None,
    analyses: Sequence[Any] = (),
) -> Path:
    """Write ``tables/*.csv``, ``figures/*.png`` and ``index.html`` into ``report_dir``; returns the
    page. ``analyses`` (the run's) give each section its description, captions and notes."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    table_paths = write_tables(tables, report_dir)
    figure_paths = save_figures(figures, report_dir)
    return write_index(
        report_dir, dict(meta or {}), tables, table_paths, figure_paths, manifest, analyses
    )
