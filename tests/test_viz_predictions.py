"""Per-token class predictions across blocks (the data of the logit-lens views).

Checked against a slow reference that projects each token by hand (``F.layer_norm`` with the final
norm's weights, then ``W_U``/``b_U``) and counts ranks with explicit loops; directions of effects on
the bundled trained model; layouts with register tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vit_embedding_lens import HookedViT
from vit_embedding_lens.testing import create_timm_vit
from vit_embedding_lens.viz import TokenClassPredictions, token_class_predictions, token_types
from vit_embedding_lens.zoo import load_mnist_eval


@pytest.fixture(scope="module")
def bundled():
    model = HookedViT.from_bundled()
    digits = load_mnist_eval()
    pick = torch.arange(0, len(digits), 17)  # 30 digits, 3 per class (the set is sorted by class)
    return model, digits.images[pick], digits.labels[pick]


@pytest.fixture(scope="module")
def bundled_cache(bundled):
    model, images, labels = bundled
    with torch.no_grad():
        logits, cache = model.run_with_cache(images)
    return logits, cache


def _reference_logits(model, v):
    """Class logits of one vector, by hand: the model's final LayerNorm, then the head."""
    v = v.detach()
    ln = model.ln_final
    with torch.no_grad():
        normed = F.layer_norm(v.double(), (v.shape[-1],), ln.w.double(), ln.b.double(), ln.eps)
        return normed @ model.W_U.double() + model.b_U.double()


def test_topk_and_target_rank_match_a_token_by_token_reference(bundled, bundled_cache):
    model, images, labels = bundled
    _, cache = bundled_cache
    pred = token_class_predictions(model, cache, k=3, targets=labels)
    n_img, n_blocks, n_tok, k = pred.topk_classes.shape
    assert (n_blocks, n_tok, k) == (model.cfg.n_layers, model.layout.n_tokens, 3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):  # random (image, block, token) cells
        i = int(torch.randint(n_img, (1,), generator=gen))
        b = int(torch.randint(n_blocks, (1,), generator=gen))
        t = int(torch.randint(n_tok, (1,), generator=gen))
        logits = _reference_logits(model, cache[f"blocks.{b}.hook_resid_post"][i, t])
        probs = logits.softmax(-1)
        order = sorted(range(len(probs)), key=lambda c: -float(probs[c]))
        assert pred.topk_classes[i, b, t].tolist() == order[:3]
        torch.testing.assert_close(
            pred.topk_probs[i, b, t].double(), probs[order[:3]], atol=1e-5, rtol=1e-4
        )
        target = int(labels[i])
        rank = sum(1 for c in range(len(logits)) if logits[c] > logits[target])
        assert int(pred.target_ranks[i, b, t]) == rank
        assert float(pred.target_probs[i, b, t]) == pytest.approx(float(probs[target]), abs=1e-5)


def test_last_block_cls_top1_is_the_models_prediction(bundled, bundled_cache):
    model, _, _ = bundled
    logits, cache = bundled_cache
    pred = token_class_predictions(model, cache, k=1)
    cls = model.layout.cls_index
    assert torch.equal(pred.top1[:, -1, cls], logits.argmax(-1))
    assert pred.target_probs is None and pred.target_ranks is None


def test_identifiability_rises_across_blocks_on_the_trained_model(bundled):
    model, images, labels = bundled
    pred = token_class_predictions(
        model, images, k=1, targets=labels
    )  # images in, cache made inside
    layout = model.layout
    cls_top1 = (pred.target_ranks[:, :, layout.cls_index] == 0).float().mean(0)
    image_top1 = (pred.target_ranks[:, :, layout.n_prefix :] == 0).float().mean((0, 2))
    # the CLS token becomes identifiable with depth and ends far above chance (1/10)
    assert cls_top1[-1] > cls_top1[0] + 0.3 and cls_top1[-1] > 0.8
    # image tokens start near chance and gain identifiability in the later blocks
    assert image_top1[-1] > image_top1[0] + 0.1
    assert (
        pred.target_probs[:, -1, layout.cls_index].mean()
        > pred.target_probs[:, 0, layout.cls_index].mean()
    )


