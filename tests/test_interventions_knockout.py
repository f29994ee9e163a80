"""Attention knockout: no-op when empty, fused pre-softmax equals the explicit path and a hand-built
attention, post-softmax equals zeroing the pattern by hand, heads/blocks are respected, token
removal composes with it, and on the trained bundled model ``self_only`` collapses image-token
identifiability while ``no_cls`` barely changes it."""

from __future__ import annotations

import functools

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.interventions import (
    identifiability,
    kept_positions,
    knockout,
    knockout_mask,
)
from vit_embedding_lens.testing import assert_close_scaled, create_prefix_variant


@functools.lru_cache(maxsize=None)
def tiny(n_prefix: int) -> HookedViT:
    return HookedViT.from_timm(
        create_prefix_variant(
            n_prefix, depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=4
        )
    )


@functools.lru_cache(maxsize=None)
def bundled() -> HookedViT:
    return HookedViT.from_bundled()


def all_names(model, suffix):
    return [f"blocks.{l}.{suffix}" for l in range(model.cfg.n_layers)]


def hand_attention(q, k, v, allowed, mode):
    """Attention from cached q, k, v [B, N, H, dh] with an allowed mask, by explicit loops over
    heads."""
    B, N, H, dh = q.shape
    z = torch.empty_like(q)
    for h in range(H):
        a = allowed[h] if allowed.ndim == 3 else allowed
        scores = q[:, :, h] @ k[:, :, h].transpose(1, 2) / dh**0.5  # [B, N, N]
        if mode == "pre_softmax":
            weights = torch.softmax(scores.masked_fill(~a, float("-inf")), dim=-1)
        else:
            weights = torch.softmax(scores, dim=-1) * a
        z[:, :, h] = weights @ v[:, :, h]
    return z


def test_empty_knockout_is_an_exact_no_op(make_images):
    model = tiny(1)
    images = make_images(2, 32)
    N = model.layout.n_tokens
    nothing = torch.zeros(N, N, dtype=torch.bool)
    clean = model(images)
    with knockout(model, mask=nothing) as ko:
        assert torch.equal(model(images), clean)
        assert all(b.attn.score_mask is None for b in model.blocks)
    assert ko.is_empty and ko.hooks() == []
    with knockout(model, mask=nothing, mode="post_softmax"):
        assert torch.equal(model(images), clean)


