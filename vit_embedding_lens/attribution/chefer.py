"""Chefer et al. 2021 gradient-weighted attention relevance (baseline, METHODS §6).

``R = I``; for every block in order, ``R += mean_h(clamp(∇A ⊙ A, min=0)) @ R``, with ``∇A`` the
gradient of the class-of-interest logit w.r.t. that block's post-softmax attention (through the
whole model). The map is the readout row of ``R`` over the image tokens (for an attention pool:
the rows weighted by the pool's head-averaged attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def chefer_relevance(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    classes: ClassSpec = None,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> AttributionMap:
    """Gradient-weighted relevance of every image token for ``classes`` (default: prediction)."""
    layout = image_layout(model, images)
    classes = resolve_classes(model, images, classes)
    names = [act_name("pattern", l) for l in range(model.cfg.n_layers)]
    maps = []
    for sl in tqdm(
        batch_slices(images.shape[0], batch_size), desc="Chefer relevance", disable=not progress
    ):
        with torch.enable_grad():
            x = images[sl].detach().requires_grad_(True)  # a graph even when the weights are frozen
            keep = {n: None for n in [*names, *readout_hooks(model)]}
            logits, acts = capture(model, x, keep, detach=False)
            chosen = logits.gather(1, classes[sl, None]).sum()
            patterns = [acts[n] for n in names]
            grads = torch.autograd.grad(chosen, patterns)
        relevance = _propagate([a.detach() for a in patterns], grads)
        weights = readout_weights(model, layout, {k: a.detach() for k, a in acts.items()})
        maps.append(read_rows(relevance, weights)[:, layout.n_prefix :])
    return AttributionMap(scores=torch.cat(maps), layout=layout, classes=classes, method="chefer")


def _propagate(patterns, grads) -> Float[Tensor, "batch pos pos"]:
    """``R = I; R += mean_h(clamp(∇A ⊙ A, 0)) @ R`` through the blocks."""
    a0 = patterns[0]
    relevance = torch.eye(a0.shape[-1], dtype=a0.dtype, device=a0.device).expand(
        a0.shape[0], -1, -1
    )
    for a, g in zip(patterns, grads):
        cam = (g * a).clamp(min=0).mean(1)
        relevance = relevance + cam @ relevance
    return relevance
