"""Token slots after token removal: the kernels ``HookedViT(images, keep_mask=...)`` runs.

Removing tokens right after the position embedding leaves each image with its kept tokens, in
their original order, padded to the longest row. These functions validate a keep mask, give the
layout position of every slot (:func:`kept_positions`, ``-1`` at padding), gather the kept tokens
and build the padding mask that keeps padded slots out of every attention.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from vit_embedding_lens.model.layout import TokenLayout

#: index of a padded slot in :func:`kept_positions`' index (never a real token position)
PAD_INDEX = -1


def check_keep_mask(keep: Tensor, layout: TokenLayout, batch: int, device: torch.device) -> None:
    """Raise a clear error unless ``keep`` is a bool ``[batch, pos]`` mask that keeps every
    prefix token and at least one token per row."""
    if not isinstance(keep, Tensor):
        raise TypeError(
            f"keep_mask must be a bool tensor [batch, {layout.n_tokens}], got {type(keep).__name__}"
        )
    if keep.dtype != torch.bool:
        raise TypeError(
            f"keep_mask must be a bool tensor (True = keep the token), got dtype {keep.dtype}; "
            f"use keep.bool()"
        )
    if keep.ndim != 2 or keep.shape[1] != layout.n_tokens:
        raise ValueError(
            f"keep_mask must have shape [batch, n_tokens] = [{batch}, {layout.n_tokens}] in "
            f"layout order ({layout.n_prefix} prefix + {layout.n_patches} patches), got "
            f"{tuple(keep.shape)}"
        )
    if keep.shape[0] != batch:
        raise ValueError(f"keep_mask has {keep.shape[0]} rows for a batch of {batch} images")
    if keep.device != device:
        raise ValueError(
            f"keep_mask is on {keep.device} but the model is on {device}; use keep.to('{device}')"
        )
    if layout.n_prefix and not bool(keep[:, : layout.n_prefix].all()):
        raise ValueError(
            "keep_mask drops a prefix token (CLS, distillation or register): prefix tokens are "
            f"always kept; set keep[:, :{layout.n_prefix}] = True"
        )
    if not bool(keep.any(dim=1).all()):
        raise ValueError(
            "a row of keep_mask keeps no token at all; keep at least one image token per image"
        )


def kept_positions(
    keep: Bool[Tensor, "batch pos"],
) -> Tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Original positions of the kept tokens, row by row, in their original order.

    Returns ``(index, valid)``, both ``[batch, max_kept]`` with ``max_kept`` the largest number of
    tokens any row keeps: ``index[b, s]`` is the layout position of slot ``s`` of image ``b`` after
    removal, ``valid[b, s]`` is False at padded slots (there ``index`` is ``-1``; use
    ``index.clamp(min=0)`` before gathering and ``valid`` to ignore what comes back).
    """
    if keep.dtype != torch.bool or keep.ndim != 2:
        raise ValueError(
            f"keep must be a bool tensor [batch, n_tokens], got {keep.dtype} {tuple(keep.shape)}"
        )
    n_kept = keep.sum(dim=1)
    max_kept = int(n_kept.max()) if keep.shape[0] else 0
    # a stable sort of "dropped" (False first) keeps kept tokens first, in their original order
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :max_kept]
    valid = torch.arange(max_kept, device=keep.device)[None, :] < n_kept[:, None]
    index = torch.where(valid, order, torch.full_like(order, PAD_INDEX))
    return index, valid


def gather_tokens(x: Tensor, index: Int[Tensor, "batch pos"], dim: int = 1) -> Tensor:
    """``x[b, index[b, s]]`` along token dimension ``dim``; padded slots (index -1) read token 0."""
    idx = index.clamp(min=0)
    shape = [1] * x.ndim
    shape[0], shape[dim] = idx.shape
    idx = idx.view(shape).expand(*[s if i != dim else idx.shape[1] for i, s in enumerate(x.shape)])
    return torch.gather(x, dim, idx)


def padding_mask(positions: Int[Tensor, "batch pos"]) -> Optional[Bool[Tensor, "batch 1 pos pos"]]:
    """Attention mask ``[batch, 1, n, n]`` (True = may attend) for a padded token sequence.

    Real tokens attend to real tokens only; a padded slot (position -1) attends to itself only, so
    padding neither reads nor influences real tokens and no softmax row is empty. ``None`` when no
    row is padded.
    """
    valid = positions >= 0
    if bool(valid.all()):
        return None
    n = positions.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=positions.device)
    return torch.where(valid[:, :, None], valid[:, None, :], eye).unsqueeze(1)
