"""TransformerLens semantics: ActivationCache helpers, names_filter, hooks.

Small randomized models: a plain CLS ViT, a LayerScale + no_embed_class CLS ViT
(deit3), the avg-pool residual-post-norm ViT (rpn) where it makes sense, and the
distilled DeiT.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformer_lens
from timm.models.vision_transformer import ResPostBlock

from vit_embedding_lens import HookedViT
from vit_embedding_lens.testing import assert_close_scaled, create_timm_vit

REL = 1e-5
RTOL = 1e-5

MODELS = {
    "vit": (
        "vit_base_patch16_224",
        dict(depth=3, embed_dim=64, num_heads=4, img_size=(48, 64), num_classes=11),
    ),
    "deit3": (
        "deit3_small_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64, num_classes=11),
    ),
    "rpn": (
        "vit_base_patch16_rpn_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64, num_classes=11),
    ),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64, num_classes=11)),
}
CLS_MODELS = ["vit", "deit3"]  # logits read from the CLS token through ln_final, one head
PRE_NORM_MODELS = ["vit", "deit3", "distilled"]  # attn_out is linear in the per-head results


def _build(key: str, seed: int = 0, **from_timm_kwargs):
    name, overrides = MODELS[key]
    tm = create_timm_vit(name, seed=seed, **overrides)
    return tm, HookedViT.from_timm(tm, **from_timm_kwargs)


def _images(tm, make_images, batch=2, seed=0):
    return make_images(batch, tuple(tm.patch_embed.img_size), in_chans=tm.in_chans, seed=seed)


def _all_hook_names(hm) -> list[str]:
    return list(hm.hook_dict.keys())


# --------------------------------------------------------------------------------------
# run_with_cache basics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(MODELS))
def test_run_with_cache_returns_activation_cache(key, make_images):
    tm, hm = _build(key)
    x = _images(tm, make_images)
    logits, cache = hm.run_with_cache(x)
    assert isinstance(cache, transformer_lens.ActivationCache)
    assert cache.model is hm
    assert_close_scaled(logits, tm(x), rel=REL, rtol=RTOL)
    # TransformerLens shorthand indexing works on the cache
    torch.testing.assert_close(
        cache["resid_post", 0], cache["blocks.0.hook_resid_post"], atol=0, rtol=0
    )
    torch.testing.assert_close(
        cache["pattern", -1],
        cache[f"blocks.{hm.cfg.n_layers - 1}.attn.hook_pattern"],
        atol=0,
        rtol=0,
    )


@pytest.mark.parametrize("key", ["vit", "distilled"])
def test_names_filter_restricts_keys_exactly(key, make_images):
    tm, hm = _build(key)
    x = _images(tm, make_images)
    all_names = set(_all_hook_names(hm))

    _, cache = hm.run_with_cache(x, names_filter="blocks.1.attn.hook_pattern")
    assert set(cache.keys()) == {"blocks.1.attn.hook_pattern"}

    wanted = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "hook_logits"]
    _, cache = hm.run_with_cache(x, names_filter=wanted)
    assert set(cache.keys()) == set(wanted)

    pred = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    _, cache = hm.run_with_cache(x, names_filter=pred)
    expected = {f"blocks.{l}.hook_resid_post" for l in range(hm.cfg.n_layers)}
    assert set(cache.keys()) == expected == {n for n in all_names if pred(n)}

    _, full = hm.run_with_cache(x)
    assert set(full.keys()) <= all_names
    assert expected < set(full.keys())


def test_remove_batch_dim_and_device(make_images):
    tm, hm = _build("vit")
    x = _images(tm, make_images, batch=1)
    N, d = hm.cfg.n_ctx, hm.cfg.d_model
    logits, cache = hm.run_with_cache(x, remove_batch_dim=True)
    assert logits.shape == (1, hm.cfg.n_classes)
    assert cache.has_batch_dim is False
    assert cache["blocks.0.hook_resid_post"].shape == (N, d)
    assert cache["blocks.0.attn.hook_pattern"].shape == (hm.cfg.n_heads, N, N)
    assert cache["hook_pooled"].shape == (d,)

    _, batched = hm.run_with_cache(x)
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_post"], batched["blocks.1.hook_resid_post"][0], atol=0, rtol=0
    )

    _, cache_cpu = hm.run_with_cache(x, device="cpu")
    assert all(v.device.type == "cpu" for v in cache_cpu.values())
    _, cache_dev = hm.run_with_cache(x, device=torch.device("cpu"))
    torch.testing.assert_close(cache_dev["hook_logits"], logits, atol=0, rtol=0)


# --------------------------------------------------------------------------------------
# Residual-stream decompositions
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", CLS_MODELS)
@pytest.mark.parametrize("fold_ln", [False, True])
def test_accumulated_resid_logit_lens_final_entry_is_the_logits(key, fold_ln, make_images):
    tm, hm = _build(key, fold_ln=fold_ln)
    x = _images(tm, make_images)
    logits, cache = hm.run_with_cache(x)
    acc, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    L = hm.cfg.n_layers
    assert acc.shape == (L + 1, x.shape[0], hm.cfg.n_ctx, hm.cfg.d_model)
    assert len(labels) == L + 1
    cls = hm.layout.cls_index
    lens_logits = acc[-1, :, cls] @ hm.W_U + hm.b_U
    assert_close_scaled(lens_logits, logits, rel=REL, rtol=RTOL)
    assert_close_scaled(logits, tm(x), rel=REL, rtol=RTOL)
    # the un-normalized final entry is the last block's output
    raw = cache.accumulated_resid()
    torch.testing.assert_close(raw[-1], cache[f"blocks.{L - 1}.hook_resid_post"], atol=0, rtol=0)


@pytest.mark.parametrize("key", list(MODELS))
def test_decompose_resid_sums_to_resid_post(key, make_images):
    tm, hm = _build(key)
    x = _images(tm, make_images)
    _, cache = hm.run_with_cache(x)
    L = hm.cfg.n_layers
    comps, labels = cache.decompose_resid(return_labels=True)
    assert labels[:2] == ["embed", "pos_embed"]
    assert comps.shape[0] == 2 + 2 * L == len(labels)
    assert_close_scaled(comps.sum(0), cache[f"blocks.{L - 1}.hook_resid_post"], rel=1e-4, rtol=1e-5)
    # up to the input of layer 1, and up to the MLP input of layer 1
    assert_close_scaled(
        cache.decompose_resid(layer=1).sum(0), cache["blocks.1.hook_resid_pre"], rel=1e-4, rtol=1e-5
    )
    assert_close_scaled(
        cache.decompose_resid(layer=1, mlp_input=True).sum(0),
        cache["blocks.1.hook_resid_mid"],
        rel=1e-4,
        rtol=1e-5,
    )


@pytest.mark.parametrize("key", PRE_NORM_MODELS)
@pytest.mark.parametrize("use_attn_result", [False, True])
def test_stack_head_results_sum_to_attn_out(key, use_attn_result, make_images):
    tm, hm = _build(key)
    assert not any(isinstance(b, ResPostBlock) for b in tm.blocks)
    x = _images(tm, make_images)
    reference = hm(x)
    if use_attn_result:
        hm.set_use_attn_result(True)
    logits, cache = hm.run_with_cache(x)
    assert_close_scaled(logits, reference, rel=REL, rtol=RTOL)
    B, N, H, d, L = x.shape[0], hm.cfg.n_ctx, hm.cfg.n_heads, hm.cfg.d_model, hm.cfg.n_layers
    if use_attn_result:
        for l in range(L):
            assert cache[f"blocks.{l}.attn.hook_result"].shape == (B, N, H, d)

    stack, labels = cache.stack_head_results(return_labels=True)  # [L*H, B, N, d]
    assert stack.shape == (L * H, B, N, d)
    assert labels[: H + 1] == [f"L0H{h}" for h in range(H)] + ["L1H0"]
    per_layer = stack.reshape(L, H, B, N, d)
    for l in range(L):
        total = per_layer[l].sum(0) + hm.blocks[l].attn.b_O
        assert_close_scaled(total, cache[f"blocks.{l}.hook_attn_out"], rel=1e-4, rtol=1e-5)
        # head h alone: z_h @ W_O[h]
        z = cache[f"blocks.{l}.attn.hook_z"]
        assert_close_scaled(
            per_layer[l, 1], z[:, :, 1] @ hm.blocks[l].attn.W_O[1], rel=1e-4, rtol=1e-5
        )


@pytest.mark.parametrize("key", ["deit3", "distilled"])
def test_stack_neuron_results_sum_to_mlp_out(key, make_images):
    """W_out must carry the LayerScale gamma so neuron results add up to hook_mlp_out."""
    tm, hm = _build(key)
    x = _images(tm, make_images)
    _, cache = hm.run_with_cache(x)
    L, dm = hm.cfg.n_layers, hm.cfg.d_mlp
    neurons = cache.stack_neuron_results(layer=L)  # [L*d_mlp, B, N, d]
    per_layer = neurons.reshape(L, dm, *neurons.shape[1:])
    for l in range(L):
        total = per_layer[l].sum(0) + hm.blocks[l].mlp.b_out
        assert_close_scaled(total, cache[f"blocks.{l}.hook_mlp_out"], rel=1e-4, rtol=1e-5)


@pytest.mark.parametrize("key", CLS_MODELS)
def test_apply_ln_to_stack_and_logit_attrs_reconstruct_the_class_logit(key, make_images):
    x_seed = 5
    # unfolded model: LN scale from the cache, LN weight/bias applied by hand
    tm, hm = _build(key)
    x = _images(tm, make_images, seed=x_seed)
    logits, cache = hm.run_with_cache(x)
    cls = hm.layout.cls_index
    comps = cache.decompose_resid(pos_slice=cls)  # [C, B, d] at the CLS position
    normed = cache.apply_ln_to_stack(comps, layer=-1, pos_slice=cls)
    recon = (normed.sum(0) * hm.ln_final.w + hm.ln_final.b) @ hm.W_U + hm.b_U
    assert_close_scaled(recon, logits, rel=1e-4, rtol=1e-5)

    # folded model: direct logit attribution is exact
    hm_f = HookedViT.from_timm(tm, fold_ln=True)
    assert hm_f.cfg.normalization_type == "LNPre"
    logits_f, cache_f = hm_f.run_with_cache(x)
    assert_close_scaled(logits_f, logits, rel=REL, rtol=RTOL)
    comps_f = cache_f.decompose_resid(pos_slice=cls)
    normed_f = cache_f.apply_ln_to_stack(comps_f, layer=-1, pos_slice=cls)
    assert_close_scaled(normed_f.sum(0) @ hm_f.W_U + hm_f.b_U, logits, rel=1e-4, rtol=1e-5)

    class_ids = torch.tensor([3, 7])  # one class per image, different for the two images
    attrs = cache_f.logit_attrs(comps_f, tokens=class_ids, pos_slice=cls)  # [C, B]
    assert attrs.shape == (comps_f.shape[0], x.shape[0])
    total = attrs.sum(0) + hm_f.b_U[class_ids]
    expected = logits.gather(1, class_ids[:, None])[:, 0]
    assert_close_scaled(total, expected, rel=1e-4, rtol=1e-5)


def test_avg_pool_readout_through_ln_final(make_images):
    """rpn: logits = fc_norm(mean of patch tokens of the last block) @ W_U + b_U."""
    tm, hm = _build("rpn")
    x = _images(tm, make_images)
    logits, cache = hm.run_with_cache(x)
    L, n_pre = hm.cfg.n_layers, hm.layout.n_prefix
    pooled = cache[f"blocks.{L - 1}.hook_resid_post"][:, n_pre:].mean(1)
    via_ln = hm.ln_final(pooled) @ hm.W_U + hm.b_U
    assert_close_scaled(via_ln, logits, rel=REL, rtol=RTOL)
    assert_close_scaled(cache["hook_pooled"], tm.fc_norm(pooled), rel=REL, rtol=RTOL)


# --------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["vit", "deit3", "rpn", "distilled"])
def test_run_with_hooks_zero_ablation_matches_timm(key, make_images):
    tm, hm = _build(key)
    x = _images(tm, make_images)
    clean = hm(x)

    unchanged = hm.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_attn_out", lambda t, hook: t)])
    torch.testing.assert_close(unchanged, clean, atol=0, rtol=0)
    returns_none = hm.run_with_hooks(
        x, fwd_hooks=[("blocks.0.hook_attn_out", lambda t, hook: None)]
    )
    torch.testing.assert_close(returns_none, clean, atol=0, rtol=0)

    ablated = hm.run_with_hooks(
        x, fwd_hooks=[("blocks.0.hook_attn_out", lambda t, hook: torch.zeros_like(t))]
    )
    assert (ablated - clean).abs().max() > 1e-2

    # the same ablation inside timm: zero the attention write-in of block 0
    blk = tm.blocks[0]
    target = blk.norm1 if isinstance(blk, ResPostBlock) else blk.ls1
    handle = target.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    try:
        timm_ablated = tm(x)
    finally:
        handle.remove()
    assert_close_scaled(ablated, timm_ablated, rel=REL, rtol=RTOL)

    # hooks are gone afterwards
    torch.testing.assert_close(hm(x), clean, atol=0, rtol=0)


def test_hooks_context_manager_and_filter_function_names(make_images):
    tm, hm = _build("vit")
    x = _images(tm, make_images)
    clean = hm(x)
    calls = []

    def zero_mlp(t, hook):
        calls.append(hook.name)
        return torch.zeros_like(t)

    with hm.hooks(fwd_hooks=[(lambda n: n.endswith("hook_mlp_out"), zero_mlp)]):
        ablated = hm(x)
    assert sorted(calls) == [f"blocks.{l}.hook_mlp_out" for l in range(hm.cfg.n_layers)]
    assert (ablated - clean).abs().max() > 1e-2
    torch.testing.assert_close(hm(x), clean, atol=0, rtol=0)


def test_patch_one_head_changes_only_downstream(make_images):
    """Zeroing head 0's z in the last layer leaves every earlier activation untouched."""
    tm, hm = _build("vit")
    x = _images(tm, make_images)
    L = hm.cfg.n_layers
    _, clean = hm.run_with_cache(x)

    def zero_head0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    with hm.hooks(fwd_hooks=[(f"blocks.{L - 1}.attn.hook_z", zero_head0)]):
        _, patched = hm.run_with_cache(x)
    torch.testing.assert_close(
        patched[f"blocks.{L - 1}.hook_resid_pre"],
        clean[f"blocks.{L - 1}.hook_resid_pre"],
        atol=0,
        rtol=0,
    )
    delta = patched[f"blocks.{L - 1}.hook_attn_out"] - clean[f"blocks.{L - 1}.hook_attn_out"]
    expected = -clean[f"blocks.{L - 1}.attn.hook_z"][:, :, 0] @ hm.blocks[L - 1].attn.W_O[0]
    assert_close_scaled(delta, expected, rel=1e-4, rtol=1e-5)


