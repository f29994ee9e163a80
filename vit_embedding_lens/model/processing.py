"""Opt-in weight processing, as TransformerLens offers it; each step keeps the log-probabilities.

- ``fold_ln``: fold every block norm's and the final norm's affine weights into the weights that
  read them (``W_Q/W_K/W_V``, ``W_in``, the classifier); the norms become ``LNPre``.
- ``center_writing_weights``: make everything written into the residual stream zero-mean over
  ``d_model`` (patch embedding, prefix tokens, positions, ``W_O``/``b_O``, ``W_out``/``b_out``):
  every reader of the residual is a LayerNorm, which removes the mean anyway.
- ``center_unembed``: zero-mean classifier weights over classes (logits shift by a constant).
- ``fold_value_biases``: ``b_V`` moves into ``b_O`` (attention rows sum to one).

Architectures where a step would change the function (residual post-norm blocks, a missing
classifier head) are refused with an error that says why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Sequence, Tuple, cast

import torch
from torch import Tensor

from vit_embedding_lens.model.components import ClassifierHead

if TYPE_CHECKING:
    from vit_embedding_lens.model.components import TransformerBlock
    from vit_embedding_lens.model.hooked_vit import HookedViT


def process_weights_(
    model: "HookedViT",
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> "HookedViT":
    """Apply the requested steps in place, in TransformerLens's order; returns the model."""
    if fold_ln:
        fold_layer_norm_(model)
    if center_writing_weights:
        center_writing_weights_(model)
    if center_unembed:
        center_unembed_(model)
    if fold_value_biases:
        fold_value_biases_(model)
    return model


def _blocks(model: "HookedViT") -> Sequence[TransformerBlock]:
    """``model.blocks`` with its item type (an ``nn.ModuleList`` is typed as holding modules)."""
    return cast("Sequence[TransformerBlock]", model.blocks)


def _centered(x: Tensor, dim: int = -1) -> Tensor:
    return x - x.mean(dim=dim, keepdim=True)


@torch.no_grad()
def fold_layer_norm_(model: "HookedViT") -> None:
    """Fold ln1/ln2 into the attention and MLP input weights and ln_final into the classifier.

    ``norm(x) @ W + b_W`` with ``norm(x) = n(x) * w + b`` equals ``n(x) @ (w[:, None] * W) +
    (b @ W + b_W)``; the norms keep only their normalization (TransformerLens's ``LNPre``).
    CLIP's ``ln_pre`` writes into the residual stream itself and stays as it is.
    """
    cfg = model.cfg
    if cfg.normalization_type != "LN":
        raise ValueError(
            f"fold_ln: the norms are already folded (normalization_type={cfg.normalization_type!r})"
        )
    if cfg.block_norm == "post":
        raise ValueError(
            f"fold_ln: {cfg.model_name} has residual post-norm blocks, whose norms write into the "
            f"residual stream; there is no following weight to fold them into"
        )
    if not cfg.n_classes:
        raise ValueError(
            f"fold_ln: {cfg.model_name} has no classifier head to fold the final norm into"
        )
    if cfg.global_pool == "map" or cfg.d_embed or cfg.head_type != "linear":
        raise ValueError(
            f"fold_ln: {cfg.model_name}'s final norm is read by an attention pool, a projection "
            "or a cosine head, not a linear classifier; folding it is not implemented for these "
            "heads (use the model unfolded)"
        )
    for block in _blocks(model):
        w1, b1 = block.ln1.w, block.ln1.b
        attn = block.attn
        for W, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)):
            b.add_(torch.einsum("d,hde->he", b1, W))
            W.mul_(w1[None, :, None])
        w2, b2 = block.ln2.w, block.ln2.b
        block.mlp.b_in.add_(b2 @ block.mlp.W_in)
        block.mlp.W_in.mul_(w2[:, None])
    wf, bf = model.ln_final.w, model.ln_final.b
    head = model.head
    heads = [(head.W_head, head.b_head)]
    if cfg.has_dist_token:
        heads.append((head.W_head_dist, head.b_head_dist))
    for W, b in heads:
        b.add_(bf @ W)
        W.mul_(wf[:, None])
    _drop_norm_affine(model)


def _drop_norm_affine(model: "HookedViT") -> None:
    """Turn the folded norms into LNPre: remove their (now folded) weights, switch the config."""
    norms = [model.ln_final] + [n for block in _blocks(model) for n in (block.ln1, block.ln2)]
    for norm in norms:
        del norm.w
        del norm.b
        norm.affine = False
    model.replace_cfg(normalization_type="LNPre")
    model.setup()


@torch.no_grad()
def center_writing_weights_(model: "HookedViT") -> None:
    """Remove the mean over ``d_model`` from every weight and bias that writes to the residual."""
    cfg = model.cfg
    if cfg.block_norm == "post":
        raise ValueError(
            f"center_writing_weights: {cfg.model_name} has residual post-norm blocks; attention "
            f"reads the residual stream without a norm, so centering it would change the output"
        )
    if cfg.final_norm == "pooled" and cfg.global_pool in ("max", "avgmax"):
        raise ValueError(
            f"center_writing_weights: {cfg.model_name} max-pools the residual stream before its "
            "norm; a per-token mean does not commute with the max, so centering would change the "
            "output"
        )
    embed = model.embed
    embed.W_E.copy_(_centered(embed.W_E, dim=0))  # conv weight [d_model, chan, ph, pw]
    embed.b_E.copy_(_centered(embed.b_E))
    embed.W_prefix.copy_(_centered(embed.W_prefix))
    if model.pos_embed is not None:
        model.pos_embed.W_pos.copy_(_centered(model.pos_embed.W_pos))
    if cfg.pre_norm:
        model.ln_pre.b.copy_(_centered(model.ln_pre.b))
    for block in _blocks(model):
        block.attn.W_O.copy_(_centered(block.attn.W_O))
        block.attn.b_O.copy_(_centered(block.attn.b_O))
        block.mlp.W_out.copy_(_centered(block.mlp.W_out))
        block.mlp.b_out.copy_(_centered(block.mlp.b_out))


@torch.no_grad()
def center_unembed_(model: "HookedViT") -> None:
    """Zero-mean the classifier over classes: each logit shifts by the same per-image constant."""
    head = model.classifier_head()
    if not isinstance(head, ClassifierHead):  # cosine: logit_bias is one number, only W shifts
        head.W_head.copy_(_centered(head.W_head, dim=-1))
        return
    pairs: List[Tuple[Tensor, Tensor]] = [(head.W_head, head.b_head)]
    if model.cfg.has_dist_token:
        pairs.append((head.W_head_dist, head.b_head_dist))
    for W, b in pairs:
        W.copy_(_centered(W, dim=-1))
        b.copy_(_centered(b))


@torch.no_grad()
def fold_value_biases_(model: "HookedViT") -> None:
    """Move ``b_V`` into ``b_O``: each query's pattern sums to one, so ``b_V`` passes through whole.

    Exact for the unmodified model; an intervention that zeroes attention weights without
    renormalizing (post-softmax knockout) no longer passes the whole value bias through.
    """
    for block in _blocks(model):
        attn = block.attn
        attn.b_O.add_(torch.einsum("he,hed->d", attn.b_V, attn.W_O))
        attn.b_V.zero_()
