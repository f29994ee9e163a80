"""HookedViT reproduces timm exactly (fp32 CPU), and its hooks mean what the contract says.

Every timm model is built with randomized, realistic weights (see
``vit_embedding_lens.testing``): timm's default init (LayerScale ~1e-5, norms at
(1, 0), zero biases and tokens) would hide most conversion bugs.

Reference block outputs come from timm's own ``forward_intermediates`` (``norm=False``,
prefix tokens concatenated back in front); reference sub-block values (q/k/v,
pattern, attention/MLP write-ins, MLP pre-activations) are recomputed from the timm
block's own submodules, fed with the residual stream HookedViT cached.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from vit_embedding_lens import HookedViT
from vit_embedding_lens.testing import assert_close_scaled, create_timm_vit, timm_reference

REL = 1e-5  # atol = REL * max(1, max|expected|)
RTOL = 1e-5

# --------------------------------------------------------------------------------------
# Model families. Fast variants: depth 2, narrow, small images (each test well under 2 s).
# Odd widths / head counts / non-square images on purpose, to catch reshapes and
# transpositions that happen to work for square 768/12 models.
# --------------------------------------------------------------------------------------
FAST_CASES: dict[str, tuple[str, dict]] = {
    "vit_base_patch32_224": (
        "vit_base_patch32_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64),
    ),
    "vit_base_patch16_224": (
        "vit_base_patch16_224",
        dict(depth=2, embed_dim=96, num_heads=6, img_size=(48, 80)),
    ),
    "vit_large_patch16_224": (
        "vit_large_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=8, img_size=64),
    ),
    # no qkv bias; default head has 11221 classes
    "vit_base_patch16_224_miil": (
        "vit_base_patch16_224_miil",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64, num_classes=37),
    ),
    # no CLS token, avg pool, residual post-norm blocks, fc_norm
    "vit_base_patch16_rpn_224": (
        "vit_base_patch16_rpn_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64),
    ),
    "deit_base_patch16_224": (
        "deit_base_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=2, img_size=64),
    ),
    # CLS + distillation token, two heads averaged
    "deit_tiny_distilled_patch16_224": (
        "deit_tiny_distilled_patch16_224",
        dict(depth=2, img_size=64),
    ),
    # LayerScale, no_embed_class
    "deit3_small_patch16_224": (
        "deit3_small_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64),
    ),
    # CLS + 4 registers, LayerScale, no_embed_class; default num_classes=0 (see
    # test_num_classes_zero)
    "vit_small_patch14_reg4_dinov2": (
        "vit_small_patch14_reg4_dinov2",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=56, num_classes=10),
    ),
    # norm_pre (ln_pre), no patch-embed bias, LayerNorm eps 1e-5
    "vit_base_patch16_clip_224": (
        "vit_base_patch16_clip_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64),
    ),
    "vit_base_patch16_clip_quickgelu_224": (
        "vit_base_patch16_clip_quickgelu_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64),
    ),
    # no CLS, avg pool with the final norm on tokens (fc_norm=False), LayerScale, no qkv bias
    "vit_medium_patch16_gap_256": (
        "vit_medium_patch16_gap_256",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64),
    ),
    # 4 registers, no CLS, avg pool + fc_norm, mlp_ratio 5.6, LayerScale
    "vit_little_patch16_reg4_gap_256": (
        "vit_little_patch16_reg4_gap_256",
        dict(depth=2, embed_dim=80, num_heads=5, img_size=64),
    ),
    "flexivit_small": (
        "flexivit_small",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=(64, 48)),
    ),
    # supported options on a plain ViT
    "vit_qk_norm": (
        "vit_base_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64, qk_norm=True),
    ),
    "vit_init_values": (
        "vit_base_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64, init_values=1e-5),
    ),
    "vit_cls_avg_pool": (
        "vit_base_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64, global_pool="avg"),
    ),
    "vit_in_chans1": (
        "vit_base_patch16_224",
        dict(depth=2, embed_dim=64, num_heads=4, img_size=64, in_chans=1),
    ),
}

# Full-size default configs (batch 1, one forward each). rel: tolerance factor.
SLOW_CASES: dict[str, tuple[str, dict, float]] = {
    "vit_base_patch32_224": ("vit_base_patch32_224", {}, REL),
    "vit_base_patch16_224": ("vit_base_patch16_224", {}, REL),
    "vit_large_patch16_224": ("vit_large_patch16_224", dict(depth=6), REL),
    "vit_base_patch16_224_miil": ("vit_base_patch16_224_miil", {}, REL),
    # Residual post-norm: the raw residual stream (norm ~25) feeds attention directly, and
    # rounding grows with depth; timm's own fp32 output differs from its fp64 output by
    # ~2e-5 * max|x| at block 12 with these weights, so 1e-5 is below fp32 noise here.
    "vit_base_patch16_rpn_224": ("vit_base_patch16_rpn_224", {}, 1e-4),
    "deit_base_patch16_224": ("deit_base_patch16_224", {}, REL),
    "deit_tiny_distilled_patch16_224": ("deit_tiny_distilled_patch16_224", {}, REL),
    "deit3_small_patch16_224": ("deit3_small_patch16_224", {}, REL),
    # default is 518 px (1369 patches) and num_classes=0; 224 px and a 1000-class head keep it a
    # family test
    "vit_small_patch14_reg4_dinov2": (
        "vit_small_patch14_reg4_dinov2",
        dict(img_size=224, num_classes=1000),
        REL,
    ),
    "vit_base_patch16_clip_224": ("vit_base_patch16_clip_224", {}, REL),
    "vit_base_patch16_clip_quickgelu_224": ("vit_base_patch16_clip_quickgelu_224", {}, REL),
    "vit_medium_patch16_gap_256": ("vit_medium_patch16_gap_256", {}, REL),
    "vit_little_patch16_reg4_gap_256": ("vit_little_patch16_reg4_gap_256", {}, REL),
    "flexivit_small": ("flexivit_small", {}, REL),
}

FAST_IDS = list(FAST_CASES)


def _build(case_id: str, seed: int = 0):
    name, overrides = FAST_CASES[case_id]
    tm = create_timm_vit(name, seed=seed, **overrides)
    return tm, HookedViT.from_timm(tm)


def _images(tm: nn.Module, make_images, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return make_images(batch, tuple(tm.patch_embed.img_size), in_chans=tm.in_chans, seed=seed)


def _is_distilled(tm: nn.Module) -> bool:
    return getattr(tm, "dist_token", None) is not None


def _has_fc_norm(tm: nn.Module) -> bool:
    return not isinstance(tm.fc_norm, nn.Identity)


def _has_norm_pre(tm: nn.Module) -> bool:
    return not isinstance(tm.norm_pre, nn.Identity)


def _timm_prefix_tokens(tm: nn.Module) -> torch.Tensor:
    """[1, n_prefix, d] in timm's token order: CLS, distillation, registers."""
    toks = []
    if tm.cls_token is not None:
        toks.append(tm.cls_token)
    if _is_distilled(tm):
        toks.append(tm.dist_token)
    if tm.reg_token is not None:
        toks.append(tm.reg_token)
    if not toks:
        return tm.pos_embed.new_zeros(1, 0, tm.embed_dim)
    return torch.cat(toks, dim=1)


