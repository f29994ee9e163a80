"""The shortcuts of issue 18 change no result: a cached pooled vector holds only its own bytes,
patching chunks cells by start block with the values of the one-cell-per-forward loop, and runs
the last block for the readout's rows only where nothing else reads it."""

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
    loop = get_act_patch_resid_pre(
        model,
        corrupted,
        cache,
        metric,
        tokens=tokens,
        batch_cells=1,
        skip_unpatched_layers=False,
        progress=False,
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
    clean, corrupted = images(2, seed=1), images(2, seed=2)
    _, cache = model.run_with_cache(clean)
    metric = logit_diff(model, model(clean).argmax(-1))
    calls = _sweep_spy(monkeypatch)
    fast = get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    assert bool(calls) == (n_prefix > 0)  # avg pooling reads every token's row
    calls.clear()
    plain = get_act_patch_resid_pre(
        model, corrupted, cache, metric, batch_cells=1, skip_unpatched_layers=False, progress=False
    )
    assert not calls
    assert_close_scaled(fast.values, plain.values, rel=1e-5)
    assert fast.values.std() > 0.01  # the sweep is not constant


def test_patching_runs_the_whole_last_block_when_something_else_reads_it(monkeypatch):
    model = tiny()
    clean, corrupted = images(2, seed=1), images(2, seed=2)
    _, cache = model.run_with_cache(clean)
    metric = logit_diff(model, model(clean).argmax(-1))
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
        want = metric(model(clean))  # patching the whole input of a block restores the clean run
    assert_close_scaled(hooked, torch.stack([want, want]), rel=1e-5)