@pytest.mark.parametrize("n_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("mode", ["pre_softmax", "post_softmax"])
def test_knockout_matches_hand_built_attention(n_prefix, mode, make_images):
    model = tiny(n_prefix)
    images = make_images(3, 32)
    names = (
        all_names(model, "attn.hook_q")
        + all_names(model, "attn.hook_k")
        + all_names(model, "attn.hook_v")
    )
    names += all_names(model, "attn.hook_z") + all_names(model, "hook_resid_post")
    ko = knockout(model, "self_only", mode=mode)
    with ko:
        logits, cache = model.run_with_cache(images, names_filter=names)
    for l in range(model.cfg.n_layers):
        q, k, v = (cache[f"blocks.{l}.attn.hook_{x}"] for x in "qkv")
        expected = hand_attention(q, k, v, ko.allowed, mode)
        assert_close_scaled(cache[f"blocks.{l}.attn.hook_z"], expected, rel=2e-5)
    # the hook-list form (explicit path) gives the same run
    with model.hooks(fwd_hooks=ko.hooks()):
        hooked_logits = model(images)
    assert_close_scaled(hooked_logits, logits, rel=2e-5)
    # and the context manager left nothing behind
    assert all(b.attn.score_mask is None for b in model.blocks)
    assert not any(h.has_hooks() for h in model.hook_dict.values())
    assert not torch.allclose(model(images), logits, atol=1e-3)


def test_pre_softmax_runs_fused_and_equals_explicit(make_images):
    model = tiny(2)
    images = make_images(3, 32)
    with knockout(model, queries="image", keys=[0, 5, 7], blocks=[1]):
        assert (
            model.blocks[1].attn.score_mask is not None and model.blocks[0].attn.score_mask is None
        )
        fused = model(images)
        model.set_attention_implementation("explicit")
        try:
            explicit = model(images)
        finally:
            model.set_attention_implementation("auto")
    assert_close_scaled(fused, explicit, rel=1e-5)


def test_self_only_pattern_and_prefix_rows(make_images):
    """Pre-softmax self_only: image rows are one-hot on the diagonal; prefix rows equal the clean
    pattern in the first knocked-out block."""
    model = tiny(5)
    layout = model.layout
    images = make_images(2, 32)
    name = "blocks.0.attn.hook_pattern"
    _, clean = model.run_with_cache(images, names_filter=name)
    with knockout(model, "self_only"):
        _, cache = model.run_with_cache(images, names_filter=name)
    pattern = cache[name]
    image = list(layout.patch_indices)
    eye = torch.eye(layout.n_tokens)[image]
    torch.testing.assert_close(pattern[:, :, image], eye.expand_as(pattern[:, :, image]))
    prefix = list(layout.prefix_indices)
    torch.testing.assert_close(pattern[:, :, prefix], clean[name][:, :, prefix])
    # post-softmax: image rows keep only their own (unrenormalized) weight
    with knockout(model, "self_only", mode="post_softmax"):
        _, post = model.run_with_cache(images, names_filter=name)
    diag = clean[name].diagonal(dim1=-2, dim2=-1)[..., image]
    torch.testing.assert_close(post[name][:, :, image].sum(-1), diag)


def test_heads_and_blocks_are_respected(make_images):
    model = tiny(1)
    images = make_images(2, 32)
    z1 = "blocks.1.attn.hook_z"
    names = [z1, "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"]
    _, clean = model.run_with_cache(images, names_filter=names)
    with knockout(model, "no_cls", blocks=1, heads=[0, 2]):
        _, cache = model.run_with_cache(images, names_filter=names)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_post"])
    changed = (cache[z1] - clean[z1]).abs().amax(dim=(0, 1, 3))  # per head
    assert changed[0] > 1e-3 and changed[2] > 1e-3
    assert changed[1] < 1e-6 and changed[3] < 1e-6
    assert (
        cache[z1][:, 0, 0] - clean[z1][:, 0, 0]
    ).abs().max() < 1e-6  # the CLS query row is untouched


@pytest.mark.parametrize("mode", ["pre_softmax", "post_softmax"])
def test_knockout_with_token_removal_equals_masking(mode, make_images):
    """Removal + knockout equals: all tokens kept, removed keys masked before the softmax in every
    block, then the same knockout (for the kept tokens' outputs)."""
    model = tiny(1)
    layout = model.layout
    images = make_images(3, 32)
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(3, layout.n_tokens, generator=gen) < 0.6
    keep[:, : layout.n_prefix + 1] = True
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with knockout(model, "no_cls", mode=mode, blocks=0):
        _, removed = model.run_with_cache(images, keep_mask=keep, names_filter=last)
    mask_keys = lambda s, hook: s.masked_fill(~keep[:, None, None, :], float("-inf"))
    hooks = [(n, mask_keys) for n in all_names(model, "attn.hook_attn_scores")]
    with model.hooks(fwd_hooks=hooks), knockout(model, "no_cls", mode=mode, blocks=0):
        _, masked = model.run_with_cache(images, names_filter=last)
    index, valid = kept_positions(keep)
    for b in range(3):
        assert_close_scaled(
            removed[last][b, valid[b]], masked[last][b, index[b][valid[b]]], rel=2e-5
        )


def test_knockout_masks_and_errors():
    layout = tiny(2).layout
    N, P = layout.n_tokens, layout.n_prefix
    so = knockout_mask(layout, "self_only")
    for i in range(N):  # slow reference
        for j in range(N):
            assert so[i, j] == (i >= P and i != j)
    nc = knockout_mask(layout, "no_cls")
    assert nc.sum() == layout.n_patches and nc[P:, layout.cls_index].all()
    qk = knockout_mask(layout, queries="cls", keys="image")
    assert qk.sum() == layout.n_patches and qk[0, P:].all()
    assert knockout_mask(layout, queries=[3], keys=None)[3].all()
    with pytest.raises(ValueError, match="exactly one"):
        knockout_mask(layout, "self_only", queries="cls")
    with pytest.raises(ValueError, match="preset"):
        knockout_mask(layout, "everything")
    with pytest.raises(ValueError, match="bool tensor"):
        knockout_mask(layout, mask=torch.ones(N, N))
    with pytest.raises(ValueError, match="no CLS"):
        knockout(tiny(0), "no_cls")
    with pytest.raises(ValueError, match="every key"):
        knockout(tiny(2), queries="all", keys="all")
    knockout(tiny(2), queries="all", keys="all", mode="post_softmax")  # allowed: weights become 0
    with pytest.raises(IndexError, match="block"):
        knockout(tiny(2), "self_only", blocks=[7])
    with pytest.raises(ValueError, match="mode"):
        knockout(tiny(2), "self_only", mode="softmax")


def test_bundled_self_only_collapses_identifiability_no_cls_does_not():
    """Correct-label rank 0 of image tokens' final resid_post (ClassProjection), 50 digits."""
    from vit_embedding_lens.zoo.bundled import load_mnist_eval

    model = bundled()
    data = load_mnist_eval()
    images, labels = data.images[::10], data.labels[::10]
    metric = identifiability(model, labels, top1=True, readout="image")

    def measure():
        _, cache = model.run_with_cache(images, names_filter=metric.hook_name)
        return metric.from_cache(cache).item()

    base = measure()
    found = {}
    for preset in ("self_only", "no_cls"):
        for mode in ("pre_softmax", "post_softmax"):
            with knockout(model, preset, mode=mode):
                found[preset, mode] = measure()
    for mode in ("pre_softmax", "post_softmax"):
        # measured (50 digits): base 0.305; self_only 0.113 / 0.088; no_cls 0.323 / 0.317
        assert found["self_only", mode] < 0.7 * base, (base, found)
        assert abs(found["no_cls", mode] - base) < 0.1 * base, (base, found)
