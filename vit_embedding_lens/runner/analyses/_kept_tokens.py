"""Identifiability of the tokens a model saw after token removal, at the last block (METHODS §5):
what the paper reports beside the accuracy for context removal."""

from __future__ import annotations

from typing import Any, Tuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_embedding_lens.model.hook_names import act_name

#: which kept tokens the percentage counts: image tokens only (the library's), or every kept token,
#: prefix tokens included (the reference code's, which ranks the whole last-block sequence)
TOKEN_SETS = ("image", "all")


def prefix_only_allowed(model: Any) -> bool:
    """Whether ``model`` can run on its prefix tokens alone (it reads a prefix token or pools the
    prefix too); a model that pools only image tokens cannot."""
    cfg = model.cfg
    return model.layout.n_prefix > 0 and (cfg.global_pool == "token" or cfg.pool_include_prefix)


@torch.no_grad()
def kept_token_identifiability(
    model: Any,
    images: Float[Tensor, "batch chan height width"],
    labels: Int[Tensor, " batch"],
    keep: Bool[Tensor, "batch pos"],
    tokens: str = "image",
) -> Tuple[Float[Tensor, "batch class"], Float[Tensor, " batch"]]:
    """``(logits, share)``: the model's logits with only ``keep`` tokens, and per image the share of
    its kept tokens (``tokens``: ``"image"`` or ``"all"``) whose label is top-1 in the class-space
    projection of the last block's residual stream (NaN when the image kept none)."""
    from vit_embedding_lens.lens.projection import ClassProjection

    if tokens not in TOKEN_SETS:
        raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")
    last = act_name("resid_post", model.cfg.n_layers - 1)
    logits, cache = model.run_with_cache(images, keep_mask=keep, names_filter=last)
    resid = cache[last]  # [batch, slots, d_model]
    positions = model.token_positions
    if positions is None:
        positions = torch.arange(resid.shape[1], device=resid.device).expand(resid.shape[0], -1)
    positions = positions.to(resid.device)
    scores = ClassProjection(model)(resid)  # [batch, slots, class]
    target = labels.to(resid.device).long()
    correct = scores.gather(-1, target[:, None, None].expand(-1, scores.shape[1], 1))
    top1 = (scores > correct).sum(-1) == 0
    counted = positions >= 0
    if tokens == "image":
        image = model.layout.image_token_mask(resid.device)
        counted = counted & image[positions.clamp(min=0)]
    n = counted.sum(-1)
    share = (top1 & counted).sum(-1).double() / n.clamp(min=1)
    share = torch.where(n > 0, share, torch.full_like(share, float("nan")))
    return logits, share.float().cpu()
