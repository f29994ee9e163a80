"""The token-removal benchmark (METHODS §6): masks, AUC, a loop reference, the bundled model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.attribution import (
    chefer_relevance,
    importance_rank,
    keep_masks,
    perturbation_auc,
    perturbation_benchmark,
    random_attribution,
)
from vit_embedding_lens.attribution.perturbation import PerturbationResult
from vit_embedding_lens.testing import create_timm_vit

TINY = dict(depth=2, img_size=32, patch_size=8, num_classes=10, embed_dim=64, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    return HookedViT.from_timm(create_timm_vit("vit_tiny_patch16_224", **{**TINY, **kw}))


def test_keep_masks_keep_the_prefix_and_the_right_end_of_the_ranking():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    rank = importance_rank(scores)
    assert rank.tolist() == [[3, 0, 1, 2], [0, 1, 2, 3]]
    n = torch.tensor([1, 2])
    negative = keep_masks(rank, n, torch.tensor([True, True]), n_prefix=2)
    positive = keep_masks(rank, n, torch.tensor([False, False]), n_prefix=2)
    assert negative.tolist() == [
        [True, True, False, True, False, False],
        [True, True, True, True, False, False],
    ]
    assert positive.tolist() == [
        [True, True, True, False, False, False],
        [True, True, False, False, True, True],
    ]


def test_auc_is_the_methods_formula():
    acc = np.array([0.2, 0.5, 0.9, 0.6])  # N = 5 image tokens: n = 1..4
    assert perturbation_auc(acc, 5) == pytest.approx(acc.sum() / (0.9 * 5))
    assert perturbation_auc(acc, 5, [1, 2, 3, 4]) == perturbation_auc(acc, 5)
    # a curve sampled at some n is integrated between them (n = 2 is interpolated to 0.55), not
    # averaged: a plain mean of the samples would weight them as if they were evenly spread
    assert perturbation_auc(acc[::2], 5, [1, 3]) == pytest.approx(
        (0.2 + 0.55 + 0.9 + 0.9) / (0.9 * 5)
    )
    # a linear curve sampled on a grid dense at small n gives its exact AUC
    N = 49
    line = np.linspace(0.1, 0.9, N - 1)
    grid = [1, 2, 4, 8, 16, 32, 48]
    exact = perturbation_auc(line, N)
    assert exact == pytest.approx(line.sum() / (0.9 * N))
    assert perturbation_auc(line[np.array(grid) - 1], N, grid) == pytest.approx(exact)
    assert np.isnan(perturbation_auc([0.0, 0.0], 5, [1, 2]))
    with pytest.raises(ValueError, match="accuracies"):
        perturbation_auc(np.ones(5), 5)
    with pytest.raises(ValueError, match="n_values"):
        perturbation_auc(acc[::2], 5)


def masked_accuracy(model, images, targets, scores, n, order):
    """Reference: remove tokens by masking them as attention keys (-inf scores) in every block.

    For a CLS-pooled model this equals dropping them from the sequence: no kept token can read a
    masked one, and nothing reads the removed tokens' own outputs.
    """
    layout = model.layout
    hits = 0
    for b in range(images.shape[0]):
        by_importance = sorted(range(layout.n_patches), key=lambda p: (-float(scores[b, p]), p))
        kept = by_importance[:n] if order == "negative" else by_importance[layout.n_patches - n :]
        removed = [layout.n_prefix + p for p in range(layout.n_patches) if p not in kept]

        def mask(attn_scores, hook):
            attn_scores[..., removed] = float("-inf")
            return attn_scores

        with torch.no_grad():
            logits = model.run_with_hooks(
                images[b : b + 1],
                fwd_hooks=[(lambda name: name.endswith("hook_attn_scores"), mask)],
            )
        hits += int(logits.argmax(-1).item() == int(targets[b]))
    return hits / images.shape[0]


def test_benchmark_matches_a_masking_loop_reference(make_images):
    model = tiny(reg_tokens=4)  # five prefix tokens
    images = make_images(6, 32, seed=4)
    targets = model(images).argmax(-1)
    scores = torch.randn(6, model.layout.n_patches, generator=torch.Generator().manual_seed(0))
    n_keep = [1, 5, 9, 15]
    result = perturbation_benchmark(
        model,
        images,
        None,
        {"given": scores, "chefer": "chefer"},
        n_keep=n_keep,
        batch_size=7,
        progress=False,
    )
    curves = result.curves.set_index(["method", "order", "n"])
    for order in ("positive", "negative"):
        for n in n_keep:
            expected = masked_accuracy(model, images, targets, scores, n, order)
            assert curves.loc[("given", order, n), "accuracy"] == pytest.approx(expected)
    chefer = chefer_relevance(model, images, targets, progress=False).scores
    for n in (1, 9):
        assert curves.loc[("chefer", "negative", n), "accuracy"] == pytest.approx(
            masked_accuracy(model, images, targets, chefer, n, "negative")
        )


def test_tables_have_one_row_per_observation(make_images):
    model = tiny()
    images = make_images(4, 32, seed=1)
    labels = torch.tensor([0, 1, 2, 3])
    amap = random_attribution(model, images, labels, seed=9)
    result = perturbation_benchmark(
        model,
        images,
        labels,
        {"fixed": amap, "random": "random", "fn": chefer_relevance},
        n_keep=[2, 8],
        seeds=(0, 1, 2),
        progress=False,
    )
    assert list(result.curves.columns[:5]) == ["method", "order", "n", "accuracy", "seed"]
    assert len(result.curves) == (1 + 3 + 1) * 2 * 2
    assert len(result.auc) == (1 + 3 + 1) * 2
    assert result.curves[result.curves.method == "random"].seed.tolist().count(2) == 4
    assert result.curves[result.curves.method == "fixed"].seed.isna().all()
    summary = result.summary().set_index(["method", "order"])
    assert summary.loc[("random", "positive"), "n_seeds"] == 3
    assert ((result.curves.accuracy >= 0) & (result.curves.accuracy <= 1)).all()
    with pytest.raises(ValueError, match="orders"):
        perturbation_benchmark(
            model, images, labels, ["random"], orders=["sideways"], progress=False
        )
    with pytest.raises(ValueError, match="accuracy has shape"):
        PerturbationResult.from_accuracy(
            [("a", None)], ["positive"], [1, 2], torch.zeros(1, 1, 3), 4
        )
    with pytest.raises(ValueError, match="n_keep"):
        perturbation_benchmark(model, images, labels, ["random"], n_keep=[0, 3], progress=False)
    with pytest.raises(ValueError, match="shape"):
        perturbation_benchmark(model, images, labels, {"bad": torch.zeros(4, 3)}, progress=False)
    with pytest.raises(ValueError, match="4 images"):
        perturbation_benchmark(model, images, labels[:2], ["random"], progress=False)


def test_models_without_prefix_tokens_work(make_images):
    model = tiny(class_token=False, global_pool="avg")
    images = make_images(3, 32, seed=2)
    result = perturbation_benchmark(
        model, images, None, ["class_space", "rollout"], n_keep=[1, 8, 15], progress=False
    )
    assert result.auc.auc.notna().all()
    full = result.curves[(result.curves.n == 15)]
    assert (full.accuracy >= 0).all()


def bundled_subset(per_class, name="mnist-vit", with_object_tokens=False):
    """The first ``per_class`` held-out images of each class (and which image tokens are on the
    object)."""
    from vit_embedding_lens.zoo.bundled import load_bundled_eval

    data = load_bundled_eval(name)
    pick = torch.cat([torch.nonzero(data.labels == c).flatten()[:per_class] for c in range(10)])
    model = HookedViT.from_bundled(name)
    subset = (model, data.images[pick], data.labels[pick])
    if with_object_tokens:
        subset += (data.class_token_mask(model.layout)[pick][:, model.layout.n_prefix :],)
    return subset


BUNDLED = ["mnist-vit", "fashion-vit"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_chefer_beats_random_in_both_directions(name):
    model, images, labels = bundled_subset(5, name)
    result = perturbation_benchmark(
        model,
        images,
        labels,
        ["chefer", "random"],
        n_keep=[4, 16, 32, 48],
        seeds=(0,),
        progress=False,
    )
    assert result.auc_of("chefer", "negative") > result.auc_of("random", "negative") + 0.02
    assert result.auc_of("chefer", "positive") < result.auc_of("random", "positive") - 0.2


@pytest.fixture(scope="module", params=BUNDLED)
def bundled_benchmark(request):
    """The paper's method on a trained model: 10 images per class, n up to N-1 (so every curve
    ends near the full-image accuracy and the AUCs' normalization by the maximum is comparable)."""
    model, images, labels = bundled_subset(10, request.param)
    return perturbation_benchmark(
        model,
        images,
        labels,
        ["class_space", "random"],
        n_keep=[4, 12, 24, 36, 48],
        seeds=(0, 1),
        progress=False,
    )


