"""Image-shaped heatmaps for patching and knockout sweeps: one panel per block (or block x head).

Activation patching per block x token, knockout effects per token, or any ``[.., grid_h, grid_w]``
map go in as they are; all panels share one colour scale, centred on ``center`` (0 = "no effect")
with a diverging colour map, so panels can be compared by eye.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from vit_embedding_lens.viz._figures import panel_grid, to_numpy
from vit_embedding_lens.viz.token_grid import as_grids


def _panels(
    maps: Any, layout: Any, titles: Optional[Sequence[str]], row_labels, col_labels
) -> tuple:
    """``(grids [n, gh, gw], prefix [n, n_prefix] or None, titles, ncols or None)``."""
    if isinstance(maps, Mapping):
        if not maps:
            raise ValueError("maps is empty")
        parts = [as_grids(v, layout, f"maps[{k!r}]") for k, v in maps.items()]
        if any(g.shape[0] != 1 for g, _ in parts):
            raise ValueError(
                "each entry of a maps dict must be one map ([grid_h, grid_w] or [n_tokens])"
            )
        grids = np.concatenate([g for g, _ in parts])
        prefix = None if any(p is None for _, p in parts) else np.concatenate([p for _, p in parts])
        return grids, prefix, [str(k) for k in maps], None
    arr = to_numpy(maps, "maps")
    ncols = None
    if arr.ndim == 4 or (
        arr.ndim == 3
        and layout is not None
        and arr.shape[-1] in (layout.n_tokens, layout.n_patches)
    ):
        n_rows, n_cols = arr.shape[:2]
        grids, prefix = as_grids(arr.reshape(n_rows * n_cols, *arr.shape[2:]), layout, "maps")
        rows = list(row_labels) if row_labels is not None else [f"block {i}" for i in range(n_rows)]
        cols = list(col_labels) if col_labels is not None else [str(j) for j in range(n_cols)]
        if len(rows) != n_rows or len(cols) != n_cols:
            raise ValueError(
                f"{len(rows)} row and {len(cols)} column labels for a {n_rows} x {n_cols} grid of "
                "maps"
            )
        default = [f"{r} · {c}" for r in rows for c in cols]
        ncols = n_cols
    else:
        grids, prefix = as_grids(arr, layout, "maps")
        labels = row_labels if row_labels is not None else None
        default = (
            list(labels) if labels is not None else [f"block {i}" for i in range(grids.shape[0])]
        )
    if titles is not None:
        default = list(titles)
    if len(default) != grids.shape[0]:
        raise ValueError(f"{len(default)} titles for {grids.shape[0]} panels")
    return grids, prefix, default, ncols


def heatmap_grid_table(
    maps: Any,
    *,
    layout: Any = None,
    titles: Optional[Sequence[str]] = None,
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """The data behind :func:`plot_heatmap_grid`: ``panel, title, row, col, token, value`` per cell
    (prefix tokens with ``row``/``col`` missing)."""
    grids, prefix, names, _ = _panels(maps, layout, titles, row_labels, col_labels)
    n, gh, gw = grids.shape
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    frame = pd.DataFrame(
        {
            "panel": np.repeat(np.arange(n), gh * gw),
            "title": np.repeat(names, gh * gw),
            "row": np.tile(rows.ravel(), n),
            "col": np.tile(cols.ravel(), n),
            "token": [f"P{r},{c}" for _ in range(n) for r, c in zip(rows.ravel(), cols.ravel())],
            "value": grids.reshape(-1).astype(float),
        }
    )
    if prefix is not None:
        tokens = layout.token_labels()[: layout.n_prefix]
        frame = pd.concat(
            [
                frame,
                pd.DataFrame(
                    {
                        "panel": np.repeat(np.arange(n), len(tokens)),
                        "title": np.repeat(names, len(tokens)),
                        "token": tokens * n,
                        "value": prefix.reshape(-1).astype(float),
                    }
                ),
            ],
            ignore_index=True,
        )
    return frame


def plot_heatmap_grid(
    maps: Any,
    *,
    layout: Any = None,
    titles: Optional[Sequence[str]] = None,
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    cmap: str = "RdBu_r",
    center: Optional[float] = 0.0,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    ncols: Optional[int] = None,
    colorbar_label: Optional[str] = None,
    suptitle: Optional[str] = None,
):
    """Patching / knockout results as image-shaped heatmaps sharing one colour scale; the Figure.

    ``maps``: ``[n, grid_h, grid_w]`` (one panel per block), ``[n_rows, n_cols, grid_h, grid_w]``
    (e.g. block x head, labelled by ``row_labels``/``col_labels``), a dict ``{title: [grid_h,
    grid_w]}``, or, with ``layout=``, token vectors ``[n, pos]`` / ``[n_rows, n_cols,
    pos]`` whose prefix-token values are written in the panel titles. ``center`` makes the
    scale symmetric around it (``None``: plain min..max).
    """
    grids, prefix, names, grid_cols = _panels(maps, layout, titles, row_labels, col_labels)
    finite = grids[np.isfinite(grids)].astype(float)
    lo = float(finite.min()) if vmin is None else vmin
    hi = float(finite.max()) if vmax is None else vmax
    if center is not None:
        half = max(abs(hi - center), abs(lo - center)) or 1e-12
        lo, hi = center - half, center + half
    if prefix is not None:
        tokens = layout.token_labels()[: layout.n_prefix]
        names = [
            f"{t}\n" + ", ".join(f"{nm} {v:+.2f}" for nm, v in zip(tokens, p))
            for t, p in zip(names, prefix)
        ]
    fig, axes = panel_grid(grids.shape[0], ncols or grid_cols, panel_size=2.0, extra_width=0.8)
    image = None
    for ax, grid, name in zip(axes, grids, names):
        image = ax.imshow(grid.astype(float), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.colorbar(image, ax=axes, shrink=0.8)
    if colorbar_label:
        bar.set_label(colorbar_label)
    if suptitle:
        fig.suptitle(suptitle)
    return fig
