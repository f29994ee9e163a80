"""The shortcuts of issue 18 change no result: a cached pooled vector holds only its own bytes,
patching chunks cells by start block with the values of the one-cell-per-forward loop, shares a
patched block's unchanged tokens' queries, keys and values with the corrupted run, computes only
the patched rows of a block patched at a token-by-token activation, and runs the last block for
the readout's rows only, each where nothing else reads or hooks that block."""

from __future__ import annotations

import functools

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.interventions import (
    get_act_patch_resid_pre,
    logit_diff,
    patching,
    run_patching,
)
from vit_embedding_lens.interventions.patching import _chunks
from vit_embedding_lens.testing import assert_close_scaled, create_prefix_variant, create_timm_vit


@functools.lru_cache(maxsize=None)
def _timm_tiny():
    return create_prefix_variant(
        1, depth=3, img_size=32, patch_size=8, embed_dim=64, num_heads=4, num_classes=10
    )


def tiny() -> HookedViT:
    return HookedViT.from_timm(_timm_tiny())


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def patching_inputs(model: HookedViT):
    """Two corrupted images, the cache of two clean ones, and the logit difference between the
    clean run's top classes and the rest."""
    clean, corrupted = images(2, seed=1), images(2, seed=2)
    _, cache = model.run_with_cache(clean)
    return corrupted, cache, logit_diff(model, model(clean).argmax(-1))


def one_forward_per_cell(sweep, *args, **kwargs):
    """``sweep`` (a patching sweep or ``run_patching``) as the plain loop: one cell per forward
    pass, every block run."""
    return sweep(*args, batch_cells=1, skip_unpatched_layers=False, progress=False, **kwargs)


def assert_plain_loop_agrees(fast, calls: list, sweep, *args, **kwargs) -> None:
    """The plain loop (:func:`one_forward_per_cell`) takes none of the spied shortcuts and gives
    the batched sweep ``fast``'s values, which are not constant."""
    calls.clear()
    plain = one_forward_per_cell(sweep, *args, **kwargs)
    assert not calls
    assert_close_scaled(fast.values, plain.values, rel=1e-5)
    assert fast.values.std() > 0.01


def one_token(model: HookedViT, token: int) -> torch.Tensor:
    """A ``resid``-shaped mask selecting one token of every image."""
    mask = torch.zeros(1, model.layout.n_tokens, 1, dtype=torch.bool)
    mask[0, token] = True
    return mask


def test_cached_pooled_vector_holds_only_its_own_bytes():
    model, x = tiny(), images()
    with torch.no_grad():
        logits, cache = model.run_with_cache(x)
    pooled = cache["hook_pooled"]
    assert pooled.untyped_storage().nbytes() == pooled.numel() * pooled.element_size()
    ln = model.ln_final
    with torch.no_grad():
        assert torch.equal(pooled, cache["ln_final.hook_normalized"][:, 0] * ln.w + ln.b)
    assert torch.equal(logits, model.head(pooled))


def test_patching_chunks_never_mix_start_blocks():
    cells = [{f"blocks.{layer}.hook_resid_pre": torch.ones(1)} for layer in (0, 0, 1, 1, 1, 2, 0)]
    chunks, starts = _chunks(cells, 2, None, skip=True)
    assert sorted(c for chunk in chunks for c in chunk) == list(range(len(cells)))
    for chunk, start in zip(chunks, starts):
        assert len(chunk) <= 2
        assert {int(next(iter(cells[c])).split(".")[1]) for c in chunk} == {start}
    assert _chunks(cells, 3, None, skip=False) == ([[0, 1, 2], [3, 4, 5], [6]], [0, 0, 0])
    # a readout at block 1 caps every start there
    _, capped = _chunks(cells, 2, 1, skip=True)
    assert max(capped) == 1


def test_patching_values_match_the_one_cell_per_forward_loop():
    model = tiny()
    clean, corrupted = images(2, seed=1), images(2, seed=2)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        target = model(clean).argmax(-1)
    metric = logit_diff(model, target)
    tokens = {"a": [0], "b": [3], "c": [7]}
    batched = get_act_patch_resid_pre(
        model, corrupted, cache, metric, tokens=tokens, batch_cells=2, progress=False
    )
    loop = one_forward_per_cell(
        get_act_patch_resid_pre, model, corrupted, cache, metric, tokens=tokens
    )
    torch.testing.assert_close(batched.values, loop.values, rtol=1e-5, atol=1e-5)


