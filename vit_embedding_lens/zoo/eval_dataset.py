"""A bundled model's held-out images as a runner data set, with per-token class masks.

``vit_embedding_lens.data`` re-exports :func:`bundled_eval_dataset` (its old address), so this
module imports ``data`` only when it builds a data set: a top-level import would run
``data/__init__`` while this module is half loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from vit_embedding_lens.loading.names import bundled_name
from vit_embedding_lens.zoo.bundled import DEFAULT_BUNDLED, check_subset_size, load_bundled_eval

if TYPE_CHECKING:
    from vit_embedding_lens.data.samples import InMemoryDataset
    from vit_embedding_lens.data.token_labels import Method
    from vit_embedding_lens.model.hooked_vit import HookedViT


def bundled_eval_dataset(
    model: HookedViT,
    n: Optional[int] = None,
    token_labels: Method = "nearest",
    name: Optional[str] = None,
) -> InMemoryDataset:
    """A bundled model's held-out images, their foreground masks (digit strokes, garments) as
    per-token class masks for ``model``. ``n``: that many images, balanced over the classes (image
    0 of every class, then image 1, ...); ids keep each image's index in the shipped set. ``name``:
    the bundled model (default: ``model``'s own when it is a bundled one, else ``mnist-vit``)."""
    from vit_embedding_lens.data.samples import InMemoryDataset

    if name is None:
        name = bundled_name(getattr(model.cfg, "model_name", None)) or DEFAULT_BUNDLED
    data = load_bundled_eval(name)
    pick = torch.arange(len(data))
    check_subset_size(n, len(data), f"{name} eval images")
    if n is not None:
        labels = data.labels
        rank_in_class = torch.empty_like(labels)
        for c in labels.unique():
            members = torch.nonzero(labels == c).flatten()
            rank_in_class[members] = torch.arange(len(members))
        pick = torch.from_numpy(np.lexsort((labels.numpy(), rank_in_class.numpy())))[:n]
    masks = data.class_token_mask(model.layout, method=token_labels)[pick]
    set_name = f"{name.removesuffix('-vit')}-eval"
    ids = [f"{set_name}/{i:04d}" for i in pick.tolist()]
    source = {
        "layout": "bundled",
        "name": set_name,
        "n": n,
        "order": "balanced",
        "token_labels": token_labels,
    }
    return InMemoryDataset(data.images[pick], data.labels[pick], ids, masks, source=source)
