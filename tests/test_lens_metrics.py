"""Ranks, the streaming lens and its tables (METHODS §2, §3, §5) against slow references written
differently: ranks by a full sort and a position lookup, readings by projecting every cached
activation one token at a time with ``F.layer_norm`` + matmul, token groups from explicit index
lists, per-image percentages by loops over images and tokens. Random float64 models with 0, 1, 2 and
5 prefix tokens (and a post-norm one) so near-ties cannot make the fast and the slow route
disagree."""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as scipy_stats
from torch.utils.data import DataLoader, TensorDataset

from vit_embedding_lens import HookedViT
from vit_embedding_lens.lens.metrics import (
    change_rate_table,
    class_vs_context,
    compare_with_random,
    composition_table,
    identifiability_scores,
    identifiability_table,
    per_image_identifiability,
    summarize,
    token_groups,
)
from vit_embedding_lens.lens.ranks import (
    class_rank,
    count_true,
    identifiability_score,
    rank_and_logit,
)
from vit_embedding_lens.lens.stats import permutation_test_greater
from vit_embedding_lens.lens.streaming import (
    CHANGES,
    COMPOSITION_BITS,
    KINDS,
    LensResult,
    lens_batch,
    lens_dataset,
    lens_from_cache,
)
from vit_embedding_lens.model.layout import TokenLayout
from vit_embedding_lens.testing import create_timm_vit

