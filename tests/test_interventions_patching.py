"""Activation patching: batched sweeps equal a plain one-forward-per-cell loop written here,
patching everything restores the clean run, patching nothing leaves the corrupted one, results map
onto the patch grid, and the class-space metrics match slow references."""

from __future__ import annotations

import functools

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.interventions import (
    ClassSpaceMetric,
    get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_result_all_pos,
    get_act_patch_block_every,
    get_act_patch_resid_mid,
    get_act_patch_resid_pre,
    grid_region,
    grid_tiles,
    identifiability,
    logit_diff,
    probability,
    run_patching,
)
from vit_embedding_lens.testing import assert_close_scaled, create_prefix_variant


@functools.lru_cache(maxsize=None)
def tiny(n_prefix: int) -> HookedViT:
    return HookedViT.from_timm(
        create_prefix_variant(
            n_prefix, depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=4, num_classes=10
        )
    )


@functools.lru_cache(maxsize=None)
def pair(n_prefix: int):
    """(model, clean images, corrupted images, clean cache, per-image targets)."""
    model = tiny(n_prefix)
    gen = torch.Generator().manual_seed(n_prefix)
    clean = torch.randn(3, 3, 32, 32, generator=gen)
    corrupted = torch.randn(3, 3, 32, 32, generator=gen)
    _, cache = model.run_with_cache(clean)
    return model, clean, corrupted, cache, model(clean).argmax(-1)


def sample_cells(axes, n, seed=0):
    """``n`` distinct random cells of a sweep (all of them when there are fewer), always with the
    first and the last one."""
    import itertools
    import random

    cells = list(itertools.product(*axes))
    picked = random.Random(seed).sample(cells[1:-1], min(n, len(cells)) - 2)
    return [cells[0], *picked, cells[-1]]


def loop_reference(model, corrupted, clean_cache, metric, name_of, select):
    """One forward per cell; the hook copies the clean entries selected by ``select(act)`` (an index
    expression built per cell) - no batching, no mask stacking."""
    out = {}
    for key, name in name_of.items():

        def hook(act, hook, key=key):
            act = act.clone()
            idx = select(key)
            act[idx] = clean_cache[hook.name][idx]
            return act

        logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)])
        out[key] = metric(logits)
    return out


@pytest.mark.parametrize("n_prefix", [0, 1, 2, 5])
def test_resid_pre_sweep_equals_one_forward_per_cell(n_prefix):
    model, clean, corrupted, cache, target = pair(n_prefix)
    metric = logit_diff(model, target)  # target minus best other class, model logits
    L, N = model.cfg.n_layers, model.layout.n_tokens
    cells = sample_cells([range(L), range(N)], 12, seed=n_prefix)
    names = {(l, t): f"blocks.{l}.hook_resid_pre" for l, t in cells}
    ref = loop_reference(model, corrupted, cache, metric, names, lambda key: (slice(None), key[1]))
    for batch_cells in (None, 5):
        result = get_act_patch_resid_pre(
            model, corrupted, cache, metric, batch_cells=batch_cells, progress=False
        )
        assert result.dims == ("layer", "token") and result.values.shape == (L, N)
        for cell in cells:
            assert result.values[cell].item() == pytest.approx(ref[cell].item(), abs=1e-5)
    # the image-shaped map and the prefix part
    gh, gw = model.layout.grid_size
    assert result.grid.shape == (L, gh, gw) and result.prefix.shape == (L, n_prefix)
    for l in range(L):
        for r in range(gh):
            for c in range(gw):
                assert result.grid[l, r, c] == result.values[l, model.layout.token_index(r, c)]
    frame = result.frame
    assert len(frame) == L * N and frame["is_prefix"].sum() == L * n_prefix
    row = frame[(frame.layer == 1) & (frame.token == N - 1)].iloc[0]
    assert row.value == pytest.approx(result.values[1, N - 1].item())
    assert (row.row, row.col) == model.layout.patch_position(N - 1)


def test_head_sweeps_equal_one_forward_per_cell():
    model, clean, corrupted, cache, target = pair(1)
    metric = probability(model, target)
    L, N, H = model.cfg.n_layers, model.layout.n_tokens, model.cfg.n_heads
    # per head, per position: z [B, N, H, dh]
    cells = sample_cells([range(L), range(N), range(H)], 16)
    names = {key: f"blocks.{key[0]}.attn.hook_z" for key in cells}
    ref = loop_reference(
        model, corrupted, cache, metric, names, lambda key: (slice(None), key[1], key[2])
    )
    result = get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric, progress=False)
    assert result.dims == ("layer", "token", "head") and result.values.shape == (L, N, H)
    for cell in cells:
        assert result.values[cell].item() == pytest.approx(ref[cell].item(), abs=1e-5)
    # patterns, all positions: pattern [B, H, N, N]
    names = {(l, h): f"blocks.{l}.attn.hook_pattern" for l in range(L) for h in range(H)}
    ref = loop_reference(model, corrupted, cache, metric, names, lambda key: (slice(None), key[1]))
    result = get_act_patch_attn_head_pattern_all_pos(
        model, corrupted, cache, metric, progress=False
    )
    expected = torch.tensor([[ref[l, h].item() for h in range(H)] for l in range(L)])
    assert_close_scaled(result.values, expected, rel=1e-5)
    every = get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric, progress=False)
    assert every.values.shape == (5, L, H) and every.coords["component"] == [
        "z",
        "q",
        "k",
        "v",
        "pattern",
    ]
    torch.testing.assert_close(every.values[4], result.values)


