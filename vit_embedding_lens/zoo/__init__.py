"""The bundled small trained models (MNIST and Fashion-MNIST ViTs) and their reproducible training
script."""

from vit_embedding_lens.zoo.bundled import (
    BUNDLED_MODELS,
    BundledEvalSet,
    load_bundled_eval,
    load_mnist_eval,
    model_card,
)
from vit_embedding_lens.zoo.eval_dataset import bundled_eval_dataset

__all__ = [
    "BUNDLED_MODELS",
    "BundledEvalSet",
    "bundled_eval_dataset",
    "load_bundled_eval",
    "load_mnist_eval",
    "model_card",
]
