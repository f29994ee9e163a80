"""The lens on heads that are not linear after the norm (METHODS §8): a CLIP-like tower with a
cosine (zero-shot) head and a SigLIP-like tower with an attention pool. Every vector is read as the
model reads that vector alone; the streaming lens's sums stay exact; runner analyses, patching and
token removal run on these models and agree with the model's own outputs."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from vit_embedding_lens import HookedViT
from vit_embedding_lens.data import InMemoryDataset
from vit_embedding_lens.interventions import get_act_patch_resid_pre, logit_diff
from vit_embedding_lens.lens import (
    ClassProjection,
    lens_batch,
    lens_dataset,
    lens_from_cache,
    pool_decomposition,
)
from vit_embedding_lens.runner import build_analyses, run_analyses, summarize_run
from vit_embedding_lens.testing import create_timm_vit, randomize_vit_weights_

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["apple", "boat", "cat", "dog", "eel", "fox"]
SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4)


def embeddings(d: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(len(NAMES), d, generator=torch.Generator().manual_seed(seed))


def clip_like() -> HookedViT:
    tm = VisionTransformer(**SMALL, pre_norm=True, global_pool="token", num_classes=0)
    hm = HookedViT.from_timm(randomize_vit_weights_(tm, seed=1))
    return hm.with_class_embeddings(embeddings(32), NAMES, logit_scale=30.0, logit_bias=0.0)


def siglip_like() -> HookedViT:
    tm = create_timm_vit("vit_base_patch16_siglip_224", seed=2, num_classes=0, **SMALL)
    hm = HookedViT.from_timm(tm)
    return hm.with_class_embeddings(embeddings(32), NAMES, logit_scale=10.0, logit_bias=-2.0)


MODELS = {"clip_like": clip_like, "siglip_like": siglip_like}


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(MODELS))
def test_parts_sum_exactly_and_a_vector_is_read_as_the_model_reads_it_alone(kind):
    model = MODELS[kind]()
    proj = ClassProjection(model)
    assert not proj.linear
    x = images()
    _, cache = model.run_with_cache(x)
    L = model.cfg.n_layers
    mid, mlp = cache[f"blocks.{L - 1}.hook_resid_mid"], cache[f"blocks.{L - 1}.hook_mlp_out"]
    post = cache[f"blocks.{L - 1}.hook_resid_post"]
    summed = proj.from_parts(proj.unnormalized(mid) + proj.unnormalized(mlp), proj.scale(post))
    torch.testing.assert_close(summed, proj(post), atol=1e-5, rtol=1e-5)
    # each token alone: the model's own readout of a one-token sequence (no prefix token to pool
    # for the MAP model; the CLS model reads its CLS token)
    for j in (0, 3, model.layout.n_tokens - 1):
        alone = post[:, j : j + 1]
        if model.cfg.global_pool == "token":
            alone = post[:, [0] * 1] if j == 0 else None
        if alone is None:
            continue
        torch.testing.assert_close(
            proj(post[:, j]), model.readout(alone, fire_hooks=False), atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(proj.differentiable(post), proj(post), atol=1e-5, rtol=1e-5)


def test_cls_reading_of_the_last_block_is_the_zero_shot_logits():
    model = clip_like()
    x = images()
    logits, cache = model.run_with_cache(x)
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, model.layout.cls_index]
    torch.testing.assert_close(ClassProjection(model)(last), logits, atol=1e-5, rtol=1e-5)
    result = lens_batch(model, x, logits.argmax(-1))
    assert bool((result.rank["resid"][:, -1, model.layout.cls_index] == 0).all())


def test_map_pooled_attention_output_read_through_the_pool_is_the_logits():
    model = siglip_like()
    x = images()
    logits, cache = model.run_with_cache(x)
    proj = ClassProjection(model)
    torch.testing.assert_close(
        proj.finish(cache["attn_pool.hook_attn_out"]), logits, atol=1e-5, rtol=1e-5
    )
    # the attention output as the probe-weighted sum of per-token, per-head terms
    terms = pool_decomposition(model, x)
    torch.testing.assert_close(proj.finish(terms.attn_out), logits, atol=1e-5, rtol=1e-5)
    # all of the probe's attention on one token: the model reads that token alone, and the lens
    # ranks the model's prediction first there at the last block
    j = 5

    def on_token(pattern, hook):
        edited = torch.zeros_like(pattern)
        edited[..., j] = 1.0
        return edited

    with model.hooks(fwd_hooks=[("attn_pool.hook_pattern", on_token)]):
        one = model(x)
        result = lens_batch(model, x, one.argmax(-1))
    assert bool((result.rank["resid"][:, -1, j] == 0).all())


@pytest.mark.parametrize("kind", list(MODELS))
def test_streaming_lens_matches_a_direct_reading(kind):
    model = MODELS[kind]()
    x = images()
    labels = torch.arange(6) % len(NAMES)
    result = lens_batch(model, x, labels)
    _, cache = model.run_with_cache(x)
    proj = ClassProjection(model)
    for block in range(model.cfg.n_layers):
        logits = proj(cache[f"blocks.{block}.hook_resid_post"])
        target = logits.gather(-1, labels[:, None, None].expand(-1, logits.shape[1], 1))
        direct = (logits > target).sum(-1)
        agree = (result.rank["resid"][:, block].long() == direct).float().mean()
        assert agree >= 0.99, (block, agree)
    again = lens_from_cache(model, cache, labels)
    assert torch.equal(again.rank["resid"], result.rank["resid"])
    streamed = lens_dataset(model, [(x[:3], labels[:3]), (x[3:], labels[3:])], progress=False)
    assert torch.equal(streamed.rank["resid"], result.rank["resid"])


@pytest.mark.parametrize("kind", list(MODELS))
def test_runner_analyses_run_and_agree_with_the_model(kind, tmp_path):
    model = MODELS[kind]()
    x = images(8)
    with torch.no_grad():
        predicted = model(x).argmax(-1)
    dataset = InMemoryDataset(x, predicted, [f"img{i}" for i in range(8)])
    analyses = build_analyses(["lens", "accuracy", "knockout", "memories", "context_removal"])
    results = run_analyses(model, dataset, analyses, tmp_path, batch_size=4, progress=False)
    assert results is not None
    tables, _ = summarize_run(results, analyses, model)
    assert tables["accuracy"]["summary"]["top1"].item() == 1.0  # labels are the predictions
    assert set(tables) >= {"lens", "knockout", "memories", "context_removal"}
    assert all(len(t) for t in tables["lens"].values())


@pytest.mark.parametrize("kind", list(MODELS))
def test_patching_and_token_removal(kind):
    model = MODELS[kind]()
    clean, corrupted = images(2, seed=0), images(2, seed=1)
    target = model(clean).argmax(-1)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))
    metric = logit_diff(model, target)
    result = get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    L, N = model.cfg.n_layers, model.layout.n_tokens
    assert result.values.shape == (L, N)
    for layer, token in [(0, 1), (1, N - 1)]:

        def patch(act, hook, token=token):
            act = act.clone()
            act[:, token] = cache[hook.name][:, token]
            return act

        logits = model.run_with_hooks(
            corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)]
        )
        assert result.values[layer, token].item() == pytest.approx(metric(logits).item(), abs=1e-5)
    # patching every token at block 0 restores the clean metric
    full = model.run_with_hooks(
        corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: cache[hook.name])]
    )
    assert metric(full).item() == pytest.approx(metric(model(clean)).item(), abs=1e-5)
    # token removal: keeping every token is the plain forward
    keep = torch.ones(2, N, dtype=torch.bool)
    torch.testing.assert_close(model(clean, keep_mask=keep), model(clean), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_random_init_twin_keeps_the_class_space(kind):
    from vit_embedding_lens.loading.twin import random_init_twin

    model = MODELS[kind]()
    twin = random_init_twin(model, seed=0)
    assert twin.cfg.head_type == "cosine" and twin.class_names == NAMES
    assert torch.equal(twin.head.W_head, model.head.W_head)
    assert twin.head.logit_bias.item() == model.head.logit_bias.item()
    assert not torch.equal(twin.blocks[0].attn.W_Q, model.blocks[0].attn.W_Q)
    assert twin(images(2)).shape == (2, len(NAMES))


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_linear_class_map_is_the_direct_path(kind):
    """``classifier_head`` (the value projection's class map): for a CLS tower, the projection and
    the scaled text embeddings; for an attention pool, one token's value/output map and the pool's
    skip connection (its MLP left out), then the projection and the head."""
    from vit_embedding_lens.lens.projection import classifier_head

    model = MODELS[kind]()
    weight, bias = classifier_head(model)
    u = torch.randn(5, model.cfg.d_model, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        features = model.attn_pool.value_output(u) if model.cfg.global_pool == "map" else u
        expected = model.head.logit_scale * features @ model.head.W_head + model.head.logit_bias
    torch.testing.assert_close(u @ weight + bias, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
def test_tuned_lens_fits_and_reads_zero_shot_models(kind):
    """The tuned lens on a cosine head (CLS readout vector) and on an attention pool (token
    vectors; its readout KL reads the translated stream through the whole pool): the plain
    lens's last-block readout KL is 0 (the model's output), and the lens directions exist."""
    from vit_embedding_lens.lens import TunedClassLens, readout_kl
    from vit_embedding_lens.lens.tuned_checks import lens_directions

    model = MODELS[kind]()
    x = images(8)
    lens = TunedClassLens.fit(model, [x[:4], x[4:]], epochs=2, n_tokens=8, progress=False)
    n_vectors = 8 * 8
    assert lens.card["n_vectors"] == n_vectors
    readout = lens.card["heldout_kl_readout_plain"]
    assert all(v != v for v in readout) == (kind == "siglip_like")  # NaN: no readout vector
    kl = readout_kl(model, x, {"plain": None, "tuned": lens})
    assert kl["plain"].shape == (8, model.cfg.n_layers)
    assert kl["plain"][:, -1].abs().max() < 1e-6 and bool((kl["tuned"] >= -1e-6).all())
    directions = lens_directions(model, lens, 0, 3)
    torch.testing.assert_close(
        directions.T @ directions, torch.eye(3, dtype=directions.dtype), atol=1e-8, rtol=0
    )
    if kind == "siglip_like":
        with pytest.raises(ValueError, match="no single readout vector"):
            TunedClassLens.fit(model, [x], tokens="readout", progress=False)