def test_unknown_hook_name_raises_with_suggestion(make_images):
    tm, hm = _build("vit")
    x = _images(tm, make_images)
    with pytest.raises(ValueError, match=re.escape("blocks.0.hook_attn_out")):
        hm.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_atn_out", lambda t, hook: t)])
    with pytest.raises(ValueError, match=re.escape("blocks.1.hook_resid_post")):
        hm.run_with_cache(x, names_filter="blocks.1.hook_resid_psot")
    with pytest.raises(ValueError, match=re.escape("blocks.0.attn.hook_pattern")):
        hm.run_with_cache(x, names_filter=["hook_embed", "blocks.0.attn.hook_patern"])
    # nothing stays attached after the failures
    torch.testing.assert_close(
        hm(x), tm(x), atol=1e-5 * max(1.0, tm(x).abs().max().item()), rtol=RTOL
    )


# --------------------------------------------------------------------------------------
# Weight processing (TransformerLens conventions)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["vit", "deit3", "distilled"])
def test_fold_ln_keeps_logits(key, make_images):
    tm, _ = _build(key)
    x = _images(tm, make_images)
    ref = tm(x)
    hm = HookedViT.from_timm(tm, fold_ln=True)
    assert hm.cfg.normalization_type == "LNPre"
    assert_close_scaled(hm(x), ref, rel=1e-4, rtol=1e-5)


