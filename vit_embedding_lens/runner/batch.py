"""Batch: what an analysis receives, one slice of a data set, plus a forward pass shared by analyses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_embedding_lens.data.images import Sample, SkippedImage


@dataclass
class Batch:
    """Images of one batch with their labels, ids and positions in the data set.

    ``token_masks`` is True at image tokens on the object (from segmentation masks), ``None`` when
    the data set has no masks. ``skipped`` lists the items of this batch that could not be loaded
    (they are not in ``images``). ``hook_names`` is the union of the activations the running
    analyses asked for; :meth:`shared_forward` computes them once for all analyses.
    """

    images: Float[Tensor, "batch chan height width"]
    labels: Int[Tensor, " batch"]
    image_ids: List[str]
    indices: Int[Tensor, " batch"]
    token_masks: Optional[Bool[Tensor, "batch n_tokens"]] = None
    skipped: List[SkippedImage] = field(default_factory=list)
    hook_names: Tuple[str, ...] = ()
    #: ``(hook name, function)`` pairs attached during :meth:`shared_forward` (analyses that reduce
    #: activations inside hooks instead of caching them, e.g. the lens)
    forward_hooks: List[Tuple[str, Any]] = field(default_factory=list)
    _forward: Optional[Tuple[Tensor, Any]] = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> "Batch":
        """Images (cast to ``dtype``), labels and masks on ``device``."""
        return Batch(
            images=self.images.to(device=device, dtype=dtype or self.images.dtype),
            labels=self.labels.to(device),
            image_ids=self.image_ids,
            indices=self.indices,
            token_masks=None if self.token_masks is None else self.token_masks.to(device),
            skipped=self.skipped,
            hook_names=self.hook_names,
        )

    def shared_forward(self, model: Any) -> Tuple[Tensor, Any]:
        """``(logits, cache)`` of one ``run_with_cache`` over :attr:`hook_names`, computed on first use
        and shared by every analysis of this batch (no gradients); :attr:`forward_hooks` run during it."""
        if self._forward is None:
            names = list(self.hook_names)
            with torch.no_grad(), model.hooks(fwd_hooks=self.forward_hooks):
                if names:
                    self._forward = model.run_with_cache(self.images, names_filter=names)
                else:
                    self._forward = (model(self.images), None)
        return self._forward

    def release(self) -> None:
        """Drop the shared forward's activations (the runner calls it when the batch is done)."""
        self._forward = None


def collate(items: Sequence[Union[Sample, SkippedImage]]) -> Batch:
    """Samples -> one :class:`Batch`; skipped items are listed apart. Used as a DataLoader collate_fn."""
    samples = [s for s in items if isinstance(s, Sample)]
    skipped = [s for s in items if isinstance(s, SkippedImage)]
    if samples:
        images = torch.stack([s.image for s in samples])
    else:
        images = torch.zeros(0)
    masks = [s.token_mask for s in samples]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        raise ValueError("some samples of a batch have token masks and some do not")
    return Batch(
        images=images,
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        image_ids=[s.image_id for s in samples],
        indices=torch.tensor([s.index for s in samples], dtype=torch.long),
        token_masks=torch.stack(masks) if samples and masks[0] is not None else None,
        skipped=skipped,
    )
