"""Attention rollout (Abnar & Zuidema 2020), a baseline: attention flows through the residual.

Per block: the head-averaged pattern plus the identity (the residual connection), rows
renormalized to sum to one; the blocks' matrices multiplied from the first to the last. The map is
the readout row of the product over the image tokens (for an attention pool: the rows weighted by
the pool's head-averaged attention, the pool being one last attention step without residual).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.attribution.capture import capture
from vit_embedding_lens.attribution.readout import (
    ClassSpec,
    batch_slices,
    image_layout,
    read_rows,
    readout_hooks,
    readout_weights,
    resolve_classes,
)
from vit_embedding_lens.attribution.result import AttributionMap
from vit_embedding_lens.model.hook_names import act_name

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


def attention_rollout(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    classes: ClassSpec = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> AttributionMap:
    """Rollout of the attention from the readout token(s) to every image token (class-agnostic;
    ``classes`` is recorded only, default the prediction)."""
    layout = image_layout(model, images)
    classes = resolve_classes(model, images, classes)
    names = [act_name("pattern", l) for l in range(model.cfg.n_layers)]
    maps = []
    for sl in tqdm(
        batch_slices(images.shape[0], batch_size), desc="attention rollout", disable=not progress
    ):
        with torch.no_grad():
            keep = {n: lambda a: a.mean(1) for n in names}
            _, acts = capture(
                model, images[sl], {**keep, **{n: None for n in readout_hooks(model)}}
            )
        rollout: Optional[Tensor] = None
        for n in names:
            mixed = acts[n] + torch.eye(
                acts[n].shape[-1], dtype=acts[n].dtype, device=acts[n].device
            )
            mixed = mixed / mixed.sum(-1, keepdim=True)
            rollout = mixed if rollout is None else mixed @ rollout
        if rollout is None:
            raise ValueError("attention rollout needs at least one block")
        weights = readout_weights(model, layout, acts)
        maps.append(read_rows(rollout, weights)[:, layout.n_prefix :])
    return AttributionMap(scores=torch.cat(maps), layout=layout, classes=classes, method="rollout")
