"""Preprocessing: the image transform a model expects, and the same geometry for segmentation masks.

Two recipes, both built with timm's own ``create_transform`` so the images are exactly what timm
would feed the model:

- ``"timm"``: the model's timm data config (``timm.data.resolve_data_config``): resize, centre crop
  by ``crop_pct``, the model's interpolation, mean and std.
- ``"paper"``: the reference setup of Vilas et al.: resize straight to the input size (no crop,
  aspect ratio not kept), bilinear, mean = std = 0.5.

A mask must land on the same pixels as its image, so :meth:`Preprocessing.mask_transform` replays
the image transform's geometric steps (resize, crop, pad) with nearest-neighbour interpolation and
zero fill, and nothing else. The input size is always the model's own (``model.cfg``), never the
size a pretrained config names: a ``vit_tiny_patch16_224`` created with ``img_size=32`` takes 32x32.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Literal, Mapping, Optional, Tuple

import numpy as np
import torch
from jaxtyping import Bool
from PIL import Image
from torch import Tensor

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

PreprocessKind = Literal["timm", "paper"]
PREPROCESS_KINDS = ("timm", "paper")

#: the reference code's preprocessing: no crop, bilinear, mean = std = 0.5 (METHODS §7)
PAPER_INTERPOLATION = "bilinear"
PAPER_MEAN_STD = 0.5


@dataclass(frozen=True)
class Preprocessing:
    """A resolved preprocessing recipe: everything that decides the pixels the model sees."""

    kind: str
    input_size: Tuple[int, int, int]  # (channels, height, width)
    interpolation: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    crop_pct: float
    crop_mode: str

    def __post_init__(self) -> None:
        chans = self.input_size[0]
        if len(self.mean) != chans or len(self.std) != chans:
            raise ValueError(
                f"the preprocessing's mean {self.mean} / std {self.std} do not have one value per "
                f"input channel ({chans}); pass a data config for a {chans}-channel model or use "
                "--preprocess paper"
            )

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def image_mode(self) -> str:
        """The PIL mode images are converted to before the transform."""
        if self.channels == 3:
            return "RGB"
        if self.channels == 1:
            return "L"
        raise ValueError(
            f"images for a {self.channels}-channel model cannot be read from image files"
        )

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready description (part of a run's configuration fingerprint)."""
        d = asdict(self)
        d["input_size"], d["mean"], d["std"] = (
            list(self.input_size),
            list(self.mean),
            list(self.std),
        )
        return d

    def image_transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> normalized float tensor ``[C, H, W]``, built by timm's
        ``create_transform``."""
        from timm.data import create_transform

        return create_transform(
            input_size=self.input_size,
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
        )

    def mask_transform(self) -> Callable[[Image.Image], Image.Image]:
        """PIL mask -> PIL mask on the model's input pixels (nearest, zero fill): the image's
        geometry."""
        return geometric_part(self.image_transform(), nearest=True)


def geometric_part(transform: Any, nearest: bool = True) -> Callable[[Image.Image], Image.Image]:
    """The geometric steps of a timm/torchvision eval ``Compose`` (before the tensor conversion).

    With ``nearest`` every resize interpolates by nearest neighbour and every pad fills with 0, so a
    label mask keeps its labels. Raises TypeError for a step whose geometry it cannot replay.
    """
    from timm.data.transforms import CenterCropOrPad, MaybeToTensor, ResizeKeepRatio, TrimBorder
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    steps = list(getattr(transform, "transforms", [transform]))
    geometric = []
    for step in steps:
        if isinstance(step, (MaybeToTensor, T.ToTensor, T.PILToTensor)) or type(step).__name__ in (
            "MaybePILToTensor",
            "ToTensor",
        ):
            break
        if isinstance(step, T.Resize):
            mode = InterpolationMode.NEAREST if nearest else step.interpolation
            step = T.Resize(step.size, interpolation=mode, max_size=step.max_size)
        elif isinstance(step, ResizeKeepRatio):
            step = copy.copy(step)
            if nearest:
                step.interpolation = InterpolationMode.NEAREST
        elif isinstance(step, CenterCropOrPad):
            step = copy.copy(step)
            if nearest:
                step.fill = 0
        elif not isinstance(step, (T.CenterCrop, TrimBorder)):
            raise TypeError(
                f"cannot replay the preprocessing step {type(step).__name__} on masks; masks can "
                f"follow Resize, ResizeKeepRatio, CenterCrop, CenterCropOrPad and TrimBorder"
            )
        geometric.append(step)

    def apply(img: Image.Image) -> Image.Image:
        for step in geometric:
            img = step(img)
        return img

    return apply


def resolve_preprocessing(
    model: "HookedViT",
    kind: str = "timm",
    data_config: Optional[Mapping[str, Any]] = None,
) -> Preprocessing:
    """The preprocessing for ``model`` (a HookedViT): ``"timm"`` from its data config, or
    ``"paper"``.

    ``data_config`` is a timm data config (``timm.data.resolve_data_config(model=timm_model)``); for
    ``"timm"`` without one, timm's defaults are used (ImageNet mean/std, bicubic, crop 0.875). The
    input size always comes from the model itself.
    """
    if kind not in PREPROCESS_KINDS:
        raise ValueError(f"preprocess must be one of {PREPROCESS_KINDS}, got {kind!r}")
    cfg = model.cfg
    input_size = (int(cfg.in_chans), int(cfg.image_size[0]), int(cfg.image_size[1]))
    if kind == "paper":
        return Preprocessing(
            kind="paper",
            input_size=input_size,
            interpolation=PAPER_INTERPOLATION,
            mean=(PAPER_MEAN_STD,) * input_size[0],
            std=(PAPER_MEAN_STD,) * input_size[0],
            crop_pct=1.0,
            crop_mode="squash",
        )
    from timm.data import resolve_data_config

    config = dict(
        resolve_data_config(pretrained_cfg=dict(data_config or {}, input_size=input_size))
    )
    return Preprocessing(
        kind="timm",
        input_size=input_size,
        interpolation=str(config["interpolation"]),
        mean=tuple(float(m) for m in config["mean"]),
        std=tuple(float(s) for s in config["std"]),
        crop_pct=float(config.get("crop_pct") or 0.875),
        crop_mode=str(config.get("crop_mode") or "center"),
    )


def binary_mask_image(mask: np.ndarray) -> Image.Image:
    """A boolean ``[H, W]`` array as a PIL ``L`` image (0 / 255), ready for
    :meth:`mask_transform`."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))  # 2-D uint8: mode "L"


def mask_from_image(img: Image.Image) -> Bool[Tensor, "height width"]:
    """A transformed ``L`` mask image back to a boolean tensor."""
    return torch.from_numpy(np.asarray(img) > 127)
