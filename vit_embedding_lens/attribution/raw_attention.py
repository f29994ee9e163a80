"""Raw attention of one block (default the last), a baseline: the readout query row (the rows
weighted by :func:`~vit_embedding_lens.model.readout.readout_weights`), mean over heads."""

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
from vit_embedding_lens.model.indices import resolve_block

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


def raw_attention(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    classes: ClassSpec = None,
    *,
    block: int = -1,
    batch_size: int = 64,
    progress: bool = True,
) -> AttributionMap:
    """Attention weights from the readout token(s) to the image tokens in ``block`` (class-agnostic;
    ``classes`` is recorded only, default the prediction)."""
    layout = image_layout(model, images)
    block = resolve_block(model, block)
    classes = resolve_classes(model, images, classes)
    name = act_name("pattern", block)
    maps = []
    for sl in tqdm(
        batch_slices(images.shape[0], batch_size), desc="raw attention", disable=not progress
    ):
        with torch.no_grad():
            keep = {name: lambda a: a.mean(1), **{n: None for n in readout_hooks(model)}}
            _, acts = capture(model, images[sl], keep)
        weights = readout_weights(model, layout, acts)
        maps.append(read_rows(acts[name], weights)[:, layout.n_prefix :])
    return AttributionMap(
        scores=torch.cat(maps), layout=layout, classes=classes, method="raw_attention"
    )