# --------------------------------------------------------------------------------------
# Logits and every block output
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", FAST_IDS)
def test_logits_and_block_outputs_match_timm(case_id, make_images):
    tm, hm = _build(case_id)
    x = _images(tm, make_images, batch=2)
    ref_logits, ref_blocks = timm_reference(tm, x)
    # the reference helper is timm's forward
    assert_close_scaled(ref_logits, tm(x), rel=1e-6, rtol=1e-6)

    logits = hm(x)  # no hooks: the fused attention path
    assert logits.shape == (2, tm.num_classes)
    assert logits.dtype == torch.float32
    assert_close_scaled(
        logits, ref_logits, rel=REL, rtol=RTOL, msg=f"{case_id}: logits (plain forward)"
    )

    logits_c, cache = hm.run_with_cache(x)  # all hooks: the explicit attention path
    assert_close_scaled(
        logits_c, ref_logits, rel=REL, rtol=RTOL, msg=f"{case_id}: logits (run_with_cache)"
    )
    assert len(ref_blocks) == hm.cfg.n_layers
    for i, ref in enumerate(ref_blocks):
        assert_close_scaled(
            cache[f"blocks.{i}.hook_resid_post"],
            ref,
            rel=REL,
            rtol=RTOL,
            msg=f"{case_id}: block {i} output",
        )


