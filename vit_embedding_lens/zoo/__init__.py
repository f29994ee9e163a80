"""The bundled small trained model (MNIST ViT) and its reproducible training script."""

from vit_embedding_lens.zoo.bundled import BUNDLED_MODELS, MnistEvalSet, load_mnist_eval, model_card

__all__ = ["BUNDLED_MODELS", "MnistEvalSet", "load_mnist_eval", "model_card"]
