"""Which timm Vision Transformers the converter takes, and why it refuses the others.

Nothing here restates a refusal: every model is built on PyTorch's ``meta`` device (no memory, no
weights; one block where the family allows it, all blocks otherwise) and passed to the converter's
own ``check_supported``; a refusal's reason is the ``feature`` field of its
:class:`~vit_embedding_lens.errors.UnsupportedArchitectureError`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from vit_embedding_lens.errors import UnsupportedArchitectureError
from vit_embedding_lens.model.convert import check_supported

#: timm modules that define Vision Transformer classifiers (the converter's candidates)
VIT_MODULES = (
    "vision_transformer",
    "deit",
    "eva",
    "beit",
    "vision_transformer_relpos",
    "vision_transformer_sam",
    "vision_transformer_hybrid",
    "naflexvit",
)


@dataclass(frozen=True)
class SupportEntry:
    """Whether a timm model converts; ``reason``: the refused feature, or why it was not built."""

    model: str
    module: str
    supported: bool
    reason: Optional[str] = None


def refusal_feature(err: Exception) -> str:
    """The feature a converter refusal names (its ``feature`` field); the message otherwise."""
    feature = getattr(err, "feature", None)
    return str(feature) if feature else str(err)


def _build_on_meta(name: str) -> torch.nn.Module:
    import timm

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            return timm.create_model(name, pretrained=False, depth=1)
        except Exception:  # families whose per-block settings need their full depth
            return timm.create_model(name, pretrained=False)


def check_model_support(name: str) -> SupportEntry:
    """Whether HookedViT converts the timm model ``name`` (no weights are created or downloaded)."""
    import timm

    base = name.split(".")[0]
    if base not in timm.list_models():
        raise ValueError(f"{name!r} is not a timm model name; see timm.list_models('vit*')")
    module = _module_of(base)
    try:
        model = _build_on_meta(base)
    except Exception as err:  # noqa: BLE001 - report, never crash a listing
        return SupportEntry(
            name, module, False, f"could not be built ({type(err).__name__}: {err})"
        )
    try:
        check_supported(model, base)
    except UnsupportedArchitectureError as err:
        return SupportEntry(
            name, module, False, re.sub(r"blocks\.\d+", "blocks.N", refusal_feature(err))
        )
    return SupportEntry(name, module, True)


def _module_of(name: str) -> str:
    from timm.models._registry import _model_to_module

    return _model_to_module.get(name, "?")


def vit_model_names(
    modules: Sequence[str] = VIT_MODULES, pattern: Optional[str] = None
) -> List[str]:
    """The timm model names of ``modules`` (all ViT families by default), matching ``pattern``."""
    import timm

    return sorted(timm.list_models(pattern or "*", module=list(modules)))
