"""One self-contained ``index.html`` that shows a run's figures and tables, with links to the
files."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

MAX_ROWS = 30
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table.dataframe { border-collapse: collapse; font-size: .85em; margin: .5em 0 1.5em; }
table.dataframe td, table.dataframe th {
  border: 1px solid #ddd; padding: .2em .6em; text-align: right;
}
table.dataframe th { background: #f4f4f4; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
.meta td { padding: .1em 1em .1em 0; vertical-align: top; } .note { color: #666; font-size: .85em; }
.failures { border: 2px solid #c33; background: #fff4f4; padding: 0 1em; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; font-size: .8em; }
"""


def _rel(path: Path, base: Path) -> str:
    return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()


def _table_html(df: pd.DataFrame, csv: str) -> str:
    shown = df.head(MAX_ROWS).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    more = f"first {MAX_ROWS} of {len(df)} rows; " if len(df) > MAX_ROWS else ""
    return f'{shown}<p class="note">{more}<a href="{html.escape(csv)}">{html.escape(csv)}</a></p>'


def write_index(
    report_dir: Path,
    meta: Mapping[str, Any],
    tables: Mapping[str, Mapping[str, pd.DataFrame]],
    table_paths: Mapping[str, Mapping[str, Path]],
    figure_paths: Mapping[str, Mapping[str, Path]],
    manifest: Mapping[str, Any] | None = None,
    failures: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write ``report_dir/index.html``: run facts, what failed (``failures``: analysis, part,
    error), then per analysis its figures and tables."""
    report_dir = Path(report_dir)
    title = html.escape(str(meta.get("title", "vit-lens report")))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1><table class='meta'>",
    ]
    for key, value in meta.items():
        if key != "title":
            parts.append(
                f"<tr><td><b>{html.escape(str(key))}</b></td><td>{html.escape(str(value))}</td></tr>"
            )
    parts.append("</table>")
    if failures:
        items = "".join(
            f"<li><b>{html.escape(str(f.get('analysis')))}</b> ({html.escape(str(f.get('part')))})"
            f": {html.escape(str(f.get('error')))}</li>"
            for f in failures
        )
        parts.append(
            "<div class='failures'><h2>Parts of this report could not be made</h2>"
            f"<ul>{items}</ul><p class='note'>The rest of the report is complete; the tracebacks "
            "are in manifest.json under report.failures.</p></div>"
        )
    for analysis in list(dict.fromkeys(list(figure_paths) + list(tables))):
        parts.append(f"<h2>{html.escape(analysis)}</h2>")
        for name, path in figure_paths.get(analysis, {}).items():
            src, label = html.escape(_rel(path, report_dir)), html.escape(name)
            caption = f'<figcaption class="note">{label}</figcaption>'
            parts.append(f'<figure><img src="{src}" alt="{label}">{caption}</figure>')
        for name, df in tables.get(analysis, {}).items():
            parts.append(f"<h3>{html.escape(name)}</h3>")
            parts.append(_table_html(df, _rel(table_paths[analysis][name], report_dir)))
    if manifest:
        config = html.escape(json.dumps(manifest.get("config", {}), indent=1))
        summary = "<summary>run configuration (manifest.json)</summary>"
        parts.append(f"<h2>Configuration</h2><details>{summary}<pre>{config}</pre></details>")
    parts.append("</body></html>")
    path = report_dir / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
