"""Shared plumbing for the figures: backend-free Figure creation, array coercion, PNG export.

Figures are built with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: nothing
is registered in pyplot's global state (no leaked figures in long loops, no double display in
notebooks) and no GUI backend is needed, so everything works headless (Agg) and inside servers.
"""

from __future__ import annotations

import io
from typing import Any, Optional, Tuple

import numpy as np


def new_figure(figsize: Tuple[float, float] = (6.0, 4.0), **kwargs: Any):
    """A pyplot-free Figure (rendered by Agg when saved or displayed)."""
    from matplotlib.figure import Figure

    _ensure_notebook_display()
    return Figure(figsize=figsize, **kwargs)


_DISPLAY_CHECKED = False


def _ensure_notebook_display() -> None:
    """Inside IPython/Jupyter, make returned Figures display as PNG.

    Jupyter's PNG formatter for Figures is installed by the inline backend when ``pyplot`` is first
    imported; figures built without ``pyplot`` would otherwise show as ``<Figure size ...>``. A
    formatter the user (or the inline backend) already installed is left alone.
    """
    global _DISPLAY_CHECKED
    if _DISPLAY_CHECKED:
        return
    _DISPLAY_CHECKED = True
    import sys

    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython
    from matplotlib.figure import Figure

    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    png = shell.display_formatter.formatters["image/png"]
    try:
        png.lookup_by_type(Figure)
    except KeyError:
        png.for_type(Figure, lambda fig: figure_to_png(fig, bbox_inches="tight"))


def figure_and_axes(ax: Any = None, figsize: Tuple[float, float] = (6.0, 4.0)):
    """``(figure, axes)``: the caller's ``ax`` and its figure, or a new single-panel figure."""
    if ax is not None:
        if not hasattr(ax, "figure") or not hasattr(ax, "plot"):
            raise TypeError(f"ax must be a matplotlib Axes, got {type(ax).__name__}")
        return ax.figure, ax
    fig = new_figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def panel_grid(
    n_panels: int, ncols: Optional[int] = None, panel_size: float = 2.2, extra_width: float = 0.0
):
    """A figure with ``n_panels`` axes on a grid (``ncols`` per row); unused cells are hidden."""
    if n_panels < 1:
        raise ValueError("nothing to plot: 0 panels")
    ncols = min(n_panels, ncols or min(n_panels, 6))
    nrows = -(-n_panels // ncols)
    fig = new_figure(
        figsize=(panel_size * ncols + extra_width, panel_size * nrows + 0.4), layout="constrained"
    )
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig, list(axes[:n_panels])


def to_numpy(x: Any, name: str = "values") -> np.ndarray:
    """A numpy copy of a tensor / array / nested list (detached, on the CPU, float tensors as
    float64)."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            x = x.double() if x.is_floating_point() else x
            return x.numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}")
    return np.asarray(x)


def image_to_display(image: Any) -> np.ndarray:
    """An image for ``imshow``: ``[H, W]`` grey or ``[H, W, 3|4]`` colour, scaled to ``[0, 1]``.

    Accepts torch-style ``[C, H, W]`` (C = 1, 3 or 4) and numpy-style ``[H, W, C]``. Normalized
    model inputs (any range) are min-max rescaled per image; uint8 images are divided by 255.
    """
    arr = to_numpy(image, "image")
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            "image must be [H, W], [C, H, W] or [H, W, C] with C in (1, 3, 4), got shape "
            f"{tuple(arr.shape)}; pass one image, not a batch (images[0])"
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    lo, hi = np.nanmin(arr), np.nanmax(arr)
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def stars_label(p: float) -> str:
    """The label drawn above a distribution: the stars of
    :func:`~vit_embedding_lens.lens.stats.significance_stars`, ``"n.s."`` when not significant,
    nothing when there is no test (NaN/None)."""
    from vit_embedding_lens.lens.stats import significance_stars

    if p is None or not np.isfinite(p):
        return ""
    return significance_stars(p) or "n.s."


def figure_to_png(fig: Any, dpi: int = 100, bbox_inches: Optional[str] = None) -> bytes:
    """PNG bytes of a Figure (Agg, no display needed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches=bbox_inches)
    return buffer.getvalue()


def legend_outside(ax: Any, **kwargs: Any) -> Any:
    """The axes' legend to the right of the axes, where it covers no data (constrained and tight
    layouts make room for it); returns the Legend, or None when nothing is labelled."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    options: dict = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    options.update(fontsize=8, frameon=False)
    options.update(kwargs)
    return ax.legend(handles, labels, **options)
