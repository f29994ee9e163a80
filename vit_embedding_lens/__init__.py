"""vit-embedding-lens: mechanistic interpretability of timm Vision Transformers.

``HookedViT`` converts a timm ViT exactly into a TransformerLens-style hooked module; the analyses
(class-embedding lens, interventions, attributions) build on it.
"""

# the loading floor registers HookedViT.from_timm's and from_bundled's loaders when imported
from vit_embedding_lens import loading  # noqa: F401
from vit_embedding_lens.errors import ConversionError, UnsupportedArchitectureError
from vit_embedding_lens.model import HookedViT, HookedViTConfig, TokenLayout, ViTActivationCache

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "HookedViT",
    "HookedViTConfig",
    "TokenLayout",
    "UnsupportedArchitectureError",
    "ViTActivationCache",
    "__version__",
]
