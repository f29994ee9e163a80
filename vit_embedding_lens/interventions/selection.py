"""Which tokens, heads and units an intervention touches, as boolean masks over an activation.

Token sets are given as layout groups (``"cls"``, ``"dist"``, ``"registers"``, ``"prefix"``,
``"image"``, ``"all"``), token indices, a ``range``, or a boolean per-token mask (``[pos]``,
or ``[batch, pos]`` for one set per image, e.g. an object mask from
:func:`vit_embedding_lens.data.token_labels.token_mask_from_mask`). Everything is read from the
model's :class:`~vit_embedding_lens.model.layout.TokenLayout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from vit_embedding_lens.model.hook_names import hook_block as hook_layer  # noqa: F401 (old name)
from vit_embedding_lens.model.indices import resolve_indices
from vit_embedding_lens.model.layout import TokenLayout

TokenSpec = Union[str, int, range, Sequence[int], Tensor]
GROUPS = ("all", "cls", "dist", "registers", "prefix", "image")


def token_mask(
    layout: TokenLayout, spec: TokenSpec, device: Optional[torch.device] = None
) -> Tensor:
    """A boolean mask over the sequence (``[pos]``, or ``[batch, pos]`` when ``spec`` is a
    per-image mask) that is True at the tokens ``spec`` names."""
    N = layout.n_tokens
    if isinstance(spec, str):
        return _group_mask(layout, spec, device)
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        if spec.shape[-1] != N or spec.ndim not in (1, 2):
            raise ValueError(
                f"a boolean token mask must be [n_tokens] or [batch, n_tokens] with n_tokens = {N} "
                f"({layout.n_prefix} prefix + {layout.n_patches} patches), got {tuple(spec.shape)}"
            )
        return spec.to(device) if device is not None else spec
    if isinstance(spec, Tensor):
        if spec.is_floating_point() or spec.ndim > 1:
            raise TypeError(
                "token indices must be a 1-D integer tensor (or use a bool mask), got "
                f"{spec.dtype} {tuple(spec.shape)}"
            )
        spec = spec.tolist()
    if isinstance(spec, int):
        spec = [spec]
    try:
        indices = [int(i) for i in spec]
    except TypeError:
        raise TypeError(
            f"cannot read {spec!r} as a token set; use a group name {GROUPS}, token indices, or a "
            "bool mask"
        ) from None
    mask = torch.zeros(N, dtype=torch.bool, device=device)
    for i in indices:
        if not -N <= i < N:
            raise IndexError(f"token index {i} is out of range for {N} tokens")
        mask[i] = True
    return mask


def _group_mask(layout: TokenLayout, group: str, device: Optional[torch.device]) -> Tensor:
    mask = torch.zeros(layout.n_tokens, dtype=torch.bool, device=device)
    name = group.lower()
    if name == "all":
        mask[:] = True
    elif name in ("image", "patches"):
        mask[layout.n_prefix :] = True
    elif name == "prefix":
        mask[: layout.n_prefix] = True
    elif name == "cls":
        if layout.cls_index is None:
            raise ValueError(
                "this model has no CLS token (it pools its image tokens); choose other tokens"
            )
        mask[layout.cls_index] = True
    elif name in ("dist", "distillation"):
        if layout.dist_index is None:
            raise ValueError("this model has no distillation token; choose other tokens")
        mask[layout.dist_index] = True
    elif name in ("registers", "register"):
        if not layout.register_indices:
            raise ValueError("this model has no register tokens; choose other tokens")
        mask[list(layout.register_indices)] = True
    else:
        raise ValueError(
            f"unknown token group {group!r}; use one of {GROUPS}, token indices or a bool mask"
        )
    return mask


def grid_region(
    layout: TokenLayout,
    rows: Union[slice, range, Sequence[int]],
    cols: Union[slice, range, Sequence[int]],
) -> Bool[Tensor, " pos"]:
    """Token mask of a region of the patch grid, e.g.
    ``grid_region(layout, slice(0, 3), slice(2, 5))``."""
    grid = torch.zeros(layout.grid_size, dtype=torch.bool)
    r = torch.arange(layout.grid_size[0])[_as_index(rows)]
    c = torch.arange(layout.grid_size[1])[_as_index(cols)]
    grid[r[:, None], c[None, :]] = True
    mask = torch.zeros(layout.n_tokens, dtype=torch.bool)
    mask[layout.n_prefix :] = layout.from_grid(grid)
    return mask


def _as_index(index):
    return index if isinstance(index, slice) else list(index)


def grid_tiles(
    layout: TokenLayout, tile: Union[int, Tuple[int, int]] = 2
) -> Dict[str, Bool[Tensor, " pos"]]:
    """The patch grid cut into ``tile``-sized blocks (the last row/column of blocks may be smaller):
    ``{"r0:2,c0:2": mask, ...}`` in row-major order, for per-region patching sweeps."""
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    gh, gw = layout.grid_size
    tiles = {}
    for r0 in range(0, gh, th):
        for c0 in range(0, gw, tw):
            r1, c1 = min(r0 + th, gh), min(c0 + tw, gw)
            tiles[f"r{r0}:{r1},c{c0}:{c1}"] = grid_region(layout, slice(r0, r1), slice(c0, c1))
    return tiles


# -------------------------------------------------------------------------------------------------
# Hook activations: which axis is what
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HookAxes:
    """Axes of a hook's activation (batch is axis 0): its token axis, and its head or unit axis."""

    ndim: int
    token: int
    head: Optional[int] = None
    unit: Optional[int] = None  # MLP neuron or feature