def test_images_and_cache_routes_agree_and_batchless_cache_works(bundled, bundled_cache):
    model, images, labels = bundled
    _, cache = bundled_cache
    from_cache = token_class_predictions(model, cache, k=2, targets=labels, blocks=[1, 4])
    from_images = token_class_predictions(model, images, k=2, targets=labels, blocks=[1, 4])
    assert from_cache.topk_classes.shape[0] == len(images)
    assert from_cache.blocks == [1, 4]
    assert torch.equal(from_cache.topk_classes, from_images.topk_classes)
    torch.testing.assert_close(from_cache.target_probs, from_images.target_probs)
    _, single = model.run_with_cache(images[:1], remove_batch_dim=True)
    one = token_class_predictions(model, single, k=2, targets=int(labels[0]), blocks=[1, 4])
    assert torch.equal(one.topk_classes[0], from_cache.topk_classes[0])


def test_to_frame_is_tidy_and_consistent_with_tensors(bundled, bundled_cache):
    model, _, labels = bundled
    _, cache = bundled_cache
    pred = token_class_predictions(model, cache, k=2, targets=labels, blocks=[0, 5])
    frame = pred.to_frame()
    n_img = labels.shape[0]
    assert len(frame) == n_img * 2 * model.layout.n_tokens * 2
    row = frame[
        (frame.image == 3) & (frame.block == 5) & (frame.token == "P2,4") & (frame.k == 1)
    ].iloc[0]
    pos = model.layout.token_index(2, 4)
    assert row.position == pos and row.token_type == "image"
    assert row["class"] == int(pred.topk_classes[3, 1, pos, 1])
    assert row.class_name == model.class_names[row["class"]]
    assert row.target == int(labels[3]) and row.target_rank == int(pred.target_ranks[3, 1, pos])
    assert set(frame.loc[frame.position == 0, "token"]) == {"CLS"}


def test_registers_layout_grid_excludes_prefix_tokens():
    tm = create_timm_vit(
        "vit_small_patch16_224",
        depth=2,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        num_heads=2,
        reg_tokens=4,
        num_classes=7,
    )
    model = HookedViT.from_timm(tm)
    layout = model.layout
    assert token_types(layout) == ["CLS", "REG", "REG", "REG", "REG"] + ["image"] * 16
    images = torch.randn(2, 3, 32, 32)
    pred = token_class_predictions(model, images, k=3, targets=[1, 6])
    grid = pred.grid("target_prob", image_index=1)
    assert grid.shape == (2, 4, 4)
    # grid cell (r, c) is the token at layout.token_index(r, c), never a register
    for r in range(4):
        for c in range(4):
            assert grid[1, r, c] == pred.target_probs[1, 1, layout.token_index(r, c)]
    frame = pred.to_frame()
    assert {"REG0", "REG3"} <= set(frame.token) and set(
        frame.loc[frame.token == "REG2", "token_type"]
    ) == {"REG"}


def test_clear_errors(bundled, bundled_cache):
    model, images, labels = bundled
    _, cache = bundled_cache
    _, partial = model.run_with_cache(images[:2], names_filter="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="names_filter"):
        token_class_predictions(model, partial)
    with pytest.raises(ValueError, match="hook must be one of"):
        token_class_predictions(model, cache, hook="hook_pattern")
    with pytest.raises(ValueError, match="k must be between"):
        token_class_predictions(model, cache, k=11)
    with pytest.raises(ValueError, match="targets for a batch"):
        token_class_predictions(model, cache, targets=[1, 2])
    with pytest.raises(ValueError, match="out of range"):
        token_class_predictions(model, cache, blocks=[6])
    pred = token_class_predictions(model, cache, k=1)
    assert isinstance(pred, TokenClassPredictions)
    with pytest.raises(ValueError, match="needs targets"):
        pred.grid("target_prob")
