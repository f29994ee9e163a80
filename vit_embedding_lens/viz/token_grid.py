"""Per-token values on the patch grid, block by block: the "logit lens" picture of a ViT.

Each panel is one block; each cell one image token, coloured by a score (e.g. the correct class's
probability) or by its top-1 class, optionally drawn over the input image and annotated with
labels (e.g. class names). Prefix-token values, when the input has them, go into the panel titles.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from vit_embedding_lens.viz._figures import image_to_display, panel_grid, to_numpy


def as_grids(values: Any, layout: Any, what: str) -> tuple:
    """``([n_panels, gh, gw] array, prefix [n_panels, n_prefix] or None)`` from grid or token
    input."""
    arr = to_numpy(values, what)
    if (
        layout is not None
        and arr.ndim in (1, 2)
        and arr.shape[-1] in (layout.n_tokens, layout.n_patches)
    ):
        arr = arr[None] if arr.ndim == 1 else arr
        prefix = (
            arr[:, : layout.n_prefix]
            if arr.shape[-1] == layout.n_tokens and layout.n_prefix
            else None
        )
        grid_h, grid_w = layout.grid_size
        patches = arr[:, -layout.n_patches :]
        return patches.reshape(arr.shape[0], grid_h, grid_w), prefix
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        hint = "" if layout is not None else "; token vectors need layout= to be put on the grid"
        raise ValueError(
            f"{what} must be [grid_h, grid_w] or [n_panels, grid_h, grid_w], got shape "
            f"{arr.shape}{hint}"
        )
    if layout is not None and tuple(arr.shape[-2:]) != tuple(layout.grid_size):
        raise ValueError(
            f"{what} has a {arr.shape[-2:]} grid, the layout has {tuple(layout.grid_size)}"
        )
    return arr, None


def token_grid_table(
    values: Any,
    labels: Any = None,
    *,
    layout: Any = None,
    class_names: Optional[Sequence[str]] = None,
) -> pd.DataFrame:
    """The data behind :func:`plot_token_grid`: one row per panel and cell (``panel, row, col,
    value`` and ``label``), plus prefix tokens (``row``/``col`` missing, ``token`` named by the
    layout)."""
    grids, prefix = as_grids(values, layout, "values")
    text = _cell_labels(labels, grids.shape, layout, class_names, grids)
    n, gh, gw = grids.shape
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    frame = pd.DataFrame(
        {
            "panel": np.repeat(np.arange(n), gh * gw),
            "row": np.tile(rows.ravel(), n),
            "col": np.tile(cols.ravel(), n),
            "token": [f"P{r},{c}" for _ in range(n) for r, c in zip(rows.ravel(), cols.ravel())],
            "value": grids.reshape(-1),
        }
    )
    if text is not None:
        frame["label"] = text.reshape(-1)
    if prefix is not None:
        names = layout.token_labels()[: layout.n_prefix]
        extra = pd.DataFrame(
            {
                "panel": np.repeat(np.arange(n), len(names)),
                "token": names * n,
                "value": prefix.reshape(-1),
            }
        )
        frame = pd.concat([frame, extra], ignore_index=True)
    return frame


def _cell_labels(
    labels: Any, shape: tuple, layout: Any, class_names: Optional[Sequence[str]], grids: np.ndarray
):
    """Text per cell (``[n_panels, gh, gw]`` of str) or None."""
    if labels is None:
        if class_names is not None and np.issubdtype(grids.dtype, np.integer):
            labels = grids
        else:
            return None
    if isinstance(labels, str):
        raise TypeError("labels must be an array of per-cell labels, not one string")
    lab = np.asarray(
        to_numpy(labels, "labels") if not isinstance(labels, (list, tuple)) else labels,
        dtype=object,
    )
    if lab.shape[-1] in (
        (layout.n_tokens, layout.n_patches) if layout is not None else ()
    ) and lab.ndim in (1, 2):
        lab = lab[None] if lab.ndim == 1 else lab
        lab = lab[:, -layout.n_patches :].reshape(lab.shape[0], *layout.grid_size)
    if lab.ndim == 2:
        lab = lab[None]
    if lab.shape != shape:
        raise ValueError(f"labels have shape {lab.shape}, the values {shape}")
    if class_names is not None:
        lab = np.vectorize(
            lambda v: class_names[int(v)] if _is_int(v) else str(v), otypes=[object]
        )(lab)
    return lab.astype(str)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def plot_token_grid(
    values: Any,
    image: Any = None,
    labels: Any = None,
    *,
    layout: Any = None,
    class_names: Optional[Sequence[str]] = None,
    titles: Optional[Sequence[str]] = None,
    cmap: Optional[str] = None,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    alpha: float = 0.65,
    ncols: Optional[int] = None,
    colorbar_label: Optional[str] = None,
    fontsize: Optional[float] = None,
):
    """One panel per block: every image token's value (or top-1 class) on the patch grid; the
    Figure.

    ``values``: ``[block, grid_h, grid_w]`` or ``[grid_h, grid_w]``; with ``layout=`` also
    ``[block, pos]`` or ``[block, n_patches]`` in token order (prefix values then appear
    in the titles). Integer values are classes: coloured categorically and annotated with
    ``class_names`` when given. ``image`` (``[C, H, W]`` or ``[H, W, C]``) is drawn underneath with
    the grid at ``alpha``. ``labels``: text per cell, same shape as ``values`` (class ids are
    translated with ``class_names``). Float values share one colour scale across panels.
    """
    grids, prefix = as_grids(values, layout, "values")
    categorical = np.issubdtype(grids.dtype, np.integer)
    text = _cell_labels(labels, grids.shape, layout, class_names, grids)
    n, gh, gw = grids.shape
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} panels")
    titles = (
        list(titles)
        if titles is not None
        else ([f"block {i}" for i in range(n)] if n > 1 else [""])
    )
    if prefix is not None:
        names = layout.token_labels()[: layout.n_prefix]
        titles = [
            t
            + "\n"
            + ", ".join(_prefix_text(nm, v, class_names, categorical) for nm, v in zip(names, p))
            for t, p in zip(titles, prefix)
        ]
    picture = image_to_display(image) if image is not None else None
    extent = (0, picture.shape[1], picture.shape[0], 0) if picture is not None else (0, gw, gh, 0)
    if categorical:
        n_cls = int(grids.max()) + 1 if class_names is None else len(class_names)
        cmap = cmap or ("tab10" if n_cls <= 10 else "tab20")
        vmin, vmax = -0.5, max(n_cls, 1) - 0.5
    else:
        cmap = cmap or "viridis"
        finite = grids[np.isfinite(grids)]
        vmin = float(finite.min()) if vmin is None and finite.size else vmin
        vmax = float(finite.max()) if vmax is None and finite.size else vmax
    fig, axes = panel_grid(n, ncols, panel_size=2.3, extra_width=0.0 if categorical else 0.8)
    size = fontsize or max(4.0, min(9.0, 70.0 / max(gh, gw)))
    mappable = None
    for ax, grid, title, i in zip(axes, grids, titles, range(n)):
        if picture is not None:
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, extent=extent)
        mappable = ax.imshow(
            grid,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            extent=extent,
            interpolation="nearest",
            alpha=alpha if picture is not None else 1.0,
        )
        if text is not None:
            cell_h, cell_w = (extent[2] / gh, extent[1] / gw)
            for r in range(gh):
                for c in range(gw):
                    ax.text(
                        (c + 0.5) * cell_w,
                        (r + 0.5) * cell_h,
                        text[i, r, c],
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="white" if picture is not None else "black",
                    )
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if not categorical and mappable is not None:
        bar = fig.colorbar(mappable, ax=axes, shrink=0.8)
        if colorbar_label:
            bar.set_label(colorbar_label)
    return fig


def _prefix_text(
    name: str, value: Any, class_names: Optional[Sequence[str]], categorical: bool
) -> str:
    if categorical:
        return f"{name}: {class_names[int(value)] if class_names is not None else int(value)}"
    return f"{name}: {float(value):.2f}"
