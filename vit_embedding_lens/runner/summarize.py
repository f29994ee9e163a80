"""From a finished run's arrays to each analysis's tables and figures, and the run's report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from vit_embedding_lens.report.tables import headline_tables
from vit_embedding_lens.report.write import failure_record, report_files, write_report
from vit_embedding_lens.runner.analysis import Analysis
from vit_embedding_lens.runner.lock import ForeignFileError, acquire_lock, release_lock
from vit_embedding_lens.runner.manifest import read_manifest, write_manifest
from vit_embedding_lens.runner.results import RunResults

if TYPE_CHECKING:
    import pandas as pd

    from vit_embedding_lens.model.hooked_vit import HookedViT

REPORT_DIR = "report"


def summarize_run(
    results: RunResults,
    analyses: Sequence[Analysis],
    model: HookedViT,
    figures: bool = True,
    failures: Optional[List[Dict[str, str]]] = None,
) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """``(tables, figures)``, each ``{analysis name: {name: DataFrame | Figure}}``.

    An analysis without results (every image skipped) gets no tables. Without ``failures`` the
    first error is raised; with a list, an analysis whose ``summarize`` (or ``figures``) raises
    loses its tables (or figures) only, and the error is appended to ``failures`` (see
    :func:`~vit_embedding_lens.report.write.failure_record`).
    """
    tables: Dict[str, Dict[str, Any]] = {}
    figs: Dict[str, Dict[str, Any]] = {}
    for analysis in analyses:
        if analysis.name not in results.arrays:
            continue
        try:
            tables[analysis.name] = dict(analysis.summarize(results[analysis.name], model))
        except Exception as err:
            if failures is None:
                raise
            failures.append(failure_record(analysis.name, "tables", err))
            continue
        if figures:
            try:
                figs[analysis.name] = dict(analysis.figures(tables[analysis.name], model))
            except Exception as err:
                if failures is None:
                    raise
                failures.append(failure_record(analysis.name, "figures", err))
    return tables, figs


@dataclass
class RunReport:
    """What :func:`write_run_report` made: the page, the tables, the headline tables, and the
    parts that failed (each a :func:`~vit_embedding_lens.report.write.failure_record`)."""

    page: Path
    tables: Dict[str, Dict[str, Any]]
    headlines: Dict[str, pd.DataFrame]
    failures: List[Dict[str, str]] = field(default_factory=list)


def write_run_report(
    out_dir: Union[str, Path],
    results: RunResults,
    analyses: Sequence[Analysis],
    model: HookedViT,
    meta: Optional[Mapping[str, Any]] = None,
) -> RunReport:
    """Tables, figures and ``index.html`` of a finished run into ``out_dir/report``.

    Every table and figure is made and written on its own: one that fails is left out, named on
    the page and in the manifest (``report.failures``), and the rest is written. The files written
    are listed in the manifest (``report.files``, relative to ``out_dir``); a file in the way that
    the runner did not write raises :class:`ForeignFileError` before anything is written, and
    report files of an earlier report that this one does not make are removed.
    """
    out_dir = Path(out_dir)
    failures: List[Dict[str, str]] = []
    tables, figures = summarize_run(results, analyses, model, failures=failures)
    headlines = {}
    for name, named in tables.items():
        try:
            headlines.update(headline_tables({name: named}, analyses))
        except Exception as err:
            failures.append(failure_record(name, "headline", err))
    token = acquire_lock(out_dir)
    try:
        manifest, page = _write_owned_report(out_dir, tables, figures, meta, failures, analyses)
    finally:
        release_lock(out_dir, token)
    results.manifest = manifest
    return RunReport(page=page, tables=tables, headlines=headlines, failures=failures)


def _write_owned_report(
    out_dir: Path,
    tables: Dict[str, Dict[str, Any]],
    figures: Dict[str, Dict[str, Any]],
    meta: Optional[Mapping[str, Any]],
    failures: List[Dict[str, str]],
    analyses: Sequence[Analysis] = (),
) -> Tuple[Dict[str, Any], Path]:
    """Write the report under the folder's lock, only over files the runner wrote."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise FileNotFoundError(f"{out_dir} holds no run (no manifest.json) to report on")
    before = set(manifest.get("report", {}).get("files", []))
    planned = [f"{REPORT_DIR}/{p}" for p in report_files(tables, figures)]
    foreign = [p for p in planned if (out_dir / p).exists() and p not in before]
    if foreign:
        raise ForeignFileError(
            f"{out_dir} holds files the report would overwrite but vit-lens did not write: "
            f"{foreign[:10]}; move them, or write the run to another --out"
        )
    for stale in sorted(before - set(planned)):  # ours, from an earlier report
        (out_dir / stale).unlink(missing_ok=True)
    # listed before writing, so a report killed halfway is still known to be ours
    manifest["report"] = {"status": "writing", "files": sorted(planned), "failures": []}
    write_manifest(out_dir, manifest)
    page = write_report(
        out_dir / REPORT_DIR, tables, figures, meta, manifest, analyses, failures=failures
    )
    manifest["report"] = {
        "status": "written" if not failures else "written with failures",
        "files": sorted(planned),
        "failures": failures,
    }
    write_manifest(out_dir, manifest)
    return manifest, page
