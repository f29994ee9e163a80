"""Attribution figures (matplotlib): perturbation curves, probe vs projection accuracy,
attribution overlays. The data they draw comes from :mod:`vit_embedding_lens.attribution`, which
re-exports these names; so this module imports that package only when a figure is drawn (a
top-level import would run ``attribution/__init__`` while this module is half loaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from torch import Tensor

from vit_embedding_lens.viz._figures import new_figure
from vit_embedding_lens.viz.palette import method_color

if TYPE_CHECKING:
    from vit_embedding_lens.attribution.result import AttributionMap


def plot_perturbation_curves(result, *, fraction: bool = False, figsize=(10, 4)):
    """Accuracy vs image tokens kept, one panel per order, one line per method (random: the mean
    over seeds with a min-max band); the legend gives each method's AUC."""
    curves = result.curves
    orders = list(dict.fromkeys(curves.order))
    fig = new_figure(figsize=figsize)
    axes = fig.subplots(1, len(orders), squeeze=False, sharey=True)
    x_col = "fraction_kept" if fraction else "n"
    summary = result.summary().set_index(["method", "order"])
    for ax, order in zip(axes[0], orders):
        part = curves[curves.order == order]
        for mi, method in enumerate(dict.fromkeys(part.method)):
            rows = part[part.method == method].groupby(x_col)["accuracy"]
            mean, lo, hi = rows.mean(), rows.min(), rows.max()
            auc = summary.loc[(method, order), "auc"]
            label = f"{method} (AUC {auc:.3f})"
            (line,) = ax.plot(mean.index, mean.values, color=method_color(method, mi), label=label)
            if (hi > lo).any():
                ax.fill_between(mean.index, lo.values, hi.values, color=line.get_color(), alpha=0.2)
        better = "lower" if order == "positive" else "higher"
        ax.set_title(
            f"{order} order ({'most' if order == 'positive' else 'least'} important removed first; "
            f"{better} AUC is better)",
            fontsize=9,
        )
        ax.set_xlabel("fraction of image tokens kept" if fraction else "image tokens kept")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    return fig


def plot_probe_comparison(table: pd.DataFrame, *, figsize=(12, 3.5)):
    """Top-1 accuracy per block, one panel per layer type: probes vs the class-space projection,
    for the CLS (or first prefix) token and the mean over image tokens."""
    layers = list(dict.fromkeys(table.layer))
    fig = new_figure(figsize=figsize)
    axes = fig.subplots(1, len(layers), squeeze=False, sharey=True)
    styles = {"probe": "--", "projection": "-"}
    for ax, layer in zip(axes[0], layers):
        part = table[table.layer == layer]
        for kind in dict.fromkeys(part.kind):
            for readout in ("projection", "probe"):
                rows = part[(part.kind == kind) & (part.readout == readout)]
                mean = rows.groupby("block")["accuracy"].mean()
                ax.plot(
                    mean.index,
                    mean.values,
                    styles[readout],
                    marker="o",
                    ms=3,
                    label=f"{kind} {readout}",
                )
        ax.set_title(layer)
        ax.set_xlabel("block")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("top-1 accuracy (held out)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_attribution_maps(
    images: Tensor,
    maps: Union[Sequence[AttributionMap], Mapping[str, AttributionMap]],
    *,
    indices: Optional[Sequence[int]] = None,
    alpha: float = 0.55,
    cmap: str = "heat",
    mean=None,
    std=None,
    class_names: Optional[Sequence[str]] = None,
):
    """A grid of overlays: one row per image, the image then one column per method."""
    from vit_embedding_lens.attribution.overlay import image_to_rgb, overlay

    items = list(maps.items()) if isinstance(maps, Mapping) else [(m.method, m) for m in maps]
    if not items:
        raise ValueError("give at least one AttributionMap")
    indices = list(indices) if indices is not None else list(range(min(4, images.shape[0])))
    n_cols = len(items) + 1
    fig = new_figure(figsize=(2 * n_cols, 2 * len(indices)))
    axes = fig.subplots(len(indices), n_cols, squeeze=False)
    for row, i in enumerate(indices):
        axes[row][0].imshow(image_to_rgb(images[i], mean, std))
        cls = int(items[0][1].classes[i])
        axes[row][0].set_title(
            class_names[cls] if class_names and cls >= 0 else f"class {cls}", fontsize=8
        )
        for col, (name, amap) in enumerate(items, start=1):
            axes[row][col].imshow(
                overlay(
                    amap.scores[i],
                    images[i],
                    layout=amap.layout,
                    alpha=alpha,
                    cmap=cmap,
                    mean=mean,
                    std=std,
                )
            )
            if row == 0:
                axes[row][col].set_title(name, fontsize=8)
    for ax in np.ravel(axes):
        ax.axis("off")
    fig.tight_layout()
    return fig
