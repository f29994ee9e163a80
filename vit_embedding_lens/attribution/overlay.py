"""Attribution maps on top of the input image, as plain float RGB arrays (no plotting library).

:func:`upsample_map` brings a patch-grid map to pixels; :func:`overlay` colours it and blends it
with the image. matplotlib is needed only for colour maps other than the built-in ``"heat"``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from vit_embedding_lens.model.layout import TokenLayout

#: the built-in colour map: black -> red -> yellow -> white, at 0, 1/3, 2/3, 1
_HEAT = np.array([[0.0, 0.0, 0.0], [0.85, 0.0, 0.0], [1.0, 0.85, 0.0], [1.0, 1.0, 1.0]])


def upsample_map(
    values: Tensor,
    size: Sequence[int],
    layout: Optional[TokenLayout] = None,
    mode: str = "bilinear",
) -> Float[Tensor, "... height width"]:
    """A map ``[..., grid_h, grid_w]`` (or ``[..., n_patches]`` with ``layout``) resized to
    ``size = (height, width)`` pixels (``mode``: ``"bilinear"`` or ``"nearest"``)."""
    values = torch.as_tensor(values)
    if layout is not None and (
        values.ndim < 2 or tuple(values.shape[-2:]) != tuple(layout.grid_size)
    ):
        values = layout.to_grid(values)
    if values.ndim < 2:
        raise ValueError(
            f"expected a grid [..., grid_h, grid_w], got {tuple(values.shape)}; pass layout= or "
            "reshape token scores with layout.to_grid()"
        )
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    lead = values.shape[:-2]
    work = torch.float64 if values.dtype == torch.float64 else torch.float32
    flat = values.detach().to(work).reshape(-1, 1, *values.shape[-2:])
    extra = dict(align_corners=False) if mode == "bilinear" else {}
    up = F.interpolate(flat, size=(int(size[0]), int(size[1])), mode=mode, **extra)
    return up.reshape(*lead, int(size[0]), int(size[1]))


def colorize(values: np.ndarray, cmap: str = "heat") -> np.ndarray:
    """Values in [0, 1] ``[..., ]`` -> RGB ``[..., 3]`` floats in [0, 1]."""
    values = np.clip(np.asarray(values, dtype=float), 0.0, 1.0)
    if cmap == "heat":
        stops = np.linspace(0.0, 1.0, len(_HEAT))
        return np.stack([np.interp(values, stops, _HEAT[:, c]) for c in range(3)], axis=-1)
    import matplotlib

    return np.asarray(matplotlib.colormaps[cmap](values))[..., :3]


def image_to_rgb(
    image: Union[Tensor, np.ndarray],
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """An image ``[C, H, W]`` tensor or ``[H, W]``/``[H, W, C]``/``[C, H, W]`` array -> RGB floats
    ``[H, W, 3]`` in [0, 1]: the normalization undone with ``mean``/``std`` when given, else min-max
    scaled."""
    if isinstance(image, Tensor):
        if image.ndim != 3:
            raise ValueError(
                f"an image tensor must be [channels, height, width], got {tuple(image.shape)}"
            )
        arr = image.detach().cpu().float().permute(1, 2, 0).numpy()
    else:
        arr = np.asarray(image, dtype=float)
        arr = arr[..., None] if arr.ndim == 2 else arr
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # [C, H, W]
            arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 colour channels, got an image of shape {arr.shape}")
    if mean is not None or std is not None:
        m = np.asarray(mean if mean is not None else 0.0, dtype=float)
        s = np.asarray(std if std is not None else 1.0, dtype=float)
        arr = np.clip(arr * s + m, 0.0, 1.0)
    else:
        lo, hi = arr.min(), arr.max()
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def overlay(
    values: Tensor,
    image: Union[Tensor, np.ndarray],
    *,
    layout: Optional[TokenLayout] = None,
    alpha: float = 0.5,
    cmap: str = "heat",
    mode: str = "bilinear",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> np.ndarray:
    """One image's map (``[grid_h, grid_w]``, or ``[n_patches]`` with ``layout``) upsampled to the
    image, min-max scaled, coloured and blended: RGB floats ``[H, W, 3]`` in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = image_to_rgb(image, mean, std)
    heat = upsample_map(values, rgb.shape[:2], layout, mode).numpy()
    if heat.ndim != 2:
        raise ValueError(
            f"overlay takes one image's map; got {heat.ndim - 2} extra leading dimensions"
        )
    lo, hi = heat.min(), heat.max()
    heat = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    return (1.0 - alpha) * rgb + alpha * colorize(heat, cmap)
