"""Attention knockout (METHODS §5): remove attention from a set of query tokens to a set of keys.

Two modes:

- ``"pre_softmax"`` (default): the removed scores are masked before the softmax, so each query's
  remaining weights are renormalized. As a context manager it masks the scores of the chosen
  blocks' attention (``Attention.masked_scores``), so the model keeps its fused attention kernel
  (and caching, hooks and token removal all still work); as a hook list it masks
  ``hook_attn_scores`` (explicit path).
- ``"post_softmax"``: the removed weights are zeroed after the softmax and *not* renormalized, as
  the paper's reference code does (a hook on ``hook_pattern``). For the ``self_only`` preset it
  also sets each image token's self-weight to 1, as the reference does (``attn[:, :, t, :] = 0;
  attn[:, :, t, t] = 1``); on image-token rows that equals ``pre_softmax``. Other masks only
  zero.

    with knockout(model, "self_only", blocks=range(3, 6)):
        logits, cache = model.run_with_cache(images)
    hooks = knockout(model, "no_cls", mode="post_softmax").hooks()
    logits = model.run_with_hooks(images, fwd_hooks=hooks)
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import TYPE_CHECKING, Callable, Iterable, List, Literal, Optional, Tuple, Union, cast

import torch
from jaxtyping import Bool
from torch import Tensor

from vit_embedding_lens.interventions.selection import TokenSpec, token_mask
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.model.indices import resolve_blocks, resolve_heads
from vit_embedding_lens.model.layout import TokenLayout

if TYPE_CHECKING:
    from vit_embedding_lens.model.components import Attention
    from vit_embedding_lens.model.hooked_vit import HookedViT

Mode = Literal["pre_softmax", "post_softmax"]
PRESETS = ("self_only", "no_cls")
Blocks = Union[None, int, Iterable[int]]
Heads = Union[None, int, Iterable[int]]


def knockout_mask(
    layout: TokenLayout,
    preset: Optional[str] = None,
    *,
    queries: Optional[TokenSpec] = None,
    keys: Optional[TokenSpec] = None,
    mask: Optional[Tensor] = None,
) -> Bool[Tensor, "pos pos"]:
    """``[query, key]`` mask in layout order, True where attention is *removed*.

    Exactly one of: a ``preset`` (``"self_only"``: image tokens attend only to themselves, prefix
    rows untouched; ``"no_cls"``: image tokens cannot attend to CLS), a pair ``queries``/``keys``
    (token sets; either defaults to all tokens), or a full boolean ``mask`` ``[pos, pos]``.
    """
    given = [preset is not None, queries is not None or keys is not None, mask is not None]
    if sum(given) != 1:
        raise ValueError(
            "give exactly one of: a preset ('self_only', 'no_cls'), queries=/keys= token sets, or "
            "a full [n_tokens, n_tokens] bool mask="
        )
    N = layout.n_tokens
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (N, N):
            raise ValueError(
                f"mask= must be a bool tensor [n_tokens, n_tokens] = [{N}, {N}] (True = remove the "
                f"query->key attention), got {getattr(mask, 'dtype', type(mask))} "
                f"{tuple(getattr(mask, 'shape', ()))}"
            )
        return mask.cpu()
    if preset is not None:
        image = token_mask(layout, "image")
        if preset == "self_only":
            return image[:, None] & ~torch.eye(N, dtype=torch.bool)
        if preset == "no_cls":
            return image[:, None] & token_mask(layout, "cls")[None, :]
        raise ValueError(
            f"unknown knockout preset {preset!r}; use one of {PRESETS} or queries=/keys="
        )
    q = token_mask(layout, "all" if queries is None else queries).cpu()
    k = token_mask(layout, "all" if keys is None else keys).cpu()
    if q.ndim != 1 or k.ndim != 1:
        raise ValueError(
            "knockout takes one token set for the whole batch ([n_tokens]), not one per image"
        )
    return q[:, None] & k[None, :]


class AttentionKnockout:
    """A knockout of attention edges in chosen blocks (and heads): a context manager or a hook list.

    ``removed`` is the ``[query, key]`` mask (True = removed) in layout order; ``blocks`` default to
    all, ``heads`` to all. With token removal (``keep_mask=``) the mask is read at the kept tokens.
    """

    def __init__(
        self,
        model: HookedViT,
        preset: Optional[str] = None,
        *,
        queries: Optional[TokenSpec] = None,
        keys: Optional[TokenSpec] = None,
        mask: Optional[Tensor] = None,
        blocks: Blocks = None,
        heads: Heads = None,
        mode: Mode = "pre_softmax",
    ) -> None:
        if mode not in ("pre_softmax", "post_softmax"):
            raise ValueError(f"mode must be 'pre_softmax' or 'post_softmax', got {mode!r}")
        self.model = model
        self.mode = mode
        self.removed = knockout_mask(model.layout, preset, queries=queries, keys=keys, mask=mask)
        #: ``[N, N]`` True at the weights a post-softmax knockout sets to 1 (the reference's
        #: ``self_only`` rule: an image token's self-weight); None when it only zeroes
        self.set_to_one: Optional[Tensor] = None
        if mode == "post_softmax" and preset == "self_only":
            self.set_to_one = torch.diag(token_mask(model.layout, "image").cpu())
        self.blocks = resolve_blocks(model, blocks, distinct=True, allow_empty=True)
        self.heads = None if heads is None else resolve_heads(model, heads, allow_empty=True)
        allowed = ~self.removed
        if self.heads is not None:
            per_head = torch.ones(model.cfg.n_heads, *allowed.shape, dtype=torch.bool)
            per_head[self.heads] = allowed
            allowed = per_head
        device = model.embed.W_E.device
        if self.set_to_one is not None and self.heads is not None:
            per_head = torch.zeros(model.cfg.n_heads, *self.set_to_one.shape, dtype=torch.bool)
            per_head[self.heads] = self.set_to_one
            self.set_to_one = per_head
        if self.set_to_one is not None:
            self.set_to_one = self.set_to_one.to(device)
        #: True = may attend: ``[pos, pos]``, or ``[head, pos, pos]`` when heads are chosen
        self.allowed: Tensor = allowed.to(device)
        if mode == "pre_softmax" and not bool(allowed.any(-1).all()):
            raise ValueError(
                "this knockout removes every key of some query token, so its softmax is "
                "undefined; keep at least one key per query (e.g. the token itself), or use "
                "mode='post_softmax'"
            )
        #: True when the knockout removes nothing (then it leaves the model untouched)
        self.is_empty = bool(self.allowed.all()) or not self.blocks
        self._stack: Optional[ExitStack] = None

    # -- as hooks ---------------------------------------------------------------------------------
    def hooks(self) -> List[Tuple[str, Callable]]:
        """``(hook name, hook)`` pairs for ``run_with_hooks`` / ``model.hooks``: masked scores
        (``pre_softmax``, explicit attention path) or zeroed pattern weights (``post_softmax``)."""
        if self.is_empty:
            return []
        point = "attn_scores" if self.mode == "pre_softmax" else "pattern"
        hook = self._mask_scores if self.mode == "pre_softmax" else self._zero_pattern
        return [(act_name(point, l), hook) for l in self.blocks]

    def _allowed_for(self, act: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """The allowed mask (or ``mask``, same layout) as ``[batch|1, head|1, query, key]`` for this
        forward's token slots."""
        from vit_embedding_lens.model.components import _mask_at_positions

        positions = self.model.token_positions
        allowed = (self.allowed if mask is None else mask).to(act.device)
        if positions is not None and positions.shape[1] == act.shape[-1]:
            out = _mask_at_positions(allowed, positions)
            if mask is not None:  # padded slots: never set anything there
                out = out & (positions >= 0)[:, None, :, None].to(act.device)
            return out
        if act.shape[-1] != allowed.shape[-1]:
            raise ValueError(
                f"attention over {act.shape[-1]} tokens but the knockout mask is over "
                f"{allowed.shape[-1]}; build the knockout for this model's input size"
            )
        return allowed if allowed.ndim == 3 else allowed[None]

    def _mask_scores(self, scores: Tensor, hook) -> Tensor:
        return scores.masked_fill(~self._allowed_for(scores), float("-inf"))

    def _zero_pattern(self, pattern: Tensor, hook) -> Tensor:
        pattern = pattern * self._allowed_for(pattern).to(pattern.dtype)
        if self.set_to_one is not None:
            pattern = pattern.masked_fill(self._allowed_for(pattern, self.set_to_one), 1.0)
        return pattern

    # -- as a context manager ---------------------------------------------------------------------
    def __enter__(self) -> "AttentionKnockout":
        if self._stack is not None:
            raise RuntimeError("this knockout is already active; make a new one to nest knockouts")
        self._stack = ExitStack()
        if self.is_empty:
            return self  # nothing removed: leave the model's computation untouched
        if self.mode == "post_softmax":
            self._stack.enter_context(self.model.hooks(fwd_hooks=list(self.hooks())))
        else:
            for l in self.blocks:
                attn = cast("Attention", self.model.blocks[l].attn)
                self._stack.enter_context(attn.masked_scores(self.allowed))
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __repr__(self) -> str:
        heads = "all" if self.heads is None else self.heads
        return (
            f"AttentionKnockout({int(self.removed.sum())} query->key edges removed, "
            f"blocks={self.blocks}, heads={heads}, mode={self.mode!r})"
        )


def knockout(
    model: HookedViT,
    preset: Optional[str] = None,
    *,
    queries: Optional[TokenSpec] = None,
    keys: Optional[TokenSpec] = None,
    mask: Optional[Tensor] = None,
    blocks: Blocks = None,
    heads: Heads = None,
    mode: Mode = "pre_softmax",
) -> AttentionKnockout:
    """An :class:`AttentionKnockout`: use it as ``with knockout(...):`` or
    ``knockout(...).hooks()``."""
    return AttentionKnockout(
        model, preset, queries=queries, keys=keys, mask=mask, blocks=blocks, heads=heads, mode=mode
    )