@pytest.mark.slow
@pytest.mark.parametrize("case_id", list(SLOW_CASES))
def test_full_size_matches_timm(case_id, make_images):
    name, overrides, rel = SLOW_CASES[case_id]
    tm = create_timm_vit(name, seed=1, **overrides)
    hm = HookedViT.from_timm(tm)
    x = _images(tm, make_images, batch=1, seed=1)
    ref_logits, ref_blocks = timm_reference(tm, x)
    logits, cache = hm.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert logits.shape == ref_logits.shape
    assert_close_scaled(logits, ref_logits, rel=rel, rtol=RTOL, msg=f"{case_id}: logits")
    assert len(ref_blocks) == hm.cfg.n_layers
    for i, ref in enumerate(ref_blocks):
        assert_close_scaled(
            cache[f"blocks.{i}.hook_resid_post"],
            ref,
            rel=rel,
            rtol=RTOL,
            msg=f"{case_id}: block {i} output",
        )


@pytest.mark.parametrize("case_id", FAST_IDS)
def test_float64_matches_timm_to_double_precision(case_id, make_images):
    """In float64, any real difference (eps 1e-6 vs 1e-5, exact vs tanh GELU, a missing
    bias of size 1e-6...) stands far above rounding noise."""
    tm, _ = _build(case_id)
    tm64 = copy.deepcopy(tm).double()
    hm64 = HookedViT.from_timm(tm, dtype=torch.float64)
    x = _images(tm, make_images, batch=2).double()
    ref_logits, ref_blocks = timm_reference(tm64, x)
    logits, cache = hm64.run_with_cache(x)
    assert logits.dtype == torch.float64
    assert_close_scaled(logits, ref_logits, rel=1e-10, rtol=1e-10, msg=f"{case_id}: float64 logits")
    for i, ref in enumerate(ref_blocks):
        assert_close_scaled(
            cache[f"blocks.{i}.hook_resid_post"],
            ref,
            rel=1e-10,
            rtol=1e-10,
            msg=f"{case_id}: float64 block {i}",
        )


@pytest.mark.parametrize(
    "case_id", ["vit_base_patch16_224", "deit3_small_patch16_224", "vit_base_patch16_clip_224"]
)
def test_fused_and_explicit_attention_paths_agree(case_id, make_images):
    tm, hm = _build(case_id)
    x = _images(tm, make_images, batch=2, seed=3)
    fused = hm(x)
    explicit, _ = hm.run_with_cache(x)
    only_pattern, _ = hm.run_with_cache(x, names_filter="blocks.1.attn.hook_pattern")
    identity_hooked = hm.run_with_hooks(
        x, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: t)]
    )
    for other in (explicit, only_pattern, identity_hooked):
        assert_close_scaled(other, fused, rel=REL, rtol=RTOL)


# --------------------------------------------------------------------------------------
# Hook semantics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", FAST_IDS)
def test_hook_shapes(case_id, make_images):
    tm, hm = _build(case_id)
    B = 2
    x = _images(tm, make_images, batch=B)
    _, cache = hm.run_with_cache(x)
    N = tm.num_prefix_tokens + tm.patch_embed.num_patches
    d = tm.embed_dim
    H = tm.blocks[0].attn.num_heads
    dh = d // H
    dm = tm.blocks[0].mlp.fc1.out_features
    C = tm.num_classes

    expected = {
        "hook_embed": (B, N, d),
        "hook_pos_embed": (B, N, d),
        "hook_pooled": (B, d),
        "hook_logits": (B, C),
    }
    for l in range(len(tm.blocks)):
        p = f"blocks.{l}."
        for name in (
            "hook_resid_pre",
            "hook_resid_mid",
            "hook_resid_post",
            "hook_attn_out",
            "hook_mlp_out",
        ):
            expected[p + name] = (B, N, d)
        for ln in ("ln1", "ln2"):
            expected[p + ln + ".hook_scale"] = (B, N, 1)
            expected[p + ln + ".hook_normalized"] = (B, N, d)
        for name in ("hook_q", "hook_k", "hook_v", "hook_z"):
            expected[p + "attn." + name] = (B, N, H, dh)
        expected[p + "attn.hook_attn_scores"] = (B, H, N, N)
        expected[p + "attn.hook_pattern"] = (B, H, N, N)
        expected[p + "mlp.hook_pre"] = (B, N, dm)
        expected[p + "mlp.hook_post"] = (B, N, dm)
    if _has_fc_norm(tm):
        expected["ln_final.hook_scale"] = (B, 1)
        expected["ln_final.hook_normalized"] = (B, d)
    else:
        expected["ln_final.hook_scale"] = (B, N, 1)
        expected["ln_final.hook_normalized"] = (B, N, d)
    if _has_norm_pre(tm):
        expected["ln_pre.hook_scale"] = (B, N, 1)
        expected["ln_pre.hook_normalized"] = (B, N, d)
    if _is_distilled(tm):
        expected["hook_pooled_dist"] = (B, d)

    keys = set(cache.keys())
    missing = sorted(set(expected) - keys)
    assert not missing, f"missing hooks: {missing}"
    wrong = {
        k: (tuple(cache[k].shape), v) for k, v in expected.items() if tuple(cache[k].shape) != v
    }
    assert not wrong, f"wrong shapes (got, expected): {wrong}"
    # ln_pre only with norm_pre; hook_pooled_dist only if distilled
    assert _has_norm_pre(tm) == any(k.startswith("ln_pre.") for k in keys)
    assert _is_distilled(tm) == ("hook_pooled_dist" in keys)


