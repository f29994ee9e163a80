"""Closed-form ridge regression with an intercept, batched over many independent problems.

Matches scikit-learn's ``Ridge(alpha, fit_intercept=True)``: centre ``x`` and ``y``, solve
``(XᵀX + αI) W = Xᵀ Y`` (or, with fewer samples than features, the equivalent dual
``W = Xᵀ (XXᵀ + αI)⁻¹ Y``), intercept ``ȳ - x̄ W``. Solved in float64, returned in ``x``'s dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor


class RidgeFit(NamedTuple):
    weight: Float[Tensor, "... d n_out"]
    bias: Float[Tensor, "... n_out"]


def fit_ridge(
    x: Float[Tensor, "... n d"], y: Float[Tensor, "... n n_out"], alpha: float = 1.0
) -> RidgeFit:
    """Ridge regression of ``y`` on ``x`` (leading dimensions are independent problems)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if x.ndim < 2 or y.ndim != x.ndim or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"x [..., n, d] and y [..., n, n_out] must share [..., n]; got {tuple(x.shape)}, "
            f"{tuple(y.shape)}"
        )
    dtype = x.dtype
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(-2, keepdim=True), y.mean(-2, keepdim=True)
    xc, yc = x - x_mean, y - y_mean
    n, d = x.shape[-2:]
    if d <= n:
        gram = xc.transpose(-1, -2) @ xc + alpha * torch.eye(d, dtype=x.dtype, device=x.device)
        weight = torch.linalg.solve(gram, xc.transpose(-1, -2) @ yc)
    else:
        kernel = xc @ xc.transpose(-1, -2) + alpha * torch.eye(n, dtype=x.dtype, device=x.device)
        weight = xc.transpose(-1, -2) @ torch.linalg.solve(kernel, yc)
    bias = (y_mean - x_mean @ weight).squeeze(-2)
    return RidgeFit(weight.to(dtype), bias.to(dtype))


def one_vs_all_targets(labels: Int[Tensor, " n"], n_classes: int) -> Float[Tensor, "n class"]:
    """``+1`` for the image's class, ``-1`` for every other class."""
    if labels.ndim != 1:
        raise ValueError(
            f"labels must be a 1-D tensor of class ids, got shape {tuple(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels must be in [0, {n_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    return torch.nn.functional.one_hot(labels.long(), n_classes).float() * 2 - 1
