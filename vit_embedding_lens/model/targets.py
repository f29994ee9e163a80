"""The class of interest per image, as a ``[batch]`` tensor of class ids: one reader for every
analysis that takes labels, targets or classes (ids, names, tensors, or the model's prediction)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: one class for all images or one per image: ids, names (``model.class_names``) or a tensor
ClassSpec = Union[None, int, str, Tensor, Sequence[int], Sequence[str]]


class TargetTypeError(TypeError, ValueError):
    """Class ids of the wrong type or shape (a ``TypeError`` and a ``ValueError`` both)."""


def check_class_ids(ids: Tensor, n_classes: int, what: str = "class ids") -> None:
    """Refuse ids outside ``[0, n_classes)`` with an error that gives the range seen."""
    if ids.numel() and bool(((ids < 0) | (ids >= n_classes)).any()):
        raise ValueError(
            f"{what} out of range: each must lie in [0, {n_classes}), "
            f"got {ids.min().item()}..{ids.max().item()}"
        )


def predicted_classes(
    model: "HookedViT",
    images: Float[Tensor, "batch chan height width"],
    batch_size: Optional[int] = None,
) -> Int[Tensor, " batch"]:
    """The model's top-1 class per image (no gradients), ``batch_size`` images per forward."""
    step = batch_size or max(images.shape[0], 1)
    with torch.no_grad():
        parts = [model(images[i : i + step]).argmax(-1) for i in range(0, images.shape[0], step)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=images.device)


def class_targets(
    model: "HookedViT",
    classes: Any,
    batch: int,
    *,
    what: str = "classes",
    broadcast: bool = False,
    device: Optional[torch.device] = None,
) -> Int[Tensor, " batch"]:
    """Class ids ``[batch]`` (int64) from ids, class names, a list or an integer tensor.

    ``broadcast``: one class (an id, a name, or a one-element tensor) stands for every image;
    otherwise exactly one per image is required. Names are read with ``model.to_single_token``.
    ``what`` names the argument in errors (``"labels"``, ``"targets"``, ``"classes"``).
    """
    if isinstance(classes, str) or (
        isinstance(classes, (list, tuple)) and any(isinstance(c, str) for c in classes)
    ):
        names = [classes] if isinstance(classes, str) else classes
        classes = [model.to_single_token(c) for c in names]
    ids = torch.as_tensor(classes, device=device)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TargetTypeError(
            f"{what} must be integer class ids, got dtype {ids.dtype}; use {what}.long()"
        )
    if ids.ndim > 1:
        raise TargetTypeError(
            f"{what} must be one class id per image, a [batch] tensor, got shape {tuple(ids.shape)}"
        )
    ids = ids.reshape(-1).long()
    if broadcast and ids.numel() == 1:
        ids = ids.expand(batch)
    if ids.numel() != batch:
        one_for_all = ", or one for all" if broadcast else ""
        raise ValueError(
            f"{ids.numel()} {what} for {batch} images: {what} for a batch must be one per "
            f"image{one_for_all}"
        )
    check_class_ids(ids, model.cfg.n_classes, what)
    return ids.clone()


def class_names_or_ids(names: Optional[Sequence[str]], n_classes: int) -> List[str]:
    """The class names for tables and labels, or the ids as strings for models without names."""
    return list(names) if names else [str(c) for c in range(n_classes)]