def test_model_built_under_inference_mode_runs():
    with torch.inference_mode():  # inference-tensor weights have no version counter
        model = tiny()
        x = images()
        assert torch.equal(model(x), model(x))


# -- the last block for the prefix rows only ------------------------------------------------------
BLOCK_VARIANTS = {
    "pre-norm": ("vit_base_patch16_224", {}),
    "qk-norm": ("vit_base_patch16_224", dict(qk_norm=True)),
    "layerscale": ("deit3_small_patch16_224", dict(embed_dim=64, num_heads=4)),
    "post-norm": ("vit_base_patch16_rpn_224", {}),
}


@pytest.mark.parametrize("variant", list(BLOCK_VARIANTS))
def test_a_block_read_at_some_rows_equals_those_rows_of_the_block(variant):
    name, overrides = BLOCK_VARIANTS[variant]
    kwargs = dict(depth=2, embed_dim=64, num_heads=4, img_size=32, patch_size=8, num_classes=10)
    model = HookedViT.from_timm(create_timm_vit(name, **{**kwargs, **overrides}))
    with torch.no_grad():
        resid = model(images(), stop_at_layer=1)
        full = model.blocks[1](resid)
        for rows in (slice(0, 1), slice(0, 3), slice(5, 9)):
            assert_close_scaled(model.blocks[1].rows(resid, rows), full[:, rows], rel=1e-5)


def _sweep_spy(monkeypatch):
    """Counts the chunks that ran the last block for the prefix rows only."""
    calls = []
    original = patching._forward_prefix_rows

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(patching, "_forward_prefix_rows", spy)
    return calls


@pytest.mark.parametrize("n_prefix", [0, 1, 2, 5])
def test_patching_runs_the_last_block_for_the_readout_rows_when_only_they_are_read(
    n_prefix, monkeypatch
):
    model = HookedViT.from_timm(
        create_prefix_variant(
            n_prefix, depth=3, img_size=32, patch_size=8, embed_dim=64, num_heads=4, num_classes=10
        )
    )
    corrupted, cache, metric = patching_inputs(model)
    calls = _sweep_spy(monkeypatch)
    fast = get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    assert bool(calls) == (n_prefix > 0)  # avg pooling reads every token's row
    assert_plain_loop_agrees(fast, calls, get_act_patch_resid_pre, model, corrupted, cache, metric)


def test_patching_runs_the_whole_last_block_when_something_else_reads_it(monkeypatch):
    model = tiny()
    corrupted, cache, metric = patching_inputs(model)
    calls = _sweep_spy(monkeypatch)
    last = model.cfg.n_layers - 1
    z_cell = {f"blocks.{last}.attn.hook_z": torch.ones(1, 1, 1, 1, dtype=torch.bool)}
    run_patching(model, corrupted, cache, metric, [z_cell], progress=False)
    assert not calls  # a patch inside the last block
    doubled = [("ln_final.hook_normalized", lambda t, hook: t * 2)]
    cells = [{f"blocks.{l}.hook_resid_pre": torch.ones(1, 1, 1, dtype=torch.bool)} for l in (0, 2)]
    with model.hooks(fwd_hooks=doubled):  # a standing hook on the readout is honoured
        hooked = run_patching(model, corrupted, cache, metric, cells, progress=False)
    assert not calls
    with torch.no_grad(), model.hooks(fwd_hooks=doubled):
        # patching the whole input of a block restores the clean run (patching_inputs's)
        want = metric(model(images(2, seed=1)))
    assert_close_scaled(hooked, torch.stack([want, want]), rel=1e-5)


# -- a patched block's unchanged tokens: queries, keys and values from the corrupted run ---------
def _variant_model(variant: str, depth: int = 2) -> HookedViT:
    name, overrides = BLOCK_VARIANTS[variant]
    kwargs = dict(depth=depth, embed_dim=64, num_heads=4, img_size=32, patch_size=8, num_classes=10)
    return HookedViT.from_timm(create_timm_vit(name, **{**kwargs, **overrides}))


