"""Ridge probes against scikit-learn, probe accuracy tables, probe-based token importance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from vit_embedding_lens import HookedViT
from vit_embedding_lens.attribution import (
    ProbeAttribution,
    collect_token_activations,
    fit_linear_probes,
    fit_ridge,
    one_vs_all_targets,
    probe_accuracy_table,
    probe_comparison,
    sample_per_class,
)
from vit_embedding_lens.lens import ClassProjection
from vit_embedding_lens.testing import create_timm_vit

TINY = dict(depth=2, img_size=32, patch_size=8, num_classes=5, embed_dim=32, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n, d", [(40, 12), (15, 30)])  # primal and dual solutions
def test_ridge_matches_sklearn(n, d):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, d, generator=gen) * 2 + 1
    labels = torch.randint(0, 4, (3, n), generator=gen)
    y = torch.stack([one_vs_all_targets(l, 4) for l in labels])
    fit = fit_ridge(x, y, alpha=1.0)
    for i in range(3):
        ref = Ridge(alpha=1.0).fit(x[i].double().numpy(), y[i].double().numpy())
        np.testing.assert_allclose(fit.weight[i].numpy(), ref.coef_.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(fit.bias[i].numpy(), ref.intercept_, rtol=1e-4, atol=1e-5)
    assert fit.weight.dtype == x.dtype


def test_targets_and_bad_inputs():
    assert one_vs_all_targets(torch.tensor([2, 0]), 3).tolist() == [[-1, -1, 1], [1, -1, -1]]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        one_vs_all_targets(torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="alpha"):
        fit_ridge(torch.zeros(4, 2), torch.zeros(4, 1), alpha=-1)


def test_sample_per_class_is_seeded_and_disjoint():
    labels = torch.arange(5).repeat_interleave(6)
    train, test = sample_per_class(labels, 2, seed=3)
    again, _ = sample_per_class(labels, 2, seed=3)
    assert torch.equal(train, again)
    assert torch.bincount(labels[train]).tolist() == [2] * 5
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == 30
    with pytest.raises(ValueError, match="none held out"):
        sample_per_class(labels, 6)


@pytest.fixture(scope="module")
def tiny_setup():
    model = HookedViT.from_timm(create_timm_vit("vit_tiny_patch16_224", reg_tokens=1, **TINY))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(30, 3, 32, 32, generator=gen)
    labels = torch.arange(5).repeat(6)
    return model, images, labels


def test_probes_match_sklearn_per_block_layer_and_position(tiny_setup):
    model, images, labels = tiny_setup
    probes = fit_linear_probes(model, images, labels, progress=False)
    assert probes.weight.shape == (3, 2, model.layout.n_tokens, 32, 5)
    _, cache = model.run_with_cache(images)
    targets = one_vs_all_targets(labels, 5).numpy()
    for layer, block, token in [("resid_post", 1, 0), ("attn_out", 0, 1), ("mlp_out", 1, 7)]:
        x = cache[f"blocks.{block}.hook_{layer}"][:, token].double().numpy()
        ref = Ridge(alpha=1.0).fit(x, targets)
        k, l = probes.index(layer, block)
        np.testing.assert_allclose(
            probes.weight[k, l, token].numpy(), ref.coef_.T, rtol=1e-3, atol=1e-5
        )
        np.testing.assert_allclose(
            probes.bias[k, l, token].numpy(), ref.intercept_, rtol=1e-3, atol=1e-5
        )


def test_accuracy_table_against_direct_computation(tiny_setup):
    model, images, labels = tiny_setup
    train, test = sample_per_class(labels, 3, seed=0)
    probes = fit_linear_probes(
        model, images[train], labels[train], layers=["resid_post"], blocks=[1], progress=False
    )
    table = probe_accuracy_table(model, probes, images[test], labels[test], progress=False)
    assert len(table) == 2 * model.layout.n_tokens
    assert set(table.kind) == {"cls", "register", "image"}
    _, cache = model.run_with_cache(images[test])
    acts = cache["blocks.1.hook_resid_post"]
    for token in (0, 1, 5):
        x_train = (
            model.run_with_cache(images[train])[1]["blocks.1.hook_resid_post"][:, token]
            .double()
            .numpy()
        )
        ref = Ridge(alpha=1.0).fit(x_train, one_vs_all_targets(labels[train], 5).numpy())
        probe_acc = (
            ref.predict(acts[:, token].double().numpy()).argmax(-1) == labels[test].numpy()
        ).mean()
        proj_acc = (
            (ClassProjection(model)(acts[:, token]).argmax(-1) == labels[test])
            .float()
            .mean()
            .item()
        )
        rows = table[table.token == token].set_index("readout")
        assert rows.loc["probe", "accuracy"] == pytest.approx(probe_acc)
        assert rows.loc["projection", "accuracy"] == pytest.approx(proj_acc)


def test_probe_attribution_reads_each_token_with_its_own_probe(tiny_setup):
    model, images, labels = tiny_setup
    probes = fit_linear_probes(model, images, labels, blocks=[0, 1], progress=False)
    result = ProbeAttribution(probes, block=0, layer="mlp_out")(
        model, images[:4], labels[:4], progress=False
    )
    assert result.method == "probe" and result.scores.shape == (4, model.layout.n_patches)
    acts = collect_token_activations(model, images[:4], ["mlp_out"], [0], progress=False)[:, 0, 0]
    k, l = probes.index("mlp_out", 0)
    for b in range(4):
        for p, token in enumerate(model.layout.patch_indices):
            expected = (
                acts[b, token] @ probes.weight[k, l, token, :, labels[b]]
                + probes.bias[k, l, token, labels[b]]
            )
            assert result.scores[b, p].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="trained blocks"):
        ProbeAttribution(probes, block=5)
    with pytest.raises(ValueError, match="trained layers"):
        ProbeAttribution(probes, layer="resid_mid")


def test_bundled_probe_comparison():
    """Measured directions on the trained model: the last block's CLS projection is the model's
    own prediction, so its accuracy is the model's; probes on 5 digits per class read the CLS token
    far above chance; image tokens at the last block are read better by probes than by the
    projection (the projection is not trained for them)."""
    from vit_embedding_lens.zoo.bundled import load_mnist_eval

    model = HookedViT.from_bundled()
    data = load_mnist_eval()
    pick = torch.cat([torch.nonzero(data.labels == c).flatten()[:25] for c in range(10)])
    images, labels = data.images[pick], data.labels[pick]
    comparison = probe_comparison(
        model, images, labels, k_per_class=5, batch_size=250, progress=False
    )
    assert len(comparison.train_indices) == 50 and len(comparison.test_indices) == 200
    table = comparison.table
    last = table[(table.layer == "resid_post") & (table.block == 5)]
    cls = last[last.kind == "cls"].set_index("readout").accuracy
    test = comparison.test_indices
    with torch.no_grad():
        model_acc = (model(images[test]).argmax(-1) == labels[test]).float().mean().item()
    assert cls["projection"] == pytest.approx(model_acc)
    assert cls["probe"] > 0.8
    image = last[last.kind == "image"].groupby("readout").accuracy.mean()
    assert image["probe"] > image["projection"]
    summary = comparison.summary()
    assert set(summary.columns) == {"layer", "block", "kind", "readout", "accuracy"}
    resid = summary[summary.layer == "resid_post"]
    cls_projection = resid[(resid.kind == "cls") & (resid.readout == "projection")]
    early, late = cls_projection.set_index("block").accuracy.loc[[0, 5]]
    assert late > early
