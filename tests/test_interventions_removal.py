"""Token removal in the forward pass (``keep_mask=``): equal to masking the removed keys in every
block, uneven rows equal per-image runs, padding never leaks, prefix tokens are protected."""

from __future__ import annotations

import functools

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.interventions import kept_positions, to_layout_order
from vit_embedding_lens.testing import assert_close_scaled, create_prefix_variant


@functools.lru_cache(maxsize=None)
def tiny(n_prefix: int) -> HookedViT:
    model = HookedViT.from_timm(
        create_prefix_variant(
            n_prefix, depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=4
        )
    )
    assert model.layout.n_prefix == n_prefix
    return model


def random_keep(layout, batch: int, p: float = 0.6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, layout.n_tokens, generator=gen) < p
    keep[:, : layout.n_prefix] = True
    keep[:, layout.n_prefix] = True  # at least one image token
    keep[0, layout.n_prefix + 1 :] = False  # row 0 keeps few tokens: uneven rows, padding
    return keep


def masked_keys_reference(model: HookedViT, images, keep):
    """Every token stays; removed tokens' scores are set to -inf as keys in every block (by hand,
    on the attention scores, explicit path). Returns (final resid_post [B, N, d], logits)."""

    def mask_scores(scores, hook):
        return scores.masked_fill(~keep[:, None, None, :], float("-inf"))

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    hooks = [(f"blocks.{l}.attn.hook_attn_scores", mask_scores) for l in range(model.cfg.n_layers)]
    with model.hooks(fwd_hooks=hooks):
        logits, cache = model.run_with_cache(images, names_filter=last)
    return cache[last], logits


@pytest.mark.parametrize("n_prefix", [0, 1, 2, 5])
def test_removal_equals_masking_removed_keys(n_prefix, make_images):
    model = tiny(n_prefix)
    layout = model.layout
    images = make_images(4, 32)
    keep = random_keep(layout, 4)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits, cache = model.run_with_cache(images, keep_mask=keep, names_filter=last)
    index, valid = kept_positions(keep)
    removed_resid = cache[last]
    assert removed_resid.shape[1] == int(keep.sum(1).max()) < layout.n_tokens

    ref_resid, ref_logits = masked_keys_reference(model, images, keep)
    for b in range(4):
        slots = index[b][valid[b]]
        assert_close_scaled(removed_resid[b, valid[b]], ref_resid[b, slots], rel=2e-5)
    if model.cfg.global_pool == "token" or model.cfg.has_dist_token:
        assert_close_scaled(logits, ref_logits, rel=2e-5)
    else:  # average pooling over the kept image tokens of the masked run, then fc_norm and head
        kept_image = keep[:, layout.n_prefix :, None].to(ref_resid.dtype)
        pooled = (layout.patch_tokens(ref_resid) * kept_image).sum(1) / kept_image.sum(1)
        assert_close_scaled(logits, model.head(model.ln_final(pooled)), rel=2e-5)
    # and the removal really changed something
    assert not torch.allclose(logits, model(images), atol=1e-3)


@pytest.mark.parametrize("n_prefix", [0, 1, 2, 5])
def test_uneven_rows_equal_per_image_runs(n_prefix, make_images):
    model = tiny(n_prefix)
    images = make_images(3, 32, seed=1)
    keep = random_keep(model.layout, 3, seed=2)
    assert len(set(keep.sum(1).tolist())) > 1
    batched = model(images, keep_mask=keep)
    one_by_one = torch.cat([model(images[i : i + 1], keep_mask=keep[i : i + 1]) for i in range(3)])
    assert_close_scaled(batched, one_by_one, rel=2e-5)
    # a single image that keeps a token set runs without any padding: compare with plain slicing
    b = 2
    slots = keep[b].nonzero().squeeze(1)
    _, cache = model.run_with_cache(images[b : b + 1], keep_mask=keep[b : b + 1])
    _, full = model.run_with_cache(images[b : b + 1])
    first = "blocks.0.hook_resid_pre"
    torch.testing.assert_close(cache[first][0], full[first][0, slots])


