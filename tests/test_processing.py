"""Weight processing keeps the model's log-probabilities, and changes the weights it claims to."""

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.testing import create_timm_vit

SMALL = dict(depth=2, embed_dim=96, num_heads=4, img_size=64)
FAMILIES = {
    "cls": ("vit_base_patch16_224", SMALL),
    "layerscale_no_embed_class": ("deit3_small_patch16_224", SMALL),
    "distilled": ("deit_tiny_distilled_patch16_224", SMALL),
    "clip_ln_pre": ("vit_base_patch16_clip_224", SMALL),
    "registers_gap_fc_norm": ("vit_little_patch16_reg4_gap_256", SMALL),
    "gap_final_norm": ("vit_medium_patch16_gap_256", SMALL),
    "qk_norm": ("vit_base_patch16_224", dict(SMALL, qk_norm=True)),
}
STEPS = ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"]


def _images(model, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.cfg.in_chans, *model.cfg.image_size, generator=gen)


def _log_probs(model, x):
    with torch.no_grad():
        return model(x).log_softmax(-1)


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def timm_model(request):
    name, kwargs = FAMILIES[request.param]
    return create_timm_vit(name, seed=1, **kwargs)


@pytest.mark.parametrize("steps", [[s] for s in STEPS] + [STEPS], ids=STEPS + ["all"])
def test_processing_keeps_log_probs(timm_model, steps):
    plain = HookedViT.from_timm(timm_model)
    processed = HookedViT.from_timm(timm_model, **{s: True for s in steps})
    x = _images(plain)
    expected, got = _log_probs(plain, x), _log_probs(processed, x)
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=2e-5 * scale, rtol=1e-5)
    # the explicit attention / norm path (full cache) agrees too
    with torch.no_grad():
        logits, _ = processed.run_with_cache(x)
    torch.testing.assert_close(logits.log_softmax(-1), expected, atol=2e-5 * scale, rtol=1e-5)


def test_fold_ln_removes_norm_weights_and_switches_config(timm_model):
    model = HookedViT.from_timm(timm_model, fold_ln=True)
    assert model.cfg.normalization_type == "LNPre"
    names = dict(model.named_parameters())
    assert not any(k.startswith(("blocks.0.ln1.", "blocks.0.ln2.", "ln_final.")) for k in names)
    # the folded weights differ from the unfolded ones (the step really did something)
    plain = HookedViT.from_timm(timm_model)
    assert not torch.allclose(model.blocks[0].attn.W_Q, plain.blocks[0].attn.W_Q)
    assert not torch.allclose(model.W_U, plain.W_U)


def test_center_writing_weights_centers_every_writer(timm_model):
    model = HookedViT.from_timm(timm_model, center_writing_weights=True)
    writers = [model.embed.W_E.flatten(1).T, model.embed.b_E, model.embed.W_prefix]
    if model.pos_embed is not None:
        writers.append(model.pos_embed.W_pos)
    for block in model.blocks:
        writers += [block.attn.W_O, block.attn.b_O, block.mlp.W_out, block.mlp.b_out]
    for w in writers:
        assert w.numel() == 0 or w.mean(-1).abs().max() < 1e-5
    # and the residual stream entering each block is then zero-mean over d_model (no ln_pre)
    if not model.cfg.pre_norm:
        _, cache = model.run_with_cache(_images(model), names_filter=lambda n: "resid" in n)
        for key in cache.keys():
            assert cache[key].mean(-1).abs().max() < 1e-4, key


def test_center_unembed_and_fold_value_biases(timm_model):
    model = HookedViT.from_timm(timm_model, center_unembed=True, fold_value_biases=True)
    assert model.W_U.mean(-1).abs().max() < 1e-6
    assert model.b_U.mean().abs() < 1e-6
    assert model.b_V.abs().max() == 0
    if model.cfg.qkv_bias:  # randomized weights: the fold had something to move
        assert HookedViT.from_timm(timm_model).b_V.abs().max() > 0


def test_refusals_name_the_reason():
    rpn = create_timm_vit("vit_base_patch16_rpn_224", **SMALL)
    with pytest.raises(ValueError, match="post-norm"):
        HookedViT.from_timm(rpn, fold_ln=True)
    with pytest.raises(ValueError, match="post-norm"):
        HookedViT.from_timm(rpn, center_writing_weights=True)
    headless = create_timm_vit("vit_base_patch16_224", num_classes=0, **SMALL)
    with pytest.raises(ValueError, match="classifier head"):
        HookedViT.from_timm(headless, fold_ln=True)
    maxpool = create_timm_vit("vit_base_patch16_224", global_pool="max", class_token=False, **SMALL)
    with pytest.raises(ValueError, match="max"):
        HookedViT.from_timm(maxpool, center_writing_weights=True)
    folded = HookedViT.from_timm(create_timm_vit("vit_base_patch16_224", **SMALL), fold_ln=True)
    from vit_embedding_lens.model.processing import fold_layer_norm_

    with pytest.raises(ValueError, match="already folded"):
        fold_layer_norm_(folded)


def test_post_norm_blocks_still_allow_the_steps_that_are_exact():
    rpn = create_timm_vit("vit_base_patch16_rpn_224", **SMALL)
    plain = HookedViT.from_timm(rpn)
    processed = HookedViT.from_timm(rpn, center_unembed=True, fold_value_biases=True)
    x = _images(plain)
    torch.testing.assert_close(_log_probs(processed, x), _log_probs(plain, x), atol=1e-4, rtol=1e-5)


def test_processing_is_exact_in_float64(timm_model):
    """In float64 any real change of function stands far above rounding (1e-9 vs ~1e-14)."""
    plain = HookedViT.from_timm(timm_model, dtype=torch.float64)
    steps = {s: True for s in STEPS}
    if plain.cfg.block_norm == "post":
        steps = {"center_unembed": True, "fold_value_biases": True}
    processed = HookedViT.from_timm(timm_model, dtype=torch.float64, **steps)
    x = _images(plain).double()
    torch.testing.assert_close(_log_probs(processed, x), _log_probs(plain, x), atol=1e-9, rtol=1e-9)


def test_processed_model_keeps_the_requested_dtype(timm_model):
    model = HookedViT.from_timm(
        timm_model, dtype=torch.bfloat16, fold_ln=True, center_writing_weights=True
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