@pytest.mark.slow
def test_bundled_class_space_beats_random_when_removing_its_most_important_tokens(
    bundled_benchmark,
):
    """Positive order: removing the paper's most important tokens first hurts more than random
    removal. Held on every small model measured (benchmarks/attribution_small_models.py, 1,000
    held-out images, every n): MNIST 0.625 vs 0.659, Fashion-MNIST 0.660 vs 0.775."""
    result = bundled_benchmark
    assert result.auc_of("class_space", "positive") < result.auc_of("random", "positive")


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason=(
        "measured: on no small trained ViT does keeping the paper's most important tokens beat "
        "random order. Negative AUC, class_space vs random, 1,000 held-out images, every n "
        "(benchmarks/attribution_small_models.py): MNIST 0.501 vs 0.666; Fashion-MNIST 0.747 vs "
        "0.780; Fashion-MNIST with 196 tokens 0.660 vs 0.865; 8 blocks of width 192 0.735 vs "
        "0.780. The map is signed: object tokens whose values point away from the class get the "
        "most negative scores and are removed first. Chefer relevance (clamped at 0) beats random "
        "on all of them. The method matches the reference code (loss, CLS row, sign, sum, token "
        "removal). Strict: a change that makes this pass must update the finding."
    ),
)
def test_bundled_class_space_beats_random_when_keeping_its_most_important_tokens(bundled_benchmark):
    result = bundled_benchmark
    assert result.auc_of("class_space", "negative") > result.auc_of("random", "negative")


@pytest.mark.parametrize("name", BUNDLED)
def test_the_signed_class_space_map_puts_object_tokens_last(name):
    """Why the negative order fails: the paper's map is signed, and its lowest scores fall on the
    object more often than chance (measured: Fashion 0.58 vs 0.48 of tokens, MNIST 0.37 vs 0.16), so
    "least important first" removes object tokens early. Chefer's clamped relevance ranks background
    last."""
    from vit_embedding_lens.attribution import class_space_attribution

    model, images, labels, on_object = bundled_subset(10, name, with_object_tokens=True)

    def bottom_on_object(scores, k=10):
        return on_object.gather(1, (-scores).topk(k, dim=1).indices).float().mean().item()

    paper = bottom_on_object(class_space_attribution(model, images, labels, progress=False).scores)
    chefer = bottom_on_object(chefer_relevance(model, images, labels, progress=False).scores)
    base_rate = on_object.float().mean().item()
    assert paper > base_rate + 0.05
    assert chefer < base_rate - 0.1