@pytest.mark.parametrize("case_id", ["vit_base_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_hook_result_only_after_set_use_attn_result(case_id, make_images):
    """Contract (and TransformerLens): per-head results [B, N, H, d] are a large tensor,
    computed only after model.set_use_attn_result(True)."""
    tm, hm = _build(case_id)
    x = _images(tm, make_images)
    logits, cache = hm.run_with_cache(x)
    assert not any(k.endswith("attn.hook_result") for k in cache.keys()), (
        "hook_result cached by default"
    )
    hm.set_use_attn_result(True)
    logits_r, cache_r = hm.run_with_cache(x)
    B, N, H, d = x.shape[0], hm.cfg.n_ctx, hm.cfg.n_heads, hm.cfg.d_model
    for l in range(hm.cfg.n_layers):
        assert cache_r[f"blocks.{l}.attn.hook_result"].shape == (B, N, H, d)
    assert_close_scaled(logits_r, logits, rel=REL, rtol=RTOL)
    hm.set_use_attn_result(False)
    _, cache_off = hm.run_with_cache(x)
    assert not any(k.endswith("attn.hook_result") for k in cache_off.keys())


@pytest.mark.parametrize("case_id", FAST_IDS)
def test_embedding_hooks(case_id, make_images):
    tm, hm = _build(case_id)
    B = 2
    x = _images(tm, make_images, batch=B)
    _, cache = hm.run_with_cache(x)
    n_pre = tm.num_prefix_tokens
    embed, pos = cache["hook_embed"], cache["hook_pos_embed"]

    # hook_embed: prefix tokens in place, then the patch embeddings
    assert_close_scaled(
        embed[:, :n_pre], _timm_prefix_tokens(tm).expand(B, -1, -1), rel=1e-6, rtol=1e-6
    )
    assert_close_scaled(embed[:, n_pre:], tm.patch_embed(x), rel=REL, rtol=RTOL)

    # hook_pos_embed: the learned table, zeros where timm adds no position embedding
    if tm.no_embed_class:
        assert torch.count_nonzero(pos[:, :n_pre]) == 0
        torch.testing.assert_close(pos[:, n_pre:], tm.pos_embed.expand(B, -1, -1), atol=0, rtol=0)
    else:
        torch.testing.assert_close(pos, tm.pos_embed.expand(B, -1, -1), atol=0, rtol=0)

    resid0 = cache["blocks.0.hook_resid_pre"]
    if _has_norm_pre(tm):  # CLIP: ln_pre(embed + pos) is the first residual stream
        assert_close_scaled(resid0, tm.norm_pre(embed + pos), rel=REL, rtol=RTOL)
        s = embed + pos
        scale = (
            (s - s.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + tm.norm_pre.eps
        ).sqrt()
        assert_close_scaled(cache["ln_pre.hook_scale"], scale, rel=REL, rtol=RTOL)
    else:
        assert_close_scaled(resid0, embed + pos, rel=REL, rtol=RTOL)


@pytest.mark.parametrize(
    "case_id", ["deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2", "flexivit_small"]
)
def test_no_embed_class_prefix_position_rows_are_exactly_zero(case_id, make_images):
    tm, hm = _build(case_id)
    assert tm.no_embed_class
    _, cache = hm.run_with_cache(_images(tm, make_images), names_filter="hook_pos_embed")
    pos = cache["hook_pos_embed"]
    n_pre = tm.num_prefix_tokens
    assert torch.equal(pos[:, :n_pre], torch.zeros_like(pos[:, :n_pre]))
    assert torch.count_nonzero(pos[:, n_pre:]) == pos[:, n_pre:].numel()
    assert hm.pos_embed.W_pos.shape == (tm.patch_embed.num_patches, tm.embed_dim)


@pytest.mark.parametrize("case_id", FAST_IDS)
def test_block_hooks_match_timm_submodules(case_id, make_images):
    tm, hm = _build(case_id)
    B = 2
    x = _images(tm, make_images, batch=B)
    _, cache = hm.run_with_cache(x)

    def close(name, expected, rel=REL):
        assert_close_scaled(cache[name], expected, rel=rel, rtol=RTOL, msg=f"{case_id}: {name}")

    for l, blk in enumerate(tm.blocks):
        p = f"blocks.{l}."
        pre = cache[p + "hook_resid_pre"]
        mid = cache[p + "hook_resid_mid"]
        post = cache[p + "hook_resid_post"]
        attn_out = cache[p + "hook_attn_out"]
        mlp_out = cache[p + "hook_mlp_out"]
        post_norm = isinstance(blk, ResPostBlock)

        # residual bookkeeping
        assert_close_scaled(mid, pre + attn_out, rel=REL, rtol=RTOL)
        assert_close_scaled(post, mid + mlp_out, rel=REL, rtol=RTOL)
        if l + 1 < len(tm.blocks):
            torch.testing.assert_close(
                cache[f"blocks.{l + 1}.hook_resid_pre"], post, atol=0, rtol=0
            )

        # attention internals, recomputed with timm's own qkv / q_norm / k_norm
        attn_in = pre if post_norm else blk.norm1(pre)
        H, dh = blk.attn.num_heads, blk.attn.head_dim
        N = pre.shape[1]
        q, k, v = blk.attn.qkv(attn_in).reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)  # [B, H, N, dh]
        scores = (q @ k.transpose(-2, -1)) * blk.attn.scale
        pattern = scores.softmax(-1)
        z = pattern @ v
        close(p + "attn.hook_q", q.transpose(1, 2))
        close(p + "attn.hook_k", k.transpose(1, 2))
        close(p + "attn.hook_v", v.transpose(1, 2))
        close(p + "attn.hook_attn_scores", scores)
        close(p + "attn.hook_pattern", pattern)
        close(p + "attn.hook_z", z.transpose(1, 2))
        pat = cache[p + "attn.hook_pattern"]
        torch.testing.assert_close(pat.sum(-1), torch.ones_like(pat.sum(-1)), atol=1e-5, rtol=0)
        assert_close_scaled(
            pat, cache[p + "attn.hook_attn_scores"].softmax(-1), rel=1e-6, rtol=1e-5
        )

        # the real write-ins (after LayerScale; after norm1/norm2 for residual post-norm blocks)
        if post_norm:
            close(p + "hook_attn_out", blk.norm1(blk.attn(pre)))
            mlp_in = mid
            close(p + "hook_mlp_out", blk.norm2(blk.mlp(mid)))
        else:
            close(p + "hook_attn_out", blk.ls1(blk.attn(blk.norm1(pre))))
            mlp_in = blk.norm2(mid)
            close(p + "hook_mlp_out", blk.ls2(blk.mlp(blk.norm2(mid))))
            # TransformerLens LayerNorm convention: scale = sqrt(var + eps)
            for ln, src, norm in (("ln1", pre, blk.norm1), ("ln2", mid, blk.norm2)):
                scale = (
                    (src - src.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + norm.eps
                ).sqrt()
                close(p + ln + ".hook_scale", scale)
        pre_act = blk.mlp.fc1(mlp_in)
        close(p + "mlp.hook_pre", pre_act)
        close(p + "mlp.hook_post", blk.mlp.act(pre_act))


@pytest.mark.parametrize("case_id", FAST_IDS)
def test_pooled_and_logit_hooks(case_id, make_images):
    tm, hm = _build(case_id)
    x = _images(tm, make_images, batch=2)
    logits, cache = hm.run_with_cache(x)
    torch.testing.assert_close(cache["hook_logits"], logits, atol=0, rtol=0)

    feats = tm.forward_features(x)
    pooled = cache["hook_pooled"]
    if _is_distilled(tm):
        assert_close_scaled(pooled, feats[:, 0], rel=REL, rtol=RTOL)
        assert_close_scaled(cache["hook_pooled_dist"], feats[:, 1], rel=REL, rtol=RTOL)
        expected = (
            pooled @ hm.head.W_head
            + hm.head.b_head
            + cache["hook_pooled_dist"] @ hm.head.W_head_dist
            + hm.head.b_head_dist
        ) / 2
    else:
        assert_close_scaled(pooled, tm.forward_head(feats, pre_logits=True), rel=REL, rtol=RTOL)
        expected = pooled @ hm.W_U + hm.b_U
    assert_close_scaled(logits, expected, rel=REL, rtol=RTOL)


# --------------------------------------------------------------------------------------
# Layout, config, weights
# --------------------------------------------------------------------------------------
_TINY = dict(depth=1, embed_dim=64, num_heads=4)
LAYOUT_CASES = [
    # name, overrides, n_prefix, cls_index, dist_index, register_indices, grid (gh, gw)
    ("vit_base_patch16_224", dict(_TINY, img_size=(48, 80)), 1, 0, None, (), (3, 5)),
    ("vit_base_patch16_rpn_224", dict(_TINY, img_size=64), 0, None, None, (), (4, 4)),
    ("deit_tiny_distilled_patch16_224", dict(depth=1, img_size=64), 2, 0, 1, (), (4, 4)),
    ("deit3_small_patch16_224", dict(_TINY, img_size=(64, 32)), 1, 0, None, (), (4, 2)),
    (
        "vit_small_patch14_reg4_dinov2",
        dict(_TINY, img_size=56, num_classes=10),
        5,
        0,
        None,
        (1, 2, 3, 4),
        (4, 4),
    ),
    (
        "vit_little_patch16_reg4_gap_256",
        dict(depth=1, embed_dim=80, num_heads=5, img_size=64),
        4,
        None,
        None,
        (0, 1, 2, 3),
        (4, 4),
    ),
]


@pytest.mark.parametrize(
    "name,overrides,n_prefix,cls_index,dist_index,register_indices,grid",
    LAYOUT_CASES,
    ids=[c[0] for c in LAYOUT_CASES],
)
def test_layout(name, overrides, n_prefix, cls_index, dist_index, register_indices, grid):
    tm = create_timm_vit(name, **overrides)
    hm = HookedViT.from_timm(tm)
    lay = hm.layout
    gh, gw = grid
    n_tokens = n_prefix + gh * gw
    assert lay.n_prefix == n_prefix
    assert lay.cls_index == cls_index
    assert lay.dist_index == dist_index
    assert tuple(lay.register_indices) == register_indices
    assert tuple(lay.grid_size) == grid
    assert lay.n_patches == gh * gw
    assert lay.n_tokens == n_tokens == hm.cfg.n_ctx
    assert tuple(lay.patch_indices) == tuple(range(n_prefix, n_tokens))
    labels = lay.token_labels()
    assert len(labels) == n_tokens
    if cls_index is not None:
        assert labels[cls_index] == "CLS"
    if register_indices:
        assert [labels[i] for i in register_indices] == [
            f"REG{j}" for j in range(len(register_indices))
        ]
    # row-major patches, "P{row},{col}"
    assert labels[n_prefix] == "P0,0"
    assert labels[n_prefix + 1] == ("P0,1" if gw > 1 else "P1,0")
    assert labels[n_prefix + gw] == "P1,0"
    assert labels[-1] == f"P{gh - 1},{gw - 1}"
    assert len(set(labels)) == n_tokens
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.n_prefix = 7


@pytest.mark.parametrize("case_id", FAST_IDS)
def test_config_fields(case_id):
    tm, hm = _build(case_id)
    cfg = hm.cfg
    blk = tm.blocks[0]
    assert cfg.n_layers == len(tm.blocks)
    assert cfg.d_model == tm.embed_dim
    assert cfg.n_heads == blk.attn.num_heads
    assert cfg.d_head == tm.embed_dim // blk.attn.num_heads
    assert cfg.d_mlp == blk.mlp.fc1.out_features
    assert cfg.n_classes == cfg.d_vocab == tm.num_classes
    assert cfg.n_ctx == tm.num_prefix_tokens + tm.patch_embed.num_patches
    assert tuple(cfg.image_size) == tuple(tm.patch_embed.img_size)
    assert tuple(cfg.patch_size) == tuple(tm.patch_embed.patch_size)
    assert cfg.in_chans == tm.in_chans
    assert cfg.normalization_type == "LN"
    assert cfg.attn_only is False
    assert cfg.eps == pytest.approx(blk.norm1.eps, rel=0, abs=0)
    assert cfg.global_pool == tm.global_pool
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layers = 99


def test_weight_names_and_orientation():
    """TransformerLens names and orientation; LayerScale folded into W_O/b_O and W_out/b_out."""
    for name, overrides in [
        ("vit_base_patch16_224", dict(depth=2, embed_dim=96, num_heads=6, img_size=(48, 80))),
        ("deit3_small_patch16_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=64)),
    ]:
        tm = create_timm_vit(name, **overrides)
        hm = HookedViT.from_timm(tm)
        d, H = tm.embed_dim, tm.blocks[0].attn.num_heads
        dh = d // H
        eq = lambda a, b: torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)  # noqa: E731

        eq(hm.embed.W_E, tm.patch_embed.proj.weight)
        eq(hm.embed.b_E, tm.patch_embed.proj.bias)
        eq(hm.embed.W_prefix, _timm_prefix_tokens(tm)[0])
        eq(hm.pos_embed.W_pos, tm.pos_embed[0])
        for l, blk in enumerate(tm.blocks):
            a, m = hm.blocks[l].attn, hm.blocks[l].mlp
            g1 = blk.ls1.gamma if hasattr(blk.ls1, "gamma") else torch.ones(d)
            g2 = blk.ls2.gamma if hasattr(blk.ls2, "gamma") else torch.ones(d)
            Wqkv, bqkv = blk.attn.qkv.weight, blk.attn.qkv.bias
            for i, (W, b) in enumerate([(a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V)]):
                assert W.shape == (H, d, dh)
                eq(W, Wqkv[i * d : (i + 1) * d].reshape(H, dh, d).transpose(1, 2))
                eq(b, bqkv[i * d : (i + 1) * d].reshape(H, dh))
            assert a.W_O.shape == (H, dh, d)
            eq(a.W_O, (blk.attn.proj.weight * g1[:, None]).T.reshape(H, dh, d))
            eq(a.b_O, blk.attn.proj.bias * g1)
            eq(m.W_in, blk.mlp.fc1.weight.T)
            eq(m.b_in, blk.mlp.fc1.bias)
            eq(m.W_out, (blk.mlp.fc2.weight * g2[:, None]).T)
            eq(m.b_out, blk.mlp.fc2.bias * g2)
            eq(hm.blocks[l].ln1.w, blk.norm1.weight)
            eq(hm.blocks[l].ln1.b, blk.norm1.bias)
            eq(hm.blocks[l].ln2.w, blk.norm2.weight)
            eq(hm.blocks[l].ln2.b, blk.norm2.bias)
        eq(hm.ln_final.w, tm.norm.weight)
        eq(hm.ln_final.b, tm.norm.bias)
        eq(hm.head.W_head, tm.head.weight.T)
        eq(hm.head.b_head, tm.head.bias)
        assert torch.equal(hm.W_U, hm.head.W_head)
        assert torch.equal(hm.b_U, hm.head.b_head)


def test_distilled_head_weights():
    tm = create_timm_vit("deit_tiny_distilled_patch16_224", depth=1, img_size=64)
    hm = HookedViT.from_timm(tm)
    torch.testing.assert_close(hm.head.W_head, tm.head.weight.T, atol=0, rtol=0)
    torch.testing.assert_close(hm.head.W_head_dist, tm.head_dist.weight.T, atol=0, rtol=0)
    torch.testing.assert_close(hm.head.b_head_dist, tm.head_dist.bias, atol=0, rtol=0)
    assert not torch.equal(hm.head.W_head, hm.head.W_head_dist)


# --------------------------------------------------------------------------------------
# Construction properties
# --------------------------------------------------------------------------------------
def test_timm_module_is_not_modified(make_images):
    tm = create_timm_vit("deit3_small_patch16_224", depth=2, embed_dim=64, num_heads=4, img_size=64)
    tm.train()
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    param_ids = {k: id(p) for k, p in tm.named_parameters()}
    hm = HookedViT.from_timm(tm)
    assert tm.training, "from_timm must not switch the timm model to eval mode"
    after = tm.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert param_ids == {k: id(p) for k, p in tm.named_parameters()}
    assert not hm.training

    # the HookedViT owns its weights: editing it leaves timm alone
    with torch.no_grad():
        hm.blocks[0].attn.W_Q.add_(1.0)
    assert torch.equal(tm.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    x = _images(tm, make_images)
    assert_close_scaled(HookedViT.from_timm(tm)(x), tm.eval()(x), rel=REL, rtol=RTOL)


def test_num_classes_zero(make_images):
    """timm's default for DINOv2 is num_classes=0 (head = Identity, output = pooled features).
    The contract does not pin this case: accept a clear refusal, or exactly timm's output."""
    tm = create_timm_vit(
        "vit_small_patch14_reg4_dinov2", depth=2, embed_dim=64, num_heads=4, img_size=56
    )
    assert tm.num_classes == 0
    x = _images(tm, make_images)
    try:
        hm = HookedViT.from_timm(tm)
    except ValueError as e:
        assert any(w in str(e).lower() for w in ("num_classes", "head", "classifier", "classes")), (
            str(e)
        )
        return
    assert_close_scaled(hm(x), tm(x), rel=REL, rtol=RTOL)


# --------------------------------------------------------------------------------------
# The test utilities themselves
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("deit_tiny_distilled_patch16_224", dict(depth=2, img_size=64)),
        (
            "vit_small_patch14_reg4_dinov2",
            dict(depth=2, embed_dim=64, num_heads=4, img_size=56, num_classes=10),
        ),
        ("vit_base_patch16_rpn_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=64)),
    ],
    ids=["distilled", "reg4", "no-prefix"],
)
def test_timm_reference_matches_block_forward_hooks(name, overrides, make_images):
    tm = create_timm_vit(name, **overrides)
    x = _images(tm, make_images)
    outs = []
    handles = [
        blk.register_forward_hook(lambda mod, inp, out: outs.append(out)) for blk in tm.blocks
    ]
    try:
        logits = tm(x)
    finally:
        for h in handles:
            h.remove()
    ref_logits, ref_blocks = timm_reference(tm, x)
    assert len(ref_blocks) == len(outs) == len(tm.blocks)
    for a, b in zip(ref_blocks, outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref_logits, logits, atol=1e-6, rtol=1e-6)


def test_randomize_vit_weights_is_deterministic_and_realistic():
    import timm

    from vit_embedding_lens.testing import randomize_vit_weights_

    kw = dict(depth=2, embed_dim=64, num_heads=4, img_size=64)
    name = "vit_little_patch16_reg4_gap_256"  # LayerScale, registers, fc_norm
    a = create_timm_vit(name, seed=0, **kw)
    b = create_timm_vit(name, seed=0, **kw)
    c = create_timm_vit(name, seed=1, **kw)
    fresh = timm.create_model(name, pretrained=False, **kw)
    assert not a.training
    pa, pb, pc, pf = (dict(m.named_parameters()) for m in (a, b, c, fresh))
    for k, v in pa.items():
        assert torch.equal(v, pb[k]), f"{k}: same seed, different values"
        assert not torch.equal(v, pc[k]), f"{k}: different seeds, same values"
        assert not torch.equal(v, pf[k]), f"{k}: left at timm's init"
    gammas = torch.cat([v for k, v in pa.items() if k.endswith(".gamma")])
    assert gammas.numel() == 2 * kw["depth"] * kw["embed_dim"]  # ls1 and ls2 of every block
    assert gammas.abs().min() >= 0.2 and gammas.abs().max() <= 1.5
    assert (gammas > 0).any() and (gammas < 0).any()
    assert (pa["blocks.0.norm1.weight"] - 1).abs().max() > 0.1
    assert pa["blocks.0.norm1.bias"].abs().max() > 0.1
    assert pa["reg_token"].std() > 0.3 and pa["pos_embed"].std() > 0.3

    # private generator: the global RNG stream is untouched
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    randomize_vit_weights_(fresh, seed=5)
    assert torch.equal(torch.rand(3), expected)
