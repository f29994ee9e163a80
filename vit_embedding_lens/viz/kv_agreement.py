"""Key-value agreement per block against a random-class baseline (METHODS §4).

A line per memory type (MLP, attention) with the mean agreement rate over classes, a band for the
spread over classes when per-class values are given, and the random-class baseline dashed in the
same colour.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from vit_embedding_lens.viz._figures import figure_and_axes, legend_outside
from vit_embedding_lens.viz._tables import as_fractions, long_frame, ordered_groups
from vit_embedding_lens.viz.palette import sublayer_color


def kv_agreement_table(
    agreement: Any,
    baseline: Any = None,
    *,
    block_col: str = "block",
    group_col: str = "sublayer",
    value_col: str = "agreement",
    block_axis: int = 0,
    percent: bool = False,
    band: Tuple[float, float] = (25.0, 75.0),
) -> pd.DataFrame:
    """The numbers behind :func:`plot_kv_agreement`: ``block, sublayer, n, mean, low, high`` and
    ``baseline_mean`` when a baseline is given.

    ``agreement`` is a tidy DataFrame (one row per block, or per block and class), a mapping
    ``{sublayer: array [block] or [block, class]}``, or one such array. ``baseline``: the
    same forms, or, when ``agreement`` is a DataFrame, the name of its baseline column. In arrays,
    axis ``block_axis`` is the block. Rates are fractions, or percentages with ``percent=True``.
    Example with the lens's memory usage (``block, sublayer, metric, value`` rows)::

        f = usage.to_frame().query("token_group == 'image'")
        plot_kv_agreement(f[f.metric == "kv_agreement"], f[f.metric == "kv_agreement_random"],
                          value_col="value")
    """
    if isinstance(baseline, str):
        if not isinstance(agreement, pd.DataFrame) or baseline not in agreement:
            raise ValueError(
                f"baseline={baseline!r} names a column, but agreement has no such column"
            )
        baseline = agreement.drop(columns=[value_col]).rename(columns={baseline: value_col})
    columns: Dict[str, Any] = dict(
        block_col=block_col,
        group_col=group_col,
        value_col=value_col,
        default_group="mlp",
        block_axis=block_axis,
    )
    table = _summary(
        as_fractions(long_frame(agreement, what="agreement", **columns), percent, "agreement"), band
    )
    if baseline is not None:
        base = _summary(
            as_fractions(long_frame(baseline, what="baseline", **columns), percent, "baseline"),
            band,
        )
        base = base.rename(columns={"mean": "baseline_mean"})[
            ["block", "sublayer", "baseline_mean"]
        ]
        table = table.merge(base, on=["block", "sublayer"], how="left")
    return table


def _summary(frame: pd.DataFrame, band: Tuple[float, float]) -> pd.DataFrame:
    lo, hi = band
    table = frame.groupby(["block", "group"], sort=False)["value"].agg(
        n="size",
        mean="mean",
        low=lambda v: np.percentile(v, lo),
        high=lambda v: np.percentile(v, hi),
    )
    table = table.reset_index().rename(columns={"group": "sublayer"})
    return table.sort_values("block", kind="stable").reset_index(drop=True)


def plot_kv_agreement(
    agreement: Any,
    baseline: Any = None,
    *,
    block_col: str = "block",
    group_col: str = "sublayer",
    value_col: str = "agreement",
    block_axis: int = 0,
    percent: bool = False,
    sublayers: Optional[Sequence[str]] = None,
    band: Tuple[float, float] = (25.0, 75.0),
    title: Optional[str] = None,
    ax: Any = None,
):
    """Agreement rate (%) per block for each memory type, with the random-class baseline; the
    Figure.

    Inputs: see :func:`kv_agreement_table`. The band spans the ``band`` percentiles over classes.
    """
    table = kv_agreement_table(
        agreement,
        baseline,
        block_col=block_col,
        group_col=group_col,
        value_col=value_col,
        block_axis=block_axis,
        percent=percent,
        band=band,
    )
    order = ordered_groups(table.rename(columns={"sublayer": "group"}), sublayers)
    blocks = sorted(table["block"].unique())
    fig, ax = figure_and_axes(ax, figsize=(max(4.5, 0.6 * len(blocks) + 2) + 1.8, 3.6))  # + legend
    for i, sub in enumerate(order):
        rows = table[table["sublayer"] == sub]
        color = sublayer_color(sub, i)
        ax.plot(rows["block"], 100 * rows["mean"], "o-", color=color, label=f"{sub}")
        if (rows["n"] > 1).any():
            ax.fill_between(
                rows["block"], 100 * rows["low"], 100 * rows["high"], color=color, alpha=0.15, lw=0
            )
        if "baseline_mean" in rows and rows["baseline_mean"].notna().any():
            ax.plot(
                rows["block"],
                100 * rows["baseline_mean"],
                "--",
                color=color,
                alpha=0.8,
                label=f"{sub} (random classes)",
            )
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel("key-value agreement (%)")
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title)
    legend_outside(ax)
    return fig