@pytest.mark.parametrize("key", ["vit", "deit3", "distilled"])
def test_all_processing_keeps_class_probabilities(key, make_images):
    """fold_ln + center_writing_weights + center_unembed + fold_value_biases change the
    logits at most by a per-example constant (center_unembed)."""
    tm, _ = _build(key)
    x = _images(tm, make_images)
    ref = tm(x).log_softmax(-1)
    hm = HookedViT.from_timm(
        tm, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
    )
    logits, cache = hm.run_with_cache(x)
    assert_close_scaled(logits.log_softmax(-1), ref, rel=1e-4, rtol=1e-5)
    torch.testing.assert_close(logits.mean(-1), torch.zeros(x.shape[0]), atol=1e-4, rtol=0)
    # centred writing weights: every write into the residual stream has zero mean over d_model
    for l in range(hm.cfg.n_layers):
        for name in ("hook_attn_out", "hook_mlp_out"):
            out = cache[f"blocks.{l}.{name}"]
            torch.testing.assert_close(
                out.mean(-1), torch.zeros_like(out.mean(-1)), atol=1e-4, rtol=0
            )
        assert torch.count_nonzero(hm.blocks[l].attn.b_V) == 0


def test_cache_token_groups_follow_the_layout():
    """ViTActivationCache.patch_tokens / prefix_tokens split by model.layout, for full and short
    keys."""
    from vit_embedding_lens.testing import create_timm_vit

    model = HookedViT.from_timm(
        create_timm_vit(
            "vit_small_patch14_reg4_dinov2",
            depth=2,
            embed_dim=64,
            num_heads=4,
            img_size=56,
            num_classes=7,
        )
    )
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(x)
    n_prefix = model.layout.n_prefix
    assert n_prefix == 5
    resid = cache["blocks.1.hook_resid_post"]
    assert torch.equal(cache.patch_tokens("blocks.1.hook_resid_post"), resid[:, n_prefix:])
    assert torch.equal(cache.prefix_tokens(("resid_post", 1)), resid[:, :n_prefix])
    z = cache["blocks.0.attn.hook_z"]
    assert torch.equal(cache.patch_tokens(("z", 0)), z[:, n_prefix:])
    with pytest.raises(ValueError, match="query and a key"):
        cache.patch_tokens("blocks.0.attn.hook_pattern")
