"""Attention vs MLP: how often each sublayer raises the correct class, per block (METHODS §3).

One panel per token group (CLS, image tokens), grouped bars per block for the attention and MLP
sublayers, a 50 % reference line. A rate is the share of tokens whose correct-class projection rises
(``Δ > 0``); with one observation per image the bar is the mean and the whisker its standard error.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from vit_embedding_lens.viz._figures import legend_outside, new_figure
from vit_embedding_lens.viz._tables import as_fractions, long_frame, ordered_groups
from vit_embedding_lens.viz.palette import REFERENCE_COLOR, sublayer_color


def change_rates_table(
    data: Any,
    *,
    block_col: str = "block",
    sublayer_col: str = "sublayer",
    group_col: str = "group",
    value_col: str = "rate",
    block_axis: int = 0,
    percent: bool = False,
) -> pd.DataFrame:
    """The numbers behind :func:`plot_change_rates`: ``block, sublayer, group, n, rate, sem``.

    ``data``: a tidy DataFrame (one row per block x sublayer x group, or per image as well), or a
    mapping ``{sublayer: {group: array}}`` (or ``{sublayer: array}`` for one group) whose axis
    ``block_axis`` is the block. Rates are fractions in ``[0, 1]``, or percentages with
    ``percent=True`` (e.g. the lens's ``change_rate_table``); the table holds fractions.
    """
    if isinstance(data, pd.DataFrame):
        if sublayer_col not in data:
            raise ValueError(
                f"change rates: no column {sublayer_col!r} (columns: {list(data.columns)}); "
                f"pass sublayer_col="
            )
        parts = []
        for sub, rows in data.groupby(sublayer_col, sort=False):
            frame = long_frame(
                rows,
                block_col=block_col,
                group_col=group_col,
                value_col=value_col,
                what="change rates",
            )
            parts.append(frame.assign(sublayer=str(sub)))
        frame = pd.concat(parts, ignore_index=True)
    elif isinstance(data, Mapping):
        parts = []
        for sub, values in data.items():
            values = values if isinstance(values, Mapping) else {"all": values}
            parts.append(
                long_frame(
                    dict(values), what=f"change rates[{sub!r}]", block_axis=block_axis
                ).assign(sublayer=str(sub))
            )
        frame = pd.concat(parts, ignore_index=True)
    else:
        raise TypeError(
            "change rates: give a DataFrame (block, sublayer, group, rate) or "
            "{sublayer: {group: array [n_blocks, ...]}}"
        )
    frame = as_fractions(frame, percent, "change rates")
    grouped = frame.groupby(["block", "sublayer", "group"], sort=False)["value"]
    table = grouped.agg(
        n="size", rate="mean", sem=lambda v: v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    )
    return table.reset_index().sort_values("block", kind="stable").reset_index(drop=True)


def plot_change_rates(
    data: Any,
    *,
    block_col: str = "block",
    sublayer_col: str = "sublayer",
    group_col: str = "group",
    value_col: str = "rate",
    block_axis: int = 0,
    percent: bool = False,
    groups: Optional[Sequence[str]] = None,
    reference: Optional[float] = 0.5,
    title: Optional[str] = None,
):
    """Attention vs MLP change rate per block, one panel per token group; returns the Figure.

    ``data``: see :func:`change_rates_table`. Rates are plotted in percent.
    """
    table = change_rates_table(
        data,
        block_col=block_col,
        sublayer_col=sublayer_col,
        group_col=group_col,
        value_col=value_col,
        block_axis=block_axis,
        percent=percent,
    )
    order = ordered_groups(table, groups)
    sublayers = list(dict.fromkeys(table["sublayer"]))
    blocks = sorted(table["block"].unique())
    fig = new_figure(
        figsize=(max(4.0, 0.6 * len(blocks) + 1.5) * len(order) + 0.8, 3.6), layout="constrained"
    )
    axes = fig.subplots(1, len(order), squeeze=False, sharey=True)[0]
    width = 0.8 / len(sublayers)
    for ax, group in zip(axes, order):
        for si, sub in enumerate(sublayers):
            rows = table[(table["group"] == group) & (table["sublayer"] == sub)].set_index("block")
            present = [b for b in blocks if b in rows.index]
            x = np.asarray(present, dtype=float) + (si - (len(sublayers) - 1) / 2) * width
            ax.bar(
                x,
                100 * rows.loc[present, "rate"],
                width * 0.95,
                yerr=100 * rows.loc[present, "sem"],
                color=sublayer_color(sub, si),
                alpha=0.85,
                label=sub,
                capsize=2,
            )
        if reference is not None:
            ax.axhline(100 * reference, color=REFERENCE_COLOR, lw=0.8, ls=":")
        ax.set_xticks(blocks)
        ax.set_xlabel("block")
        ax.set_title(f"{group} tokens" if group not in ("all",) else "all tokens", fontsize=10)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("tokens with rising correct-class logit (%)")
    legend_outside(axes[-1])
    if title:
        fig.suptitle(title)
    return fig
