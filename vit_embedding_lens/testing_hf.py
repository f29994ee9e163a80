"""Test utilities for Hugging Face ``transformers`` vision models: realistic random weights and a
reference forward pass. Nothing here downloads weights (models are built from configs).

:func:`randomize_hf_weights_` applies :func:`vit_embedding_lens.testing.randomize_vit_weights_`
(norms far from (1, 0), biases and heads at a realistic size) and then redraws the tensors whose
HF names that function does not know: CLS/distillation/register tokens, class embeddings, the
MAP probe and position tables at ``0.5 * randn``; Dinov2's LayerScale ``lambda1`` uniform(0.2, 1.5)
with a random sign; ``mask_token`` too, so a conversion that used it would show.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from vit_embedding_lens.testing import randomize_vit_weights_

__all__ = ["randomize_hf_weights_", "hf_reference", "HF_OUTPUT_FIELDS"]

_TOKENS = {
    "cls_token",
    "distillation_token",
    "register_tokens",
    "class_embedding",
    "position_embeddings",
    "mask_token",
    "probe",
}

#: the output a converted HookedViT equals, by HF output field, in order of preference
HF_OUTPUT_FIELDS = ("logits", "image_embeds", "pooler_output")


@torch.no_grad()
def randomize_hf_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every learned tensor of a transformers vision model with realistic values, in
    place and deterministically (a private generator); returns the model in eval mode."""
    randomize_vit_weights_(model, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            shape = p.shape
            if p_name in _TOKENS or (
                p_name == "weight" and mod_name.endswith("position_embedding")
            ):
                new = 0.5 * torch.randn(shape, generator=gen)
            elif p_name == "lambda1":
                sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
                new = (0.2 + 1.3 * torch.rand(shape, generator=gen)) * sign
            else:
                continue
            p.copy_(new.to(device=p.device, dtype=p.dtype))
    return model.eval()


@torch.no_grad()
def hf_reference(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """One HF forward with ``output_hidden_states=True``: ``(output, hidden_states)``.

    ``output`` is the first of :data:`HF_OUTPUT_FIELDS` the model returns (logits, projected image
    embeddings, or pooled features); ``hidden_states[0]`` is the input of the first layer and
    ``hidden_states[l + 1]`` the output of layer ``l``.
    """
    out: Any = model(pixel_values=images, output_hidden_states=True)
    for key in HF_OUTPUT_FIELDS:
        value = out.get(key) if hasattr(out, "get") else None
        if value is not None:
            return value, list(out.hidden_states)
    raise ValueError(f"{type(model).__name__} returned none of {HF_OUTPUT_FIELDS}")
