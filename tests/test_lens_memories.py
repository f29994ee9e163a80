"""Key-value memories (METHODS §4): values and P against timm's own weights, class-value agreement
against a cosine loop, key-value agreement and compositionality against per-token Python loops
(0, 1, 2 and 3 prefix tokens), write-in decompositions (pre- and post-norm), and the directions of
the effects on the bundled trained model."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from vit_embedding_lens import HookedViT
from vit_embedding_lens.lens.memories import (
    class_value_agreement,
    compare_class_value_agreement,
    memory_coefficients,
    memory_values,
    n_memories,
    top_memories,
    value_projection,
    value_topk,
)
from vit_embedding_lens.lens.memory_usage import (
    TOKEN_GROUPS,
    MemoryUsage,
    memory_usage,
    memory_usage_batch,
    random_classes,
)
from vit_embedding_lens.testing import assert_close_scaled, create_timm_vit

KINDS = ("attn", "mlp")
# (timm name, overrides) by number of prefix tokens; LayerScale on (randomized gammas far from 1)
ARCHS = {
    0: ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
    1: ("vit_tiny_patch16_224", dict(init_values=1e-5)),
    2: ("deit_tiny_distilled_patch16_224", dict()),
    3: ("vit_tiny_patch16_224", dict(reg_tokens=2)),
}


@functools.lru_cache(maxsize=None)
def tiny(n_prefix: int):
    """``(timm module, HookedViT)``: depth 2, 32x32 images, patch 8, 10 classes."""
    name, kw = ARCHS[n_prefix]
    timm_model = create_timm_vit(name, depth=2, img_size=32, patch_size=8, num_classes=10, **kw)
    model = HookedViT.from_timm(timm_model)
    assert model.layout.n_prefix == n_prefix
    return timm_model, model


@functools.lru_cache(maxsize=None)
def bundled():
    from vit_embedding_lens.zoo.bundled import load_mnist_eval

    model = HookedViT.from_bundled()
    data = load_mnist_eval()
    # a class-balanced subset (the eval set is sorted by label): 20 digits per class
    idx = torch.cat([torch.nonzero(data.labels == c).squeeze(1)[:20] for c in range(10)])
    return model, data.images[idx], data.labels[idx]


# -- references written from timm's weights, with loops --------------------------------------------
def timm_values(timm_model, block: int, kind: str) -> list:
    """Value vectors from timm's modules, one per memory: a column of fc2 / proj, times
    LayerScale."""
    blk = timm_model.blocks[block]
    if kind == "mlp":
        linear, ls = blk.mlp.fc2, getattr(blk, "ls2", None)
    else:
        linear, ls = blk.attn.proj, getattr(blk, "ls1", None)
    gamma = ls.gamma if hasattr(ls, "gamma") else torch.ones(linear.weight.shape[0])
    return [linear.weight[:, i] * gamma for i in range(linear.weight.shape[1])]


def timm_class_embeddings(timm_model) -> list:
    weight = timm_model.head.weight
    if getattr(timm_model, "head_dist", None) is not None:
        weight = (weight + timm_model.head_dist.weight) / 2
    return [weight[c] for c in range(weight.shape[0])]


def group_of(label: str) -> str:
    return "cls" if label == "CLS" else "image" if label.startswith("P") else "prefix"


def top_indices(values: list, k: int) -> list:
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


def slow_usage(model, images, labels_per_draw: list, k: int = 5, top: int = 5):
    """Per-token loops. Returns ``{(draw, kind, block, group, class): [agree, match, tokens]}``;
    ``labels_per_draw[0]`` are the labels; the write-in's class read with a hand-built LayerNorm."""
    _, cache = model.run_with_cache(images)
    groups = [group_of(t) for t in model.layout.token_labels()]
    ln = model.ln_final
    heads = [(model.head.W_head, model.head.b_head)]
    if model.cfg.has_dist_token:
        heads.append((model.head.W_head_dist, model.head.b_head_dist))
    counts = {}
    for kind in KINDS:
        for block in range(model.cfg.n_layers):
            P = value_projection(model, block, kind)
            class_top = [set(top_indices(P[c].tolist(), top)) for c in range(P.shape[0])]
            memory_class = [
                max(range(P.shape[0]), key=lambda c: P[c, i].item()) for i in range(P.shape[1])
            ]
            if kind == "mlp":
                coefs = cache[f"blocks.{block}.mlp.hook_pre"]
            else:
                z = cache[f"blocks.{block}.attn.hook_z"]
                coefs = z.reshape(*z.shape[:2], -1)  # head-major, as timm concatenates the heads
            write = cache[f"blocks.{block}.hook_{kind}_out"]
            normed = F.layer_norm(write, (model.cfg.d_model,), ln.w, ln.b, ln.eps)
            logits = sum(normed @ w + b for w, b in heads) / len(heads)
            for b in range(images.shape[0]):
                for n, group in enumerate(groups):
                    active = top_indices(coefs[b, n].tolist(), k)
                    own = max(range(logits.shape[-1]), key=lambda c: logits[b, n, c].item())
                    match = any(memory_class[i] == own for i in active)
                    for draw, labels in enumerate(labels_per_draw):
                        c = int(labels[b])
                        cell = counts.setdefault((draw, kind, block, group, c), [0, 0, 0])
                        cell[0] += any(i in class_top[c] for i in active)
                        cell[1] += match
                        cell[2] += 1
    return counts


