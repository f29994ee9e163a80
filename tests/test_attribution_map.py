"""Attributions of attention-pool (MAP, SigLIP) models: the readout weights are the pool's
head-averaged attention, and every map reads its rows through them (references computed another
way: per-image loops in float64 from ``run_with_cache``/``backward``). Fixed pools keep their rows.

timm models are built with realistic random weights (``vit_embedding_lens.testing``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vit_embedding_lens import HookedViT
from vit_embedding_lens.attribution import (
    ATTRIBUTION_METHODS,
    attention_rollout,
    chefer_relevance,
    class_space_attribution,
    raw_attention,
    readout_positions,
)
from vit_embedding_lens.attribution.class_space import class_space_loss
from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.model.readout import POOL_PATTERN, readout_hooks, readout_weights
from vit_embedding_lens.testing import create_timm_vit, randomize_vit_weights_

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=4)


def siglip(seed: int = 0):
    """timm's SigLIP architecture (no CLS token, MAP head), small."""
    return HookedViT.from_timm(
        create_timm_vit("vit_base_patch16_siglip_224", seed=seed, num_classes=7, **SMALL)
    )


def cls_registers_map(seed: int = 1):
    """A CLS token and two registers, pooled by MAP that leaves the prefix out."""
    tm = VisionTransformer(
        **SMALL, global_pool="map", class_token=True, reg_tokens=2, num_classes=5
    )
    return HookedViT.from_timm(randomize_vit_weights_(tm, seed=seed))


CASES = {"siglip": siglip, "cls_registers_map": cls_registers_map}


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def pool_weights(model, x) -> np.ndarray:
    """The pool's attention averaged over heads, placed at the pooled positions (float64)."""
    _, cache = model.run_with_cache(x, names_filter=[POOL_PATTERN])
    pattern = cache[POOL_PATTERN].double().numpy()  # [batch, head, 1, pooled]
    n, pooled = model.layout.n_tokens, pattern.shape[-1]
    out = np.zeros((x.shape[0], n))
    for h in range(pattern.shape[1]):
        out[:, n - pooled :] += pattern[:, h, 0] / pattern.shape[1]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_readout_weights_are_the_pools_head_averaged_attention(case):
    model, x = CASES[case](), images()
    _, cache = model.run_with_cache(x, names_filter=readout_hooks(model))
    weights = readout_weights(model, model.layout, cache)
    assert weights.shape == (3, model.layout.n_tokens)
    np.testing.assert_allclose(weights.double().numpy(), pool_weights(model, x), atol=1e-6)
    torch.testing.assert_close(weights.sum(1), torch.ones(3))
    assert (weights[:, : model.layout.n_prefix] == 0).all()  # the pool leaves the prefix out
    assert (weights[:, model.layout.n_prefix :] > 0).all()
    with pytest.raises(ValueError, match="readout_weights"):
        readout_positions(model)
    with pytest.raises(ValueError, match="attn_pool.hook_pattern"):
        readout_weights(model)


def test_fixed_pools_weight_their_readout_positions():
    cls = HookedViT.from_timm(create_timm_vit("vit_tiny_patch16_224", seed=0, **SMALL))
    w = readout_weights(cls)
    assert w.shape == (1, cls.layout.n_tokens) and w[0, 0] == 1 and w.sum() == 1
    avg = HookedViT.from_timm(
        create_timm_vit(
            "vit_tiny_patch16_224", seed=0, class_token=False, global_pool="avg", **SMALL
        )
    )
    torch.testing.assert_close(readout_weights(avg), torch.full((1, 16), 1 / 16))


