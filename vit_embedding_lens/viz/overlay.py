"""Attribution overlays drawn: a patch-grid map upsampled onto the input image, with a colour bar.

The blended picture as data (no plotting) is :func:`vit_embedding_lens.attribution.overlay`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np

from vit_embedding_lens.attribution.overlay import overlay
from vit_embedding_lens.viz._figures import figure_and_axes, to_numpy

Upsampling = Literal["nearest", "bilinear"]


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
    """Draw :func:`vit_embedding_lens.attribution.overlay` (image plus upsampled map) with the map's
    colour bar; returns the Figure."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    blended = overlay(map, image, alpha=alpha, cmap=cmap, mode=mode)
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