def test_per_image_token_groups_equal_loop():
    """A per-image group (an 'object mask' [batch, pos]) and a grid region, at resid_mid."""
    model, clean, corrupted, cache, target = pair(2)
    layout = model.layout
    metric = identifiability(model, target)
    gen = torch.Generator().manual_seed(7)
    objects = (torch.rand(3, layout.n_tokens, generator=gen) < 0.5) & layout.image_token_mask()
    groups = {
        "object": objects,
        "top-left": grid_region(layout, slice(0, 2), slice(0, 2)),
        "cls": "cls",
    }
    result = get_act_patch_resid_mid(model, corrupted, cache, metric, tokens=groups, progress=False)
    assert result.dims == ("layer", "group") and result.coords["group"] == list(groups)
    for l in range(model.cfg.n_layers):
        name = f"blocks.{l}.hook_resid_mid"
        for g, mask in enumerate(
            [
                objects,
                groups["top-left"].expand(3, -1),
                torch.eye(layout.n_tokens, dtype=torch.bool)[0].expand(3, -1),
            ]
        ):

            def hook(act, hook, mask=mask):
                return torch.where(mask[..., None], cache[hook.name], act)

            expected = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))
            assert result.values[l, g].item() == pytest.approx(expected.item(), abs=1e-6)


def test_patching_everything_restores_clean_and_nothing_keeps_corrupted():
    model, clean, corrupted, cache, target = pair(5)
    as_logits = lambda logits: logits  # a metric may return any shape: here all logits
    with torch.no_grad():  # as the sweeps run (autograd may pick other kernels)
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    result = get_act_patch_block_every(
        model, corrupted, cache, as_logits, tokens={"all": "all"}, progress=False
    )
    assert result.values.shape == (3, model.cfg.n_layers, 1, 3, model.cfg.n_classes)
    for l in range(model.cfg.n_layers):  # the whole residual stream entering any block
        assert_close_scaled(result.values[0, l, 0], clean_logits, rel=1e-5)
    # the last block's MLP write-in alone does not restore the clean run
    assert not torch.allclose(result.values[2, -1, 0], clean_logits, atol=1e-3)
    # one cell per forward, no skipped blocks, a clean run on the same (fused) attention path:
    # bit-for-bit the clean logits
    with torch.no_grad():
        fused_logits, fused_cache = model.run_with_cache(
            clean, names_filter="blocks.1.hook_resid_pre"
        )
    cells = [{"blocks.1.hook_resid_pre": torch.ones(1, 1, 1, dtype=torch.bool)}]
    exact = run_patching(
        model,
        corrupted,
        fused_cache,
        as_logits,
        cells,
        batch_cells=1,
        skip_unpatched_layers=False,
        progress=False,
    )
    assert torch.equal(exact[0], fused_logits)
    nothing = [
        {f"blocks.{l}.hook_resid_pre": torch.zeros(1, model.layout.n_tokens, 1, dtype=torch.bool)}
        for l in range(2)
    ]
    kept = run_patching(model, corrupted, cache, as_logits, nothing, progress=False)
    for c in range(2):
        assert_close_scaled(kept[c], corrupted_logits, rel=1e-5)


def test_result_patching_and_tiles():
    model, clean, corrupted, cache, target = pair(1)
    metric = logit_diff(model, target)
    with pytest.raises(ValueError, match="set_use_attn_result"):
        get_act_patch_attn_head_result_all_pos(model, corrupted, cache, metric, progress=False)
    model.set_use_attn_result(True)
    try:
        _, full = model.run_with_cache(clean)
        result = get_act_patch_attn_head_result_all_pos(
            model, corrupted, full, metric, progress=False
        )
        z = get_act_patch_attn_head_out_all_pos_ref(model, corrupted, full, metric)
        assert_close_scaled(
            result.values, z, rel=1e-5
        )  # patching a head's write-in = patching its z
    finally:
        model.set_use_attn_result(False)
    tiles = grid_tiles(model.layout, 3)  # 4x4 grid -> 3x3, 3x1, 1x3, 1x1 tiles
    assert list(tiles) == ["r0:3,c0:3", "r0:3,c3:4", "r3:4,c0:3", "r3:4,c3:4"]
    assert sum(t.sum().item() for t in tiles.values()) == model.layout.n_patches
    assert not torch.stack(list(tiles.values())).sum(0).gt(1).any()


