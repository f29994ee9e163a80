"""The paper's attribution: gradients of class-space losses w.r.t. attention weights (METHODS §6).

For block ``l``, the readout token's attention write-in (``blocks.l.hook_attn_out`` at the CLS
position) is projected onto the class space with :class:`ClassProjection`, a loss of the class of
interest is taken, and ``-∂loss_l/∂A^l`` with respect to that block's post-softmax attention
weights is kept: the readout query row, over image-token keys. The map sums this over heads and
blocks. Each block's loss is differentiated only w.r.t. its own block's pattern, never through later
blocks: the write-in is rebuilt from the cached pattern rows and values (``z = A v``, then ``W_O``,
``b_O`` and, for residual post-norm blocks, ``ln1``), all blocks in one small graph, one backward.

Models without a CLS token (average pooling): the readout is the mean of the image tokens'
write-ins (the pooled readout of ``attn_out``) and the map is the mean over those query rows.
Attention-pool (MAP, SigLIP) models: the readout is the write-ins mixed by the pool's head-averaged
attention (:func:`~vit_embedding_lens.model.readout.readout_weights`), and the map is the rows'
gradients mixed by the same weights (the mean, for average pooling). Every query row is kept then:
lower ``batch_size`` for large MAP models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Literal, Optional, Sequence, cast

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.attribution.capture import capture
from vit_embedding_lens.attribution.readout import (
    ClassSpec,
    batch_slices,
    image_layout,
    readout_hooks,
    readout_weights,
    resolve_blocks,
    resolve_classes,
)
from vit_embedding_lens.attribution.result import AttributionMap
from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.model.readout import pooled_positions

if TYPE_CHECKING:
    from vit_embedding_lens.model.components import Attention
    from vit_embedding_lens.model.hooked_vit import HookedViT
    from vit_embedding_lens.model.layout import TokenLayout

Loss = Literal["cross_entropy", "double_softmax"]


def class_space_loss(
    logits: Float[Tensor, "... class"], classes: Int[Tensor, "..."], loss: Loss
) -> Tensor:
    """Per-vector loss of the class of interest: cross-entropy on the projected logits, or
    (``"double_softmax"``, the reference code) cross-entropy applied to their softmax."""
    if loss == "cross_entropy":
        inputs = logits
    elif loss == "double_softmax":
        inputs = logits.softmax(-1)
    else:
        raise ValueError(f"loss must be 'cross_entropy' or 'double_softmax', got {loss!r}")
    flat = inputs.reshape(-1, inputs.shape[-1])
    return F.cross_entropy(flat, classes.reshape(-1), reduction="none").reshape(classes.shape)


def class_space_attribution(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    classes: ClassSpec = None,
    *,
    loss: Loss = "cross_entropy",
    blocks: Optional[Sequence[int]] = None,
    per_head: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> AttributionMap:
    """The paper's map: ``sum_{l, h} -∂loss_l/∂A^l_h[readout, image tokens]``.

    ``classes``: the class to explain (an id or name for all images, or one per image; default the
    prediction; pass the labels to explain the true class). ``loss``: ``"cross_entropy"`` on the
    projected logits (default) or ``"double_softmax"`` as the reference code. ``blocks``: which
    blocks to sum (default all). Per-block maps are always kept; per-head maps with ``per_head``.
    """
    class_space_loss(
        torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), loss
    )  # validates ``loss``
    layout = image_layout(model, images)
    rows = pooled_positions(model, layout)
    blocks = resolve_blocks(model, blocks)
    classes = resolve_classes(model, images, classes)
    projection = ClassProjection(model)
    block_maps, head_maps = [], []
    for sl in tqdm(
        batch_slices(images.shape[0], batch_size),
        desc="class-space attribution",
        disable=not progress,
    ):
        heads = _block_head_maps(
            model, images[sl], classes[sl], blocks, rows, layout, projection, loss
        )
        heads = heads[..., layout.n_prefix :]  # keys: image tokens
        block_maps.append(heads.sum(2))
        if per_head:
            head_maps.append(heads)
    per_block = torch.cat(block_maps)
    return AttributionMap(
        scores=per_block.sum(1),
        layout=layout,
        classes=classes,
        method="class_space" if loss == "cross_entropy" else "class_space_double_softmax",
        per_block=per_block,
        per_head=torch.cat(head_maps) if per_head else None,
        blocks=tuple(blocks),
    )


def _block_head_maps(
    model: HookedViT,
    images: Tensor,
    classes: Tensor,
    blocks: Sequence[int],
    rows: Sequence[int],
    layout: TokenLayout,
    projection,
    loss: Loss,
) -> Float[Tensor, "batch block head pos"]:
    """``-∂loss_l/∂A^l`` mixed over the query rows ``rows`` by the readout weights (their mean for
    fixed pools), for every block and head."""
    keep: Dict[str, Optional[Callable[[Tensor], Tensor]]] = {}
    for l in blocks:
        keep[act_name("pattern", l)] = lambda a: a[:, :, rows]  # [B, H, R, N]
        keep[act_name("v", l)] = None  # [B, N, H, dh]
    keep.update({n: None for n in readout_hooks(model)})
    with torch.no_grad():
        _, acts = capture(model, images, keep)
    weights = readout_weights(model, layout, acts)[:, rows].to(images.device)  # [B or 1, R]
    with torch.enable_grad():
        pattern = torch.stack([acts[act_name("pattern", l)] for l in blocks]).requires_grad_(
            True
        )  # [L,B,H,R,N]
        v = torch.stack([acts[act_name("v", l)] for l in blocks])  # [L, B, N, H, dh]
        z = einops.einsum(pattern, v, "l b h r n, l b n h e -> l b r h e")
        attns = [cast("Attention", model.blocks[l].attn) for l in blocks]
        w_o = torch.stack([a.W_O for a in attns]).detach()  # [L, H, dh, d]
        b_o = torch.stack([a.b_O for a in attns]).detach()  # [L, d]
        write = einops.einsum(z, w_o, "l b r h e, l h e d -> l b r d") + b_o[:, None, None]
        if model.cfg.block_norm == "post":
            write = torch.stack([_ln1(model.blocks[l].ln1, w) for l, w in zip(blocks, write)])
        readout = einsum_rows(write, weights.to(write.dtype), "l b r d", "l b d")
        logits = projection.differentiable(readout)  # [L, B, C]
        losses = class_space_loss(logits, classes.expand(len(blocks), -1), loss)
        (grad,) = torch.autograd.grad(losses.sum(), pattern)
    return -einsum_rows(grad, weights.to(grad.dtype), "l b h r n", "b l h n")


def einsum_rows(x: Tensor, weights: Float[Tensor, "batch row"], dims: str, out: str) -> Tensor:
    """``x`` mixed over its ``r`` (query row) axis by per-image ``weights`` (broadcast from 1)."""
    weights = weights.expand(x.shape[dims.split().index("b")], -1)
    return einops.einsum(x, weights, f"{dims}, b r -> {out}")


def _ln1(norm, x: Tensor) -> Tensor:
    """A block's ``ln1`` without firing its hook points (post-norm write-ins)."""
    w = norm.w.detach() if norm.affine else None
    b = norm.b.detach() if norm.affine else None
    return F.layer_norm(x, (norm.d,), w, b, norm.eps)
