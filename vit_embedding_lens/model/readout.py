"""The model's readout (final norm, pooling, ``fc_norm``, classifier head) for analyses.

Analyses that read a residual stream of any block as the model would (inside hooks, or many times
per forward) need :meth:`HookedViT.readout` with no hook firing (``fire_hooks=False``, one
implementation); :func:`readout_logits` names that, and :func:`readout_positions` says which
tokens the readout reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional

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
            "read it with vit_embedding_lens.lens.pool_decomposition (per-token terms) or "
            "ClassProjection (a token read alone through the pool)"
        )
    raise ValueError(
        f"{cfg.model_name} uses global_pool={cfg.global_pool!r}: attributions need the CLS token "
        f"or average pooling (a readout that is a mean of tokens); use a model with "
        f"global_pool='token' or 'avg'"
    )


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
