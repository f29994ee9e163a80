"""The bundled trained model: a 6-block timm ViT trained on real MNIST digits, shipped in the package.

It is the offline default for examples, tests and the command line: no model hub is needed.
``HookedViT.from_bundled()`` (or ``HookedViT.from_timm("bundled:mnist-vit")``) converts it like any
timm model; ``load_bundled_timm()`` gives the timm module itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

DATA_DIR = Path(__file__).parent / "data"

#: timm VisionTransformer arguments of the bundled model: 28x28 grey input, 7x7 patches of 4 px
MNIST_ARCH: Dict[str, object] = dict(
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

BUNDLED_MODELS = {
    "mnist-vit": {
        "weights": "mnist_vit.safetensors",
        "card": "mnist_vit.json",
        "class_names": MNIST_CLASS_NAMES,
    }
}


def create_mnist_timm_model() -> torch.nn.Module:
    """The bundled architecture as an untrained timm ``VisionTransformer``."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**MNIST_ARCH)


def preprocess_mnist(images: Union[Tensor, np.ndarray]) -> Float[Tensor, "batch 1 28 28"]:
    """uint8 digits ``[n, 28, 28]`` (0..255) -> the model's input: ``(x / 255 - 0.5) / 0.5``."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or tuple(x.shape[-3:]) != (1, 28, 28):
        raise ValueError(f"expected MNIST digits of shape [n, 28, 28] or [n, 1, 28, 28], got {tuple(x.shape)}")
    return (x.float() / 255.0 - 0.5) / 0.5


@dataclass(frozen=True)
class MnistEvalSet:
    """The held-out digits shipped with the package, with a foreground mask per image."""

    images: Float[Tensor, "n 1 28 28"]  # preprocessed, ready for the model
    labels: Int[Tensor, " n"]
    masks: Bool[Tensor, "n 28 28"]  # True on the digit's stroke
    raw: np.ndarray  # uint8 [n, 28, 28]

    def __len__(self) -> int:
        return len(self.labels)

    def class_token_mask(self, layout, method: str = "nearest", threshold: float = 0.5) -> Bool[Tensor, "n n_tokens"]:
        """True at image tokens on the digit's stroke ("class" tokens); the rest are "context"."""
        from vit_embedding_lens.data.token_labels import token_mask_from_mask

        return token_mask_from_mask(self.masks, layout, method=method, threshold=threshold)


def _data_file(name: str) -> Path:
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled file {path} is missing; reinstall the package or retrain with "
            f"`python -m vit_embedding_lens.zoo.train_mnist`"
        )
    return path


def load_mnist_eval(n: Optional[int] = None) -> MnistEvalSet:
    """The held-out evaluation digits (500, 50 per class), optionally the first ``n``."""
    with np.load(_data_file("mnist_eval.npz")) as data:
        raw, labels, masks = data["images"], data["labels"], data["masks"]
    if n is not None:
        raw, labels, masks = raw[:n], labels[:n], masks[:n]
    return MnistEvalSet(preprocess_mnist(raw), torch.from_numpy(labels), torch.from_numpy(masks), raw)


def model_card(name: str = "mnist-vit") -> dict:
    """Training data, split, settings and measured held-out accuracy of a bundled model."""
    return json.loads(_data_file(_entry(name)["card"]).read_text())


def _entry(name: str) -> dict:
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; available: {sorted(BUNDLED_MODELS)}")
    return BUNDLED_MODELS[name]


def load_bundled_timm(name: str = "mnist-vit") -> torch.nn.Module:
    """The bundled model as a timm module (eval mode), its weights loaded strictly."""
    from vit_embedding_lens.model.convert import load_checkpoint_

    model = create_mnist_timm_model()
    load_checkpoint_(model, _data_file(_entry(name)["weights"]))
    return model.eval()


def bundled_class_names(name: str = "mnist-vit") -> List[str]:
    return list(_entry(name)["class_names"])
