"""The shortcuts of issue 18 change no result: a cached pooled vector holds only its own bytes,
and patching chunks cells by start block with the values of the one-cell-per-forward loop."""

from __future__ import annotations

import functools

import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.interventions import get_act_patch_resid_pre, logit_diff
from vit_embedding_lens.interventions.patching import _chunks
from vit_embedding_lens.testing import create_prefix_variant


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
