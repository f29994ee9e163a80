"""One self-contained ``index.html`` that shows a run's figures and tables, with links to the
files."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

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
p.about { max-width: 60em; line-height: 1.4; }
figcaption { max-width: 60em; line-height: 1.35; }
figcaption b { color: #222; }
.finding, .failed { padding: .5em 1em; max-width: 60em; }
.finding { background: #fff8e1; border-left: 4px solid #f0b400; }
.failed { background: #fdecea; border-left: 4px solid #d93025; }
code { background: #f4f4f4; padding: 0 .2em; }
"""
#: manifest keys listed under "Run details" (the runner's own; other writers add theirs here)
SKIPPED_KEYS = ("skipped",)
CONVERTED_KEYS = ("conversions", "converted")
FAILED_KEYS = ("failures", "failed", "report_failures")


NAN_AUC_NOTE = (
    "NaN in an AUC column: that curve's accuracy is 0 at every number of kept tokens (e.g. a model "
    "at 0 % accuracy on these images), so there is no maximum to normalize the area by; it is not "
    "a failure of the run."
)


def _has_nan_auc(df: pd.DataFrame) -> bool:
    cols = [c for c in df.columns if str(c).lower() == "auc" or str(c).lower().startswith("auc ")]
    return any(df[c].map(lambda v: isinstance(v, float) and math.isnan(v)).any() for c in cols)


def _rel(path: Path, base: Path) -> str:
    return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()


def _table_html(df: pd.DataFrame, csv: str) -> str:
    shown = df.head(MAX_ROWS).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    more = f"first {MAX_ROWS} of {len(df)} rows; " if len(df) > MAX_ROWS else ""
    return f'{shown}<p class="note">{more}<a href="{html.escape(csv)}">{html.escape(csv)}</a></p>'


