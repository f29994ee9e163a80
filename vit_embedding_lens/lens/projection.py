"""Projection of residual-space vectors onto the class embedding space (METHODS §1, §8).

``p(v) = E · ln_final(v) + b``: the model's own final norm (``fc_norm`` for average-pooling models)
recomputed on ``v`` itself, then the classifier head. The norm's affine weights are folded into the
head once, so a projection is one centring, one scale and one matmul, and it never fires the model's
hook points (it is safe to call inside hooks while caching).

Because centring and the matmul are linear, ``p(v) = q(v) / σ(v) + b'`` with
``q(v) = W (v - mean v)`` linear in ``v``: the streaming analyses use that to project a residual
stream as the running sum of its sublayer write-ins' ``q`` (``unnormalized``), one matmul per
sublayer instead of one per hidden state.

Heads that are not linear after the norm (METHODS §8) are read the same way, vector by vector, as
the model reads that vector alone: SigLIP's attention pool over one token (its attention weight
is 1: the value/output path, then ``a + mlp(ln(a))``), the projection to the joint space, and the
cosine zero-shot head (L2 normalization, scale, bias). There ``q(v)`` is the linear part up to the
first nonlinearity (the pool's attention output, or the projected features, times ``σ(v)``), and
:meth:`ClassProjection.finish` applies the rest; ``from_parts`` stays exact for sums of ``q``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
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
    """The classifier's weight and bias (live parameters), as a linear map from the final-normed
    residual to the logits (:attr:`HookedViT.W_U`: through the projection to a joint space, a
    cosine head's scale without its per-image normalization). Distilled models have two heads:
    ``"mean"`` averages them (timm averages their logits), ``"cls"``/``"dist"`` pick one.

    An attention pool (MAP) has no linear readout; its *direct path* stands for it: one token's
    value/output map (its attention weight is 1) and the pool's skip connection, the pool MLP (a
    residual branch) left out. The key-value memories' value projection (no norm, no bias) uses
    it; :class:`ClassProjection` reads vectors through the pool MLP too."""
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
    if cfg.global_pool == "map":
        return _pool_direct_path(model)
    if not cfg.has_dist_token:  # through the projection and scale when there are any
        return model.W_U, model.b_U
    weight: Tensor = model.head.W_head  # [d_model, class]
    bias: Tensor = model.head.b_head  # [class]
    if head != "cls":
        w_d, b_d = model.head.W_head_dist, model.head.b_head_dist
        weight, bias = ((weight + w_d) / 2, (bias + b_d) / 2) if head == "mean" else (w_d, b_d)
    return weight, bias


def _pool_direct_path(model: "HookedViT") -> Tuple[Tensor, Tensor]:
    """An attention pool's value/output map, then the projection and the head (scaled for a
    cosine head, without its normalization): ``[d_model, class]`` and ``[class]``."""
    cfg, pool, head = model.cfg, model.attn_pool, model.head
    w_vo = torch.einsum("hde,hef->df", pool.W_V, pool.W_O)
    b_vo = torch.einsum("he,hef->f", pool.b_V, pool.W_O) + pool.b_O
    after: Tensor = head.W_head
    if cfg.d_embed:
        after = model.proj.W_proj @ after
    if cfg.head_type == "cosine":
        after = after * head.logit_scale
    return w_vo @ after, b_vo @ after + model.b_U


class ClassProjection:
    """The class-space readout of a HookedViT, as a hook-free operator: every vector is read as
    the model reads its pooled vector (``E · ln_final(v) + b`` for a linear head).

    ``head`` matters only for distilled models (two heads): ``"mean"`` (default) reads every token
    with the average of the two heads, as timm averages their logits; ``"cls"``/``"dist"`` pick one.

    ``linear`` is True when the readout after the norm is affine (a linear head, through a
    projection or not); then ``weight``/``bias`` are the folded head ``[d_model, class]``. Otherwise
    (an attention pool, a cosine head) they map to the readout's coordinates before its first
    nonlinearity (``[d_model, d_model]`` for the pool's attention output, ``[d_model, d_features]``
    for a cosine head's features) and :meth:`finish` maps those coordinates to logits.
    """

    def __init__(self, model: "HookedViT", head: HeadChoice = "mean") -> None:
        cfg = model.cfg
        if not cfg.n_classes:
            classifier_head(model, head)  # the clear error for a headless model
        if head not in ("mean", "cls", "dist"):
            raise ValueError(f"head must be 'mean', 'cls' or 'dist', got {head!r}")
        self.n_classes = cfg.n_classes
        self.eps = model.ln_final.eps
        self.linear = cfg.global_pool != "map" and cfg.head_type == "linear"
        self._model, self._head = model, head
        with torch.no_grad():
            weight, bias = self._folded()
        #: ``[d_model, k]``: the readout up to its first nonlinearity, the final norm's scale folded
        #: in (``k`` = classes for a linear head)
        self.weight: Float[Tensor, "d_model k"] = weight.detach().clone()
        #: ``[k]``: the bias of that map (the final norm's bias through it, plus its own)
        self.bias: Float[Tensor, " k"] = bias.detach().clone()
        #: the readout after the first nonlinearity (detached copies), for :meth:`finish`
        self.tail: Dict[str, Tensor] = {}
        if not self.linear:
            self.tail = {k: t.detach().clone() for k, t in self._tail_tensors().items()}
            self._act = model.attn_pool.mlp.act if cfg.global_pool == "map" else None
            self._pool_eps = model.attn_pool.ln.eps if cfg.global_pool == "map" else self.eps

    def _folded(self) -> Tuple[Tensor, Tensor]:
        """The readout's map up to its first nonlinearity with the final norm's affine folded in,
        from the live parameters."""
        model, cfg = self._model, self._model.cfg
        if self.linear:
            weight, bias = classifier_head(model, self._head)
        elif cfg.global_pool == "map":
            pool = model.attn_pool
            weight = torch.einsum("hde,hef->df", pool.W_V, pool.W_O)  # the value/output path
            bias = torch.einsum("he,hef->f", pool.b_V, pool.W_O) + pool.b_O
        elif cfg.d_embed:
            weight = model.proj.W_proj
            bias = model.proj.b_proj if cfg.proj_bias else weight.new_zeros(cfg.d_embed)
        else:
            weight = torch.eye(
                cfg.d_model, dtype=model.embed.W_E.dtype, device=model.embed.W_E.device
            )
            bias = weight.new_zeros(cfg.d_model)
        ln = model.ln_final
        if ln.affine:
            bias = bias + ln.b @ weight
            weight = ln.w[:, None] * weight
        return weight, bias

    def _tail_tensors(self) -> Dict[str, Tensor]:
        """The live parameters the readout applies after its first nonlinearity."""
        model, cfg = self._model, self._model.cfg
        tail: Dict[str, Tensor] = {}
        if cfg.global_pool == "map":
            pool = model.attn_pool
            tail.update(ln_w=pool.ln.w, ln_b=pool.ln.b)
            for name in ("W_in", "b_in", "W_out", "b_out"):
                tail[name] = getattr(pool.mlp, name)
            if cfg.d_embed:
                tail["W_proj"] = model.proj.W_proj
                if cfg.proj_bias:
                    tail["b_proj"] = model.proj.b_proj
        head = model.head
        tail["W_head"] = head.W_head
        if cfg.head_type == "cosine":
            tail.update(logit_scale=head.logit_scale, logit_bias=head.logit_bias)
        else:
            tail["b_head"] = head.b_head
        return tail

    def finish(self, coords: Float[Tensor, "... k"]) -> Float[Tensor, "... class"]:
        """Logits from the readout's coordinates (``unnormalized / scale + bias``): the identity for
        a linear head; the pool's MLP, the projection and the (cosine) head otherwise."""
        return coords if self.linear else self._finish(coords, self.tail)

    def _finish(self, x: Tensor, t: Dict[str, Tensor]) -> Tensor:
        cfg = self._model.cfg
        dtype = x.dtype
        if cfg.global_pool == "map":
            assert self._act is not None
            n = F.layer_norm(
                x, (x.shape[-1],), t["ln_w"].to(dtype), t["ln_b"].to(dtype), self._pool_eps
            )
            hidden = self._act(n @ t["W_in"].to(dtype) + t["b_in"].to(dtype))
            x = x + hidden @ t["W_out"].to(dtype) + t["b_out"].to(dtype)
            if cfg.d_embed:
                x = x @ t["W_proj"].to(dtype)
                if cfg.proj_bias:
                    x = x + t["b_proj"].to(dtype)
        if cfg.head_type == "cosine":
            z = F.normalize(x, dim=-1)
            return t["logit_scale"].to(dtype) * (z @ t["W_head"].to(dtype)) + t["logit_bias"].to(
                dtype
            )
        return x @ t["W_head"].to(dtype) + t["b_head"].to(dtype)

    def __call__(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... class"]:
        """Class logits of every vector in ``v`` (norm recomputed per vector)."""
        return self.finish(self.unnormalized(v) / self.scale(v) + self.bias.to(v.dtype))

    def unnormalized(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... k"]:
        """``q(v) = W (v - mean v)``: linear in ``v``, so ``q(a + b) = q(a) + q(b)``."""
        return (v - v.mean(-1, keepdim=True)) @ self.weight.to(v.dtype)

    def scale(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
        """The final norm's scale ``σ(v) = sqrt(var(v) + eps)`` (biased variance, as LayerNorm)."""
        return (v.var(-1, keepdim=True, unbiased=False) + self.eps).sqrt()

    def from_parts(
        self, unnormalized: Float[Tensor, "... k"], scale: Float[Tensor, "... 1"]
    ) -> Float[Tensor, "... class"]:
        """Logits from a (summed) ``unnormalized`` projection and the scale of the summed vector."""
        return self.finish(unnormalized / scale + self.bias.to(unnormalized.dtype))

    def differentiable(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... class"]:
        """Like ``__call__`` but through the live parameters, so gradients reach the model's weights
        (and ``v``). Used by gradient attributions that differentiate through the readout."""
        weight, bias = self._folded()
        coords = (v - v.mean(-1, keepdim=True)) / self.scale(v) @ weight.to(v.dtype) + bias.to(
            v.dtype
        )
        return coords if self.linear else self._finish(coords, self._tail_tensors())

    def to(
        self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None
    ) -> "ClassProjection":
        self.weight = self.weight.to(device=device, dtype=dtype)
        self.bias = self.bias.to(device=device, dtype=dtype)
        self.tail = {k: t.to(device=device, dtype=dtype) for k, t in self.tail.items()}
        return self


def project(
    model: "HookedViT", v: Float[Tensor, "... d_model"], head: HeadChoice = "mean"
) -> Float[Tensor, "... class"]:
    """Project residual-space vectors onto the class space: ``E · ln_final(v) + b`` per vector."""
    return ClassProjection(model, head=head)(v)
