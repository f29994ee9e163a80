"""Small helpers shared by the built-in analyses: class names."""

from __future__ import annotations

from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


def class_names(model: HookedViT) -> List[str]:
    """The model's class names, or the class indices as strings."""
    names = getattr(model, "class_names", None)
    return list(names) if names else [str(i) for i in range(model.cfg.n_classes)]
