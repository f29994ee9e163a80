"""Static attention patterns with readable token labels (the fallback of the interactive view).

Rows are queries, columns keys, labelled from the model's :class:`TokenLayout` ("CLS", "REG0",
"P{r},{c}"); thin lines separate the prefix tokens from the image patches. With hundreds of tokens
only every k-th patch label is printed (all prefix labels always are).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np
import pandas as pd

from vit_embedding_lens.viz._figures import figure_and_axes, panel_grid, to_numpy


def layout_of(model_or_layout: Any) -> Any:
    """The :class:`~vit_embedding_lens.model.layout.TokenLayout` of a HookedViT, or the layout."""
    layout = getattr(model_or_layout, "layout", model_or_layout)
    if not hasattr(layout, "token_labels") or not hasattr(layout, "n_tokens"):
        raise TypeError(
            f"expected a HookedViT or a TokenLayout, got {type(model_or_layout).__name__}"
        )
    return layout


def heads_first(pattern: Any, layout: Any) -> np.ndarray:
    """``[head, pos, pos]`` from ``[pos, pos]`` or ``[head, pos, pos]``, checked against the
    layout."""
    arr = to_numpy(pattern, "pattern").astype(float)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] != arr.shape[-2]:
        raise ValueError(
            "pattern must be [n_tokens, n_tokens] or [heads, n_tokens, n_tokens], got shape "
            f"{arr.shape}; pick one image from a cached [batch, heads, N, N] pattern "
            "(cache[...][i])"
        )
    if arr.shape[-1] != layout.n_tokens:
        raise ValueError(
            f"pattern has {arr.shape[-1]} tokens, the layout {layout.n_tokens} "
            f"({layout.n_prefix} prefix + {layout.n_patches} patches); pass the matching layout "
            f"(model.layout_for(image_size) for other image sizes)"
        )
    return arr


def attention_table(
    pattern: Any, model_or_layout: Any, head_names: Optional[Sequence[str]] = None
) -> pd.DataFrame:
    """One row per (head, query, key): ``head, query, key, query_label, key_label, weight``."""
    layout = layout_of(model_or_layout)
    arr = heads_first(pattern, layout)
    heads, n, _ = arr.shape
    names = list(head_names) if head_names is not None else [f"H{h}" for h in range(heads)]
    labels = np.asarray(layout.token_labels())
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return pd.DataFrame(
        {
            "head": np.repeat(names, n * n),
            "query": np.tile(q.ravel(), heads),
            "key": np.tile(k.ravel(), heads),
            "query_label": np.tile(labels[q.ravel()], heads),
            "key_label": np.tile(labels[k.ravel()], heads),
            "weight": arr.reshape(-1),
        }
    )


def tick_positions(layout: Any, max_ticks: int = 24) -> List[int]:
    """Token positions to label: every prefix token, and image patches at a regular stride."""
    stride = max(1, int(np.ceil(layout.n_patches / max(1, max_ticks - layout.n_prefix))))
    return list(layout.prefix_indices) + list(layout.patch_indices)[stride // 2 :: stride]


def plot_attention(
    pattern: Any,
    model_or_layout: Any,
    *,
    heads: Optional[Sequence[int]] = None,
    head_names: Optional[Sequence[str]] = None,
    max_ticks: int = 24,
    cmap: str = "viridis",
    title: Optional[str] = None,
    ncols: Optional[int] = None,
    ax: Any = None,
):
    """Attention weights ``[head, pos, pos]`` (or ``[pos, pos]``) as heatmaps, one panel per head;
    the Figure.

    ``heads`` picks a subset; ``ax`` is accepted for a single pattern. Token labels come from the
    model's layout (pass the model or its ``TokenLayout``).
    """
    layout = layout_of(model_or_layout)
    arr = heads_first(pattern, layout)
    names = (
        list(head_names) if head_names is not None else [f"head {h}" for h in range(arr.shape[0])]
    )
    if len(names) != arr.shape[0]:
        raise ValueError(f"{len(names)} head names for {arr.shape[0]} heads")
    if heads is not None:
        bad = [h for h in heads if not 0 <= h < arr.shape[0]]
        if bad:
            raise ValueError(f"heads {bad} out of range for {arr.shape[0]} heads")
        arr, names = arr[list(heads)], [names[h] for h in heads]
    if ax is not None and arr.shape[0] != 1:
        raise ValueError("ax= takes a single pattern; pick one head with heads=[h]")
    if ax is not None or arr.shape[0] == 1:
        fig, ax = figure_and_axes(ax, figsize=(5.0, 4.4))
        axes = [ax]
    else:
        fig, axes = panel_grid(arr.shape[0], ncols or 4, panel_size=3.0, extra_width=0.8)
    labels = layout.token_labels()
    ticks = tick_positions(layout, max_ticks)
    fontsize = 6 if len(ticks) > 12 else 8
    image = None
    for a, weights, name in zip(axes, arr, names):
        image = a.imshow(
            weights, cmap=cmap, vmin=0.0, vmax=float(arr.max()) or 1.0, interpolation="nearest"
        )
        a.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=fontsize)
        a.set_yticks(ticks, [labels[i] for i in ticks], fontsize=fontsize)
        if layout.n_prefix:
            edge = layout.n_prefix - 0.5
            a.axhline(edge, color="white", lw=0.6)
            a.axvline(edge, color="white", lw=0.6)
        a.set_xlabel("key", fontsize=8)
        a.set_ylabel("query", fontsize=8)
        a.set_title(name if title is None or len(axes) > 1 else title, fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    if title and len(axes) > 1:
        fig.suptitle(title)
    return fig
