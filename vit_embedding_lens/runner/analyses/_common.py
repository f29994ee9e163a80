"""Small helpers shared by the built-in analyses: class names and the rank of the correct class."""

from __future__ import annotations

from typing import Any, List

from torch import Tensor


def class_names(model: Any) -> List[str]:
    """The model's class names, or the class indices as strings."""
    names = getattr(model, "class_names", None)
    return list(names) if names else [str(i) for i in range(model.cfg.n_classes)]


def correct_class_rank(logits: Tensor, labels: Tensor) -> Tensor:
    """``r = #{k : p_k > p_c}`` (METHODS §2): 0 when the correct class is top-1, ties in its favour.

    ``logits`` is ``[batch, ..., n_classes]``, ``labels`` ``[batch]``.
    """
    target = labels.to(logits.device).reshape(-1, *([1] * (logits.ndim - 1)))
    correct = logits.gather(-1, target.expand(*logits.shape[:-1], 1))
    return (logits > correct).sum(-1)