@pytest.mark.parametrize("variant", list(BLOCK_VARIANTS))
def test_a_block_with_shared_queries_keys_and_values_equals_the_block(variant):
    model = _variant_model(variant)
    block = model.blocks[1]
    with torch.no_grad():
        resid = model(images(), stop_at_layer=1)  # 3 images
        shared = block.shared_qkv(resid)
        x = resid.repeat(2, 1, 1)  # two copies, as a chunk of two cells
        other = torch.randn_like(resid)
        patched = x.clone()
        patched[0, 4], patched[4, 0], patched[5, 2:6] = other[0, 4], other[1, 0], other[2, 2:6]
        changed = (patched != x).any(-1)
        assert int(changed.sum()) == 6
        assert_close_scaled(block.with_shared_qkv(patched, changed, shared), block(patched), 1e-5)
        unchanged = torch.zeros_like(changed)
        assert_close_scaled(block.with_shared_qkv(x, unchanged, shared), block(x), rel=1e-5)
        # the changed tokens are recomputed: marked unchanged, they keep the corrupted values
        stale = block.with_shared_qkv(patched, unchanged, shared)
        assert (stale - block(patched)).abs().max() > 1e-3
        with pytest.raises(ValueError, match="not a repeat"):
            block.with_shared_qkv(patched[:4], changed[:4], shared)


def _plan_spy(monkeypatch):
    """The plans the chunks ran by: ``(block, point, block sharing q/k/v or None)``."""
    calls = []
    original = patching._forward_planned

    def spy(model, plan, *args, **kwargs):
        calls.append((plan.block, plan.point, plan.qkv_block))
        return original(model, plan, *args, **kwargs)

    monkeypatch.setattr(patching, "_forward_planned", spy)
    return calls


def _tiny_with_plan_spy(monkeypatch):
    """:func:`tiny`, :func:`patching_inputs` for it, and a :func:`_plan_spy`."""
    model = tiny()
    return (model, *patching_inputs(model), _plan_spy(monkeypatch))


def _arch_model(arch: str) -> HookedViT:
    """A 3-block model: average pooling, one or two prefix tokens, or a block variant."""
    prefix = {"avg-pool": 0, "cls": 1, "two-prefix": 2}
    if arch not in prefix:
        return _variant_model(arch, depth=3)
    return HookedViT.from_timm(
        create_prefix_variant(
            prefix[arch],
            depth=3,
            img_size=32,
            patch_size=8,
            embed_dim=64,
            num_heads=4,
            num_classes=10,
        )
    )


ARCHS = ["avg-pool", "cls", "two-prefix", *(v for v in BLOCK_VARIANTS if v != "pre-norm")]


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_shares_the_patched_blocks_unchanged_tokens_with_the_corrupted_run(
    arch, monkeypatch
):
    model = _arch_model(arch)
    corrupted, cache, metric = patching_inputs(model)
    calls = _plan_spy(monkeypatch)
    tokens = {"first": [0], "some": [3, 9], "late": [model.layout.n_tokens - 1]}
    fast = get_act_patch_resid_pre(model, corrupted, cache, metric, tokens=tokens, progress=False)
    last = model.cfg.n_layers - 1
    reads_prefix_rows = model.cfg.global_pool == "token"
    # every start block shares, but a last block that runs for the prefix rows only
    assert {point for _, point, _ in calls} == {"hook_resid_pre"}
    assert sorted({block for block, _, _ in calls}) == list(
        range(last if reads_prefix_rows else last + 1)
    )
    assert_plain_loop_agrees(
        fast, calls, get_act_patch_resid_pre, model, corrupted, cache, metric, tokens=tokens
    )


class _ReadAt:
    """A metric that reads an activation (as ClassSpaceMetric does): its mean per image."""

    def __init__(self, hook_name: str) -> None:
        self.hook_name = hook_name

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        return act.flatten(1).mean(-1)


