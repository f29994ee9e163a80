"""Per-token labels from pixel masks: which image tokens lie on the object ("class" tokens) and
which on the background ("context" tokens).

A mask covers the image the model sees (images resized to the input size with no crop keep the
mask aligned with the patch grid). It is brought to the patch grid by one of:

- ``"nearest"`` (the library's default): the pixel at each patch's centre decides;
- ``"corner"``: the pixel at each patch's top-left corner decides (``mask[::p, ::p]``), which is
  what the paper's reference code gets from OpenCV's nearest resize of the mask to the grid; use it
  to reproduce the published numbers;
- ``"area"``: the fraction of each patch's pixels that are on the object, then thresholded.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from vit_embedding_lens.model.layout import TokenLayout

Method = Literal["nearest", "corner", "area"]
#: the methods, in the order the command line offers them
METHODS = ("nearest", "corner", "area")


def mask_to_grid(mask: Tensor, grid_size: Sequence[int], method: Method = "nearest") -> Tensor:
    """``[..., H, W]`` mask -> ``[..., grid_h, grid_w]``.

    ``"nearest"``: the value of the pixel at the centre of each patch cell (any dtype, so label
    masks keep their labels). ``"corner"``: the pixel at each cell's top-left corner (row
    ``floor(i * H / grid_h)``, as OpenCV's ``INTER_NEAREST``; ``mask[..., ::p, ::p]`` for a
    ``p``-pixel patch grid), the reference code's rule. ``"area"``: the fraction of each cell's
    pixels that are nonzero (float in [0, 1]); cells are the same as ``F.adaptive_avg_pool2d``'s
    when H or W is not a multiple of the grid.
    """
    if mask.ndim < 2:
        raise ValueError(
            f"a mask needs at least 2 dimensions [..., H, W], got shape {tuple(mask.shape)}"
        )
    gh, gw = int(grid_size[0]), int(grid_size[1])
    H, W = mask.shape[-2:]
    if H < gh or W < gw:
        raise ValueError(f"a {H}x{W} mask is smaller than the {gh}x{gw} patch grid")
    if method == "nearest":
        rows = ((torch.arange(gh, device=mask.device) + 0.5) * H / gh).long()
        cols = ((torch.arange(gw, device=mask.device) + 0.5) * W / gw).long()
        return mask[..., rows[:, None], cols[None, :]]
    if method == "corner":
        rows = torch.arange(gh, device=mask.device) * H // gh
        cols = torch.arange(gw, device=mask.device) * W // gw
        return mask[..., rows[:, None], cols[None, :]]
    if method == "area":
        flat = (mask != 0).float().reshape(-1, 1, H, W)
        return F.adaptive_avg_pool2d(flat, (gh, gw)).reshape(*mask.shape[:-2], gh, gw)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def token_mask_from_mask(
    mask: Tensor,
    layout: TokenLayout,
    method: Method = "nearest",
    threshold: float = 0.5,
    label: Optional[int] = None,
) -> Bool[Tensor, "... pos"]:
    """Boolean per-token mask over the whole sequence, True at image tokens on the object.

    ``mask`` is ``[..., H, W]``: boolean, 0/1, or integer labels with ``label`` naming the object's
    class (``mask == label`` is the object). With ``method="area"`` a token is on the object when at
    least ``threshold`` of its patch is. Prefix tokens (CLS, distillation, registers) are never
    labelled: they are False, as they belong to no image region.
    """
    if label is not None:
        mask = mask == label
    elif mask.is_floating_point() and method != "area":
        mask = mask != 0
    grid = mask_to_grid(mask, layout.grid_size, method)
    on_object = grid >= threshold if method == "area" else grid != 0
    tokens = torch.zeros(*mask.shape[:-2], layout.n_tokens, dtype=torch.bool, device=mask.device)
    tokens[..., layout.n_prefix :] = layout.from_grid(on_object)
    return tokens


def area_fractions(mask: Tensor, layout: TokenLayout) -> Float[Tensor, "... n_patches"]:
    """Fraction of each image token's patch that lies on the object, in token order."""
    return layout.from_grid(mask_to_grid(mask, layout.grid_size, "area"))
