"""SigLIP's attention-pool (MAP) head: timm's AttentionPoolLatent converts exactly, its hook points
mean what they say, token removal keeps removed tokens out of the pool, refusals name the feature.

timm models are built with realistic random weights (``vit_embedding_lens.testing``).
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import VisionTransformer

from vit_embedding_lens import HookedViT
from vit_embedding_lens.errors import UnsupportedArchitectureError
from vit_embedding_lens.loading.twin import random_init_twin
from vit_embedding_lens.model.hook_names import POOL_HOOKS, pool_hook_name
from vit_embedding_lens.testing import (
    assert_close_scaled,
    create_timm_vit,
    randomize_vit_weights_,
    timm_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-5
SMALL = dict(img_size=48, patch_size=8, depth=2, embed_dim=48, num_heads=4)


def siglip(num_classes: int = 7, seed: int = 0):
    """timm's SigLIP architecture (no CLS token, MAP head), small."""
    return create_timm_vit(
        "vit_base_patch16_siglip_224", seed=seed, num_classes=num_classes, **SMALL
    )


def custom_map(seed: int = 1, **kwargs):
    """A VisionTransformer with a CLS token and registers pooled by MAP (prefix left out)."""
    args = dict(SMALL, global_pool="map", class_token=True, reg_tokens=2, num_classes=5)
    args.update(kwargs)
    return randomize_vit_weights_(VisionTransformer(**args), seed=seed)


def no_q_proj(seed: int = 2):
    """MAP whose latent is the query itself (AttentionPoolLatent(q_proj=False)), bias-free kv."""
    tm = VisionTransformer(**SMALL, global_pool="map", class_token=False, num_classes=3)
    tm.attn_pool = AttentionPoolLatent(
        48, num_heads=3, mlp_ratio=2.0, q_proj=False, qkv_bias=False, norm_layer=torch.nn.LayerNorm
    )
    tm.attn_pool.norm.eps = tm.norm.eps
    return randomize_vit_weights_(tm, seed=seed)


CASES = {
    "siglip": siglip,
    "siglip_headless": lambda: siglip(num_classes=0),
    "cls_registers_map": custom_map,
    "no_q_proj": no_q_proj,
}


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_map_models_match_timm(case):
    tm = CASES[case]()
    hm = HookedViT.from_timm(tm)
    assert hm.cfg.global_pool == "map"
    assert hm.cfg.pool_n_heads == tm.attn_pool.num_heads
    assert hm.cfg.pool_d_mlp == tm.attn_pool.mlp.fc1.out_features
    x = images()
    ref, ref_blocks = timm_reference(tm, x)
    assert_close_scaled(ref, tm(x), rel=1e-6, rtol=1e-6)
    out = hm(x)
    assert out.shape == ref.shape  # logits, or pooled features for a headless tower
    assert_close_scaled(out, ref, rel=REL, rtol=REL, msg=f"{case}: output (plain forward)")
    out_c, cache = hm.run_with_cache(x)
    assert_close_scaled(out_c, ref, rel=REL, rtol=REL, msg=f"{case}: output (run_with_cache)")
    for i, block in enumerate(ref_blocks):
        assert_close_scaled(cache[f"blocks.{i}.hook_resid_post"], block, rel=REL, rtol=REL)
    if not tm.num_classes:
        assert_close_scaled(cache["hook_pooled"], ref, rel=REL, rtol=REL)


def test_pool_hooks_mean_what_they_say():
    tm = custom_map()
    hm = HookedViT.from_timm(tm)
    x = images()
    _, cache = hm.run_with_cache(x)
    assert {pool_hook_name(n) for n in POOL_HOOKS} <= set(cache.keys())
    n_prefix, H = hm.layout.n_prefix, hm.cfg.pool_n_heads
    n_pool = hm.layout.n_tokens - n_prefix  # timm pools the image tokens only
    pattern = cache["attn_pool.hook_pattern"]
    assert pattern.shape == (3, H, 1, n_pool)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(3, H, 1))
    # timm's own pool, recomputed step by step on the final-normed image tokens
    pool = tm.attn_pool
    tokens = tm.norm(cache[f"blocks.{hm.cfg.n_layers - 1}.hook_resid_post"])[:, n_prefix:]
    dh = 48 // H
    q = pool.q(pool.latent).reshape(1, 1, H, dh).transpose(1, 2)
    k, v = pool.kv(tokens).reshape(3, n_pool, 2, H, dh).permute(2, 0, 3, 1, 4)
    ref_pattern = ((q * dh**-0.5) @ k.transpose(-2, -1)).softmax(-1)
    assert_close_scaled(pattern, ref_pattern, rel=REL)
    attn_out = pool.proj((ref_pattern @ v).transpose(1, 2).reshape(3, 1, 48))[:, 0]
    assert_close_scaled(cache["attn_pool.hook_attn_out"], attn_out, rel=REL)
    assert_close_scaled(cache["attn_pool.mlp.hook_pre"], pool.mlp.fc1(pool.norm(attn_out)), rel=REL)
    assert_close_scaled(cache["attn_pool.hook_mlp_out"], pool.mlp(pool.norm(attn_out)), rel=REL)
    torch.testing.assert_close(
        cache["attn_pool.hook_attn_out"] + cache["attn_pool.hook_mlp_out"], cache["hook_pooled"]
    )
    assert cache["attn_pool.hook_q"].shape == (3, 1, H, dh)
    assert cache["attn_pool.hook_k"].shape == (3, n_pool, H, dh)
    assert cache["attn_pool.hook_z"].shape == (3, 1, H, dh)


