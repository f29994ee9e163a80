"""Per-token class predictions across blocks: the input of the logit-lens views.

Every token of a cached residual stream (``blocks.{l}.hook_resid_post`` by default) is read as class
logits with :class:`~vit_embedding_lens.lens.ClassProjection` (``E · ln_final(v) + b``, METHODS §1);
what is kept is small: the top-k classes and their probabilities, and, given targets, the target
class's probability and rank (``r = #{k : p_k > p_c}``), per image, block and token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

SUBLAYER_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)


#: the display name of each kind of position (:meth:`TokenLayout.token_kinds`)
_TYPE_NAMES = {"cls": "CLS", "dist": "DIST", "register": "REG", "image": "image"}


def token_types(layout: Any) -> List[str]:
    """``"CLS"``, ``"DIST"``, ``"REG"`` or ``"image"`` per sequence position."""
    return [_TYPE_NAMES[kind] for kind in layout.token_kinds()]


@dataclass
class TokenClassPredictions:
    """Top-k classes per image, block and token (from :func:`token_class_predictions`)."""

    topk_classes: Int[Tensor, "batch block pos k"]
    topk_probs: Float[Tensor, "batch block pos k"]
    blocks: List[int]
    layout: Any
    hook: str
    class_names: Optional[List[str]] = None
    targets: Optional[Int[Tensor, " batch"]] = None
    #: probability of each image's target class ``[batch, block, pos]`` (None without targets)
    target_probs: Optional[Float[Tensor, "batch block pos"]] = None
    #: 0-based rank of the target class (0 = top-1) ``[batch, block, pos]`` (None without targets)
    target_ranks: Optional[Int[Tensor, "batch block pos"]] = None

    @property
    def top1(self) -> Int[Tensor, "batch block pos"]:
        return self.topk_classes[..., 0]

    @property
    def token_labels(self) -> List[str]:
        return self.layout.token_labels()

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names is not None else str(index)

    def grid(self, what: str = "top1", image_index: int = 0) -> Tensor:
        """``[n_blocks, grid_h, grid_w]`` of ``"top1"``, ``"top1_prob"``, ``"target_prob"`` or
        ``"target_rank"`` for one image (image tokens only), ready for ``plot_token_grid``."""
        sources = {
            "top1": self.top1,
            "top1_prob": self.topk_probs[..., 0],
            "target_prob": self.target_probs,
            "target_rank": self.target_ranks,
        }
        if what not in sources:
            raise ValueError(f"what must be one of {sorted(sources)}, got {what!r}")
        values = sources[what]
        if values is None:
            raise ValueError(
                f"{what!r} needs targets: call token_class_predictions(..., targets=labels)"
            )
        if not 0 <= image_index < values.shape[0]:
            raise IndexError(
                f"image_index {image_index} out of range for a batch of {values.shape[0]}"
            )
        return self.layout.to_grid(values[image_index])

    def to_frame(self) -> pd.DataFrame:
        """Tidy table, one row per (image, block, token, k): ``image, block, position, token,
        token_type, k, class, class_name, prob`` (+ ``target, target_prob, target_rank``)."""
        b, n_blocks, n, k = self.topk_classes.shape
        idx = np.stack(
            np.meshgrid(
                np.arange(b), np.arange(n_blocks), np.arange(n), np.arange(k), indexing="ij"
            ),
            -1,
        )
        idx = idx.reshape(-1, 4)
        labels, types = np.asarray(self.token_labels), np.asarray(token_types(self.layout))
        classes = self.topk_classes.reshape(-1).cpu().numpy()
        frame = pd.DataFrame(
            {
                "image": idx[:, 0],
                "block": np.asarray(self.blocks)[idx[:, 1]],
                "position": idx[:, 2],
                "token": labels[idx[:, 2]],
                "token_type": types[idx[:, 2]],
                "k": idx[:, 3],
                "class": classes,
                "class_name": [self.class_name(int(c)) for c in classes],
                "prob": self.topk_probs.reshape(-1).cpu().double().numpy(),
            }
        )
        if self.targets is not None:
            per_token = (idx[:, 0], idx[:, 1], idx[:, 2])
            frame["target"] = self.targets.cpu().numpy()[idx[:, 0]]
            frame["target_prob"] = self.target_probs.cpu().double().numpy()[per_token]
            frame["target_rank"] = self.target_ranks.cpu().numpy()[per_token]
        return frame


def token_class_predictions(
    model: Any,
    cache: Union[Mapping[str, Tensor], Tensor],
    k: int = 5,
    *,
    targets: Optional[Union[int, Sequence[int], Tensor]] = None,
    hook: str = "hook_resid_post",
    blocks: Optional[Sequence[int]] = None,
    layout: Any = None,
) -> TokenClassPredictions:
    """Top-k classes of every token after every block, read through the class-embedding projection.

    ``cache``: an activation cache holding ``blocks.{l}.{hook}`` for the requested blocks (e.g. from
    ``model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_resid_post"))``), or a
    batch of images, which is then run with exactly that filter. ``hook`` is one of
    ``hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out`` (sublayer write-ins are
    normalized on their own, METHODS §1). ``targets`` (one class per image, or one for all) adds the
    target probability and rank. ``layout`` defaults to ``model.layout``.
    """
    from vit_embedding_lens.lens.projection import ClassProjection

    if hook not in SUBLAYER_HOOKS:
        raise ValueError(f"hook must be one of {SUBLAYER_HOOKS}, got {hook!r}")
    n_layers = model.cfg.n_layers
    blocks = list(range(n_layers)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in blocks if not 0 <= b < n_layers]
    if bad or not blocks:
        raise ValueError(f"blocks {bad or blocks} out of range for a model with {n_layers} blocks")
    names = [f"blocks.{b}.{hook}" for b in blocks]
    if isinstance(cache, Tensor):
        with torch.no_grad():
            _, cache = model.run_with_cache(cache, names_filter=names)
    missing = [n for n in names if n not in cache]
    if missing:
        raise ValueError(
            f"the cache has no {missing[:3]}{'...' if len(missing) > 3 else ''}; run the model with "
            f"names_filter=lambda n: n.endswith({hook!r}) (or pass the images instead of a cache)"
        )
    layout = layout if layout is not None else model.layout
    n_classes = model.cfg.n_classes
    if not 1 <= k <= n_classes:
        raise ValueError(f"k must be between 1 and the number of classes ({n_classes}), got {k}")
    projection = ClassProjection(model)
    top_c, top_p, t_prob, t_rank = [], [], [], []
    target_tensor = None
    for name in names:
        resid = cache[name]
        resid = resid[None] if resid.ndim == 2 else resid  # caches made with remove_batch_dim=True
        if resid.shape[1] != layout.n_tokens:
            raise ValueError(
                f"{name} has {resid.shape[1]} tokens, the layout {layout.n_tokens}; pass "
                f"layout=model.layout_for(image_size) for images of another size"
            )
        with torch.no_grad():
            logits = projection(resid.detach())  # [B, N, C]
        probs = logits.float().softmax(-1)
        values, classes = probs.topk(k, dim=-1)
        top_c.append(classes)
        top_p.append(values)
        if targets is not None:
            if target_tensor is None:
                target_tensor = _targets(targets, resid.shape[0], n_classes, probs.device)
            index = target_tensor[:, None, None].expand(-1, probs.shape[1], 1)  # [B, N, 1]
            t_prob.append(probs.gather(-1, index)[..., 0])
            t_rank.append(
                (logits > logits.gather(-1, index)).sum(-1)
            )  # ranks on logits, not rounded probs
    stack = lambda xs: torch.stack(xs, dim=1) if xs else None  # noqa: E731  [B, blocks, ...]
    return TokenClassPredictions(
        topk_classes=stack(top_c),
        topk_probs=stack(top_p),
        blocks=blocks,
        layout=layout,
        hook=hook,
        class_names=list(model.class_names) if getattr(model, "class_names", None) else None,
        targets=target_tensor,
        target_probs=stack(t_prob),
        target_ranks=stack(t_rank),
    )


def _targets(targets: Any, batch: int, n_classes: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(targets, device=device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{t.numel()} targets for a batch of {batch} images")
    if ((t < 0) | (t >= n_classes)).any():
        raise ValueError(f"targets must be class indices in [0, {n_classes})")
    return t.clone()