#: n_prefix -> (timm name, overrides, depth, classes); images 32x32, patch 8 (16 patches)
ARCHS = {
    0: ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg"), 2, 20),
    1: ("vit_tiny_patch16_224", dict(init_values=1e-5), 3, 37),
    2: ("deit_tiny_distilled_patch16_224", dict(), 2, 24),
    5: ("vit_tiny_patch16_224", dict(reg_tokens=4), 2, 50),
    "post-norm": ("vit_base_patch16_rpn_224", dict(embed_dim=64, num_heads=4), 2, 20),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def tiny(arch):
    """A float64 HookedViT with realistic random weights."""
    name, kw, depth, n_classes = ARCHS[arch]
    timm_model = create_timm_vit(
        name, depth=depth, img_size=32, patch_size=8, num_classes=n_classes, **kw
    )
    model = HookedViT.from_timm(timm_model, dtype=torch.float64)
    if isinstance(arch, int):
        assert model.layout.n_prefix == arch
    return model


def batch(model, n: int, seed: int = 0):
    """``(images, labels, token_mask)``: float64 images, labels, a random mask over image tokens
    only."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, model.cfg.n_classes, (n,), generator=gen)
    mask = torch.rand(n, model.layout.n_tokens, generator=gen) < 0.4
    mask[:, list(model.layout.prefix_indices)] = False
    return x, y, mask


# -- slow references -------------------------------------------------------------------------------
def sorted_rank(logits: torch.Tensor, target: int) -> int:
    """Position of ``target`` in the logits sorted from high to low, the target first among equal
    values."""
    order = sorted(range(len(logits)), key=lambda k: (-float(logits[k]), k != target))
    return order.index(target)


def argsort_rank(logits: torch.Tensor, target: int) -> int:
    """Position of ``target`` in a full descending argsort (no ties in float64 random logits)."""
    return int((torch.argsort(logits, descending=True) == target).nonzero())


def vector_projection(model, v: torch.Tensor) -> torch.Tensor:
    """``E · ln_final(v) + b`` of one vector with F.layer_norm and a matmul (mean of both heads if
    two)."""
    ln, head = model.ln_final, model.head
    normed = F.layer_norm(
        v, (v.shape[0],), ln.w if ln.affine else None, ln.b if ln.affine else None, ln.eps
    )
    logits = normed @ head.W_head + head.b_head
    if model.cfg.has_dist_token:
        logits = (logits + normed @ head.W_head_dist + head.b_head_dist) / 2
    return logits


@functools.lru_cache(maxsize=None)
def reference(arch, n: int = 4, seed: int = 0):
    """Per image, block and token, from a run_with_cache cache projected one token at a time: the
    ranks (by argsort) of attn_out, mlp_out and resid_post, the four rise flags and the composition
    bits."""
    model = tiny(arch)
    x, y, _ = batch(model, n, seed)
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    n_blocks, n_tokens = model.cfg.n_layers, model.layout.n_tokens
    rank = {k: torch.zeros(n, n_blocks, n_tokens, dtype=torch.long) for k in KINDS}
    rose = {k: torch.zeros(n, n_blocks, n_tokens, dtype=torch.bool) for k in CHANGES}
    composition = torch.zeros(n, n_blocks, n_tokens, dtype=torch.long)
    composed = torch.zeros(n, n_blocks, n_tokens, dtype=torch.bool)
    hooks = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    with torch.no_grad():
        for block in range(n_blocks):
            acts = {h: cache[f"blocks.{block}.hook_{h}"] for h in hooks}
            # the write-ins are what is added to the residual (post-norm blocks: after their norm)
            torch.testing.assert_close(acts["resid_pre"] + acts["attn_out"], acts["resid_mid"])
            torch.testing.assert_close(acts["resid_mid"] + acts["mlp_out"], acts["resid_post"])
            for i in range(n):
                c = int(y[i])
                for t in range(n_tokens):
                    p = {h: vector_projection(model, acts[h][i, t]) for h in hooks}
                    rank["attn"][i, block, t] = argsort_rank(p["attn_out"], c)
                    rank["mlp"][i, block, t] = argsort_rank(p["mlp_out"], c)
                    rank["resid"][i, block, t] = argsort_rank(p["resid_post"], c)
                    rose["block"][i, block, t] = p["resid_post"][c] > p["resid_pre"][c]
                    rose["attn"][i, block, t] = p["attn_out"][c] > p["resid_pre"][c]
                    rose["mlp"][i, block, t] = p["mlp_out"][c] > p["resid_pre"][c]
                    rose["mlp_vs_resid_mid"][i, block, t] = p["mlp_out"][c] > p["resid_mid"][c]
                    top = {h: int(p[h].argmax()) for h in hooks}
                    composition[i, block, t] = (
                        (top["resid_post"] == top["attn_out"]) * COMPOSITION_BITS["attn"]
                        + (top["resid_post"] == top["mlp_out"]) * COMPOSITION_BITS["mlp"]
                        + (top["resid_post"] == top["resid_pre"]) * COMPOSITION_BITS["resid_pre"]
                    )
                    composed[i, block, t] = top["resid_post"] not in (
                        top["attn_out"],
                        top["mlp_out"],
                        top["resid_pre"],
                    )
    return dict(rank=rank, rose=rose, composition=composition, composed=composed, labels=y)


# -- ranks -----------------------------------------------------------------------------------------
def test_class_rank_matches_a_sort_and_position_lookup():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 29, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 29, (3, 4), generator=gen)
    got = class_rank(logits, target)
    assert got.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            assert int(got[i, j]) == argsort_rank(logits[i, j], int(target[i, j]))
    # a scalar target broadcasts over the leading axes
    assert class_rank(logits, 5).tolist() == [
        [argsort_rank(logits[i, j], 5) for j in range(4)] for i in range(3)
    ]
    # rounded logits tie often: ties count in the class's favour
    coarse = torch.randint(0, 4, (50, 9), generator=gen).double()
    target = torch.randint(0, 9, (50,), generator=gen)
    assert class_rank(coarse, target).tolist() == [
        sorted_rank(coarse[i], int(target[i])) for i in range(50)
    ]
    rank, logit = rank_and_logit(coarse, target)
    assert torch.equal(logit, coarse[torch.arange(50), target])
    assert torch.equal(rank, class_rank(coarse, target))


def test_class_rank_on_hand_made_logits_with_ties():
    logits = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, -1.0])
    # three classes share the top logit: each of them is top-1; the others come after all three
    assert class_rank(logits[None].expand(6, -1), torch.arange(6)).tolist() == [0, 4, 0, 3, 0, 5]
    flat = torch.full((1, 7), 0.5)
    assert class_rank(flat, torch.tensor([6])).tolist() == [0]  # all tied: every class is top-1
    assert identifiability_score(torch.tensor([0, 4, 5]), 6).tolist() == pytest.approx(
        [1.0, 1 - 4 / 6, 1 - 5 / 6]
    )


def test_class_rank_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="class ids"):
        class_rank(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="class ids"):
        class_rank(torch.zeros(2, 5), torch.tensor([-1, 0]))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 16, 37, 1000, 2032, 2040, 2041, 2047, 2048, 4096])
def test_count_true_equals_sum(n):
    gen = torch.Generator().manual_seed(n)
    for shape in [(n,), (3, n), (2, 3, n)]:
        for density in (0.0, 0.5, 0.97, 1.0):
            flags = torch.rand(shape, generator=gen) < density
            got = count_true(flags)
            assert torch.equal(got, flags.sum(-1)), (shape, density)
    # an all-True row is the largest count per byte lane; a non-contiguous view takes the plain
    # route
    full = torch.ones(4, n, dtype=torch.bool)
    assert count_true(full).tolist() == [n] * 4
    wide = torch.rand(n, 6, generator=gen) < 0.5
    assert torch.equal(count_true(wide.T), wide.T.sum(-1))


@pytest.mark.parametrize("offset", [1, 3, 8])
def test_count_true_on_contiguous_views_that_do_not_start_on_an_eight_byte_boundary(offset):
    flat = torch.rand(offset + 3 * 16, generator=torch.Generator().manual_seed(offset)) < 0.5
    view = flat[offset:].view(3, 16)  # contiguous, storage offset not a multiple of 8 (except 8)
    assert view.is_contiguous()
    assert torch.equal(count_true(view), view.sum(-1))
    assert torch.equal(count_true(flat[offset : offset + 8]), flat[offset : offset + 8].sum())


# -- the streaming lens vs the slow reference ------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS, key=str))
def test_streaming_lens_equals_the_per_token_reference(arch):
    model = tiny(arch)
    ref = reference(arch)
    x, y, mask = batch(model, 4)
    result = lens_batch(model, x, y, mask)
    assert result.n_images == 4 and result.n_blocks == model.cfg.n_layers
    assert result.n_classes == model.cfg.n_classes and result.layout == model.layout
    for kind in KINDS:
        assert torch.equal(result.rank[kind].long(), ref["rank"][kind]), kind
    for change in CHANGES:
        assert torch.equal(result.rose[change], ref["rose"][change]), change
    assert torch.equal(result.composition.long(), ref["composition"])
    assert torch.equal(result.composition == 0, ref["composed"])
    assert torch.equal(result.labels, y) and torch.equal(result.token_mask, mask)
    # the reference is not trivially constant: every reading varies over tokens
    assert len(ref["rank"]["resid"].unique()) > 3 and 0 < ref["rose"]["block"].float().mean() < 1


@pytest.mark.parametrize("arch", [0, 5])
def test_lens_from_cache_equals_lens_batch(arch):
    model = tiny(arch)
    x, y, mask = batch(model, 4)
    _, cache = model.run_with_cache(x)
    a, b = lens_batch(model, x, y, mask), lens_from_cache(model, cache, y, mask)
    for kind in KINDS:
        assert torch.equal(a.rank[kind], b.rank[kind])
    for change in CHANGES:
        assert torch.equal(a.rose[change], b.rose[change])
    assert torch.equal(a.composition, b.composition) and torch.equal(a.token_mask, b.token_mask)
    _, partial = model.run_with_cache(x, names_filter=lambda name: "mlp_out" not in name)
    with pytest.raises(KeyError, match="hook_mlp_out"):
        lens_from_cache(model, partial, y)


@pytest.mark.parametrize("arch", [1, 2])
def test_lens_dataset_over_a_dataloader_equals_one_big_batch(arch):
    model = tiny(arch)
    x, y, mask = batch(model, 7, seed=3)
    loader = DataLoader(TensorDataset(x, y, mask), batch_size=3)  # batches of 3, 3 and 1
    streamed = lens_dataset(model, loader, progress=False)
    whole = lens_batch(model, x, y, mask)
    assert streamed.n_images == 7
    for kind in KINDS:
        assert torch.equal(streamed.rank[kind], whole.rank[kind])
    for change in CHANGES:
        assert torch.equal(streamed.rose[change], whole.rose[change])
    assert torch.equal(streamed.composition, whole.composition)
    assert torch.equal(streamed.labels, y) and torch.equal(streamed.token_mask, mask)
    unmasked = lens_dataset(model, DataLoader(TensorDataset(x, y), batch_size=3), progress=False)
    assert unmasked.token_mask is None and torch.equal(unmasked.rank["resid"], whole.rank["resid"])


def test_streaming_errors_name_the_problem():
    model = tiny(1)
    x, y, mask = batch(model, 3)
    with pytest.raises(ValueError, match="2 labels for 3 images"):
        lens_batch(model, x, y[:2])
    with pytest.raises(ValueError, match="token_mask must be"):
        lens_batch(model, x, y, mask[:, 1:])
    with pytest.raises(ValueError, match="token_mask must be"):
        lens_batch(model, x, y, mask[:2])
    prefix_marked = mask.clone()
    prefix_marked[0, model.layout.cls_index] = True
    with pytest.raises(ValueError, match="prefix token"):
        lens_batch(model, x, y, prefix_marked)
    with pytest.raises(ValueError, match="each batch must be"):
        lens_dataset(model, [(x,)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        lens_dataset(model, [], progress=False)


# -- token groups ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", [0, 1, 2, 5])
def test_token_groups_follow_the_layout(arch):
    model = tiny(arch)
    x, y, mask = batch(model, 3)
    layout = model.layout
    groups = token_groups(lens_batch(model, x, y, mask))
    prefix = list(range(layout.n_prefix))
    patches = list(
        range(layout.n_prefix, layout.n_prefix + layout.grid_size[0] * layout.grid_size[1])
    )
    expected_names = {"image", "class", "context"}
    expected_names |= {"cls"} if layout.cls_index is not None else set()
    expected_names |= {"dist"} if layout.dist_index is not None else set()
    expected_names |= {"registers"} if layout.register_indices else set()
    assert set(groups) == expected_names
    for i in range(3):
        assert groups["image"][i].nonzero().flatten().tolist() == patches
        in_class = [t for t in patches if mask[i, t]]
        assert groups["class"][i].nonzero().flatten().tolist() == in_class
        assert groups["context"][i].nonzero().flatten().tolist() == [
            t for t in patches if t not in in_class
        ]
        for name in expected_names - {"image", "class", "context"}:
            members = groups[name][i].nonzero().flatten().tolist()
            assert members and set(members) <= set(prefix)
        if "cls" in groups:
            assert groups["cls"][i].nonzero().flatten().tolist() == [layout.cls_index]
        if "registers" in groups:
            assert groups["registers"][i].nonzero().flatten().tolist() == list(
                layout.register_indices
            )


# -- tables vs loops over a hand-built result ------------------------------------------------------
def synthetic_result(
    n_images: int = 6, n_blocks: int = 3, n_classes: int = 12, seed: int = 0, mask: bool = True
) -> LensResult:
    """A LensResult with CLS, distillation and two registers over a 2x3 grid; ranks with many zeros.
    Image 0 has no class token, image 1 no context token."""
    layout = TokenLayout(
        grid_size=(2, 3), patch_size=(8, 8), cls_index=0, dist_index=1, register_indices=(2, 3)
    )
    gen = torch.Generator().manual_seed(seed)
    shape = (n_images, n_blocks, layout.n_tokens)
    rank = {
        k: torch.randint(0, n_classes, shape, generator=gen)
        * (torch.rand(shape, generator=gen) < 0.6)
        for k in KINDS
    }
    rose = {k: torch.rand(shape, generator=gen) < 0.5 for k in CHANGES}
    composition = torch.randint(0, 8, shape, generator=gen)
    token_mask = None
    if mask:
        token_mask = torch.rand(n_images, layout.n_tokens, generator=gen) < 0.5
        token_mask[:, : layout.n_prefix] = False
        token_mask[0], token_mask[1, layout.n_prefix :] = False, True
    return LensResult(
        rank=rank,
        rose=rose,
        composition=composition,
        labels=torch.arange(n_images) % n_classes,
        n_classes=n_classes,
        layout=layout,
        token_mask=token_mask,
    )


def group_members(result: LensResult, image: int) -> dict:
    """Explicit token index lists per group for one image."""
    layout = result.layout
    patches = list(range(layout.n_prefix, layout.n_tokens))
    members = {
        "cls": [layout.cls_index],
        "dist": [layout.dist_index],
        "registers": list(layout.register_indices),
        "image": patches,
    }
    if result.token_mask is not None:
        members["class"] = [t for t in patches if bool(result.token_mask[image, t])]
        members["context"] = [t for t in patches if not bool(result.token_mask[image, t])]
    return members


def loop_mean_of_per_image(result: LensResult, group: str, values: torch.Tensor) -> float:
    """Mean over images (those with tokens in the group) of the mean of ``values[batch, pos]``
    over the group's tokens of that image."""
    per_image = []
    for i in range(result.n_images):
        tokens = group_members(result, i)[group]
        if tokens:
            per_image.append(sum(float(values[i, t]) for t in tokens) / len(tokens))
    return sum(per_image) / len(per_image) if per_image else math.nan


def indexed(table: pd.DataFrame, *key_columns: str) -> dict:
    """``{(key values): row}`` for a tidy table; fails if two rows share a key."""
    index = {}
    for row in table.to_dict("records"):
        key = tuple(row[column] for column in key_columns)
        assert key not in index, key
        index[key] = row
    return index


def assert_same(actual: float, expected: float) -> None:
    if math.isnan(expected):
        assert math.isnan(actual)
    else:
        assert actual == pytest.approx(expected, abs=1e-9)


def test_identifiability_table_equals_loops():
    result = synthetic_result()
    table = identifiability_table(result)
    assert list(table.columns) == [
        "block",
        "layer_type",
        "token_group",
        "metric",
        "value",
        "n_images",
    ]
    rows = indexed(table, "block", "layer_type", "token_group", "metric")
    groups = ["cls", "dist", "registers", "image", "class", "context"]
    C = result.n_classes
    for kind in KINDS:
        r = result.rank[kind]
        for group in groups:
            for block in range(result.n_blocks):
                score = loop_mean_of_per_image(result, group, 1 - r[:, block].double() / C)
                assert_same(rows[block, kind, group, "score"]["value"], score)
                ident = loop_mean_of_per_image(result, group, r[:, block] == 0)
                assert_same(rows[block, kind, group, "identifiable_pct"]["value"], 100 * ident)
                with_tokens = [i for i in range(result.n_images) if group_members(result, i)[group]]
                assert rows[block, kind, group, "score"]["n_images"] == len(with_tokens)
                if group in ("image", "class", "context"):
                    hit = [
                        any(int(r[i, block, t]) == 0 for t in group_members(result, i)[group])
                        for i in with_tokens
                    ]
                    with_any = 100 * sum(hit) / len(hit)
                    assert_same(
                        rows[block, kind, group, "images_with_identifiable_pct"]["value"], with_any
                    )
                else:
                    assert (block, kind, group, "images_with_identifiable_pct") not in rows
    # the image-0-has-no-class-token and image-1-has-no-context-token cases were exercised
    assert table[(table.token_group == "class")]["n_images"].iloc[0] == result.n_images - 1
    assert table[(table.token_group == "context")]["n_images"].iloc[0] == result.n_images - 1
    # per_image_identifiability is the per-image column the table averages
    per_image = per_image_identifiability(result, "mlp", "class", "identifiable")
    assert math.isnan(per_image[0, 0]) and not torch.isnan(per_image[1:]).any()
    scores = identifiability_scores(result, "attn")
    assert torch.allclose(scores, 1 - result.rank["attn"].double() / result.n_classes)


def test_identifiability_of_an_empty_group_is_nan():
    result = synthetic_result()
    result.token_mask = torch.zeros_like(result.token_mask)
    table = identifiability_table(result)
    rows = table[table.token_group == "class"]
    assert rows["value"].isna().all() and (rows["n_images"] == 0).all()


def test_change_rate_table_equals_loops():
    result = synthetic_result(seed=1)
    table = change_rate_table(result)
    assert list(table.columns) == ["block", "comparison", "token_group", "value"]
    assert set(table["comparison"]) == set(CHANGES)
    rows = indexed(table, "block", "comparison", "token_group")
    for change in CHANGES:
        flags = result.rose[change]
        for group in ["cls", "dist", "registers", "image", "class", "context"]:
            for block in range(result.n_blocks):
                expected = 100 * loop_mean_of_per_image(result, group, flags[:, block])
                assert_same(rows[block, change, group]["value"], expected)


def test_composition_table_equals_loops_and_composed_means_none_of_the_three():
    result = synthetic_result(seed=2)
    table = composition_table(result)
    assert set(table["source"]) == {"attn", "mlp", "resid_pre", "composed"}
    rows = indexed(table, "block", "source", "token_group")
    codes = {  # the bit masks (1 attn, 2 mlp, 4 resid_pre) that contain each source
        "attn": (1, 3, 5, 7),
        "mlp": (2, 3, 6, 7),
        "resid_pre": (4, 5, 6, 7),
        "composed": (0,),
    }
    for source, members in codes.items():
        matches = torch.zeros(result.composition.shape)
        for code in members:
            matches += result.composition == code
        for group in ["cls", "image", "class", "context"]:
            for block in range(result.n_blocks):
                expected = 100 * loop_mean_of_per_image(result, group, matches[:, block])
                assert_same(rows[block, source, group]["value"], expected)


def test_tables_from_a_real_model_equal_percentages_of_the_cached_readings():
    """End to end: the change-rate and composition tables of the streaming lens equal per-image
    percentages computed straight from the cache-projected reference (1 prefix token, 3 blocks)."""
    model, ref = tiny(1), reference(1)
    x, y, mask = batch(model, 4)
    result = lens_batch(model, x, y, mask)
    changes = indexed(change_rate_table(result), "block", "comparison", "token_group")
    composition = indexed(composition_table(result), "block", "source", "token_group")
    ident = indexed(identifiability_table(result), "block", "layer_type", "token_group", "metric")
    for block in range(model.cfg.n_layers):
        for group in ("cls", "image", "class", "context"):
            for change in CHANGES:
                expected = 100 * loop_mean_of_per_image(
                    result, group, ref["rose"][change][:, block]
                )
                assert_same(changes[block, change, group]["value"], expected)
            expected = 100 * loop_mean_of_per_image(result, group, ref["composed"][:, block])
            assert_same(composition[block, "composed", group]["value"], expected)
            scores = 1 - ref["rank"]["resid"][:, block].double() / model.cfg.n_classes
            expected = loop_mean_of_per_image(result, group, scores)
            assert_same(ident[block, "resid", group, "score"]["value"], expected)


# -- class vs context and trained vs random --------------------------------------------------------
def separated_result(class_better: bool, n_images: int = 8) -> LensResult:
    """Class tokens ranked 0-1 and context tokens 4-11 (or the other way round)."""
    result = synthetic_result(n_images=n_images, seed=4)
    gen = torch.Generator().manual_seed(5)
    shape = result.rank["resid"].shape
    good, bad = (
        torch.randint(0, 2, shape, generator=gen),
        torch.randint(4, 12, shape, generator=gen),
    )
    on_object = result.token_mask[:, None, :].expand(shape)
    result.rank["resid"] = torch.where(on_object == class_better, good, bad)
    return result


def test_class_vs_context_equals_pooled_token_means():
    result = synthetic_result(seed=3)
    table = class_vs_context(result, n_permutations=500, seed=1)
    C = result.n_classes
    assert len(table) == result.n_blocks
    for block in range(result.n_blocks):
        class_scores, context_scores = [], []
        for i in range(result.n_images):
            members = group_members(result, i)
            class_scores += [
                1 - int(result.rank["resid"][i, block, t]) / C for t in members["class"]
            ]
            context_scores += [
                1 - int(result.rank["resid"][i, block, t]) / C for t in members["context"]
            ]
        row = table[table.block == block].iloc[0]
        assert row["class_score"] == pytest.approx(np.mean(class_scores))
        assert row["context_score"] == pytest.approx(np.mean(context_scores))
        assert row["difference"] == pytest.approx(np.mean(class_scores) - np.mean(context_scores))
        assert (row["n_class_tokens"], row["n_context_tokens"]) == (
            len(class_scores),
            len(context_scores),
        )
        test = permutation_test_greater(
            np.array(class_scores), np.array(context_scores), n_permutations=500, seed=1
        )
        assert row["p_value"] == pytest.approx(test.p_value)


def test_class_vs_context_is_significant_only_when_class_tokens_are_better():
    better = class_vs_context(separated_result(class_better=True), n_permutations=2000)
    assert (better["difference"] > 0.3).all()
    assert (
        np.allclose(better["p_value"], 1 / 2001) and (better["stars"] == "***").all()
    )  # no split beats it
    worse = class_vs_context(separated_result(class_better=False), n_permutations=2000)
    assert (
        (worse["difference"] < -0.3).all()
        and (worse["p_value"] > 0.99).all()
        and (worse["stars"] == "").all()
    )
    with pytest.raises(ValueError, match="token_mask"):
        class_vs_context(synthetic_result(mask=False))


def test_compare_with_random_direction_and_stars():
    trained = separated_result(class_better=True, n_images=30)
    random = synthetic_result(n_images=30, seed=6)
    trained.rank["resid"][:, :, 0] = torch.randint(
        0, 2, trained.rank["resid"][:, :, 0].shape
    )  # CLS near top-1
    random.rank["resid"][:, :, 0] = torch.randint(3, 12, random.rank["resid"][:, :, 0].shape)
    table = compare_with_random(trained, random, groups=("cls", "image", "registers"))
    expected_columns = {
        "block",
        "layer_type",
        "token_group",
        "trained",
        "random",
        "statistic",
        "p_value",
        "stars",
    }
    assert set(table.columns) >= expected_columns
    cls_rows = table[table.token_group == "cls"]
    assert (cls_rows["trained"] > cls_rows["random"]).all() and (cls_rows["stars"] == "***").all()
    for _, row in table.iterrows():
        a = per_image_identifiability(trained, "resid", row["token_group"]).numpy()[:, row["block"]]
        b = per_image_identifiability(random, "resid", row["token_group"]).numpy()[:, row["block"]]
        assert row["trained"] == pytest.approx(a.mean()) and row["random"] == pytest.approx(
            b.mean()
        )
        expected = scipy_stats.wilcoxon(a, b, alternative="greater")
        assert row["p_value"] == pytest.approx(expected.pvalue)
    swapped = compare_with_random(random, trained)
    assert (swapped[swapped.token_group == "cls"]["p_value"] > 0.99).all()
    assert (swapped[swapped.token_group == "cls"]["stars"] == "").all()
    other = synthetic_result(n_images=30, seed=6)
    other.labels = other.labels.flip(0)
    with pytest.raises(ValueError, match="same images"):
        compare_with_random(trained, other)


def test_summarize_returns_every_table():
    result, random = synthetic_result(), synthetic_result(seed=9)
    tables = summarize(result, random)
    assert set(tables) == {
        "identifiability",
        "change_rates",
        "composition",
        "class_vs_context",
        "trained_vs_random",
    }
    assert all(isinstance(t, pd.DataFrame) and len(t) for t in tables.values())
    assert set(summarize(synthetic_result(mask=False))) == {
        "identifiability",
        "change_rates",
        "composition",
    }