@pytest.mark.parametrize("case", list(CASES))
def test_raw_attention_is_the_pool_weighted_query_rows(case):
    model, x = CASES[case](), images()
    got = raw_attention(model, x, progress=False).scores
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
    last = cache[f"blocks.{model.cfg.n_layers - 1}.attn.hook_pattern"].double().numpy()
    w = pool_weights(model, x)
    ref = np.stack(
        [sum(w[b, q] * last[b, :, q].mean(0) for q in range(w.shape[1])) for b in range(3)]
    )
    assert got.shape == (3, model.layout.n_patches) and torch.isfinite(got).all()
    np.testing.assert_allclose(got.double().numpy(), ref[:, model.layout.n_prefix :], atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_is_the_pool_weighted_flow(case):
    model, x = CASES[case](), images()
    got = attention_rollout(model, x, progress=False).scores
    _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    n, w = model.layout.n_tokens, pool_weights(model, x)
    for b in range(3):
        flow = np.eye(n)
        for l in range(model.cfg.n_layers):
            a = cache[f"blocks.{l}.attn.hook_pattern"][b].double().numpy()
            flow = (0.5 * a.mean(0) + 0.5 * np.eye(n)) @ flow
        ref = (w[b] @ flow)[model.layout.n_prefix :]
        np.testing.assert_allclose(got[b].double().numpy(), ref, atol=1e-6)
    if model.layout.n_prefix == 0:  # row-stochastic flow, weights summing to 1: a distribution
        torch.testing.assert_close(got.sum(1), torch.ones(3))


@pytest.mark.parametrize("case", list(CASES))
def test_chefer_is_the_pool_weighted_relevance(case):
    model, x = CASES[case](), images(2)
    result = chefer_relevance(model, x, progress=False)
    assert result.scores.shape == (2, model.layout.n_patches)
    assert torch.isfinite(result.scores).all()
    w, n = pool_weights(model, x), model.layout.n_tokens
    for b in range(2):
        kept = []

        def keep(pattern, hook):
            pattern.retain_grad()
            kept.append(pattern)

        with torch.enable_grad():
            logits = model.run_with_hooks(
                x[b : b + 1], fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"), keep)]
            )
            logits[0, result.classes[b]].backward()
        model.zero_grad(set_to_none=True)
        relevance = np.eye(n)
        for p in kept:
            a, g = p[0].detach().double().numpy(), p.grad[0].double().numpy()
            cam = sum(np.maximum(a[h] * g[h], 0.0) for h in range(a.shape[0])) / a.shape[0]
            relevance = relevance + cam @ relevance
        ref = (w[b] @ relevance)[model.layout.n_prefix :]
        np.testing.assert_allclose(result.scores[b].double().numpy(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_class_space_equals_the_gradient_wrt_the_pool_mixed_row(case):
    """Pre-norm blocks write in linearly in the pattern: with the readout ``sum_r w_r write_r``,
    ``sum_r w_r dL/dA_r = (sum_r w_r^2) dL/dĀ`` for the mixed row ``Ā = sum_r w_r A_r``."""
    model, x = CASES[case](), images(2)
    assert model.cfg.block_norm == "pre"
    result = class_space_attribution(model, x, per_head=True, progress=False)
    P = model.layout.n_patches
    assert result.per_head is not None and result.per_head.shape == (2, 2, 4, P)
    assert torch.isfinite(result.scores).all()
    names = [f"blocks.{l}.attn.hook_{k}" for l in range(2) for k in ("pattern", "v")]
    _, cache = model.run_with_cache(x, names_filter=names)
    w = torch.from_numpy(pool_weights(model, x))
    projection = ClassProjection(model)
    for l in range(2):
        a = cache[f"blocks.{l}.attn.hook_pattern"].double()
        v = cache[f"blocks.{l}.attn.hook_v"].double()
        attn = model.blocks[l].attn
        mixed = torch.einsum("bq,bhqk->bhk", w, a).requires_grad_(True)
        write = torch.einsum("bhk,bkhe,hed->bd", mixed, v, attn.W_O.detach().double())
        write = (write + attn.b_O.detach().double()).float()
        losses = class_space_loss(projection.differentiable(write), result.classes, "cross_entropy")
        (grad,) = torch.autograd.grad(losses.sum(), mixed)
        ref = -(w**2).sum(1)[:, None, None] * grad
        torch.testing.assert_close(
            result.per_head[:, l].double(), ref[..., model.layout.n_prefix :], atol=1e-5, rtol=1e-4
        )


def test_every_method_runs_on_a_map_model():
    model, x = siglip(), images(2)
    for name, method in ATTRIBUTION_METHODS.items():
        scores = method(model, x, progress=False).scores
        assert scores.shape == (2, model.layout.n_patches), name
        assert torch.isfinite(scores).all(), name


def test_default_runner_analyses_run_on_a_map_model(tmp_path):
    """``vit-lens analyze``'s default analyses, attribution included, on a tiny SigLIP tower."""
    from vit_embedding_lens.data import InMemoryDataset
    from vit_embedding_lens.runner import build_analyses, run_analyses, summarize_run
    from vit_embedding_lens.runner.analyses import DEFAULT_ANALYSES

    model = HookedViT.from_timm(
        create_timm_vit("vit_base_patch16_siglip_224", seed=0, num_classes=3, **SMALL)
    )
    dataset = InMemoryDataset(images(4), torch.tensor([0, 1, 2, 0]))
    analyses = build_analyses(DEFAULT_ANALYSES)
    results = run_analyses(model, dataset, analyses, tmp_path, batch_size=2, progress=False)
    tables, _ = summarize_run(results, analyses, model)
    assert "attribution" in DEFAULT_ANALYSES
    auc = tables["attribution"]["auc"]
    assert {"class_space", "chefer", "random"} <= set(auc.method)
    assert np.isfinite(auc.auc.to_numpy(dtype=float)).all()
