"""Counterfactual image pairs, the vision analogue of clean and corrupt prompts.

- :func:`class_pairs`: images of class ``target`` (clean) paired with images of class ``other``
  (corrupt), drawn from a data set by label;
- :func:`corrupt_patches` / :func:`patch_pairs`: the same image with some patches corrupted
  (Gaussian noise, blur, the mean colour, or the patches of another image), the patches chosen by
  token groups or a token mask;
- mean or resample ablation over a data set instead of a counterfactual:
  :func:`~vit_embedding_lens.circuits.graph.ablation_reference`.

:meth:`ImagePairs.metric` builds the class-space metric (logit difference of the two classes,
probability, rank) from :mod:`vit_embedding_lens.interventions.metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_embedding_lens.interventions.metrics import ClassSpaceMetric
from vit_embedding_lens.interventions.selection import TokenSpec, token_mask
from vit_embedding_lens.model.layout import TokenLayout

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

Corruption = Literal["noise", "blur", "mean", "swap"]
CORRUPTIONS = ("noise", "blur", "mean", "swap")
PairMetric = Literal["logit_diff", "probability", "log_probability", "rank", "logit"]


@dataclass
class ImagePairs:
    """Clean images and their corrupt counterparts, one to one.

    ``target``/``other``: the class the clean images show and the one the corrupt images show
    (an int, or a per-image ``[batch]`` tensor; ``other`` is None for corrupted patches, whose
    metric then compares the target with the best other class). ``object_mask``: per-image token
    masks of the clean images (True on the object) for the ``"object"``/``"context"`` groups.
    """

    clean: Float[Tensor, "batch chan height width"]
    corrupt: Float[Tensor, "batch chan height width"]
    target: Union[int, Tensor]
    other: Optional[Union[int, Tensor]] = None
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None

    def __post_init__(self) -> None:
        check_image_pair(self.clean, self.corrupt)

    def __len__(self) -> int:
        return self.clean.shape[0]

    def metric(self, model: HookedViT, kind: PairMetric = "logit_diff") -> ClassSpaceMetric:
        """The class-space metric of these pairs, averaged over images: ``"logit_diff"`` (target
        minus other, or minus the best other class), ``"probability"``/``"log_probability"``,
        ``"logit"`` or ``"rank"`` of the target."""
        if kind == "logit_diff":
            return ClassSpaceMetric(model, "logit_diff", self.target, other=self.other)
        return ClassSpaceMetric(model, kind, self.target)

    def to(self, device) -> "ImagePairs":
        om = None if self.object_mask is None else self.object_mask.to(device)
        t = self.target.to(device) if isinstance(self.target, Tensor) else self.target
        o = self.other.to(device) if isinstance(self.other, Tensor) else self.other
        return ImagePairs(self.clean.to(device), self.corrupt.to(device), t, o, om)


def check_image_pair(clean: Tensor, corrupt: Tensor) -> None:
    """Clean and corrupt images pair one to one and have the same size."""
    if clean.ndim != 4 or corrupt.ndim != 4:
        raise ValueError(
            f"images must be [batch, chan, height, width], got {tuple(clean.shape)} and "
            f"{tuple(corrupt.shape)}"
        )
    if clean.shape[-2:] != corrupt.shape[-2:] or clean.shape[1] != corrupt.shape[1]:
        raise ValueError(
            f"clean and corrupt images differ in size: {tuple(clean.shape[1:])} and "
            f"{tuple(corrupt.shape[1:])}; resize them to one size"
        )
    if clean.shape[0] != corrupt.shape[0]:
        raise ValueError(
            f"{clean.shape[0]} clean images but {corrupt.shape[0]} corrupt ones; pairs go one "
            "to one"
        )


def class_pairs(
    images: Float[Tensor, "n chan height width"],
    labels: Int[Tensor, " n"],
    target: int,
    other: int,
    *,
    n: Optional[int] = None,
    seed: int = 0,
    object_masks: Optional[Bool[Tensor, "n pos"]] = None,
) -> ImagePairs:
    """Pairs of an image of class ``target`` (clean) and one of class ``other`` (corrupt), drawn
    from ``images`` by ``labels``: ``n`` pairs (default: as many as the rarer class has), shuffled
    with ``seed``. ``object_masks`` (per-image token masks) are kept for the clean images."""
    target, other = int(target), int(other)
    if target == other:
        raise ValueError(f"a class pair needs two different classes, got {target} twice")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"labels must be [n] with one label per image, got {tuple(labels.shape)} for "
            f"{len(images)} images"
        )
    gen = torch.Generator().manual_seed(seed)
    idx = {}
    for c in (target, other):
        where = torch.nonzero(labels.cpu() == c).flatten()
        if len(where) == 0:
            raise ValueError(
                f"no image has label {c}; the labels present are {labels.unique().tolist()}"
            )
        idx[c] = where[torch.randperm(len(where), generator=gen)]
    available = min(len(idx[target]), len(idx[other]))
    count = available if n is None else int(n)
    if not 1 <= count <= available:
        raise ValueError(
            f"n must be between 1 and {available} (images of the rarer class), got {n}"
        )
    a, b = idx[target][:count], idx[other][:count]
    masks = None if object_masks is None else object_masks[a.to(object_masks.device)]
    return ImagePairs(
        images[a.to(images.device)], images[b.to(images.device)], target, other, masks
    )


def pixel_mask(
    layout: TokenLayout, tokens: Union[TokenSpec, Tensor], batch: int
) -> Bool[Tensor, "batch 1 height width"]:
    """The pixels of the image tokens ``tokens`` names (prefix tokens have no pixels)."""
    mask = token_mask(layout, tokens)
    if mask.ndim == 1:
        mask = mask[None].expand(batch, -1)
    patches = layout.patch_tokens(mask, dim=1).reshape(mask.shape[0], *layout.grid_size)
    ph, pw = layout.patch_size
    pixels = patches.repeat_interleave(ph, 1).repeat_interleave(pw, 2)
    return pixels[:, None]


def corrupt_patches(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    tokens: Union[TokenSpec, Tensor] = "image",
    method: Corruption = "noise",
    *,
    source: Optional[Tensor] = None,
    noise_std: float = 1.0,
    blur_sigma: float = 2.0,
    seed: int = 0,
) -> Float[Tensor, "batch chan height width"]:
    """``images`` with the patches of ``tokens`` (a group name, indices, or a ``[pos]`` /
    per-image ``[batch, pos]`` bool mask) corrupted: ``"noise"`` (add Gaussian noise of
    ``noise_std``, seeded), ``"blur"`` (Gaussian blur of ``blur_sigma`` pixels), ``"mean"`` (each
    image's mean colour), ``"swap"`` (the same patches of ``source``, other images of the same
    size)."""
    if method not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {method!r}; use one of {CORRUPTIONS}")
    model.check_images(images)
    layout = model.layout
    if tuple(images.shape[-2:]) != tuple(layout.image_size):
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} but the model's patch grid covers "
            f"{layout.image_size}; corrupt images of the model's input size"
        )
    where = pixel_mask(layout, tokens, images.shape[0]).to(images.device)
    if method == "noise":
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(images.shape, generator=gen).to(images.device, images.dtype)
        replacement = images + noise_std * noise
    elif method == "blur":
        replacement = gaussian_blur(images, blur_sigma)
    elif method == "mean":
        replacement = images.mean(dim=(-2, -1), keepdim=True).expand_as(images)
    else:
        if source is None:
            raise ValueError("method='swap' needs source= images to take the patches from")
        check_image_pair(images, source)
        replacement = source.to(images.device, images.dtype)
    return torch.where(where, replacement, images)


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """A separable Gaussian blur (reflect padding), kernel radius ``3 sigma``."""
    if sigma <= 0:
        raise ValueError(f"blur_sigma must be positive, got {sigma}")
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    C = images.shape[1]
    pad = min(radius, images.shape[-1] - 1, images.shape[-2] - 1)
    out = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    if pad < radius:
        out = F.pad(out, (radius - pad,) * 4, mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def patch_pairs(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    labels: Union[int, Tensor],
    tokens: Union[TokenSpec, Tensor] = "image",
    method: Corruption = "noise",
    *,
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    **options,
) -> ImagePairs:
    """Each image paired with itself with the patches of ``tokens`` corrupted
    (:func:`corrupt_patches`; ``options`` go to it). ``labels``: the class the metric reads (an int
    or per-image labels; the metric compares it with the best other class)."""
    corrupt = corrupt_patches(model, images, tokens, method, **options)
    return ImagePairs(images, corrupt, labels, None, object_mask)