# -- values and the value projection ---------------------------------------------------------------
@pytest.mark.parametrize("n_prefix", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_value_projection_matches_a_loop_over_timm_weights(n_prefix, kind):
    timm_model, model = tiny(n_prefix)
    embeddings = timm_class_embeddings(timm_model)
    with torch.no_grad():
        for block in range(2):
            values = timm_values(timm_model, block, kind)
            expected = torch.tensor([[float(e @ v) for v in values] for e in embeddings])
            assert_close_scaled(value_projection(model, block, kind), expected)
    assert value_projection(model, 0, kind).shape == (10, n_memories(model, kind))


@pytest.mark.parametrize("n_prefix", [0, 1, 2])
def test_write_ins_are_the_coefficient_weighted_sums_of_the_values(n_prefix, make_images):
    """attn_out = z · V + b_O and mlp_out = act(pre) · V + b_out: the memory order matches the
    coefficients'."""
    _, model = tiny(n_prefix)
    _, cache = model.run_with_cache(make_images(2, 32))
    for block in range(2):
        blk = model.blocks[block]
        z = memory_coefficients(cache[f"blocks.{block}.attn.hook_z"], "attn")
        attn_out = cache[f"blocks.{block}.hook_attn_out"]
        assert_close_scaled(z @ memory_values(model, block, "attn") + blk.attn.b_O, attn_out)
        post = blk.mlp.act(memory_coefficients(cache[f"blocks.{block}.mlp.hook_pre"], "mlp"))
        mlp_out = cache[f"blocks.{block}.hook_mlp_out"]
        assert_close_scaled(post @ memory_values(model, block, "mlp") + blk.mlp.b_out, mlp_out)


def test_post_norm_values_are_the_exact_write_in_directions(make_images):
    """Residual post-norm: norm(Σ c_i v_i + b) - norm.b = (Σ c_i v'_i + v'(b)) / σ with v' = w ⊙
    centred v."""
    timm_model = create_timm_vit(
        "vit_base_patch16_rpn_224",
        depth=2,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        num_heads=4,
        num_classes=10,
    )
    model = HookedViT.from_timm(timm_model)
    assert model.cfg.block_norm == "post"
    _, cache = model.run_with_cache(make_images(2, 32))
    for block in range(2):
        blk = model.blocks[block]
        for kind, norm, coefs, bias in [
            (
                "attn",
                blk.ln1,
                memory_coefficients(cache[f"blocks.{block}.attn.hook_z"], "attn"),
                blk.attn.b_O,
            ),
            ("mlp", blk.ln2, blk.mlp.act(cache[f"blocks.{block}.mlp.hook_pre"]), blk.mlp.b_out),
        ]:
            raw = (
                coefs @ torch.stack(timm_values(timm_model, block, kind)).detach() + bias
            )  # before the norm
            sigma = (raw.var(-1, keepdim=True, unbiased=False) + norm.eps).sqrt()
            bias_dir = norm.w * (bias - bias.mean())
            expected = cache[f"blocks.{block}.hook_{kind}_out"] - norm.b
            assert_close_scaled(
                (coefs @ memory_values(model, block, kind) + bias_dir) / sigma, expected
            )


# -- class-value agreement -------------------------------------------------------------------------
@pytest.mark.parametrize("n_prefix", [1, 2])
def test_class_value_agreement_matches_a_cosine_loop(n_prefix):
    timm_model, model = tiny(n_prefix)
    agreement = class_value_agreement(model)
    assert agreement.shape == (2, 2, 10)
    embeddings = timm_class_embeddings(timm_model)
    with torch.no_grad():
        for k, kind in enumerate(KINDS):
            for block in range(2):
                values = torch.stack(timm_values(timm_model, block, kind))
                for c, e in enumerate(embeddings):
                    best = F.cosine_similarity(e[None], values, dim=1).max().item()
                    assert agreement[k, block, c].item() == pytest.approx(best, abs=1e-5)


def test_trained_class_value_agreement_beats_the_random_twin_in_late_blocks():
    model, _, _ = bundled()
    result = compare_class_value_agreement(model, seed=0)
    tests, classes = result.tests, result.classes
    assert len(tests) == 2 * model.cfg.n_layers and len(classes) == 2 * 2 * model.cfg.n_layers * 10
    assert result.trained.shape == result.random.shape == (2, model.cfg.n_layers, 10)
    assert tests.trained.tolist() == pytest.approx(result.trained.mean(-1).flatten().tolist())
    late = tests[tests.block >= model.cfg.n_layers - 2]
    # measured: trained 0.55-0.77 vs random 0.25-0.28, every class higher (p = 1/1024)
    assert (late.trained > late.random + 0.15).all(), late
    assert (late.p_value < 0.01).all(), late
    # the MLP's last block reads the classes far better than its first: training sharpens late
    # values
    mlp = tests[tests.sublayer == "mlp"].set_index("block").trained
    assert mlp.iloc[-1] > mlp.iloc[0] + 0.2


# -- key-value agreement and compositionality ------------------------------------------------------
@pytest.mark.parametrize("n_prefix", [0, 1, 2, 3])
def test_agreement_and_matches_equal_per_token_loops(n_prefix, make_images):
    _, model = tiny(n_prefix)
    images = make_images(5, 32, seed=n_prefix)
    labels = torch.tensor([3, 3, 7, 0, 9])
    draws = random_classes(torch.Generator().manual_seed(11), 2, 5, 10)
    usage = memory_usage_batch(
        model, images, labels, n_random_draws=2, generator=torch.Generator().manual_seed(11)
    )
    slow = slow_usage(model, images, [labels, draws[0], draws[1]])

    present = {g for g in map(group_of, model.layout.token_labels())}
    assert set(usage.groups) == present
    for (draw, kind, block, group, c), (agree, match, tokens) in slow.items():
        k, g = KINDS.index(kind), TOKEN_GROUPS.index(group)
        if draw == 0:
            assert usage.agree[k, block, g, c] == agree, (kind, block, group, c)
            assert usage.match[k, block, g, c] == match, (kind, block, group, c)
            assert usage.tokens[g, c] == tokens
        else:
            assert usage.random_agree[draw - 1, k, block, g, c] == agree, (
                draw,
                kind,
                block,
                group,
                c,
            )
            assert usage.random_tokens[draw - 1, g, c] == tokens
    assert int(usage.tokens.sum()) == 5 * model.layout.n_tokens
    # rates: per class, then the mean over the classes seen (3, 7, 0, 9)
    k, g = KINDS.index("mlp"), TOKEN_GROUPS.index("image")
    per_class = [
        slow[(0, "mlp", 1, "image", c)][0] / slow[(0, "mlp", 1, "image", c)][2]
        for c in (0, 3, 7, 9)
    ]
    assert usage.agreement_rate()[k, 1, g].item() == pytest.approx(sum(per_class) / 4)
    matches = sum(slow[(0, "mlp", 1, "image", c)][1] for c in (0, 3, 7, 9))
    assert usage.match_rate()[k, 1, g].item() == pytest.approx(
        matches / (5 * model.layout.n_patches)
    )


def test_every_token_agrees_when_every_memory_is_a_top_memory(make_images):
    _, model = tiny(1)
    n = min(n_memories(model, "attn"), n_memories(model, "mlp"))
    usage = memory_usage_batch(
        model,
        make_images(2, 32),
        torch.tensor([1, 2]),
        kinds="attn",
        top_memories=n,
        n_random_draws=0,
    )
    assert torch.equal(usage.agree[0], usage.tokens.expand_as(usage.agree[0]))
    assert (
        usage.agreement_rate()[0, :, [0, 2]] == 1
    ).all() and usage.random_agreement_rate().isnan().all()


def test_streaming_over_batches_adds_up(make_images):
    _, model = tiny(2)
    images, labels = make_images(6, 32), torch.tensor([0, 1, 2, 3, 4, 5])
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    streamed = memory_usage(model, batches, seed=5, progress=False)
    whole = memory_usage_batch(model, images, labels)
    for name in ("tokens", "agree", "match"):
        assert torch.equal(getattr(streamed, name), getattr(whole, name)), name
    gen = torch.Generator().manual_seed(5)
    by_hand = sum(
        (memory_usage_batch(model, x, y, generator=gen) for x, y in batches[1:]),
        memory_usage_batch(model, *batches[0], generator=gen),
    )
    assert torch.equal(streamed.random_agree, by_hand.random_agree) and streamed.n_images == 6
    frame = streamed.to_frame()
    assert set(frame.columns) == {"block", "sublayer", "token_group", "metric", "value", "n_tokens"}
    assert len(frame) == 2 * 2 * 3 * 3  # kinds x blocks x groups (cls, prefix, image) x metrics
    assert frame.value.between(0, 1).all()
    per_class = streamed.per_class_frame()
    assert per_class.groupby(["block", "sublayer", "token_group", "metric"]).size().eq(10).all()


def test_trained_key_value_agreement_beats_the_random_class_baseline_in_late_blocks():
    model, images, labels = bundled()
    frame = memory_usage_batch(model, images, labels, n_random_draws=3).to_frame()
    last = model.cfg.n_layers - 1
    table = frame[frame.block >= last - 1].pivot_table(
        index=["sublayer", "token_group", "block"], columns="metric", values="value"
    )
    gain = table.kv_agreement - table.kv_agreement_random
    # measured on these 200 digits, gain over blocks 4-5: CLS +0.34 (attn) / +0.20 (mlp), image
    # tokens +0.13 (attn) / +0.05 (mlp); the smallest is the MLP's image tokens in block 5 (+0.04)
    assert (gain.xs(last, level="block") > 0).all(), table
    assert (gain.groupby(level=["sublayer", "token_group"]).mean() > 0.02).all(), table
    assert gain.mean() > 0.1, table


# -- human-readable values -------------------------------------------------------------------------
def test_value_topk_names_the_classes_a_memory_promotes():
    model, _, _ = bundled()
    table = value_topk(model, 5, "mlp", index=[3, 17], k=3)
    P = value_projection(model, 5, "mlp")
    for memory in (3, 17):
        rows = table[table.memory == memory]
        expected = top_indices(P[:, memory].tolist(), 3)
        assert rows["class"].tolist() == expected
        assert rows.class_name.tolist() == [model.class_names[c] for c in expected]
        assert rows.score.tolist() == pytest.approx(
            [P[c, memory].item() for c in expected], abs=1e-6
        )
    by_vector = value_topk(model, vector=memory_values(model, 5, "mlp")[3], k=3)
    assert by_vector["class"].tolist() == table[table.memory == 3]["class"].tolist()
    attn = value_topk(model, 2, "attn", index=model.cfg.d_head + 4, k=2)
    assert (attn["head"] == 1).all() and (attn.d_head_index == 4).all()
    best = top_memories(model, 5, "mlp", "3", k=4)
    assert best.memory.tolist() == top_indices(P[3].tolist(), 4)
    assert best.score.is_monotonic_decreasing


def test_bad_inputs_get_clear_errors(make_images):
    _, model = tiny(1)
    images = make_images(2, 32)
    with pytest.raises(ValueError, match="kind must be"):
        memory_values(model, 0, "ffn")
    with pytest.raises(ValueError, match="out of range"):
        value_projection(model, 5, "mlp")
    with pytest.raises(ValueError, match="labels must be integer"):
        memory_usage_batch(model, images, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="one per image"):
        memory_usage_batch(model, images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        memory_usage_batch(model, images, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="most activated"):
        memory_usage_batch(model, images, torch.tensor([0, 1]), k=10_000)
    with pytest.raises(ValueError, match="either a memory"):
        value_topk(model, 0, "mlp")
    with pytest.raises(ValueError, match="memory indices"):
        value_topk(model, 0, "attn", index=10_000)
    with pytest.raises(TypeError, match=r"\(images, labels\) pair"):
        memory_usage(model, [images], progress=False)
    with pytest.raises(ValueError, match="empty"):
        memory_usage(model, [], progress=False)
    with pytest.raises(ValueError, match="same model"):
        MemoryUsage.zeros(KINDS, 2, 10, 3) + MemoryUsage.zeros(KINDS, 2, 10, 2)
