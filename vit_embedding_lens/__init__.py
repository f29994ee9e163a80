"""vit-embedding-lens: mechanistic interpretability of timm Vision Transformers.

``HookedViT`` converts a timm ViT exactly into a TransformerLens-style hooked module; the analyses
(class-embedding lens, interventions, attributions) build on it.

The package's names are imported on first use (PEP 562): ``import vit_embedding_lens`` imports
neither torch nor timm, so ``vit-lens --help`` answers at once. Reaching a model name
(``vit_embedding_lens.HookedViT``) imports the loading floor too, which registers
``HookedViT.from_timm``'s and ``from_bundled``'s loaders.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

from vit_embedding_lens.errors import ConversionError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from vit_embedding_lens.model import (
        HookedViT,
        HookedViTConfig,
        TokenLayout,
        ViTActivationCache,
    )

__version__ = "0.1.0"

#: exported names that live in the model floor, imported (with the loading floor) on first use
_MODEL_EXPORTS = ("HookedViT", "HookedViTConfig", "TokenLayout", "ViTActivationCache")
#: subpackages reachable as attributes (``vit_embedding_lens.lens``) without an import statement
_SUBMODULES = (
    "attribution",
    "cli",
    "data",
    "errors",
    "interventions",
    "lens",
    "loading",
    "model",
    "presets",
    "report",
    "runner",
    "testing",
    "viz",
    "zoo",
)

__all__ = [
    "ConversionError",
    "HookedViT",
    "HookedViTConfig",
    "TokenLayout",
    "UnsupportedArchitectureError",
    "ViTActivationCache",
    "__version__",
]


def _register_loaders() -> None:
    """Import the loading floor, which registers its loaders with ``model.registry`` (the
    registry calls this when a loader is looked up before anything imported the floor)."""
    importlib.import_module("vit_embedding_lens.loading")


def __getattr__(name: str) -> Any:
    if name in _MODEL_EXPORTS:
        _register_loaders()
        value = getattr(importlib.import_module("vit_embedding_lens.model"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        if name == "model":
            _register_loaders()
        return importlib.import_module(f"vit_embedding_lens.{name}")
    raise AttributeError(f"module 'vit_embedding_lens' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
