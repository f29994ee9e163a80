"""Baselines (Chefer relevance, attention rollout, raw attention, random) against per-image
loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.attribution import (
    ATTRIBUTION_METHODS,
    attention_rollout,
    chefer_relevance,
    get_attribution_method,
    random_attribution,
    raw_attention,
    readout_positions,
)
from vit_embedding_lens.testing import create_timm_vit

TINY = dict(depth=2, img_size=32, patch_size=8, num_classes=10, embed_dim=64, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")

LAYOUTS = {
    "no-prefix-avg": ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    "cls": ("vit_tiny_patch16_224", {}),
    "cls+dist": ("deit_tiny_distilled_patch16_224", {}),
    "cls+4reg": ("vit_tiny_patch16_224", dict(reg_tokens=4)),
}


def tiny(key="cls", seed=0):
    name, kw = LAYOUTS[key]
    return HookedViT.from_timm(create_timm_vit(name, seed=seed, **{**TINY, **kw}))


def patterns_and_grads(model, image, cls):
    """Every block's pattern for one image, and the gradient of the class logit w.r.t. each
    (``retain_grad`` and ``backward``, not ``autograd.grad``)."""
    kept = []

    def keep(pattern, hook):
        pattern.retain_grad()
        kept.append(pattern)

    logits = model.run_with_hooks(
        image, fwd_hooks=[(lambda n: n.endswith("attn.hook_pattern"), keep)]
    )
    logits[0, cls].backward()
    model.zero_grad(set_to_none=True)
    patterns = [p[0].detach().numpy().astype(np.float64) for p in kept]
    return patterns, [p.grad[0].numpy().astype(np.float64) for p in kept]


def chefer_reference(model, image, cls):
    patterns, grads = patterns_and_grads(model, image, cls)
    n = patterns[0].shape[-1]
    relevance = np.eye(n)
    for a, g in zip(patterns, grads):
        cam = np.zeros((n, n))
        for h in range(a.shape[0]):  # one head at a time, then the average
            cam += np.maximum(a[h] * g[h], 0.0) / a.shape[0]
        relevance = relevance + cam @ relevance
    rows = readout_positions(model, model.layout)
    return relevance[rows].mean(0)[model.layout.n_prefix :]


def rollout_reference(model, image):
    _, cache = model.run_with_cache(image, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    n = model.layout.n_tokens
    flow = np.eye(n)
    for l in range(model.cfg.n_layers):
        a = cache[f"blocks.{l}.attn.hook_pattern"][0].double().numpy()
        mixed = 0.5 * a.mean(0) + 0.5 * np.eye(
            n
        )  # softmax rows sum to 1: (A + I) / 2 is row-stochastic
        flow = mixed @ flow
    rows = readout_positions(model, model.layout)
    return flow[rows].mean(0)[model.layout.n_prefix :]


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_chefer_matches_a_per_image_loop(key, make_images):
    model = tiny(key)
    images = make_images(3, 32, seed=5)
    classes = torch.tensor([1, 5, 9])
    result = chefer_relevance(model, images, classes, batch_size=2, progress=False)
    assert result.scores.shape == (3, model.layout.n_patches) and result.method == "chefer"
    for b in range(3):
        expected = chefer_reference(model, images[b : b + 1], int(classes[b]))
        np.testing.assert_allclose(result.scores[b].numpy(), expected, rtol=1e-4, atol=1e-6)
    assert (result.scores >= 0).all()
    assert not torch.allclose(result.scores, torch.zeros_like(result.scores))


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_rollout_matches_a_per_image_loop(key, make_images):
    model = tiny(key)
    images = make_images(3, 32, seed=6)
    result = attention_rollout(model, images, batch_size=2, progress=False)
    for b in range(3):
        expected = rollout_reference(model, images[b : b + 1])
        np.testing.assert_allclose(result.scores[b].numpy(), expected, rtol=1e-4, atol=1e-7)
    # the rolled-out flow of a row is a distribution over all tokens: image tokens hold part of it
    total = result.scores.sum(-1)
    assert (total > 0).all() and (total <= 1 + 1e-5).all()


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_raw_attention_is_the_last_blocks_readout_row(key, make_images):
    model = tiny(key)
    images = make_images(2, 32, seed=7)
    _, cache = model.run_with_cache(images)
    pattern = cache[f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"]
    rows = readout_positions(model, model.layout)
    expected = (
        torch.stack([pattern[:, :, r, :] for r in rows], 0)
        .mean(0)
        .mean(1)[:, model.layout.n_prefix :]
    )
    result = raw_attention(model, images, progress=False)
    torch.testing.assert_close(result.scores, expected)
    first = raw_attention(model, images, block=0, progress=False)
    assert not torch.allclose(first.scores, result.scores)


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_every_method_gives_maps_for_every_layout(key, make_images):
    model = tiny(key)
    layout = model.layout
    images = make_images(2, 32, seed=8)
    for name in ATTRIBUTION_METHODS:
        result = get_attribution_method(name)(model, images, [3, 4], progress=False)
        assert result.scores.shape == (2, layout.n_patches), name
        assert result.grid.shape == (2, *layout.grid_size), name
        assert torch.isfinite(result.scores).all(), name
        assert result.classes.tolist() == [3, 4], name
        frame = result.to_dataframe()
        assert len(frame) == 2 * layout.n_patches
        assert frame.token.min() == layout.n_prefix and frame.token.max() == layout.n_tokens - 1


def test_random_is_seeded_and_leaves_the_global_rng_alone(make_images):
    model = tiny()
    images = make_images(2, 32)
    state = torch.get_rng_state()
    a = random_attribution(model, images, seed=1)
    b = random_attribution(model, images, seed=1)
    c = random_attribution(model, images, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    assert (a.classes == -1).all()


def test_unknown_method_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="chefer"):
        get_attribution_method("gradcam")
