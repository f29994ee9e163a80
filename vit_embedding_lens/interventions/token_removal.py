"""Token removal: drop tokens from the sequence right after the position embedding (METHODS §5).

``model(images, keep_mask=keep)`` does the removal inside the forward pass, with the slot kernels of
:mod:`vit_embedding_lens.model.token_slots` (validating a keep mask, the original position of every
kept slot: :func:`kept_positions`, re-exported here); this module scatters per-slot results back
to layout order (:func:`to_layout_order`) and runs removals. Rows that keep different numbers of
tokens are padded to the longest row; padded slots are marked ``valid == False`` (index ``-1``)
and never influence real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from vit_embedding_lens.model.layout import TokenLayout
from vit_embedding_lens.model.token_slots import (
    PAD_INDEX,
    check_keep_mask,
    gather_tokens,
    kept_positions,
)

if TYPE_CHECKING:
    from vit_embedding_lens.model.cache import ViTActivationCache
    from vit_embedding_lens.model.hooked_vit import HookedViT


def to_layout_order(
    values: Tensor,
    index: Int[Tensor, "batch max_kept"],
    n_tokens: int,
    dim: int = 1,
    fill: float = float("nan"),
) -> Tensor:
    """Scatter per-slot results ``[batch, ..., n_kept, ...]`` back to layout
    order ``[.., pos, ..]``.

    Removed tokens (and nothing from padded slots) get ``fill`` (NaN by default, so a forgotten
    removal shows up instead of passing for a zero).
    """
    dim = dim % values.ndim
    if values.shape[dim] != index.shape[1] or values.shape[0] != index.shape[0]:
        raise ValueError(
            f"values of shape {tuple(values.shape)} do not match index {tuple(index.shape)} along "
            f"batch and token dimension {dim}"
        )
    out_shape = list(values.shape)
    out_shape[dim] = n_tokens + 1  # one spare slot collects the padding, dropped below
    out = values.new_full(out_shape, fill)
    idx = torch.where(index >= 0, index, torch.full_like(index, n_tokens))
    shape = [1] * values.ndim
    shape[0], shape[dim] = idx.shape
    out.scatter_(dim, idx.view(shape).expand_as(values), values)
    return out.narrow(dim, 0, n_tokens)


# -------------------------------------------------------------------------------------------------
# Running with tokens removed
# -------------------------------------------------------------------------------------------------
@dataclass
class RemovalRun:
    """A forward pass with tokens removed: logits, the (optional) cache over the kept slots, and the
    map from slots to layout positions (``index``, ``valid``; see :func:`kept_positions`)."""

    logits: Tensor
    cache: Optional[ViTActivationCache]
    keep: Bool[Tensor, "batch pos"]
    index: Int[Tensor, "batch max_kept"]
    valid: Bool[Tensor, "batch max_kept"]

    def in_layout_order(self, name: str, fill: float = float("nan")) -> Tensor:
        """A cached per-token activation scattered back to layout order ``[batch, pos, ...]``
        (for the pattern: the query axis); removed tokens get ``fill`` (NaN)."""
        from vit_embedding_lens.interventions.selection import hook_axes

        if self.cache is None:
            raise ValueError(
                "this run kept no cache; call remove_tokens(..., names_filter=...) to cache "
                "activations"
            )
        act = self.cache[name]
        return to_layout_order(
            act, self.index, self.keep.shape[1], dim=hook_axes(name).token, fill=fill
        )


def keep_class_tokens(
    class_tokens: Bool[Tensor, "batch pos"], layout: TokenLayout
) -> Bool[Tensor, "batch pos"]:
    """Keep mask that removes the context: prefix tokens plus the image tokens on the object."""
    return _prefix(layout, class_tokens) | (
        class_tokens & layout.image_token_mask(class_tokens.device)
    )


def keep_context_tokens(
    class_tokens: Bool[Tensor, "batch pos"], layout: TokenLayout
) -> Bool[Tensor, "batch pos"]:
    """Keep mask that removes the object: prefix tokens plus the image tokens off the object."""
    return _prefix(layout, class_tokens) | (
        ~class_tokens & layout.image_token_mask(class_tokens.device)
    )


def _prefix(layout: TokenLayout, like: Tensor) -> Tensor:
    if like.dtype != torch.bool or like.shape[-1] != layout.n_tokens:
        raise ValueError(
            f"class_tokens must be a bool mask [..., {layout.n_tokens}] over the token sequence "
            f"(e.g. from token_mask_from_mask), got {like.dtype} {tuple(like.shape)}"
        )
    return (~layout.image_token_mask(like.device)).expand_as(like)


def remove_tokens(
    model: HookedViT,
    images: Tensor,
    keep: Bool[Tensor, "batch pos"],
    *,
    names_filter=None,
    cache: bool = False,
) -> RemovalRun:
    """Run ``model`` on ``images`` with the tokens ``keep`` marks False removed after the position
    embedding. ``names_filter`` (or ``cache=True`` for everything) caches activations over the kept
    slots; :meth:`RemovalRun.in_layout_order` maps them back to layout positions."""
    keep = keep.to(model.embed.W_E.device)
    if names_filter is not None or cache:
        logits, activations = model.run_with_cache(
            images, keep_mask=keep, names_filter=names_filter
        )
    else:
        logits, activations = model(images, keep_mask=keep), None
    index, valid = kept_positions(keep)
    return RemovalRun(logits, activations, keep, index, valid)


def remove_context(model: HookedViT, images: Tensor, class_tokens: Tensor, **kwargs) -> RemovalRun:
    """Keep only the prefix and the object's tokens (``class_tokens``, e.g. from a segmentation
    mask)."""
    return remove_tokens(model, images, keep_class_tokens(class_tokens, model.layout), **kwargs)


def remove_object(model: HookedViT, images: Tensor, class_tokens: Tensor, **kwargs) -> RemovalRun:
    """Keep only the prefix and the context tokens (everything off the object)."""
    return remove_tokens(model, images, keep_context_tokens(class_tokens, model.layout), **kwargs)


__all__ = [
    "PAD_INDEX",
    "RemovalRun",
    "check_keep_mask",
    "gather_tokens",
    "keep_class_tokens",
    "keep_context_tokens",
    "kept_positions",
    "remove_context",
    "remove_object",
    "remove_tokens",
    "to_layout_order",
]