def test_editing_the_probe_pattern_changes_the_output():
    hm = HookedViT.from_timm(siglip())
    x = images()
    clean = hm(x)

    def first_token_only(pattern, hook):
        edited = torch.zeros_like(pattern)
        edited[..., 0] = 1.0
        return edited

    edited = hm.run_with_hooks(x, fwd_hooks=[("attn_pool.hook_pattern", first_token_only)])
    assert not torch.allclose(edited, clean, atol=1e-3)
    # all attention on token 0 is the pool of that token alone (its attention weight is 1)
    _, cache = hm.run_with_cache(x, names_filter=lambda n: n.endswith("resid_post"))
    last = cache[f"blocks.{hm.cfg.n_layers - 1}.hook_resid_post"]
    alone = hm.readout(last[:, :1], fire_hooks=False)
    torch.testing.assert_close(edited, alone, atol=1e-5, rtol=1e-5)


def test_hook_free_readout_fires_no_pool_hook():
    hm = HookedViT.from_timm(custom_map())
    x = images()
    logits, cache = hm.run_with_cache(x)
    fired = []
    names = [n for n in hm.hook_dict if not n.startswith("blocks.")]
    with hm.hooks(fwd_hooks=[(n, lambda a, hook: fired.append(hook.name)) for n in names]):
        got = hm.readout(cache[f"blocks.{hm.cfg.n_layers - 1}.hook_resid_post"], fire_hooks=False)
    assert fired == []
    torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-5)


def test_token_removal_keeps_removed_and_padded_tokens_out_of_the_pool():
    hm = HookedViT.from_timm(custom_map())
    x = images(3)
    keep = torch.ones(3, hm.layout.n_tokens, dtype=torch.bool)
    keep[0, hm.layout.n_prefix + 3 :] = False  # rows keep different numbers: padding
    keep[1, hm.layout.n_prefix :: 2] = False
    out, cache = hm.run_with_cache(x, keep_mask=keep)
    n_kept_images = int(keep[0, hm.layout.n_prefix :].sum())
    pattern = cache["attn_pool.hook_pattern"][0]  # [head, 1, slots]: padded slots get nothing
    assert bool((pattern[..., n_kept_images:] == 0).all())
    for i in range(3):  # each image alone has no padding: the padded batch must agree
        alone = hm(x[i : i + 1], keep_mask=keep[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], hm(x[:1])[0], atol=1e-4)


def test_twin_of_a_map_model():
    hm = HookedViT.from_timm(siglip())
    twin = random_init_twin(hm, seed=0)
    assert twin.cfg.global_pool == "map" and twin.cfg.pool_n_heads == hm.cfg.pool_n_heads
    assert twin(images(2)).shape == (2, 7)


def _with_pool(**kwargs):
    tm = VisionTransformer(**SMALL, global_pool="map", class_token=False, num_classes=3)
    tm.attn_pool = AttentionPoolLatent(48, num_heads=4, norm_layer=torch.nn.LayerNorm, **kwargs)
    return tm


@pytest.mark.parametrize(
    "make, feature",
    [
        (lambda: _with_pool(latent_len=2), "2 latent queries"),
        (lambda: _with_pool(qk_norm=True), "queries/keys"),
        (lambda: _with_pool(pos_embed="abs", feat_size=36), "position embeddings inside"),
        (lambda: VisionTransformer(**SMALL, global_pool="prr"), "AttentionPoolPrr"),
        (lambda: VisionTransformer(**SMALL, global_pool="map", fc_norm=True), "fc_norm"),
    ],
)
def test_what_is_not_reproduced_is_refused_by_name(make, feature):
    with pytest.raises(UnsupportedArchitectureError) as refusal:
        HookedViT.from_timm(make())
    assert feature in refusal.value.feature
