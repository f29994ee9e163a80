"""Attribution overlays: a patch-grid map upsampled onto the input image.

``overlay_array`` gives the blended RGB picture as data (no plotting needed); ``plot_overlay``
draws it with a colour bar.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vit_embedding_lens.viz._figures import figure_and_axes, image_to_display, to_numpy

Upsampling = Literal["nearest", "bilinear", "bicubic"]


def upsample_map(map: Any, size: Sequence[int], mode: Upsampling = "bilinear") -> np.ndarray:
    """A ``[grid_h, grid_w]`` map resized to ``size = (H, W)`` pixels (corners aligned to the patches).

    ``nearest`` keeps one flat value per patch; ``bilinear``/``bicubic`` interpolate between patch centres.
    """
    arr = to_numpy(map, "map").astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"map must be [grid_h, grid_w], got shape {arr.shape}; reshape token scores with layout.to_grid()"
        )
    if mode not in ("nearest", "bilinear", "bicubic"):
        raise ValueError(f"mode must be 'nearest', 'bilinear' or 'bicubic', got {mode!r}")
    h, w = int(size[0]), int(size[1])
    t = torch.from_numpy(arr)[None, None]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(t, size=(h, w), mode=mode, **kwargs)[0, 0].numpy()


def overlay_array(
    image: Any,
    map: Any,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    mode: Upsampling = "bilinear",
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
) -> np.ndarray:
    """``[H, W, 3]`` floats in ``[0, 1]``: ``(1 - alpha) * image + alpha * cmap(normalized map)``.

    ``image``: ``[C, H, W]``, ``[H, W, C]`` or ``[H, W]`` (rescaled to ``[0, 1]``); ``map``:
    ``[grid_h, grid_w]``, min-max normalized unless ``vmin``/``vmax`` are given.
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    picture = image_to_display(image)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=-1)
    picture = picture[..., :3]
    heat = upsample_map(map, picture.shape[:2], mode)
    lo = np.nanmin(heat) if vmin is None else vmin
    hi = np.nanmax(heat) if vmax is None else vmax
    norm = np.clip((heat - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(heat)
    colored = colormaps[cmap](norm)[..., :3]
    return (1 - alpha) * picture + alpha * colored


def plot_overlay(
    image: Any,
    map: Any,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    mode: Upsampling = "bilinear",
    title: Optional[str] = None,
    colorbar: bool = True,
    ax: Any = None,
):
    """Draw :func:`overlay_array` (image plus upsampled map), with the map's colour bar; the Figure."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    blended = overlay_array(image, map, alpha=alpha, cmap=cmap, mode=mode)
    fig, ax = figure_and_axes(ax, figsize=(3.6, 3.2))
    ax.imshow(blended, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        values = to_numpy(map, "map").astype(float)
        mappable = ScalarMappable(norm=Normalize(np.nanmin(values), np.nanmax(values)), cmap=cmap)
        fig.colorbar(mappable, ax=ax, shrink=0.8)
    return fig
