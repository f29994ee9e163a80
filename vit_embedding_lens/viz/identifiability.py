"""Class identifiability across blocks: CLS vs image tokens, distributions and means (METHODS §2).

The figure of the paper's "evolution" analysis: per block, the distribution of identifiability
scores of each token group (violins or boxes), the group means joined by a line, an optional band
for the random-init twin model, and significance stars from per-block p-values (e.g. the one-sided
Wilcoxon test of pretrained > random).
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from vit_embedding_lens.viz._figures import figure_and_axes, legend_outside, stars_label, to_numpy
from vit_embedding_lens.viz._tables import long_frame, ordered_groups, pvalue_frame
from vit_embedding_lens.viz.palette import REFERENCE_COLOR, sublayer_color, token_group_color


def identifiability_evolution_table(
    data: Any,
    random: Any = None,
    pvalues: Any = None,
    *,
    block_col: str = "block",
    group_col: str = "group",
    value_col: str = "score",
    block_axis: int = 0,
    band: Tuple[float, float] = (5.0, 95.0),
) -> pd.DataFrame:
    """The numbers behind :func:`plot_identifiability_evolution`: one row per (block, group).

    ``data`` (and ``random``) is a tidy DataFrame (``block_col``, ``group_col``, ``value_col``; one
    row per observation), a mapping ``{group: array}``, or one array; in arrays, axis ``block_axis``
    is the block and the other axes are observations (per-image ``[batch, block]`` scores:
    ``block_axis=1``). Columns: ``block, group, n, mean, median, low, high`` (``low``/``high`` = the
    ``band`` percentiles), then ``random_mean, random_low, random_high`` and ``p_value, stars`` when
    given.
    """
    columns: Dict[str, Any] = dict(
        block_col=block_col, group_col=group_col, value_col=value_col, block_axis=block_axis
    )
    frame = long_frame(data, what="data", **columns)
    table = _summarize(frame, band)
    if random is not None:
        rand = _summarize(long_frame(random, what="random", **columns), band)
        rand = rand.rename(
            columns={"mean": "random_mean", "low": "random_low", "high": "random_high"}
        )
        table = table.merge(
            rand[["block", "group", "random_mean", "random_low", "random_high"]],
            on=["block", "group"],
            how="left",
        )
    if pvalues is not None and not _any_finite_pvalue(pvalues):
        # e.g. a model equal to its random twin: every test is undefined, so no star is drawn
        table["p_value"] = np.nan
        table["stars"] = ""
    elif pvalues is not None:
        groups = ordered_groups(frame)
        p = pvalue_frame(pvalues, groups, block_col=block_col, group_col=group_col)
        table = table.merge(p, on=["block", "group"], how="left")
        table["stars"] = [stars_label(v) for v in table["p_value"]]
    return table


def _any_finite_pvalue(pvalues: Any, p_col: str = "p_value") -> bool:
    """Whether ``pvalues`` (any form :func:`pvalue_frame` takes) holds at least one finite value."""
    if isinstance(pvalues, pd.DataFrame):
        if p_col not in pvalues:
            return True  # let pvalue_frame name the missing column
        values = pd.to_numeric(pvalues[p_col], errors="coerce").to_numpy(dtype=float)
    elif isinstance(pvalues, Mapping):
        parts = [to_numpy(v, "pvalues").astype(float).ravel() for v in pvalues.values()]
        values = np.concatenate(parts) if parts else np.zeros(0)
    else:
        values = to_numpy(pvalues, "pvalues").astype(float).ravel()
    return bool(np.isfinite(values).any())


def _summarize(frame: pd.DataFrame, band: Tuple[float, float]) -> pd.DataFrame:
    lo, hi = band
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"band must be two percentiles 0 <= low < high <= 100, got {band}")
    grouped = frame.groupby(["block", "group"], sort=False)["value"]
    table = grouped.agg(
        n="size",
        mean="mean",
        median="median",
        low=lambda v: np.percentile(v, lo),
        high=lambda v: np.percentile(v, hi),
    ).reset_index()
    return table.sort_values(["block"], kind="stable").reset_index(drop=True)


def plot_identifiability_evolution(
    data: Any,
    random: Any = None,
    pvalues: Any = None,
    *,
    block_col: str = "block",
    group_col: str = "group",
    value_col: str = "score",
    block_axis: int = 0,
    groups: Optional[Sequence[str]] = None,
    kind: Literal["violin", "box"] = "violin",
    band: Tuple[float, float] = (5.0, 95.0),
    chance: Optional[float] = 0.5,
    ylabel: str = "class identifiability score",
    title: Optional[str] = None,
    ax: Any = None,
):
    """Per block, the score distribution of each token group (e.g. ``"CLS"`` vs ``"image"``).

    ``data``/``random``: see :func:`identifiability_evolution_table`. ``random`` is drawn per group
    as a dashed mean line in the group's colour inside a band between the ``band`` percentiles.
    ``pvalues`` (``{group: [block]}``, one ``[block]`` array for all groups, or a DataFrame
    with ``block, group, p_value``) put ``*``/``**``/``***`` (p < .05/.01/.001) above the
    distributions. ``chance`` draws a reference line (0.5 is chance for ``s = 1 - r/C``; ``None``
    hides it). Returns the Figure.
    """
    if kind not in ("violin", "box"):
        raise ValueError(f"kind must be 'violin' or 'box', got {kind!r}")
    columns: Dict[str, Any] = dict(
        block_col=block_col, group_col=group_col, value_col=value_col, block_axis=block_axis
    )
    frame = long_frame(data, what="data", **columns)
    order = ordered_groups(frame, groups)
    table = identifiability_evolution_table(data, random, pvalues, band=band, **columns)
    blocks = sorted(frame["block"].unique())
    fig, ax = figure_and_axes(ax, figsize=(max(5.0, 0.9 * len(blocks) + 2) + 1.6, 4.0))  # + legend
    width = 0.8 / len(order)
    top = frame["value"].max()
    for gi, group in enumerate(order):
        color = token_group_color(group, gi)
        offset = (gi - (len(order) - 1) / 2) * width
        sub = frame[frame["group"] == group]
        present = [b for b in blocks if (sub["block"] == b).any()]
        samples = [sub.loc[sub["block"] == b, "value"].to_numpy() for b in present]
        positions = np.asarray(present, dtype=float) + offset
        _draw_distributions(ax, samples, positions, width * 0.9, color, kind)
        rows = table[table["group"] == group].set_index("block").loc[present]
        ax.plot(positions, rows["mean"], "o-", color=color, markersize=4, label=f"{group} (mean)")
        if "random_mean" in rows and rows["random_mean"].notna().any():
            ax.fill_between(
                positions, rows["random_low"], rows["random_high"], color=color, alpha=0.12, lw=0
            )
            ax.plot(
                positions,
                rows["random_mean"],
                "--",
                color=color,
                alpha=0.8,
                label=f"{group} (random init)",
            )
        if "stars" in rows:
            for x, stars in zip(positions, rows["stars"]):
                if stars:
                    ax.text(
                        x,
                        top + 0.03 * (abs(top) or 1),
                        stars,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color=color,
                    )
    if "stars" in table and (table["stars"] != "").any():
        low, high = ax.get_ylim()
        ax.set_ylim(low, max(high, top + 0.12 * (high - low)))  # room for the stars
    if pvalues is not None and "p_value" in table and table["p_value"].isna().all():
        ax.text(
            0.01,
            0.99,
            "no significance stars: every p-value is NaN (e.g. identical scores or too few images)",
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=7,
            color="0.35",
        )
    if chance is not None:
        ax.axhline(chance, color=REFERENCE_COLOR, lw=0.8, ls=":", label="chance")
    ax.set_xticks(blocks)
    ax.set_xlabel("block")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    legend_outside(ax, fontsize=7)
    return fig


def _draw_distributions(
    ax: Any, samples: list, positions: np.ndarray, width: float, color: str, kind: str
) -> None:
    if kind == "box":
        parts = ax.boxplot(
            samples,
            positions=positions,
            widths=width,
            patch_artist=True,
            showfliers=False,
            manage_ticks=False,
        )
        for box in parts["boxes"]:
            box.set(facecolor=color, alpha=0.35, edgecolor=color)
        for line in parts["medians"]:
            line.set_color(color)
        return
    # a violin needs spread: constant samples (e.g. one image per block) show only their mean marker
    keep = [i for i, s in enumerate(samples) if len(s) > 1 and np.ptp(s) > 0]
    if keep:
        parts = ax.violinplot(
            [samples[i] for i in keep], positions=positions[keep], widths=width, showextrema=False
        )
        for body in parts["bodies"]:
            body.set(facecolor=color, edgecolor=color, alpha=0.3)


def plot_lens_comparison(
    identifiability: pd.DataFrame,
    kl: Optional[pd.DataFrame] = None,
    *,
    groups: Sequence[str] = ("cls", "image"),
    title: Optional[str] = None,
):
    """Plain vs tuned class lens per block: % identifiable residual-stream tokens of each token
    group (left; solid plain, dashed tuned) and, with ``kl``, the KL divergence of the readout
    from the model's output (right).

    ``identifiability``: :func:`~vit_embedding_lens.lens.tuned_checks.identifiability_comparison`
    (columns block, layer_type, token_group, metric, value, lens); ``kl``:
    :func:`~vit_embedding_lens.lens.tuned_checks.kl_table` (block, lens, kl_mean)."""
    from vit_embedding_lens.viz._figures import panel_grid

    need = {"block", "layer_type", "token_group", "metric", "value", "lens"}
    if not need <= set(identifiability.columns):
        raise ValueError(f"identifiability needs columns {sorted(need)}")
    fig, axes = panel_grid(2 if kl is not None else 1, panel_size=3.6)
    t = identifiability[
        (identifiability["layer_type"] == "resid")
        & (identifiability["metric"] == "identifiable_pct")
    ]
    present = [g for g in groups if g in set(t["token_group"])]
    for gi, group in enumerate(present):
        color = token_group_color(group, gi)
        for lens, style in (("plain", "-"), ("tuned", "--")):
            rows = t[(t["token_group"] == group) & (t["lens"] == lens)].sort_values("block")
            if len(rows):
                axes[0].plot(
                    rows["block"], rows["value"], style, color=color, marker="o",
                    label=f"{group}, {lens}",
                )  # fmt: skip
    axes[0].set_xlabel("block")
    axes[0].set_ylabel("% identifiable tokens (residual)")
    below = dict(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # off the data
    legend_outside(axes[0], **below)
    if kl is not None:
        for lens, style in (("plain", "-"), ("tuned", "--")):
            rows = kl[kl["lens"] == lens].sort_values("block")
            axes[1].plot(
                rows["block"], rows["kl_mean"], style, marker="o", label=lens,
                color=sublayer_color("resid"),
            )  # fmt: skip
        axes[1].set_xlabel("block")
        axes[1].set_ylabel("KL(model output || lens readout)")
        legend_outside(axes[1], **below)
    if title:
        fig.suptitle(title)
    return fig
