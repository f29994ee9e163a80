"""HookedViT: timm Vision Transformers as TransformerLens-style hooked modules.

The ground floor: imports nothing of the library above it. Model names, timm module creation and
checkpoints belong to :mod:`vit_embedding_lens.loading`, which plugs into
:mod:`vit_embedding_lens.model.registry`.
"""

from vit_embedding_lens.model import convert as _convert
from vit_embedding_lens.model.cache import ViTActivationCache
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.model.convert import TimmConversion, convert_timm
from vit_embedding_lens.model.hooked_vit import HookedViT, convert_timm_vit
from vit_embedding_lens.model.host_memory import release_freed_memory, retain_freed_memory
from vit_embedding_lens.model.layout import TokenLayout
from vit_embedding_lens.model.registry import loader, register_loader, registered_kinds

# `from vit_embedding_lens.model.convert import convert_timm_vit` predates TimmConversion; the
# converter cannot import HookedViT (a cycle), so the model package hands the wrapper down to it.
_convert.convert_timm_vit = convert_timm_vit

__all__ = [
    "HookedViT",
    "HookedViTConfig",
    "TimmConversion",
    "TokenLayout",
    "ViTActivationCache",
    "convert_timm",
    "convert_timm_vit",
    "loader",
    "register_loader",
    "registered_kinds",
    "release_freed_memory",
    "retain_freed_memory",
]
