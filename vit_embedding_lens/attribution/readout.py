"""Which tokens a model reads its prediction from, and which class an attribution explains.

Every attribution explains the model's readout: the CLS token for ``global_pool='token'`` models,
the mean of the image tokens (plus the prefix tokens when ``pool_include_prefix``) for average
pooling models without a CLS token, the probe's attention-weighted mix of tokens for attention-pool
(MAP, SigLIP) models. Attention maps are read from those query rows, weighted by
:func:`readout_weights` (their mean for fixed pools, the pool's head-averaged attention for MAP).
The readout positions, block indices and class ids are read by the model's own helpers
(:mod:`vit_embedding_lens.model.readout`, :mod:`~vit_embedding_lens.model.indices`,
:mod:`~vit_embedding_lens.model.targets`); this module re-exports them under their old names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

from jaxtyping import Float, Int
from torch import Tensor

from vit_embedding_lens.model.indices import resolve_blocks
from vit_embedding_lens.model.layout import TokenLayout
from vit_embedding_lens.model.readout import (
    read_rows,
    readout_hooks,
    readout_positions,
    readout_weights,
)
from vit_embedding_lens.model.targets import ClassSpec, class_targets, predicted_classes

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

__all__ = [
    "ClassSpec",
    "batch_slices",
    "image_layout",
    "read_rows",
    "readout_hooks",
    "readout_positions",
    "readout_weights",
    "resolve_blocks",
    "resolve_classes",
]


def image_layout(model: "HookedViT", images: Tensor) -> TokenLayout:
    """The token layout for this batch (another grid for ``dynamic_img_size`` models)."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [batch, channels, height, width], got {shape}")
    return model.layout_for(images.shape[-2:])


def resolve_classes(
    model: "HookedViT", images: Float[Tensor, "batch chan height width"], classes: ClassSpec = None
) -> Int[Tensor, " batch"]:
    """The class of interest per image: given ids/names (one for all, or one per image), or the
    model's prediction when ``classes`` is None. Pass the labels to explain the true class."""
    if classes is None:
        return predicted_classes(model, images)
    return class_targets(
        model, classes, images.shape[0], what="classes", broadcast=True, device=images.device
    )


def batch_slices(n: int, batch_size: int) -> List[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(n)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
