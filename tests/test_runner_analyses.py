"""The runner analyses knockout, context_removal, memories and attribution on the bundled MNIST ViT:
stored arrays, tables and figures, agreement with direct calls of the library functions they wrap,
and the directions of their effects on the trained model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from vit_embedding_lens import HookedViT
from vit_embedding_lens.attribution import (
    perturbation_auc,
    perturbation_benchmark,
    random_attribution,
)
from vit_embedding_lens.data import InMemoryDataset, bundled_eval_dataset
from vit_embedding_lens.interventions import knockout
from vit_embedding_lens.lens import (
    lens_batch,
    memory_usage_batch,
    memory_usage_per_image,
    per_image_identifiability,
)
from vit_embedding_lens.runner import Batch, build_analyses, run_analyses, summarize_run
from vit_embedding_lens.runner.analyses import BUILTIN_ANALYSES, DEFAULT_ANALYSES
from vit_embedding_lens.runner.analyses.attribution import n_keep_grid
from vit_embedding_lens.runner.analyses.context_removal import ContextRemoval
from vit_embedding_lens.runner.analyses.knockout import KnockoutAnalysis

NAMES = ["knockout", "context_removal", "memories", "attribution", "lens"]
BATCH = 16
PER_CLASS = 4


@pytest.fixture(scope="module")
def model():
    return HookedViT.from_bundled()


@pytest.fixture(scope="module")
def dataset(model):
    """4 digits of every class (the eval set is sorted by class), with their stroke masks."""
    full = bundled_eval_dataset(model)
    labels = full.label_tensor
    pick = torch.cat(
        [torch.nonzero(labels == c)[:PER_CLASS, 0] for c in range(model.cfg.n_classes)]
    )
    return InMemoryDataset(
        full.images[pick],
        labels[pick],
        [full.image_ids[i] for i in pick],
        full.token_masks[pick],
        source={"layout": "test", "pick": pick.tolist()},
    )


@pytest.fixture(scope="module")
def run(model, dataset, tmp_path_factory):
    analyses = build_analyses(NAMES)
    results = run_analyses(
        model, dataset, analyses, tmp_path_factory.mktemp("run"), batch_size=BATCH, progress=False
    )
    tables, figures = summarize_run(results, analyses, model)
    return results, tables, figures, {a.name: a for a in analyses}


def batch_slices(n: int):
    return [slice(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


def test_registered_and_in_the_defaults():
    for name in NAMES:
        assert name in BUILTIN_ANALYSES and name in DEFAULT_ANALYSES


def test_tables_figures_and_headlines(run):
    _, tables, figures, analyses = run
    for name in NAMES:
        assert tables[name], name
        assert all(isinstance(t, pd.DataFrame) and len(t) for t in tables[name].values()), name
        assert figures[name] and all(isinstance(f, Figure) for f in figures[name].values()), name
        head = analyses[name].headline(tables[name])
        assert isinstance(head, pd.DataFrame) and len(head)


# -- knockout -------------------------------------------------------------------------------------
def test_knockout_equals_lens_batch_under_knockout(run, model, dataset):
    results, tables, _, _ = run
    r = results["knockout"]
    n, L = len(dataset), model.cfg.n_layers
    assert r["pct_identifiable"].shape == (n, 3, L) and r["correct"].shape == (n, 3)
    for c, condition in enumerate(["none", "self_only", "no_cls"]):
        for sl in batch_slices(n):
            images, labels = dataset.images[sl], dataset.label_tensor[sl]
            if condition == "none":
                result, logits = lens_batch(model, images, labels), model(images)
            else:
                with knockout(model, condition, mode="pre_softmax"):
                    result, logits = lens_batch(model, images, labels), model(images)
            expected = (
                100
                * per_image_identifiability(result, "resid", "image", metric="identifiable").numpy()
            )
            np.testing.assert_allclose(r["pct_identifiable"][sl, c], expected, atol=1e-4)
            np.testing.assert_array_equal(
                r["correct"][sl, c], (logits.argmax(-1) == labels).float().numpy()
            )
    # the table is the mean over images
    ident = tables["knockout"]["identifiability"].set_index(["condition", "block"])[
        "pct_identifiable"
    ]
    assert ident[("self_only", L - 1)] == pytest.approx(
        r["pct_identifiable"][:, 1, L - 1].mean(), abs=1e-4
    )


def test_knockout_directions(run, model):
    _, tables, _, _ = run
    acc = tables["knockout"]["accuracy"].set_index("condition")["accuracy"]
    ident = tables["knockout"]["identifiability"].set_index(["condition", "block"])[
        "pct_identifiable"
    ]
    last = model.cfg.n_layers - 1
    # image tokens that only see themselves can neither gather the class nor pass it to CLS
    assert acc["self_only"] < acc["none"] - 0.4
    assert ident[("self_only", last)] < 0.5 * ident[("none", last)]
    # CLS is a reader, not a source, for the image tokens: removing it costs little
    assert acc["no_cls"] >= acc["none"] - 0.1


def test_knockout_without_cls_records_nan():
    from vit_embedding_lens.testing import create_timm_vit

    model = HookedViT.from_timm(
        create_timm_vit(
            "vit_tiny_patch16_224",
            depth=2,
            img_size=32,
            patch_size=8,
            class_token=False,
            global_pool="avg",
            num_classes=5,
        )
    )
    assert model.layout.cls_index is None
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 4])
    batch = Batch(images, labels, ["a", "b", "c"], torch.arange(3))
    out = KnockoutAnalysis().run(model, batch)
    assert np.isnan(out["pct_identifiable"][:, 2]).all() and np.isnan(out["correct"][:, 2]).all()
    assert not np.isnan(out["pct_identifiable"][:, :2]).any()
    table = KnockoutAnalysis().summarize({**out, "label": labels.numpy()}, model)["accuracy"]
    assert np.isnan(table.set_index("condition").loc["no_cls", "accuracy"])


# -- context removal ------------------------------------------------------------------------------
def hand_keep(masks: torch.Tensor, n_prefix: int, on_object: bool) -> torch.Tensor:
    """Keep masks built token by token: every prefix token, and the image tokens on/off the
    object."""
    keep = torch.zeros_like(masks)
    for b in range(masks.shape[0]):
        for t in range(masks.shape[1]):
            keep[b, t] = t < n_prefix or bool(masks[b, t]) == on_object
    return keep


def test_context_removal_equals_keep_mask_forwards(run, model, dataset):
    results, tables, _, _ = run
    r = results["context_removal"]
    n, P = len(dataset), model.layout.n_prefix
    assert r["correct"].shape == (n, 3) and r["n_kept"].shape == (n, 3)
    images, labels, masks = dataset.images, dataset.label_tensor, dataset.token_masks
    full = (model(images).argmax(-1) == labels).float().numpy()
    np.testing.assert_array_equal(r["correct"][:, 0], full)
    for c, on_object in ((1, True), (2, False)):
        keep = hand_keep(masks, P, on_object)
        pred = model(images, keep_mask=keep).argmax(-1)
        np.testing.assert_array_equal(r["correct"][:, c], (pred == labels).float().numpy())
        np.testing.assert_array_equal(r["n_kept"][:, c], keep.sum(-1).numpy())
    # identifiability of the kept image tokens at the last block, as the reference code ranks them:
    # project the kept sequence's last residual, rank the label (CLS excluded here)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    for c, on_object in ((1, True), (2, False)):
        for i in range(0, n, 7):
            keep = hand_keep(masks[i : i + 1], P, on_object)
            _, cache = model.run_with_cache(images[i : i + 1], keep_mask=keep, names_filter=last)
            tokens = model.head(model.ln_final(cache[last]))[0, P:]  # [kept image tokens, C]
            order = torch.argsort(tokens, dim=-1, descending=True)
            top1 = (order[:, 0] == labels[i]).float()
            expected = 100 * top1.mean().item() if len(top1) else float("nan")
            np.testing.assert_allclose(r["pct_identifiable"][i, c], expected, rtol=1e-5)
    acc = tables["context_removal"]["accuracy"].set_index("condition")
    # the model needs strokes and background together; either alone still beats chance (10 classes)
    for condition in ("class_tokens_only", "context_tokens_only"):
        assert 0.15 < acc.loc[condition, "accuracy"] < acc.loc["all_tokens", "accuracy"] - 0.3
    assert (
        acc.loc["class_tokens_only", "mean_tokens_kept"]
        < acc.loc["context_tokens_only", "mean_tokens_kept"]
    )


def test_context_removal_without_tokens_or_masks(model, dataset):
    """An image with no object token runs with CLS alone (as the reference code), not skipped."""
    masks = dataset.token_masks[:3].clone()
    masks[0] = False  # no class token: the class-tokens-only condition sees CLS alone
    batch = Batch(
        dataset.images[:3],
        dataset.label_tensor[:3],
        ["a", "b", "c"],
        torch.arange(3),
        token_masks=masks,
    )
    out = ContextRemoval().run(model, batch)
    assert not np.isnan(out["correct"]).any()
    P = model.layout.n_prefix
    assert out["n_kept"][0, 1] == P
    cls_only = torch.zeros(1, model.layout.n_tokens, dtype=torch.bool)
    cls_only[:, :P] = True
    pred = model(dataset.images[:1], keep_mask=cls_only).argmax(-1)
    assert out["correct"][0, 1] == float(pred.item() == int(dataset.label_tensor[0]))
    # no image token kept: the image-token share is undefined, the all-token share is CLS's
    assert np.isnan(out["pct_identifiable"][0, 1])
    all_tokens = ContextRemoval(tokens="all").run(model, batch)
    assert all_tokens["pct_identifiable"][0, 1] in (0.0, 100.0)
    tables = ContextRemoval().summarize({**out, "label": np.zeros(3)}, model)
    row = tables["accuracy"].set_index("condition").loc["class_tokens_only"]
    assert row["n_images"] == 3 and row["n_images_prefix_only"] == 1
    assert row["n_images_skipped"] == 0

    unmasked = ContextRemoval().run(
        model, Batch(dataset.images[:3], dataset.label_tensor[:3], ["a"] * 3, torch.arange(3))
    )
    assert set(unmasked) == {"has_mask"} and not unmasked["has_mask"].any()
    tables = ContextRemoval().summarize({**unmasked, "label": np.zeros(3)}, model)
    assert list(tables) == ["note"] and "no segmentation masks" in tables["note"]["note"].iloc[0]
    assert ContextRemoval().figures(tables, model) == {}


# -- memories -------------------------------------------------------------------------------------
def test_memories_fold_to_memory_usage(run, model, dataset):
    results, tables, _, analyses = run
    r = results["memories"]
    n, L = len(dataset), model.cfg.n_layers
    assert r["agree"].shape == (n, 2, L, 3) and r["random_agree"].shape == (n, 3, 2, L, 3)
    usage = analyses["memories"].usage(r, model)
    # draw-independent counts: the whole set in one call of the library function
    direct = memory_usage_batch(model, dataset.images, dataset.label_tensor, kinds=("mlp", "attn"))
    for field in ("tokens", "agree", "match"):
        assert torch.equal(getattr(usage, field), getattr(direct, field)), field
    # the random-class draws: image by image, each from a generator seeded by its data set index
    analysis = analyses["memories"]
    for i in range(n):
        gen = torch.Generator().manual_seed(analysis.image_seed(i))
        counts = memory_usage_per_image(
            model,
            dataset.images[i : i + 1],
            dataset.label_tensor[i : i + 1],
            kinds=("mlp", "attn"),
            generator=gen,
        )
        np.testing.assert_array_equal(r["random_agree"][i : i + 1], counts.random_agree.numpy())
        np.testing.assert_array_equal(r["drawn"][i : i + 1], counts.drawn.numpy())
    frame = tables["memories"]["usage"]
    pd.testing.assert_frame_equal(frame, usage.to_frame())


def test_memories_directions(run, model):
    _, tables, _, _ = run
    usage = tables["memories"]["usage"]
    last = model.cfg.n_layers - 1
    t = usage[(usage.block == last) & (usage.sublayer == "attn") & (usage.token_group == "image")]
    value = t.set_index("metric")["value"]
    # the last attention layer's most used memories are those of the image's class
    assert value["kv_agreement"] > value["kv_agreement_random"] + 0.1
    tests = tables["memories"]["class_value_tests"]
    assert (tests["trained"] > tests["random"]).all()


def test_memories_and_lens_compare_groups(run, model, dataset):
    """Key-value agreement of correct vs incorrect images (from the stored per-image counts), and
    the lens's class- vs context-token change rates, in the runner's tables."""
    from vit_embedding_lens.lens.memory_usage import TOKEN_GROUPS

    results, tables, _, _ = run
    r = results["memories"]
    with torch.no_grad():
        correct = (model(dataset.images).argmax(-1) == dataset.label_tensor).numpy()
    np.testing.assert_array_equal(r["correct"], correct)
    assert 0 < correct.sum() < len(correct)
    table = tables["memories"]["kv_agreement_by_correctness"]
    L, g = model.cfg.n_layers, TOKEN_GROUPS.index("cls")
    for k, kind in enumerate(("mlp", "attn")):
        row = table[
            (table.sublayer == kind) & (table.token_group == "cls") & (table.block == L - 1)
        ]
        rate = 100 * r["agree"][:, k, L - 1, g] / r["tokens"][:, g]
        assert row.agreement_correct.iloc[0] == pytest.approx(rate[correct].mean())
        assert row.agreement_incorrect.iloc[0] == pytest.approx(rate[~correct].mean())
        assert 0 < row.p_value.iloc[0] <= 1
    changes = tables["lens"]["class_vs_context_changes"]
    assert set(changes.comparison) == {"attn", "mlp"} and len(changes) == 2 * L
    assert changes[["class_rate", "context_rate"]].notna().all().all()


# -- attribution ----------------------------------------------------------------------------------
def test_attribution_equals_perturbation_benchmark(run, model, dataset):
    results, tables, _, analyses = run
    r = results["attribution"]
    grid = list(range(1, model.layout.n_patches))  # the default: the full curve, every n
    assert analyses["attribution"].n_values(model.layout.n_patches) == grid
    n = len(dataset)
    assert r["correct"].shape == (n, 5, 2, len(grid))
    analysis = analyses["attribution"]
    hits = {}
    for sl in batch_slices(n):
        images, labels = dataset.images[sl], dataset.label_tensor[sl]
        random0 = torch.cat(
            [
                random_attribution(
                    model, images[i : i + 1], seed=analysis.image_seed(0, sl.start + i)
                ).scores
                for i in range(images.shape[0])
            ]
        )
        bench = perturbation_benchmark(
            model,
            images,
            labels,
            {"class_space": "class_space", "chefer": "chefer", "random": random0},
            n_keep=grid,
            progress=False,
        )
        for row in bench.curves.itertuples():
            hits[(row.method, row.order, row.n)] = hits.get(
                (row.method, row.order, row.n), 0
            ) + row.accuracy * len(labels)
    curves = tables["attribution"]["curves"]
    curves = curves[curves.seed.isna() | (curves.seed == 0)]
    assert len(curves) == len(hits)
    for row in curves.itertuples():
        assert row.accuracy == pytest.approx(hits[(row.method, row.order, row.n)] / n, abs=1e-9)
    auc = tables["attribution"]["auc"]
    for (method, order), rows in tables["attribution"]["curves"].groupby(["method", "order"]):
        for seed, part in rows.groupby(rows.seed.fillna(-1)):
            acc = part.sort_values("n").accuracy.to_numpy()
            assert len(acc) == model.layout.n_patches - 1
            # the paper's AUC: the full curve's sum over its maximum and N
            expected = acc.sum() / (acc.max() * model.layout.n_patches)
            assert perturbation_auc(acc, model.layout.n_patches) == pytest.approx(expected)
            got = auc[
                (auc.method == method) & (auc.order == order) & (auc.seed.fillna(-1) == seed)
            ].auc
            assert got.iloc[0] == pytest.approx(expected)
    assert set(auc.auc_estimator) == {"full curve"}


def test_attribution_grid_auc_is_interpolated_not_a_plain_mean(run, model):
    """On the power-of-two grid the AUC integrates the curve between the grid points: close to the
    full-curve AUC, where the old plain mean of the grid points was biased low."""
    _, tables, _, _ = run
    N = model.layout.n_patches
    grid = n_keep_grid(N)
    curves = tables["attribution"]["curves"]
    curves = curves[curves.seed.isna() | (curves.seed == 0)]
    worst_mean, worst_interp = 0.0, 0.0
    for _, part in curves.groupby(["method", "order"]):
        full = part.sort_values("n").accuracy.to_numpy()
        exact = full.sum() / (full.max() * N)
        sampled = full[np.array(grid) - 1]
        interpolated = perturbation_auc(sampled, N, grid)
        plain_mean = sampled.mean() * (N - 1) / (sampled.max() * N)
        worst_interp = max(worst_interp, abs(interpolated - exact))
        worst_mean = max(worst_mean, abs(plain_mean - exact))
    assert worst_interp < 0.05 and worst_mean > 2 * worst_interp, (worst_interp, worst_mean)


def test_attribution_directions(run):
    _, tables, _, _ = run
    s = tables["attribution"]["summary"].set_index(["method", "order"])["auc"]
    # Chefer: keeping the most relevant tokens beats random; removing them first hurts more than
    # random
    assert s[("chefer", "negative")] > s[("random", "negative")] + 0.1
    assert s[("chefer", "positive")] < s[("random", "positive")] - 0.1
    # the class-space maps find tokens whose removal hurts (on this model they do not beat random in
    # the negative order: 0.47 vs 0.49 on these digits)
    assert s[("class_space", "positive")] < s[("random", "positive")] - 0.03
