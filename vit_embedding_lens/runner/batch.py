"""Batch: what an analysis receives, one slice of a data set, plus a forward pass shared by
analyses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_embedding_lens.data.samples import NOT_FINITE_REASON, Sample, SkippedImage

if TYPE_CHECKING:
    from vit_embedding_lens.model.cache import ViTActivationCache
    from vit_embedding_lens.model.hooked_vit import HookedViT
    from vit_embedding_lens.runner.analysis import ForwardReader


class SharedForward:
    """The one forward pass (no gradients) that the analyses of a batch share, run on first use.

    It caches the activations in ``hook_names`` (one ``run_with_cache``) and attaches the hooks of
    every reader in ``readers`` (analysis name ->
    :class:`~vit_embedding_lens.runner.analysis.ForwardReader`). The runner builds one per batch
    from what the analyses declare.
    """

    def __init__(
        self,
        hook_names: Sequence[str] = (),
        readers: Optional[Mapping[str, ForwardReader]] = None,
    ) -> None:
        self.hook_names: Tuple[str, ...] = tuple(hook_names)
        self.readers: Dict[str, ForwardReader] = dict(readers or {})
        self._outputs: Optional[Tuple[Tensor, Optional[ViTActivationCache]]] = None

    def outputs(
        self, model: HookedViT, images: Tensor
    ) -> Tuple[Tensor, Optional[ViTActivationCache]]:
        """``(logits, cache)``; the cache is None when no analysis asked for activations."""
        if self._outputs is None:
            hooks: List[Tuple[Union[str, Callable], Callable]] = [
                hook for reader in self.readers.values() for hook in reader.hooks()
            ]
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                if self.hook_names:
                    names = list(self.hook_names)
                    self._outputs = model.run_with_cache(images, names_filter=names)
                else:
                    self._outputs = (model(images), None)
        return self._outputs

    def release(self) -> None:
        """Drop the logits and activations (the readers keep what they read)."""
        self._outputs = None


@dataclass(frozen=True, eq=False)
class Batch:
    """Images of one batch with their labels, ids and positions in the data set.

    ``token_masks`` is True at image tokens on the object (from segmentation masks), ``None`` when
    the data set has no masks. ``skipped`` lists the items of this batch that could not be loaded
    (they are not in ``images``). ``forward`` is the batch's :class:`SharedForward` (the runner's
    holds what the running analyses declared; a batch built by hand gets a plain forward pass).
    """

    images: Float[Tensor, "batch chan height width"]
    labels: Int[Tensor, " batch"]
    image_ids: List[str]
    indices: Int[Tensor, " batch"]
    token_masks: Optional[Bool[Tensor, "batch pos"]] = None
    skipped: List[SkippedImage] = field(default_factory=list)
    #: per image, how its file was decoded when not plainly ("" when plainly; see Sample)
    conversions: List[str] = field(default_factory=list)
    forward: SharedForward = field(default_factory=SharedForward, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> Batch:
        """Images (cast to ``dtype``), labels and masks on ``device``, with a fresh forward pass."""
        return Batch(
            images=self.images.to(device=device, dtype=dtype or self.images.dtype),
            labels=self.labels.to(device),
            image_ids=self.image_ids,
            indices=self.indices,
            token_masks=None if self.token_masks is None else self.token_masks.to(device),
            skipped=self.skipped,
            conversions=self.conversions,
        )

    def with_forward(self, forward: SharedForward) -> Batch:
        """The same batch with ``forward`` as its shared forward pass."""
        return dataclasses.replace(self, forward=forward)

    def shared_forward(self, model: HookedViT) -> Tuple[Tensor, Optional[ViTActivationCache]]:
        """``(logits, cache)`` of the shared forward pass, computed on first use."""
        return self.forward.outputs(model, self.images)

    def reader(self, model: HookedViT, analysis: str) -> Optional[ForwardReader]:
        """The reader ``analysis`` declared for this batch, after the shared forward pass it reads
        (None when it has none, e.g. in a batch built by hand)."""
        reader = self.forward.readers.get(analysis)
        if reader is not None:
            self.forward.outputs(model, self.images)
        return reader

    def release(self) -> None:
        """Drop the shared forward's activations (the runner calls it when the batch is done)."""
        self.forward.release()


def collate(items: Sequence[Union[Sample, SkippedImage]]) -> Batch:
    """Samples -> one :class:`Batch`; skipped items are listed apart, and so is a sample whose image
    has NaN or inf values (skipped with that reason). Used as a DataLoader collate_fn."""
    samples: List[Sample] = []
    skipped: List[SkippedImage] = []
    for s in items:
        if isinstance(s, SkippedImage):
            skipped.append(s)
        elif s.image.is_floating_point() and not bool(torch.isfinite(s.image).all()):
            skipped.append(SkippedImage(s.index, s.image_id, NOT_FINITE_REASON))
        else:
            samples.append(s)
    if samples:
        shapes = {tuple(s.image.shape) for s in samples}
        if len(shapes) > 1:
            raise ValueError(
                f"the images of a batch differ in shape ({sorted(shapes)}), e.g. "
                f"{samples[0].image_id!r}; preprocess every image to the model's input size"
            )
        images = torch.stack([s.image for s in samples])
    else:
        images = torch.zeros(0)
    masks = [s.token_mask for s in samples]
    if any(m is None for m in masks) and not all(m is None for m in masks):
        missing = next(s.image_id for s in samples if s.token_mask is None)
        raise ValueError(f"some samples of a batch have token masks and some do not ({missing!r})")
    shapes_of = [tuple(m.shape) for m in masks if m is not None]
    if len(set(shapes_of)) > 1:
        odd = next(
            (s.image_id, shape) for s, shape in zip(samples, shapes_of) if shape != shapes_of[0]
        )
        raise ValueError(
            f"image {odd[0]!r}: its token mask has shape {odd[1]}, unlike {shapes_of[0]} of its "
            "batch; every token mask covers the model's token sequence"
        )
    return Batch(
        images=images,
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        image_ids=[s.image_id for s in samples],
        indices=torch.tensor([s.index for s in samples], dtype=torch.long),
        # all or none of the masks are given (checked above)
        token_masks=(
            torch.stack(cast(List[Tensor], masks)) if samples and masks[0] is not None else None
        ),
        skipped=skipped,
        conversions=[getattr(s, "conversion", None) or "" for s in samples],
    )
