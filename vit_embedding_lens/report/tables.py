"""Tables of a run: CSV files, and the compact headline tables the command line prints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Sequence

import pandas as pd

if TYPE_CHECKING:
    from vit_embedding_lens.runner.analysis import Analysis

TABLES_DIR = "tables"


def table_file(analysis: str, name: str) -> str:
    return f"{analysis}__{name}.csv"


def write_tables(
    tables: Mapping[str, Mapping[str, pd.DataFrame]], report_dir: Path
) -> Dict[str, Dict[str, Path]]:
    """``report_dir/tables/<analysis>__<table>.csv`` for every table; returns the paths."""
    folder = Path(report_dir) / TABLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths: Dict[str, Dict[str, Path]] = {}
    for analysis, named in tables.items():
        for name, df in named.items():
            if not isinstance(df, pd.DataFrame):
                raise TypeError(
                    f"{analysis}.summarize returned {type(df).__name__} for table {name!r}; tables "
                    "are DataFrames"
                )
            path = folder / table_file(analysis, name)
            df.to_csv(path, index=False)
            paths.setdefault(analysis, {})[name] = path
    return paths


def headline_tables(
    tables: Mapping[str, Mapping[str, pd.DataFrame]], analyses: Sequence[Analysis] = ()
) -> Dict[str, pd.DataFrame]:
    """One small table per analysis: its :meth:`~Analysis.headline` if it gives one, else its
    ``summary`` table, else its first table (first rows)."""
    by_name = {a.name: a for a in analyses}
    out = {}
    for analysis, named in tables.items():
        if not named:
            continue
        headline = by_name[analysis].headline(dict(named)) if analysis in by_name else None
        if headline is not None:
            out[analysis] = headline
        elif "summary" in named:
            out[analysis] = named["summary"]
        else:
            out[analysis] = next(iter(named.values())).head(12)
    return out


def format_headlines(headlines: Mapping[str, pd.DataFrame]) -> str:
    """The headline tables as text for the terminal."""
    parts = []
    for analysis, df in headlines.items():
        text = df.to_string(index=False, float_format=lambda v: f"{v:.4g}")
        parts.append(f"== {analysis} ==\n{text}")
    return "\n\n".join(parts)
