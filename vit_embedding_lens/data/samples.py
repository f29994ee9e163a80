"""The items of a data set (:class:`Sample`, :class:`SkippedImage`) and a data set of
preprocessed images already in memory (:class:`InMemoryDataset`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

#: why an image with NaN or inf values is skipped
NOT_FINITE_REASON = "the image has NaN or inf values"


@dataclass
class Sample:
    """A preprocessed image ready for the model."""

    index: int  # position in the data set
    image: Float[Tensor, "chan height width"]
    label: int
    image_id: str
    token_mask: Optional[Bool[Tensor, " pos"]] = None  # True at image tokens on the object
    #: how the file was decoded when not plainly (``"16-bit"``, ``"float"``, ``"alpha on white"``)
    conversion: Optional[str] = None


@dataclass(frozen=True)
class SkippedImage:
    """An item that could not be used, and why (the run goes on without it)."""

    index: int
    image_id: str
    reason: str


class InMemoryDataset(torch.utils.data.Dataset):
    """Preprocessed images already in memory (e.g. the bundled eval digits) as :class:`Sample`
    items."""

    def __init__(
        self,
        images: Float[Tensor, "batch chan height width"],
        labels: Int[Tensor, " batch"],
        image_ids: Optional[Sequence[str]] = None,
        token_masks: Optional[Bool[Tensor, "batch pos"]] = None,
        source: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(
                f"images must be [n, chan, height, width], got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"images are {images.dtype}; the model takes preprocessed float images (e.g. "
                "0..255 uint8 pixels as images.float() / 255, then normalized with the model's "
                "mean and std), never raw integer pixels"
            )
        n = images.shape[0]
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} images")
        if token_masks is not None and token_masks.shape[0] != n:
            raise ValueError(f"{token_masks.shape[0]} token masks for {n} images")
        self.images = images
        self.label_tensor = torch.as_tensor(labels).long()
        self.image_ids = (
            list(image_ids) if image_ids is not None else [f"{i:06d}" for i in range(n)]
        )
        if len(self.image_ids) != n:
            raise ValueError(f"{len(self.image_ids)} image ids for {n} images")
        self.token_masks = token_masks
        self.has_masks = token_masks is not None
        self.source = dict(source or {"layout": "memory"})

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def labels(self) -> List[int]:
        return self.label_tensor.tolist()

    def __getitem__(self, index: int) -> Union[Sample, SkippedImage]:
        image = self.images[index]
        if not bool(torch.isfinite(image).all()):
            return SkippedImage(index, self.image_ids[index], NOT_FINITE_REASON)
        mask = self.token_masks[index] if self.token_masks is not None else None
        return Sample(index, image, int(self.label_tensor[index]), self.image_ids[index], mask)

    def fingerprint(self) -> Dict[str, Any]:
        digest = hashlib.sha256()
        for t in (self.images, self.label_tensor, self.token_masks):
            if t is not None:
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {"source": self.source, "n_images": len(self), "content_sha256": digest.hexdigest()}