def test_padding_never_influences_real_tokens(make_images):
    """Overwrite the padded slots with large noise before every block: real tokens do not move."""
    model = tiny(1)
    images = make_images(3, 32)
    keep = random_keep(model.layout, 3)
    _, valid = kept_positions(keep)
    assert not bool(valid.all())
    clean = model(images, keep_mask=keep)

    def scramble(resid, hook):
        noise = 100 * torch.randn_like(resid)
        return torch.where(valid[..., None], resid, noise)

    hooks = [(f"blocks.{l}.hook_resid_pre", scramble) for l in range(model.cfg.n_layers)]
    torch.testing.assert_close(model.run_with_hooks(images, keep_mask=keep, fwd_hooks=hooks), clean)
    # the same with the explicit attention path (pattern hooked)
    hooks.append(("blocks.0.attn.hook_pattern", lambda p, hook: p))
    torch.testing.assert_close(model.run_with_hooks(images, keep_mask=keep, fwd_hooks=hooks), clean)


def test_keep_everything_is_a_no_op(make_images):
    model = tiny(2)
    images = make_images(2, 32)
    keep = torch.ones(2, model.layout.n_tokens, dtype=torch.bool)
    torch.testing.assert_close(model(images, keep_mask=keep), model(images))
    model(images, keep_mask=keep)
    assert torch.equal(model.token_positions, torch.arange(model.layout.n_tokens).expand(2, -1))
    model(images)
    assert model.token_positions is None


def test_kept_positions_reference():
    keep = torch.tensor(
        [[1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool
    )
    index, valid = kept_positions(keep)
    assert index.shape == valid.shape == (3, 6)
    for b in range(3):  # slow reference: an explicit loop
        expected = [i for i in range(6) if keep[b, i]]
        assert index[b, : len(expected)].tolist() == expected
        assert valid[b].tolist() == [s < len(expected) for s in range(6)]
        assert (index[b, len(expected) :] == -1).all()
    values = torch.arange(18.0).view(3, 6)
    back = to_layout_order(values, index, n_tokens=6)
    for b in range(3):
        for s in range(6):
            if valid[b, s]:
                assert back[b, index[b, s]] == values[b, s]
    assert torch.isnan(back[~keep]).all() and not torch.isnan(back[keep]).any()


def test_bad_keep_masks_raise(make_images):
    model = tiny(1)
    images = make_images(2, 32)
    N = model.layout.n_tokens
    keep = torch.ones(2, N, dtype=torch.bool)
    no_cls = keep.clone()
    no_cls[1, 0] = False
    with pytest.raises(ValueError, match="prefix token"):
        model(images, keep_mask=no_cls)
    with pytest.raises(TypeError, match="bool"):
        model(images, keep_mask=keep.float())
    with pytest.raises(ValueError, match=r"\[batch, n_tokens\]"):
        model(images, keep_mask=keep[:, 1:])
    with pytest.raises(ValueError, match="rows"):
        model(images, keep_mask=keep[:1])
    avg = tiny(0)
    nothing = torch.zeros(2, avg.layout.n_tokens, dtype=torch.bool)
    nothing[0] = True
    with pytest.raises(ValueError, match="keeps no token"):
        avg(images, keep_mask=nothing)


def test_remove_context_and_object_runs(make_images):
    from vit_embedding_lens.interventions import (
        keep_class_tokens,
        keep_context_tokens,
        remove_context,
        remove_object,
    )

    model = tiny(2)
    layout = model.layout
    images = make_images(3, 32, seed=4)
    gen = torch.Generator().manual_seed(5)
    on_object = (torch.rand(3, layout.n_tokens, generator=gen) < 0.4) & layout.image_token_mask()
    on_object[:, -1] = True  # every image has some object and some context
    on_object[:, -2] = False
    keep_class, keep_context = (
        keep_class_tokens(on_object, layout),
        keep_context_tokens(on_object, layout),
    )
    image = layout.image_token_mask()
    assert keep_class[:, : layout.n_prefix].all() and keep_context[:, : layout.n_prefix].all()
    assert torch.equal(
        keep_class[:, image] ^ keep_context[:, image], torch.ones_like(keep_class[:, image])
    )
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    run = remove_context(model, images, on_object, names_filter=last)
    torch.testing.assert_close(run.logits, model(images, keep_mask=keep_class))
    full = run.in_layout_order(last)  # [B, N, d]: NaN at removed tokens
    assert full.shape == (3, layout.n_tokens, model.cfg.d_model)
    assert torch.isnan(full[~keep_class]).all() and not torch.isnan(full[keep_class]).any()
    for b in range(3):
        torch.testing.assert_close(full[b, keep_class[b]], run.cache[last][b, run.valid[b]])
    other = remove_object(model, images, on_object)
    assert other.cache is None
    torch.testing.assert_close(other.logits, model(images, keep_mask=keep_context))
