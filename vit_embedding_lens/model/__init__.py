"""HookedViT: timm Vision Transformers as TransformerLens-style hooked modules."""

from vit_embedding_lens.model.cache import ViTActivationCache
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.model.hooked_vit import HookedViT
from vit_embedding_lens.model.layout import TokenLayout

__all__ = ["HookedViT", "HookedViTConfig", "TokenLayout", "ViTActivationCache"]
