"""Which tokens a model reads its prediction from, and which class an attribution explains.

Every attribution explains the model's readout: the CLS token for ``global_pool='token'`` models,
the mean of the image tokens (plus the prefix tokens when ``pool_include_prefix``) for average
pooling models without a CLS token. Attention maps are read from those query rows (their mean).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from vit_embedding_lens.model.layout import TokenLayout

ClassSpec = Union[None, int, str, Tensor, Sequence[int], Sequence[str]]


def image_layout(model, images: Tensor) -> TokenLayout:
    """The token layout for this batch (another grid for ``dynamic_img_size`` models)."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [batch, channels, height, width], got {shape}")
    return model.layout_for(images.shape[-2:])


def readout_positions(model, layout: TokenLayout) -> List[int]:
    """Sequence positions whose (mean) residual the classifier reads.

    ``global_pool='token'``: the CLS token (distilled models too: the distillation token is not
    used). ``'avg'``: the image tokens, plus the prefix tokens when the model pools them too.
    Max pooling has no linear readout to explain: a ValueError says so.
    """
    cfg = model.cfg
    if cfg.global_pool == "token":
        if layout.cls_index is None:
            raise ValueError(f"{cfg.model_name} pools the CLS token but its layout has none")
        return [layout.cls_index]
    if cfg.global_pool == "avg":
        start = 0 if cfg.pool_include_prefix else layout.n_prefix
        return list(range(start, layout.n_tokens))
    raise ValueError(
        f"{cfg.model_name} uses global_pool={cfg.global_pool!r}: attributions need the CLS token or "
        f"average pooling (a readout that is a mean of tokens); use a model with global_pool='token' or 'avg'"
    )


def resolve_classes(
    model, images: Float[Tensor, "batch chan height width"], classes: ClassSpec = None
) -> Int[Tensor, " batch"]:
    """The class of interest per image: given ids/names (one for all, or one per image), or the
    model's prediction when ``classes`` is None. Pass the labels to explain the true class."""
    batch = images.shape[0]
    if classes is None:
        with torch.no_grad():
            return model(images).argmax(-1)
    if isinstance(classes, (int, str)):
        return torch.full(
            (batch,), model.to_single_token(classes), dtype=torch.long, device=images.device
        )
    if isinstance(classes, Tensor):
        if classes.is_floating_point():
            raise TypeError(
                f"classes must be integer class ids, got dtype {classes.dtype}; use classes.long()"
            )
        ids = classes.to(device=images.device, dtype=torch.long).reshape(-1)
    else:
        ids = torch.tensor(
            [model.to_single_token(c) for c in classes], dtype=torch.long, device=images.device
        )
    if ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        raise ValueError(
            f"got {ids.numel()} classes for {batch} images; give one class, or one per image"
        )
    n_classes = model.cfg.n_classes
    if ((ids < 0) | (ids >= n_classes)).any():
        raise ValueError(f"class ids must be in [0, {n_classes}), got {ids.tolist()[:10]}")
    return ids.clone()


def batch_slices(n: int, batch_size: int) -> List[slice]:
    """Consecutive slices of at most ``batch_size`` covering ``range(n)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def resolve_blocks(model, blocks: Optional[Sequence[int]]) -> List[int]:
    """Block indices (negative ones count from the end); all blocks when None."""
    n = model.cfg.n_layers
    if blocks is None:
        return list(range(n))
    out = []
    for b in blocks:
        if not -n <= int(b) < n:
            raise ValueError(f"block {b} is out of range for a model with {n} blocks")
        out.append(int(b) % n)
    if not out:
        raise ValueError("blocks is empty; give at least one block index (or None for all)")
    return out
