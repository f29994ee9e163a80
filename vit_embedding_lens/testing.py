"""Test utilities: timm ViTs with realistic random weights.

timm's default initialisation is a poor test fixture: LayerScale gammas start at
~1e-5, norms at exactly (1, 0), biases and class tokens at ~0. With those values a
conversion that drops LayerScale, swaps a norm's weight and bias, forgets a bias or
mis-orders prefix tokens still matches timm to many decimals. The helpers here
redraw every learned tensor with values of a realistic size so such bugs show up as
large numeric differences. Nothing here downloads weights.
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, Set, Tuple

import torch
from torch import nn

__all__ = [
    "PREFIX_VARIANTS",
    "randomize_vit_weights_",
    "create_timm_vit",
    "create_prefix_variant",
    "timm_reference",
    "assert_close_scaled",
]

#: (timm name, overrides) by number of prefix tokens: average pooling without CLS (0), CLS (1), CLS
#: and distillation token (2), CLS and 4 registers (5): the layouts every token-aware test covers
PREFIX_VARIANTS: Dict[int, Tuple[str, Dict[str, Any]]] = {
    0: ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    1: ("vit_tiny_patch16_224", dict()),
    2: ("deit_tiny_distilled_patch16_224", dict()),
    5: ("vit_tiny_patch16_224", dict(reg_tokens=4)),
}

_TOKEN_PARAMS = {"cls_token", "dist_token", "reg_token", "pos_embed"}
_HEAD_MODULES = {"head", "head_dist"}
_GAMMA_RE = re.compile(r"^gamma(_\d+)?$")


def _is_norm(module: nn.Module) -> bool:
    # LayerNorm, timm's LayerNorm/RmsNorm/SimpleNorm/GroupNorm, BatchNorm, ...
    return "norm" in type(module).__name__.lower()


def _fan_in(t: torch.Tensor) -> int:
    return max(1, t[0].numel()) if t.ndim >= 2 else max(1, t.numel())


@torch.no_grad()
def randomize_vit_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite, in place, every learned tensor of a timm ViT with realistic values.

    Deterministic for a given ``seed`` (a private ``torch.Generator``; the global RNG
    is untouched). Values, per kind of tensor:

    - LayerScale gammas (``*.gamma``, ``gamma_1``/``gamma_2``): uniform(0.2, 1.5) with
      a random sign, so LayerScale is far from both 0 and 1;
    - norm weights ``1 + 0.3 * randn``, norm biases ``0.2 * randn``;
    - class/distillation/register tokens and ``pos_embed``: ``0.5 * randn``;
    - classifier heads (``head``, ``head_dist``): weight ``randn / sqrt(d)``, bias ``0.3 * randn``;
    - other weights (linear, conv, ...): ``randn / sqrt(fan_in)``; other biases and
      1-D parameters: ``0.1 * randn``;
    - persistent float buffers: BatchNorm ``running_var`` uniform(0.5, 1.5), others
      ``0.1 * randn``. Integer buffers and non-persistent buffers (index tables,
      rotary frequency tables: derived constants, not weights) are left as they are.

    Returns ``model`` in eval mode.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def rand(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float32)

    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            shape = p.shape
            if _GAMMA_RE.match(p_name) or type(module).__name__ == "LayerScale":
                sign = torch.where(rand(shape) < 0.5, -1.0, 1.0)
                new = (0.2 + 1.3 * rand(shape)) * sign
            elif _is_norm(module) and p.ndim == 1:
                new = 1.0 + 0.3 * randn(shape) if p_name == "weight" else 0.2 * randn(shape)
            elif p_name in _TOKEN_PARAMS:
                new = 0.5 * randn(shape)
            elif leaf in _HEAD_MODULES and isinstance(module, nn.Linear):
                if p_name == "weight":
                    new = randn(shape) / math.sqrt(_fan_in(p))
                else:
                    new = 0.3 * randn(shape)
            elif p.ndim >= 2:
                new = randn(shape) / math.sqrt(_fan_in(p))
            else:  # biases (qkv, proj, fc1, fc2, patch embed, ...) and other vectors
                new = 0.1 * randn(shape)
            p.copy_(new.to(device=p.device, dtype=p.dtype))

        non_persistent: Set[str] = getattr(module, "_non_persistent_buffers_set", set())
        for b_name, b in module.named_buffers(recurse=False):
            if id(b) in seen or not b.is_floating_point() or b_name in non_persistent:
                continue
            seen.add(id(b))
            if b_name == "running_var":
                new = 0.5 + rand(b.shape)
            else:
                new = 0.1 * randn(b.shape)
            b.copy_(new.to(device=b.device, dtype=b.dtype))
    return model.eval()


def create_timm_vit(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **overrides)`` with randomized weights, in eval
    mode.

    Never downloads anything. ``overrides`` are timm model kwargs, e.g.
    ``depth=2, embed_dim=64, num_heads=4, img_size=64`` for a small, fast model.
    """
    import timm

    if overrides.pop("pretrained", False):
        raise ValueError("create_timm_vit never loads pretrained weights; use pretrained=False")
    model = timm.create_model(name, pretrained=False, **overrides)
    return randomize_vit_weights_(model, seed=seed)


@torch.no_grad()
def timm_reference(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One timm forward pass: ``(logits, [output of blocks[i] for every block])``.

    Block outputs are full residual streams ``[batch, pos, d_model]`` with the prefix tokens (CLS,
    distillation, registers) first, in timm's token order. They come from timm's own
    ``forward_intermediates`` (``norm=False``), which returns prefix tokens separately;
    they are concatenated back here. Logits come from ``forward_head`` on the same pass.
    """
    vit: Any = model  # timm's VisionTransformer API, read through nn.Module's dynamic attributes
    final, intermediates = vit.forward_intermediates(
        images,
        indices=list(range(len(vit.blocks))),
        return_prefix_tokens=True,
        norm=False,
        output_fmt="NLC",
        intermediates_only=False,
    )
    blocks = [
        torch.cat([item[1], item[0]], dim=1) if isinstance(item, tuple) else item
        for item in intermediates
    ]
    return vit.forward_head(final), blocks


def assert_close_scaled(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rel: float = 1e-5,
    rtol: float = 1e-5,
    msg: str = "",
) -> None:
    """``torch.testing.assert_close`` with ``atol = rel * max(1, max|expected|)``.

    Activations of a randomized ViT reach tens in magnitude; an absolute tolerance
    relative to the tensor's own scale keeps the check equally strict at every layer.
    """
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual,
        expected,
        atol=rel * scale,
        rtol=rtol,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def create_prefix_variant(n_prefix: int, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A small timm ViT with ``n_prefix`` prefix tokens (a key of :data:`PREFIX_VARIANTS`),
    realistic random weights; ``kwargs`` (sizes, ``num_classes``, ...) go to
    :func:`create_timm_vit`."""
    if n_prefix not in PREFIX_VARIANTS:
        raise ValueError(
            f"no variant with {n_prefix} prefix tokens; choose from {sorted(PREFIX_VARIANTS)}"
        )
    name, overrides = PREFIX_VARIANTS[n_prefix]
    return create_timm_vit(name, seed=seed, **overrides, **kwargs)
