"""Projection of residual-space vectors onto the class embedding space (METHODS §1).

``p(v) = E · ln_final(v) + b``: the model's own final norm (``fc_norm`` for average-pooling models)
recomputed on ``v`` itself, then the classifier head. The norm's affine weights are folded into the
head once, so a projection is one centring, one scale and one matmul, and it never fires the model's
hook points (it is safe to call inside hooks while caching).

Because centring and the matmul are linear, ``p(v) = q(v) / σ(v) + b'`` with
``q(v) = W (v - mean v)`` linear in ``v``: the streaming analyses use that to project a residual
stream as the running sum of its sublayer write-ins' ``q`` (``unnormalized``), one matmul per
sublayer instead of one per hidden state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, Tuple

import torch
from jaxtyping import Float
from torch import Tensor

# the model's own readout, hook-free (one home: model/readout.py); kept here under its old name
from vit_embedding_lens.model.readout import readout_logits as pooled_readout

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

__all__ = ["ClassProjection", "HeadChoice", "classifier_head", "pooled_readout", "project"]

HeadChoice = Literal["mean", "cls", "dist"]


def classifier_head(
    model: "HookedViT", head: HeadChoice = "mean"
) -> Tuple[Float[Tensor, "d_model class"], Float[Tensor, " class"]]:
    """The classifier's weight and bias (live parameters). Distilled models have two heads:
    ``"mean"`` averages them (timm averages their logits), ``"cls"``/``"dist"`` pick one."""
    cfg = model.cfg
    if not cfg.n_classes:
        raise ValueError(
            f"{cfg.model_name} has no classifier head (num_classes=0): there is no class space to "
            f"project onto; load a checkpoint with a head or create the model with num_classes>0"
        )
    if head not in ("mean", "cls", "dist"):
        raise ValueError(f"head must be 'mean', 'cls' or 'dist', got {head!r}")
    if head == "dist" and not cfg.has_dist_token:
        raise ValueError(f"{cfg.model_name} has no distillation head; use head='mean' or 'cls'")
    weight: Tensor = model.head.W_head  # [d_model, class]
    bias: Tensor = model.head.b_head  # [class]
    if cfg.has_dist_token and head != "cls":
        w_d, b_d = model.head.W_head_dist, model.head.b_head_dist
        weight, bias = ((weight + w_d) / 2, (bias + b_d) / 2) if head == "mean" else (w_d, b_d)
    return weight, bias


class ClassProjection:
    """The class-space readout ``E · ln_final(v) + b`` of a HookedViT, as a hook-free operator.

    ``head`` matters only for distilled models (two heads): ``"mean"`` (default) reads every token
    with the average of the two heads, as timm averages their logits; ``"cls"``/``"dist"`` pick one.
    """

    def __init__(self, model: "HookedViT", head: HeadChoice = "mean") -> None:
        cfg = model.cfg
        classifier_head(model, head)  # validates the model and the choice
        self.n_classes = cfg.n_classes
        self.eps = model.ln_final.eps
        self._model, self._head = model, head
        with torch.no_grad():
            weight, bias = self._folded()
        #: ``[d_model, class]``: the head with the final norm's scale folded in
        self.weight: Float[Tensor, "d_model class"] = weight.detach().clone()
        #: ``[class]``: the head bias plus the final norm's bias through the head
        self.bias: Float[Tensor, " class"] = bias.detach().clone()

    def _folded(self) -> tuple:
        """The head with the final norm's affine folded in, from the live parameters."""
        model = self._model
        weight, bias = classifier_head(model, self._head)
        ln = model.ln_final
        if ln.affine:
            bias = bias + ln.b @ weight
            weight = ln.w[:, None] * weight
        return weight, bias

    def __call__(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... class"]:
        """Class logits of every vector in ``v`` (norm recomputed per vector)."""
        return self.unnormalized(v) / self.scale(v) + self.bias.to(v.dtype)

    def unnormalized(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... class"]:
        """``q(v) = W (v - mean v)``: linear in ``v``, so ``q(a + b) = q(a) + q(b)``."""
        return (v - v.mean(-1, keepdim=True)) @ self.weight.to(v.dtype)

    def scale(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
        """The final norm's scale ``σ(v) = sqrt(var(v) + eps)`` (biased variance, as LayerNorm)."""
        return (v.var(-1, keepdim=True, unbiased=False) + self.eps).sqrt()

    def from_parts(
        self, unnormalized: Float[Tensor, "... class"], scale: Float[Tensor, "... 1"]
    ) -> Float[Tensor, "... class"]:
        """Logits from a (summed) ``unnormalized`` projection and the scale of the summed vector."""
        return unnormalized / scale + self.bias.to(unnormalized.dtype)

    def differentiable(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... class"]:
        """Like ``__call__`` but through the live parameters, so gradients reach the model's weights
        (and ``v``). Used by gradient attributions that differentiate through the readout."""
        weight, bias = self._folded()
        return (v - v.mean(-1, keepdim=True)) / self.scale(v) @ weight.to(v.dtype) + bias.to(
            v.dtype
        )

    def to(
        self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
    ) -> "ClassProjection":
        self.weight = self.weight.to(device=device, dtype=dtype)
        self.bias = self.bias.to(device=device, dtype=dtype)
        return self


def project(
    model: "HookedViT", v: Float[Tensor, "... d_model"], head: HeadChoice = "mean"
) -> Float[Tensor, "... class"]:
    """Project residual-space vectors onto the class space: ``E · ln_final(v) + b`` per vector."""
    return ClassProjection(model, head=head)(v)