def hook_axes(name: str) -> HookAxes:
    """The axes of the activation at hook point ``name``."""
    if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")):
        return HookAxes(ndim=4, token=1, head=2)
    if name.endswith(("hook_pattern", "hook_attn_scores")):
        return HookAxes(ndim=4, token=2, head=1)  # token = query position
    if name.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return HookAxes(ndim=3, token=1, unit=2)
    if name.endswith(("hook_scale",)):
        return HookAxes(ndim=3, token=1)
    if name.endswith(("hook_pooled", "hook_logits", "hook_pooled_dist")):
        raise ValueError(f"{name} has no token axis; choose a per-token hook point")
    return HookAxes(ndim=3, token=1, unit=2)


def _index_mask(size: int, index, what: str, device) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    chosen = resolve_indices(index, size, what, distinct=True, allow_empty=True)
    if chosen:
        mask[chosen] = True
    return mask


def selection_mask(
    name: str,
    layout: TokenLayout,
    n_heads: int,
    *,
    tokens: Optional[TokenSpec] = None,
    heads=None,
    units=None,
    n_units: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Boolean mask broadcastable to the activation at ``name`` (``[1 or batch, ...]``), True where
    the intervention acts: the chosen tokens (all if None) × heads (all if None) × units (all if
    None)."""
    axes = hook_axes(name)
    shape = [1] * axes.ndim
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    if tokens is not None:
        tok = token_mask(layout, tokens, device)
        tshape = [1] * axes.ndim
        tshape[axes.token] = layout.n_tokens
        if tok.ndim == 2:
            tshape[0] = tok.shape[0]
        mask = mask & tok.reshape(tshape)
    if heads is not None:
        if axes.head is None:
            raise ValueError(
                f"{name} has no head axis; heads= applies to q, k, v, z, result and the pattern"
            )
        hshape = [1] * axes.ndim
        hshape[axes.head] = n_heads
        mask = mask & _index_mask(n_heads, heads, "head", device).reshape(hshape)
    if units is not None:
        if axes.unit is None or n_units is None:
            raise ValueError(
                f"{name} has no neuron axis; units= applies to mlp.hook_pre / mlp.hook_post"
            )
        ushape = [1] * axes.ndim
        ushape[axes.unit] = n_units
        mask = mask & _index_mask(n_units, units, "neuron", device).reshape(ushape)
    return mask
