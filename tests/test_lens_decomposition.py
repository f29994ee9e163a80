"""The Gandelsman decomposition: the representation (pre-normalization features, or the pooled
vector) is the exact sum of its direct contributions for CLS, average-pool and attention-pool
models, linear and zero-shot heads; the terms read in class space sum to the logits; the attention
pool's output splits into per-token terms exactly; mean-ablating nothing keeps accuracy exactly."""

from __future__ import annotations

import pytest
import torch
from test_lens_zero_shot import MODELS, images  # tests/ is on sys.path

from vit_embedding_lens import HookedViT
from vit_embedding_lens.lens import decompose_representation, mean_ablation, pool_decomposition
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.testing import assert_close_scaled, create_timm_vit

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, num_classes=5)


def supervised(name: str, **kwargs) -> HookedViT:
    return HookedViT.from_timm(create_timm_vit(name, seed=4, **{**SMALL, **kwargs}))


def projected_linear() -> HookedViT:
    """A CLS tower with a biased projection to a joint space and a linear head (config-built)."""
    cfg = HookedViTConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_classes=5,
        image_size=(32, 32),
        patch_size=(8, 8),
        pre_norm=True,
        d_embed=24,
        proj_bias=True,
    )
    model = HookedViT(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


CASES = {
    **MODELS,
    "cls_linear": lambda: supervised("vit_base_patch16_224"),
    "cls_fc_norm": lambda: supervised("vit_base_patch16_224", fc_norm=True),
    "projected_linear": projected_linear,
    "avg_tokens_norm": lambda: supervised("vit_medium_patch16_gap_256"),
    "avg_fc_norm": lambda: supervised("vit_little_patch16_reg4_gap_256"),
    "map_linear": lambda: supervised("vit_base_patch16_siglip_224"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("per_head", [False, True])
def test_terms_sum_to_the_representation_and_to_the_logits(case, per_head):
    model = CASES[case]()
    x = images(4)
    dec = decompose_representation(model, x, per_head=per_head)
    assert dec.terms.shape[:2] == (4, len(dec.labels))
    assert_close_scaled(dec.total(), dec.representation, rel=1e-5)
    logits = model(x)
    assert_close_scaled(dec.direct_logits().sum(1) + dec.head_bias(), logits, rel=1e-5)
    L = model.cfg.n_layers
    kinds = dec.labels["kind"].value_counts()
    assert kinds["mlp"] == L and kinds["attn_bias"] == L and kinds["embed"] == 1
    assert kinds["attn"] == (L * model.cfg.n_heads if per_head else L)
    assert kinds.get("pool_mlp", 0) == int(model.cfg.global_pool == "map")
    frame = dec.frame()
    assert len(frame) == 4 * len(dec.labels) and (frame["norm"] >= 0).all()
    by_logit = dec.frame("logit")
    predicted = logits.argmax(-1)
    assert by_logit["class"].tolist() == predicted.repeat_interleave(len(dec.labels)).tolist()
    summed = torch.tensor(by_logit.groupby("image")["logit"].sum().to_numpy())
    expected = logits.gather(1, predicted[:, None])[:, 0] - dec.head_bias()[predicted]
    assert_close_scaled(summed, expected.detach(), rel=1e-5)
    with pytest.raises(ValueError, match="reduce"):
        dec.frame("mean")


@pytest.mark.parametrize("case", ["clip_like", "siglip_like", "avg_tokens_norm", "avg_fc_norm"])
def test_per_token_terms_sum_to_the_per_head_terms(case):
    """CLS models: per source token; pooling models: per pooled position (through the probe's
    weights for the attention pool)."""
    model = CASES[case]()
    x = images(3)
    by_token = decompose_representation(model, x, per_token=True)
    by_head = decompose_representation(model, x, per_head=True)
    assert_close_scaled(by_token.total(), by_token.representation, rel=1e-5)
    cfg, layout = model.cfg, model.layout
    start = 0 if cfg.global_pool == "token" or cfg.pool_include_prefix else layout.n_prefix
    tokens = by_token.labels.query("kind == 'attn'")["token"]
    assert sorted(tokens.unique()) == list(range(start, layout.n_tokens))
    for block in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            rows = (by_token.labels["block"] == block) & (by_token.labels["head"] == head)
            summed = by_token.terms[:, torch.tensor(rows.tolist())].sum(1)
            row = (by_head.labels["block"] == block) & (by_head.labels["head"] == head)
            expected = by_head.terms[:, torch.tensor(row.tolist())].sum(1)
            assert_close_scaled(summed, expected, rel=1e-5)


def _direct_effect_by_hooks(model: HookedViT, x: torch.Tensor, block: int, head: int):
    """A head's direct contribution to the representation, the other way: zero its ``z`` in a
    forward where every later write-in, the final norm's scale and the attention pool's probe
    weights and MLP output are patched to their clean values, and take the difference."""
    rep = "hook_image_embed" if model.cfg.d_embed else "hook_pooled"
    L = model.cfg.n_layers
    frozen = ["ln_final.hook_scale", rep]
    frozen += [act_name(n, b) for b in range(block + 1, L) for n in ("attn_out", "mlp_out")]
    frozen.append(act_name("mlp_out", block))
    if model.cfg.global_pool == "map":
        frozen += ["attn_pool.hook_pattern", "attn_pool.hook_mlp_out"]
    _, clean = model.run_with_cache(x, names_filter=frozen)

    def zero(z, hook):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    hooks = [(act_name("z", block), zero)]
    hooks += [(n, lambda a, hook: clean[hook.name]) for n in frozen if n != rep]
    with model.hooks(fwd_hooks=hooks):
        _, ablated = model.run_with_cache(x, names_filter=[rep])
    return clean[rep] - ablated[rep]


@pytest.mark.parametrize("case", ["clip_like", "siglip_like", "projected_linear", "cls_fc_norm"])
def test_per_head_terms_match_the_direct_effect_computed_with_hooks(case):
    model = CASES[case]()
    x = images(3, seed=1)
    dec = decompose_representation(model, x, per_head=True)
    for block, head in [(0, 0), (0, 3), (model.cfg.n_layers - 1, 2)]:
        row = (dec.labels["kind"] == "attn") & (dec.labels["block"] == block)
        row &= dec.labels["head"] == head
        (index,) = row[row].index
        expected = _direct_effect_by_hooks(model, x, block, head)
        assert_close_scaled(dec.terms[:, index], expected, rel=1e-5)
        assert expected.abs().max() > 1e-3  # a real contribution, not a vacuous check


def test_pool_terms_sum_to_the_pooled_output():
    model = MODELS["siglip_like"]()
    x = images(3)
    dec = pool_decomposition(model, x)
    n = model.layout.n_tokens
    assert dec.token_terms.shape == (3, n, model.cfg.pool_n_heads, model.cfg.d_model)
    assert_close_scaled(dec.total(), dec.pooled, rel=1e-5)
    _, cache = model.run_with_cache(x, names_filter=["attn_pool.hook_attn_out"])
    assert_close_scaled(dec.attn_out, cache["attn_pool.hook_attn_out"], rel=1e-5)
    with pytest.raises(ValueError, match="not an attention pool"):
        pool_decomposition(MODELS["clip_like"](), x)


@pytest.mark.parametrize("case", ["clip_like", "siglip_like", "cls_linear"])
def test_mean_ablating_nothing_keeps_accuracy_exactly(case):
    model = CASES[case]()
    x = images(10, seed=3)
    labels = torch.arange(10) % model.cfg.n_classes
    with torch.no_grad():
        accuracy = float((model(x).argmax(-1) == labels).float().mean())
    table = mean_ablation(model, x, labels, batch_size=4)
    L = model.cfg.n_layers
    assert table["k"].tolist() == list(range(L + 1))
    kept = table.set_index("k").loc[L]
    assert kept["accuracy"] == accuracy and kept["agreement"] == 1.0 and kept["ablated_blocks"] == 0
    assert table["accuracy"].between(0, 1).all()
    with pytest.raises(ValueError, match="k must lie"):
        mean_ablation(model, x, labels, ks=[L + 1])


def test_refusals():
    with pytest.raises(ValueError, match="post-norm"):
        decompose_representation(supervised("vit_base_patch16_rpn_224"), images(1))
    with pytest.raises(ValueError, match="not linear"):
        decompose_representation(supervised("vit_base_patch16_224", global_pool="max"), images(1))
    with pytest.raises(ValueError, match="distilled"):
        decompose_representation(supervised("deit_tiny_distilled_patch16_224"), images(1))
    model = MODELS["clip_like"]()
    labels = torch.zeros(2, dtype=torch.long)
    for ks in ([-1], [], [0, 3]):
        with pytest.raises(ValueError, match="k must lie"):
            mean_ablation(model, images(2), labels, ks=ks)
    with pytest.raises(ValueError, match="batch_size"):
        mean_ablation(model, images(2), labels, batch_size=0)
    with pytest.raises(ValueError, match="at least one image"):
        mean_ablation(model, images(0), labels[:0])
    with pytest.raises(ValueError, match="no head"):
        mean_ablation(supervised("vit_base_patch16_224", num_classes=0), images(2), labels)
    with pytest.raises(Exception, match="one class id per image|labels"):
        mean_ablation(model, images(2), torch.zeros(3, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_base_patch16_siglip_224", "vit_base_patch16_clip_224"])
def test_full_size_terms_sum_to_the_representation(name):
    """ViT-B/16 towers (SigLIP's attention pool; CLIP's CLS pooling) with realistic random weights
    and a text-like cosine head: the per-head terms sum to the representation, the pool's
    per-token terms to the pooled output, and the terms read in class space to the logits."""
    tm = create_timm_vit(name, seed=5, num_classes=0)
    model = HookedViT.from_timm(tm)
    d = model.cfg.d_features
    space = torch.randn(10, d, generator=torch.Generator().manual_seed(1))
    model = model.with_class_embeddings(space, [f"c{i}" for i in range(10)], logit_scale=100.0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    dec = decompose_representation(model, x, per_head=True)
    assert_close_scaled(dec.total(), dec.representation, rel=1e-5)
    with torch.no_grad():
        logits = model(x)
    assert_close_scaled(dec.direct_logits().sum(1) + dec.head_bias(), logits, rel=1e-5)
    if model.cfg.global_pool == "map":
        pool = pool_decomposition(model, x)
        assert_close_scaled(pool.total(), pool.pooled, rel=1e-5)
