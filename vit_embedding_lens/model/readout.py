"""The model's readout (final norm, pooling, ``fc_norm``, classifier head) for analyses.

Analyses that read a residual stream of any block as the model would (inside hooks, or many times
per forward) need :meth:`HookedViT.readout` with no hook firing (``fire_hooks=False``, one
implementation); :func:`readout_logits` names that, :func:`readout_positions` says which
tokens the readout reads and :func:`readout_weights` how much each (per image for attention-pool
models, whose readout is the probe's attention-weighted mix of tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Mapping, Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from vit_embedding_lens.model.layout import TokenLayout

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


def readout_logits(
    model: "HookedViT",
    resid: Float[Tensor, "batch pos d_model"],
    valid: Optional[Bool[Tensor, "batch pos"]] = None,
) -> Float[Tensor, "batch class"]:
    """The model's logits for a residual stream (any block's), computed as
    :meth:`HookedViT.readout` does but firing no hook: equals the logits at the last block.
    ``valid`` (False at padded slots after token removal) leaves padding out of the pool."""
    cfg = model.cfg
    if not cfg.n_classes:
        raise ValueError(
            f"{cfg.model_name} has no classifier head (num_classes=0): there are no logits to "
            f"read; load a checkpoint with a head or create the model with num_classes>0"
        )
    return model.readout(resid, valid=valid, fire_hooks=False)


def readout_positions(model: "HookedViT", layout: Optional[TokenLayout] = None) -> List[int]:
    """Sequence positions whose (mean) residual the classifier reads (``layout`` defaults to
    ``model.layout``; pass ``model.layout_for(size)`` for other input sizes).

    ``global_pool='token'``: the CLS token (distilled models too: the distillation token is not
    used). ``'avg'``: the image tokens, plus the prefix tokens when the model pools them too.
    Max pooling has no linear readout to explain: a ValueError says so.
    """
    cfg = model.cfg
    layout = model.layout if layout is None else layout
    if cfg.global_pool == "token":
        if layout.cls_index is None:
            raise ValueError(f"{cfg.model_name} pools the CLS token but its layout has none")
        return [layout.cls_index]
    if cfg.global_pool == "avg":
        start = 0 if cfg.pool_include_prefix else layout.n_prefix
        return list(range(start, layout.n_tokens))
    if cfg.global_pool == "map":
        raise ValueError(
            f"{cfg.model_name} pools with an attention pool (global_pool='map', SigLIP): its "
            "readout is no fixed set of token positions but the probe's attention over the tokens; "
            "use readout_weights (the per-image weight of every position), "
            "vit_embedding_lens.lens.pool_decomposition (per-token terms) or ClassProjection (a "
            "token read alone through the pool)"
        )
    raise ValueError(
        f"{cfg.model_name} uses global_pool={cfg.global_pool!r}: attributions need the CLS token "
        f"or average pooling (a readout that is a mean of tokens); use a model with "
        f"global_pool='token' or 'avg'"
    )


#: the hook point :func:`readout_weights` reads for attention-pool models
POOL_PATTERN = "attn_pool.hook_pattern"


def readout_hooks(model: "HookedViT") -> List[str]:
    """The hook points :func:`readout_weights` needs from a forward pass: the attention pool's
    pattern for ``global_pool='map'`` models, none otherwise."""
    return [POOL_PATTERN] if model.cfg.global_pool == "map" else []


def pooled_positions(model: "HookedViT", layout: Optional[TokenLayout] = None) -> List[int]:
    """Positions whose residual can enter the readout: :func:`readout_positions`, or for an
    attention pool the tokens it attends over (the image tokens, plus the prefix tokens when
    ``pool_include_prefix``)."""
    layout = model.layout if layout is None else layout
    if model.cfg.global_pool == "map":
        start = 0 if model.cfg.pool_include_prefix else layout.n_prefix
        return list(range(start, layout.n_tokens))
    return readout_positions(model, layout)


def readout_weights(
    model: "HookedViT",
    layout: Optional[TokenLayout] = None,
    acts: Optional[Mapping[str, Tensor]] = None,
) -> Float[Tensor, "batch pos"]:
    """Weight of every sequence position in the vector the classifier reads, rows summing to 1:
    one-hot on the CLS token, uniform over the pooled tokens (average pooling), or the attention
    pool's pattern averaged over heads (``global_pool='map'``; per image, read from
    ``acts[POOL_PATTERN]``, e.g. a cache with the hook points of :func:`readout_hooks`).

    The readout of an activation ``x [batch, pos, ...]`` is ``sum_pos weights * x``: the mean over
    :func:`readout_positions` for fixed pools, the probe's mix of tokens for an attention pool
    (exact for the pattern's value path, head-averaged). Fixed pools give a batch of 1.
    """
    layout = model.layout if layout is None else layout
    positions = pooled_positions(model, layout)
    if model.cfg.global_pool != "map":
        weights = torch.zeros(1, layout.n_tokens)
        weights[:, positions] = 1.0 / len(positions)
        return weights
    if acts is None or POOL_PATTERN not in acts:
        raise ValueError(
            f"{model.cfg.model_name} pools with an attention pool: its readout weights are the "
            f"pool's attention per image; pass acts with {POOL_PATTERN!r} (readout_hooks(model))"
        )
    pattern = acts[POOL_PATTERN]  # [batch, head, 1, pooled]
    if pattern.shape[-1] != len(positions):
        raise ValueError(
            f"the pool pattern attends over {pattern.shape[-1]} tokens, the layout pools "
            f"{len(positions)}; pass the layout of the images the pattern was computed on"
        )
    head_mean = pattern[:, :, 0].mean(1)
    weights = head_mean.new_zeros(head_mean.shape[0], layout.n_tokens)
    weights[:, positions] = head_mean
    return weights


def read_rows(
    x: Float[Tensor, "batch pos ..."], weights: Float[Tensor, "batch pos"]
) -> Float[Tensor, "batch ..."]:
    """``sum_pos weights * x``: the readout row of a per-position quantity (a relevance or
    attention matrix, a write-in), e.g. ``x[:, cls]`` for a CLS model."""
    weights = weights.to(device=x.device, dtype=x.dtype)
    return torch.einsum("bp,bp...->b...", weights.expand(x.shape[0], -1), x)


def readout_vector(
    model: "HookedViT",
    resid: Float[Tensor, "batch pos d_model"],
    layout: Optional[TokenLayout] = None,
    dtype: Optional[torch.dtype] = None,
) -> Float[Tensor, "batch d_model"]:
    """The residual-space vector the classifier reads: the mean of ``resid`` over
    :func:`readout_positions` (the CLS token, or the pooled tokens), taken in ``dtype`` (default:
    ``resid``'s). Lenses read it through their readout as the model reads its pooled vector."""
    positions = readout_positions(model, layout)
    return resid[:, positions].to(dtype or resid.dtype).mean(1)