def get_act_patch_attn_head_out_all_pos_ref(model, corrupted, cache, metric):
    from vit_embedding_lens.interventions import get_act_patch_attn_head_out_all_pos

    return get_act_patch_attn_head_out_all_pos(
        model, corrupted, cache, metric, progress=False
    ).values


def test_metrics_match_references():
    model, clean, corrupted, cache, target = pair(1)
    logits = model(clean)
    C = model.cfg.n_classes
    ranks = []
    for b in range(3):  # slow reference rank: position in a descending sort
        order = sorted(range(C), key=lambda c: -logits[b, c].item())
        ranks.append(order.index(int(target[b])))
    other = (target + 1) % C
    assert ClassSpaceMetric(model, "rank", other, reduce="none")(logits).tolist() == [
        sorted(range(C), key=lambda c: -logits[b, c].item()).index(int(other[b])) for b in range(3)
    ]
    score = identifiability(model, other, reduce="none")(logits)
    assert torch.allclose(
        score, 1 - ClassSpaceMetric(model, "rank", other, reduce="none")(logits) / C
    )
    assert identifiability(model, target, top1=True)(logits).item() == 1.0  # target = argmax
    diff = logit_diff(model, target, other, reduce="none")(logits)
    torch.testing.assert_close(diff, logits[range(3), target] - logits[range(3), other])
    p = probability(model, target, reduce="none")(logits)
    torch.testing.assert_close(p, torch.softmax(logits, -1)[range(3), target])
    # readouts: the CLS token and the pooled readout at the last block reproduce the logits
    for readout in ("cls", "pooled"):
        m = ClassSpaceMetric(model, "logit", target, readout=readout, reduce="none")
        assert m.hook_name == f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        torch.testing.assert_close(
            m.from_cache(cache), logits[range(3), target], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="no CLS"):
        ClassSpaceMetric(tiny(0), "logit", 0, readout="cls")
    with pytest.raises(ValueError, match="kind"):
        ClassSpaceMetric(model, "accuracy", 0)


def test_mid_block_readout_skips_later_blocks_and_matches():
    """A metric read at block 0 (image tokens' identifiability): patching block 1 cannot change
    it."""
    model, clean, corrupted, cache, target = pair(1)
    metric = identifiability(model, target, readout="image", block=0)
    result = get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    _, corrupted_cache = model.run_with_cache(corrupted)
    assert torch.allclose(
        result.values[1], metric.from_cache(corrupted_cache).expand(model.layout.n_tokens)
    )
    t = 3
    hook = lambda act, hook: torch.cat(
        [act[:, :t], cache[hook.name][:, t : t + 1], act[:, t + 1 :]], dim=1
    )
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", hook)]):
        _, patched = model.run_with_cache(corrupted)
    assert result.values[0, t].item() == pytest.approx(metric.from_cache(patched).item(), abs=1e-6)


def test_bundled_direction_cls_and_last_block():
    """Trained model, clean digit '3's vs corrupted '8's, logit(3) - logit(8): patching the CLS
    token at block 0 does nothing (CLS is image-independent there); patching the final CLS restores
    the clean value; patching the whole stroke region at block 0 moves the metric towards clean."""
    from vit_embedding_lens.zoo.bundled import load_mnist_eval

    model = HookedViT.from_bundled()
    data = load_mnist_eval()
    clean, corrupted = data.images[data.labels == 3][:4], data.images[data.labels == 8][:4]
    _, cache = model.run_with_cache(clean)
    metric = logit_diff(model, 3, 8)
    clean_value, corrupted_value = metric(model(clean)).item(), metric(model(corrupted)).item()
    assert clean_value > 0 > corrupted_value
    L = model.cfg.n_layers
    result = get_act_patch_resid_post(
        model, corrupted, cache, metric, tokens={"cls": "cls", "image": "image"}, progress=False
    )
    assert result.values[L - 1, 0].item() == pytest.approx(clean_value, abs=1e-4)
    assert result.values[0, 1].item() > corrupted_value + 0.5 * (clean_value - corrupted_value)
    first = get_act_patch_resid_pre(
        model, corrupted, cache, metric, tokens={"cls": "cls"}, layers=[0], progress=False
    )
    assert first.values[0, 0].item() == pytest.approx(corrupted_value, abs=1e-5)


from vit_embedding_lens.interventions import get_act_patch_resid_post  # noqa: E402


def test_bad_inputs_raise():
    model, clean, corrupted, cache, target = pair(1)
    metric = logit_diff(model, target)
    with pytest.raises(ValueError, match="clean cache has no"):
        get_act_patch_resid_pre(model, corrupted, {}, metric, progress=False)
    with pytest.raises(ValueError, match="same size"):
        get_act_patch_resid_pre(model, corrupted[:2], cache, metric, progress=False)
    with pytest.raises(ValueError, match="unknown token group"):
        get_act_patch_resid_pre(model, corrupted, cache, metric, tokens="corners", progress=False)
    with pytest.raises(ValueError, match="no per-token dimension"):
        get_act_patch_attn_head_pattern_all_pos(
            model, corrupted, cache, metric, progress=False
        ).grid
