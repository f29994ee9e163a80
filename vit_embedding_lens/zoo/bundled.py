"""The bundled trained models: small timm ViTs trained on real 28x28 grey images, shipped in the
package.

- ``mnist-vit`` (the default): 6 blocks, trained on 5,000 real MNIST digits;
- ``fashion-vit``: the same architecture trained on the 60,000 Fashion-MNIST product photos.

They are the offline models for examples, tests and the command line: no model hub is needed.
``HookedViT.from_bundled(name)`` (or ``HookedViT.from_timm("bundled:NAME")``) converts one like any
timm model; ``load_bundled_timm(name)`` gives the timm module itself, ``load_bundled_eval(name)``
its held-out images with foreground masks, and ``model_card(name)`` how it was trained and how it
scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

# model names are parsed by the loading floor; these names stay importable from here
from vit_embedding_lens.loading.names import BUNDLED_PREFIX as BUNDLED_PREFIX
from vit_embedding_lens.loading.names import bundled_name as bundled_name
from vit_embedding_lens.model.checkpoint import load_checkpoint_

if TYPE_CHECKING:
    from vit_embedding_lens.data.token_labels import Method
    from vit_embedding_lens.model.layout import TokenLayout

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_BUNDLED = "mnist-vit"

#: timm VisionTransformer arguments of the bundled models: 28x28 grey input, 7x7 patches of 4 px
GREY28_ARCH: Dict[str, Any] = dict(
    img_size=28,
    patch_size=4,
    in_chans=1,
    num_classes=10,
    embed_dim=96,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    global_pool="token",
)
MNIST_CLASS_NAMES: List[str] = [str(d) for d in range(10)]
#: a pixel (0..255) brighter than this is on the digit's stroke: a "class" token, not "context"
MNIST_FOREGROUND_THRESHOLD = 64
FASHION_CLASS_NAMES: List[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
#: Fashion-MNIST backgrounds are black; garments have dark patches, so the threshold is low
FASHION_FOREGROUND_THRESHOLD = 8


@dataclass(frozen=True)
class BundledSpec:
    """One bundled model: its files (in ``zoo/data``), architecture, classes and foreground rule."""

    name: str
    weights: str
    card: str
    eval_file: str
    class_names: List[str]
    foreground_threshold: int
    foreground: str  # what a foreground pixel is, for messages and the card
    arch: Dict[str, Any] = field(default_factory=lambda: dict(GREY28_ARCH))


BUNDLED_MODELS: Dict[str, BundledSpec] = {
    "mnist-vit": BundledSpec(
        "mnist-vit",
        "mnist_vit.safetensors",
        "mnist_vit.json",
        "mnist_eval.npz",
        MNIST_CLASS_NAMES,
        MNIST_FOREGROUND_THRESHOLD,
        "digit stroke",
    ),
    "fashion-vit": BundledSpec(
        "fashion-vit",
        "fashion_vit.safetensors",
        "fashion_vit.json",
        "fashion_eval.npz",
        FASHION_CLASS_NAMES,
        FASHION_FOREGROUND_THRESHOLD,
        "garment",
    ),
}


def bundled_spec(name: str = DEFAULT_BUNDLED) -> BundledSpec:
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; available: {sorted(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[name]


def create_bundled_timm_model(name: str = DEFAULT_BUNDLED) -> torch.nn.Module:
    """A bundled architecture as an untrained timm ``VisionTransformer``."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**bundled_spec(name).arch)


def preprocess_grey28(images: Union[Tensor, np.ndarray]) -> Float[Tensor, "batch 1 28 28"]:
    """uint8 images ``[n, 28, 28]`` (0..255) -> the bundled models' input:
    ``(x / 255 - 0.5) / 0.5``."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or tuple(x.shape[-3:]) != (1, 28, 28):
        raise ValueError(
            "expected 28x28 grey images of shape [n, 28, 28] or [n, 1, 28, 28], got "
            f"{tuple(x.shape)}"
        )
    return (x.float() / 255.0 - 0.5) / 0.5


@dataclass(frozen=True)
class BundledEvalSet:
    """The held-out images shipped with a bundled model, with a foreground mask per image."""

    images: Float[Tensor, "batch 1 28 28"]  # preprocessed, ready for the model
    labels: Int[Tensor, " batch"]
    masks: Bool[Tensor, "batch 28 28"]  # True on the object (digit stroke, garment)
    raw: np.ndarray  # uint8 [n, 28, 28]
    name: str = DEFAULT_BUNDLED

    def __len__(self) -> int:
        return len(self.labels)

    def class_token_mask(
        self, layout: "TokenLayout", method: "Method" = "nearest", threshold: float = 0.5
    ) -> Bool[Tensor, "batch pos"]:
        """True at image tokens on the object ("class" tokens); the rest are "context"."""
        from vit_embedding_lens.data.token_labels import token_mask_from_mask

        return token_mask_from_mask(self.masks, layout, method=method, threshold=threshold)


def _data_file(name: str, model: str = DEFAULT_BUNDLED) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled file {path} is missing; reinstall the package or retrain with "
            f"`python -m vit_embedding_lens.zoo.train --model {model}`"
        )
    return path


def check_subset_size(n: Optional[int], total: int, what: str = "images") -> None:
    """``n`` (None = all) must be between 1 and the ``total`` shipped."""
    if n is not None and not 1 <= n <= total:
        raise ValueError(f"n must be between 1 and {total} (the {what} shipped), got {n}")


def load_bundled_eval(name: str = DEFAULT_BUNDLED, n: Optional[int] = None) -> BundledEvalSet:
    """A bundled model's held-out evaluation images (500, 50 per class), optionally the first
    ``n``."""
    spec = bundled_spec(name)
    with np.load(_data_file(spec.eval_file, name)) as data:
        raw, labels, masks = data["images"], data["labels"], data["masks"]
    check_subset_size(n, len(labels), f"{name} eval images")
    if n is not None:
        raw, labels, masks = raw[:n], labels[:n], masks[:n]
    return BundledEvalSet(
        preprocess_grey28(raw), torch.from_numpy(labels), torch.from_numpy(masks), raw, name
    )


def load_mnist_eval(n: Optional[int] = None) -> BundledEvalSet:
    """The MNIST model's held-out digits (500, 50 per class), optionally the first ``n``."""
    return load_bundled_eval("mnist-vit", n)


def model_card(name: str = DEFAULT_BUNDLED) -> dict:
    """Training data, split, settings and measured held-out accuracy of a bundled model."""
    return json.loads(_data_file(bundled_spec(name).card, name).read_text())


def load_bundled_timm(name: str = DEFAULT_BUNDLED) -> torch.nn.Module:
    """A bundled model as a timm module (eval mode), its weights loaded strictly."""
    model = create_bundled_timm_model(name)
    load_checkpoint_(model, _data_file(bundled_spec(name).weights, name))
    return model.eval()


def bundled_class_names(name: str = DEFAULT_BUNDLED) -> List[str]:
    return list(bundled_spec(name).class_names)
