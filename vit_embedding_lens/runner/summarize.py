"""From a finished run's arrays to each analysis's tables and figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Sequence, Tuple

from vit_embedding_lens.runner.analysis import Analysis
from vit_embedding_lens.runner.results import RunResults

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


def summarize_run(
    results: RunResults, analyses: Sequence[Analysis], model: HookedViT, figures: bool = True
) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """``(tables, figures)``, each ``{analysis name: {name: DataFrame | Figure}}``.

    An analysis without results (every image skipped) gets no tables.
    """
    tables: Dict[str, Dict[str, Any]] = {}
    figs: Dict[str, Dict[str, Any]] = {}
    for analysis in analyses:
        if analysis.name not in results.arrays:
            continue
        tables[analysis.name] = dict(analysis.summarize(results[analysis.name], model))
        if figures:
            figs[analysis.name] = dict(analysis.figures(tables[analysis.name], model))
    return tables, figs
