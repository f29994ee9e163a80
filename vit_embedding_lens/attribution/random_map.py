"""Random token importance: the chance baseline of the perturbation benchmark."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from vit_embedding_lens.attribution.readout import ClassSpec, image_layout, resolve_classes
from vit_embedding_lens.attribution.result import AttributionMap

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


def random_attribution(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    classes: ClassSpec = None,
    *,
    seed: int = 0,
    progress: bool = True,
) -> AttributionMap:
    """Uniform random scores (a private generator seeded by ``seed``; the global RNG is untouched).
    ``classes`` is recorded only (-1 when not given: the model is not run)."""
    layout = image_layout(model, images)
    batch = images.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    scores = torch.rand(batch, layout.n_patches, generator=gen).to(
        device=images.device, dtype=images.dtype
    )
    if classes is None:
        ids = torch.full((batch,), -1, dtype=torch.long, device=images.device)
    else:
        ids = resolve_classes(model, images, classes)
    return AttributionMap(scores=scores, layout=layout, classes=ids, method="random")