def test_patching_runs_a_patched_block_whole_when_something_else_hooks_or_reads_it(monkeypatch):
    model, corrupted, cache, metric, calls = _tiny_with_plan_spy(monkeypatch)
    token = one_token(model, 2)
    cells = [{f"blocks.{l}.hook_resid_pre": token} for l in (0, 1)]
    # a standing hook inside block 1 is honoured: only block 0's cell shares
    halved = [("blocks.1.hook_attn_out", lambda t, hook: t / 2)]
    with model.hooks(fwd_hooks=halved):
        hooked = run_patching(model, corrupted, cache, metric, cells, progress=False)
    assert calls == [(0, "hook_resid_pre", 0)]
    with model.hooks(fwd_hooks=halved):
        want = one_forward_per_cell(run_patching, model, corrupted, cache, metric, cells)
    assert_close_scaled(hooked, want, rel=1e-5)
    calls.clear()
    # a patch of another activation of the block, or a metric read inside it
    z_cell = {"blocks.1.attn.hook_z": torch.ones(1, 1, 1, 1, dtype=torch.bool)}
    run_patching(model, corrupted, cache, metric, [z_cell], progress=False)
    read_mid = _ReadAt("blocks.1.hook_resid_mid")
    got = run_patching(model, corrupted, cache, read_mid, cells, progress=False)
    assert calls == [(0, "hook_resid_pre", 0)]  # block 0's cell, read in block 1, still shares
    want = one_forward_per_cell(run_patching, model, corrupted, cache, read_mid, cells)
    assert_close_scaled(got, want, rel=1e-5)


@pytest.mark.parametrize("point", ["attn_out", "resid_mid", "mlp_out", "resid_post"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patching_a_token_by_token_activation_computes_the_patched_rows_alone(
    arch, point, monkeypatch
):
    """After attn_out, resid_mid, mlp_out or resid_post of block l, everything up to block l's
    output is token by token: the sweep computes the patched tokens' rows of block l and shares
    the other tokens' queries, keys and values in block l + 1."""
    model = _arch_model(arch)
    corrupted, cache, metric = patching_inputs(model)
    calls = _plan_spy(monkeypatch)
    sweep = getattr(patching, f"get_act_patch_{point}")
    tokens = {"first": [0], "some": [3, 9], "late": [model.layout.n_tokens - 1]}
    fast = sweep(model, corrupted, cache, metric, tokens=tokens, progress=False)
    last = model.cfg.n_layers - 1
    prefix_rows = model.cfg.global_pool == "token"
    expected = {
        (
            block,
            f"hook_{point}",
            None if block == last or (prefix_rows and block + 1 == last) else block + 1,
        )
        for block in range(last + 1)
    }
    assert set(calls) == expected
    assert_plain_loop_agrees(fast, calls, sweep, model, corrupted, cache, metric, tokens=tokens)


def test_a_token_by_token_patch_before_a_hooked_block_runs_that_block_whole(monkeypatch):
    model, corrupted, cache, metric, calls = _tiny_with_plan_spy(monkeypatch)
    token = one_token(model, 4)
    cells = [{f"blocks.{l}.hook_mlp_out": token} for l in (0, 1)]
    doubled = [("blocks.1.attn.hook_z", lambda t, hook: t * 2)]  # a standing hook in block 1
    with model.hooks(fwd_hooks=doubled):
        got = run_patching(model, corrupted, cache, metric, cells, progress=False)
        want = one_forward_per_cell(run_patching, model, corrupted, cache, metric, cells)
    # block 0's output rows alone, block 1 whole (its hook honoured); block 1's cell unplanned
    assert calls == [(0, "hook_mlp_out", None)]
    assert_close_scaled(got, want, rel=1e-5)
    # a clean token equal to the corrupted one changes nothing: the corrupted run's metric
    same = {"blocks.1.hook_attn_out": token}
    calls.clear()
    with torch.no_grad():
        _, own = model.run_with_cache(corrupted)
    unchanged = run_patching(model, corrupted, own, metric, [same], progress=False)
    assert calls == [(1, "hook_attn_out", None)]  # block 2 is last: the CLS row alone
    torch.testing.assert_close(unchanged[0], metric(model(corrupted)), rtol=1e-5, atol=1e-5)
