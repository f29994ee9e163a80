"""Class-space readings a notebook user asks for directly: the "logit lens" top-k table per token and
block, and the projections of per-head write-ins and of MLP neuron value vectors (METHODS §1)."""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from vit_embedding_lens.lens.projection import ClassProjection

#: layer type -> the hook read at each block
LAYER_HOOKS: Dict[str, str] = {
    "resid": "hook_resid_post",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "attn": "hook_attn_out",
    "mlp": "hook_mlp_out",
}


def logit_lens(
    model,
    images: Tensor,
    k: int = 5,
    layer_types: Sequence[str] = ("resid",),
    blocks: Optional[Iterable[int]] = None,
    tokens: Optional[Iterable[int]] = None,
) -> pd.DataFrame:
    """Top-``k`` classes (with names and probabilities) of every token at every block.

    One row per image × block × layer type × token × rank: columns image, block, layer_type, token,
    token_label, rank, class_id, class_name, logit, probability. ``tokens`` are positions in
    ``model.layout`` order (default: all); ``blocks`` default to all.
    """
    unknown = [t for t in layer_types if t not in LAYER_HOOKS]
    if unknown:
        raise ValueError(f"unknown layer types {unknown}; choose from {sorted(LAYER_HOOKS)}")
    n_layers, n_classes = model.cfg.n_layers, model.cfg.n_classes
    blocks = list(range(n_layers)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in blocks if not 0 <= b < n_layers]
    if bad:
        raise ValueError(f"blocks {bad} out of range for a model with {n_layers} blocks")
    if not 1 <= k <= n_classes:
        raise ValueError(f"k must lie in [1, {n_classes}], got {k}")
    layout = model.layout
    tokens = list(range(layout.n_tokens)) if tokens is None else [int(t) for t in tokens]
    labels = layout.token_labels()
    names = [f"blocks.{b}.{LAYER_HOOKS[t]}" for b in blocks for t in layer_types]
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=names)
    proj = ClassProjection(model)
    names_of = np.asarray(
        model.class_names if model.class_names else [str(c) for c in range(n_classes)], dtype=object
    )
    frames = []
    for block in blocks:
        for layer_type in layer_types:
            acts = cache[f"blocks.{block}.{LAYER_HOOKS[layer_type]}"][:, tokens]
            logits = proj(acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts)
            top_logit, top_id = logits.topk(k, dim=-1)  # [image, token, k]
            top_prob = logits.softmax(-1).gather(-1, top_id)
            image, token, rank = np.meshgrid(
                np.arange(images.shape[0]), np.asarray(tokens), np.arange(k), indexing="ij"
            )
            ids = top_id.cpu().numpy().ravel()
            frames.append(
                pd.DataFrame(
                    dict(
                        image=image.ravel(),
                        block=block,
                        layer_type=layer_type,
                        token=token.ravel(),
                        token_label=np.asarray(labels, dtype=object)[token.ravel()],
                        rank=rank.ravel(),
                        class_id=ids,
                        class_name=names_of[ids],
                        logit=top_logit.cpu().double().numpy().ravel(),
                        probability=top_prob.cpu().double().numpy().ravel(),
                    )
                )
            )
    return pd.concat(frames, ignore_index=True)


def project_head_writes(model, cache, block: int) -> Float[Tensor, "batch pos n_heads n_classes"]:
    """Each head's write-in ``z_h · W_O[h]`` (without ``b_O``) read in class space, norm per vector.

    Needs ``blocks.{block}.attn.hook_z`` in the cache. Residual post-norm blocks write
    ``norm(sum of heads)``, which does not split into per-head write-ins: refused there.
    """
    if model.cfg.block_norm != "pre":
        raise ValueError(
            "per-head write-ins are not defined for residual post-norm blocks (the block's norm acts on "
            "the sum of the heads); read attn_out instead"
        )
    z = cache[f"blocks.{block}.attn.hook_z"]  # [batch, pos, head, d_head]
    w_o = model.blocks[block].attn.W_O  # [head, d_head, d_model]
    writes = torch.einsum("bphe,hed->bphd", z, w_o)
    return ClassProjection(model)(writes)


def project_neuron_values(model, block: int) -> Float[Tensor, "d_mlp n_classes"]:
    """Every MLP neuron's value vector (its row of ``W_out``, LayerScale included) read in class
    space with the norm recomputed per vector (METHODS §1). For the raw value projection
    ``E · W_out^T`` of the key-value memories see :mod:`vit_embedding_lens.lens.memories`."""
    return ClassProjection(model)(model.blocks[block].mlp.W_out.detach())
