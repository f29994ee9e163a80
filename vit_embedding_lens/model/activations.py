"""MLP activations by name: the ones timm ViTs use, computed exactly as timm computes them."""

from __future__ import annotations

from typing import Callable, Dict

from timm.layers.activations import QuickGELU
from torch import nn

#: name -> factory; names follow TransformerLens where it has one ("gelu", "gelu_new", "relu",
#: "silu")
ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "gelu": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def activation_name(module: nn.Module) -> str | None:
    """The name of a timm activation module, or None when it is not one HookedViT supports."""
    kind = type(module).__name__
    if kind in ("GELU",):
        return "gelu_new" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    if kind in ("GELUTanh",):
        return "gelu_new"
    return {"QuickGELU": "quick_gelu", "ReLU": "relu", "SiLU": "silu", "Swish": "silu"}.get(kind)