def _n_images(meta: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> int | None:
    for value in (meta.get("images"), (manifest or {}).get("config", {}).get("n_images")):
        if isinstance(value, int):
            return value
    return None


def analysis_texts(
    analysis: Any, tables: Mapping[str, pd.DataFrame], n_images: int | None
) -> Tuple[str, Dict[str, str], List[str], List[str]]:
    """``(description, captions, notes, problems)`` of one analysis for the page. An analysis
    without them (a plug-in, an object following the protocol) gets empty texts; one whose
    captions or notes raise gets the error in ``problems``, and the page is written all the same."""
    description = str(getattr(analysis, "description", "") or "")
    captions: Dict[str, str] = {}
    notes: List[str] = []
    problems: List[str] = []
    n = n_images if n_images is not None else "?"
    try:
        if hasattr(analysis, "figure_captions"):
            captions = {
                str(k): str(v) for k, v in analysis.figure_captions(dict(tables), n).items()
            }
    except Exception as err:  # a caption must never cost the report
        problems.append(f"captions: {type(err).__name__}: {err}")
    try:
        if hasattr(analysis, "notes"):
            notes = [str(x) for x in analysis.notes(dict(tables))]
    except Exception as err:
        problems.append(f"notes: {type(err).__name__}: {err}")
    return description, captions, notes, problems


def _first(manifest: Mapping[str, Any], keys: Sequence[str]) -> Tuple[str, Any]:
    for key in keys:
        if manifest.get(key):
            return key, manifest[key]
    return "", None


def _records_html(records: Any, limit: int = MAX_ROWS) -> str:
    """A list of dicts (or of strings) as a small table."""
    rows = list(records)
    if rows and all(isinstance(r, Mapping) for r in rows):
        shown = pd.DataFrame(rows[:limit]).to_html(index=False, border=0, na_rep="")
    else:
        shown = "<ul>" + "".join(f"<li>{html.escape(str(r))}</li>" for r in rows[:limit]) + "</ul>"
    more = f'<p class="note">first {limit} of {len(rows)}</p>' if len(rows) > limit else ""
    return shown + more


def _failure_text(item: Any) -> str:
    if isinstance(item, Mapping):
        what = " ".join(str(item[k]) for k in ("analysis", "kind", "name", "what") if k in item)
        why = item.get("error") or item.get("reason") or item.get("message") or ""
        return f"{what}: {why}" if what else str(why or dict(item))
    return str(item)


def run_details_html(
    manifest: Mapping[str, Any] | None, failures: Sequence[Any] = (), n_skipped: int | None = None
) -> str:
    """The "Run details" section: versions, git commit, command line, attempts, skipped and
    converted images, and what failed (from the manifest and ``failures``)."""
    manifest = manifest or {}
    env = manifest.get("environment") or {}
    rows: List[Tuple[str, str]] = []
    if env.get("command_line"):
        rows.append(("command line", f"<code>{html.escape(str(env['command_line']))}</code>"))
    for name, version in (env.get("versions") or {}).items():
        rows.append((name, html.escape(str(version) if version else "not installed")))
    for key, label in (("python", "Python"), ("platform", "platform")):
        if env.get(key):
            rows.append((label, html.escape(str(env[key]))))
    if env:
        commit = env.get("git_commit")
        rows.append(("git commit", html.escape(commit) if commit else "not a git checkout"))
    for key in ("created", "updated", "status"):
        if manifest.get(key):
            rows.append((key, html.escape(str(manifest[key]))))
    if manifest.get("attempts"):
        rows.append(("attempts (resumes + 1)", str(len(manifest["attempts"]))))
    parts = ['<h2 id="run-details">Run details</h2><table class="meta">']
    parts += [f"<tr><td><b>{html.escape(k)}</b></td><td>{v}</td></tr>" for k, v in rows]
    parts.append("</table>")
    key, failed = _first(manifest, FAILED_KEYS)
    failed_items = list(failed or []) + list(failures)
    if failed_items:
        parts.append(
            '<h3>What failed</h3><div class="failed"><p>The rest of the report was written; these '
            "parts could not be:</p><ul>"
        )
        parts += [f"<li>{html.escape(_failure_text(x))}</li>" for x in failed_items]
        parts.append("</ul></div>")
    key, skipped = _first(manifest, SKIPPED_KEYS)
    count = manifest.get("n_skipped", n_skipped)
    if skipped:
        total = f" ({count} in all)" if isinstance(count, int) and count > len(skipped) else ""
        parts.append(f"<h3>Skipped images{total}</h3>")
        parts.append(
            '<p class="note">Images the run could not use, with the reason; they are in no '
            "table or figure.</p>"
        )
        parts.append(_records_html(skipped))
    else:
        parts.append('<p class="note">No image was skipped.</p>')
    key, converted = _first(manifest, CONVERTED_KEYS)
    if converted:
        parts.append("<h3>Converted images</h3>")
        if isinstance(converted, Mapping) and "images" in converted:  # the runner's own record
            counts = converted.get("counts") or {}
            summary = ", ".join(f"{html.escape(str(k))}: {v}" for k, v in counts.items())
            if summary:
                parts.append(f'<p class="note">{summary}</p>')
            converted = converted["images"]
        elif isinstance(converted, Mapping):
            converted = [{"conversion": k, "images": v} for k, v in converted.items()]
        parts.append(_records_html(converted))
    return "\n".join(parts)


def write_index(
    report_dir: Path,
    meta: Mapping[str, Any],
    tables: Mapping[str, Mapping[str, pd.DataFrame]],
    table_paths: Mapping[str, Mapping[str, Path]],
    figure_paths: Mapping[str, Mapping[str, Path]],
    manifest: Mapping[str, Any] | None = None,
    analyses: Sequence[Any] = (),
    failures: Sequence[Mapping[str, Any]] = (),
    interactive: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Write ``report_dir/index.html``: run facts, what failed (``failures``: analysis, part,
    error), then per analysis what it shows (its
    :attr:`~vit_embedding_lens.runner.Analysis.description`), flagged findings, figures with
    captions and tables, then the run details (versions, commit, command line, skipped images,
    what failed) and the configuration. A figure with an entry in ``interactive`` (analysis ->
    figure name -> offline HTML) is shown interactive, its PNG linked and kept for browsers
    without JavaScript."""
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
    parts.append(
        '<p class="note"><a href="#run-details">run details</a>: versions, command line, '
        "skipped images</p>"
    )
    by_name = {getattr(a, "name", None): a for a in analyses}
    n_images = _n_images(meta, manifest)
    problems_all: List[str] = []
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
        parts.append(f'<h2 id="{html.escape(analysis)}">{html.escape(analysis)}</h2>')
        description, captions, notes, problems = analysis_texts(
            by_name.get(analysis), tables.get(analysis, {}), n_images
        )
        problems_all += [f"{analysis} {p}" for p in problems]
        if description:
            parts.append(f'<p class="about">{html.escape(description)}</p>')
        for note in notes:
            parts.append(f'<p class="finding">{html.escape(note)}</p>')
        for name, path in figure_paths.get(analysis, {}).items():
            src, label = html.escape(_rel(path, report_dir)), html.escape(name)
            text = f"<b>{label}.</b> {html.escape(captions[name])}" if name in captions else label
            view = (interactive or {}).get(analysis, {}).get(name)
            if view is not None:
                link = f' (<a href="{src}">static PNG</a>)'
                caption = f'<figcaption class="note">{text}{link}</figcaption>'
                fallback = f'<noscript><img src="{src}" alt="{label}"></noscript>'
                parts.append(f'<figure><div class="view">{view}</div>{fallback}{caption}</figure>')
                continue
            caption = f'<figcaption class="note">{text}</figcaption>'
            parts.append(f'<figure><img src="{src}" alt="{label}">{caption}</figure>')
        for name, df in tables.get(analysis, {}).items():
            parts.append(f"<h3>{html.escape(name)}</h3>")
            if _has_nan_auc(df):
                parts.append(f'<p class="finding">{NAN_AUC_NOTE}</p>')
            parts.append(_table_html(df, _rel(table_paths[analysis][name], report_dir)))
    skipped_count = meta.get("skipped")
    parts.append(
        run_details_html(
            manifest,
            problems_all,  # ``failures`` are shown once, at the top
            skipped_count if isinstance(skipped_count, int) else None,
        )
    )
    if manifest:
        config = html.escape(json.dumps(manifest.get("config", {}), indent=1))
        summary = "<summary>run configuration (manifest.json)</summary>"
        parts.append(f"<h2>Configuration</h2><details>{summary}<pre>{config}</pre></details>")
    parts.append("</body></html>")
    path = report_dir / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
