"""The cache's store: ``mlp.hook_post`` kept as ``act(mlp.hook_pre)`` until read, bit for bit.

References are caches filled into a plain dict by the same caching hooks (TransformerLens's
behaviour: every tensor stored as it is), over the same forward pass.
"""

from __future__ import annotations

import io
import pickle
import resource

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.model import host_memory
from vit_embedding_lens.model.activation_store import ActivationStore
from vit_embedding_lens.testing import create_timm_vit

SMALL = dict(depth=2, embed_dim=64, num_heads=4, img_size=32, patch_size=8, num_classes=7)
MODELS = {
    "gelu": ("vit_base_patch16_224", SMALL),
    "gelu_tanh": ("vit_base_patch16_224", dict(SMALL, act_layer="gelu_tanh")),
    "quick_gelu": ("vit_base_patch16_224", dict(SMALL, act_layer="quick_gelu")),
    "map_pool": ("vit_base_patch16_224", dict(SMALL, global_pool="map", class_token=False)),
}
POSTS = lambda name: name.endswith("mlp.hook_post")  # noqa: E731


def _model(key: str) -> HookedViT:
    name, overrides = MODELS[key]
    return HookedViT.from_timm(create_timm_vit(name, **overrides))


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _reference(model: HookedViT, x: torch.Tensor, extra_hooks=(), names_filter=None) -> dict:
    """Every activation stored as it is, as TransformerLens's caching hooks store it."""
    cache, fwd, _ = model.get_caching_hooks(names_filter, cache={})
    with model.hooks(fwd_hooks=[*extra_hooks, *fwd]):
        model(x)
    return cache


def _storage_bytes(tensors) -> int:
    return sum(
        {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()
    )


@pytest.mark.parametrize("mode", ["inference", "grad"])
@pytest.mark.parametrize("key", list(MODELS))
def test_derived_entries_equal_the_stored_tensors_bit_for_bit(key, mode):
    model, x = _model(key), _images()
    context = torch.inference_mode() if mode == "inference" else torch.enable_grad()
    with context:
        ref = _reference(model, x)
        _, cache = model.run_with_cache(x)
    store = cache.cache_dict
    assert isinstance(store, ActivationStore)
    derived = [name for name in store if store.is_derived(name)]
    n_mlps = model.cfg.n_layers + (1 if key == "map_pool" else 0)  # the attention pool's MLP
    assert sorted(derived) == sorted(n for n in ref if POSTS(n)) and len(derived) == n_mlps
    # held memory: exactly the derived tensors' bytes less
    held = _storage_bytes(store.held_tensors().values())
    assert held == _storage_bytes(ref.values()) - sum(
        ref[n].numel() * ref[n].element_size() for n in derived
    )
    assert list(store) == list(ref)  # same names, same order
    for name in ref:
        assert torch.equal(cache[name], ref[name]), name
    assert not any(store.is_derived(n) for n in store)  # read once, then kept


def test_hooks_that_replace_or_edit_hook_post_are_cached_as_they_left_it():
    model, x = _model("gelu"), _images()

    def edit_in_place(t, hook):
        t[:, 0] = 5.0

    def replace(t, hook):
        return t * 2

    hooks = [("blocks.0.mlp.hook_post", edit_in_place), ("blocks.1.mlp.hook_post", replace)]
    with torch.inference_mode():
        ref = _reference(model, x, hooks)
        with model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(x)
    assert not cache.cache_dict.is_derived("blocks.0.mlp.hook_post")
    assert not cache.cache_dict.is_derived("blocks.1.mlp.hook_post")
    assert bool((cache["blocks.0.mlp.hook_post"][:, 0] == 5.0).all())
    for name in ref:
        assert torch.equal(cache[name], ref[name]), name


def test_a_hook_on_hook_pre_is_seen_by_the_derived_hook_post():
    model, x = _model("gelu"), _images()
    hooks = [("blocks.1.mlp.hook_pre", lambda t, hook: t.flip(-1))]
    with torch.inference_mode():
        ref = _reference(model, x, hooks)
        with model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(x)
    assert cache.cache_dict.is_derived("blocks.1.mlp.hook_post")
    assert torch.equal(cache["blocks.1.mlp.hook_post"], ref["blocks.1.mlp.hook_post"])


def test_hook_post_without_its_hook_pre_is_stored_as_it_is():
    model, x = _model("gelu"), _images()
    _, cache = model.run_with_cache(x, names_filter=POSTS)
    assert not any(cache.cache_dict.is_derived(n) for n in cache.cache_dict)
    ref = _reference(model, x, names_filter=POSTS)
    assert all(torch.equal(cache[n], ref[n]) for n in ref)


@pytest.mark.parametrize("mode", ["inference", "grad"])
def test_editing_hook_pre_before_reading_hook_post_is_refused_by_name(mode):
    model, x = _model("gelu"), _images()
    context = torch.inference_mode() if mode == "inference" else torch.no_grad()
    with context:
        _, cache = model.run_with_cache(x)
        cache["blocks.1.mlp.hook_pre"][0, 0, 0] += 1.0
        with pytest.raises(RuntimeError, match=r"blocks\.1\.mlp\.hook_pre was edited in place"):
            cache["blocks.1.mlp.hook_post"]
        # materialized first, edits are the caller's business
        _, cache = model.run_with_cache(x)
        ref = _reference(model, x)
        cache.cache_dict.materialize()
        cache["blocks.1.mlp.hook_pre"].zero_()
        assert torch.equal(cache["blocks.1.mlp.hook_post"], ref["blocks.1.mlp.hook_post"])


def test_the_store_pickles_saves_and_converts_as_a_dict_of_tensors():
    model, x = _model("gelu"), _images()
    _, cache = model.run_with_cache(x)
    ref = _reference(model, x)
    loaded = pickle.loads(pickle.dumps(cache.cache_dict))
    buffer = io.BytesIO()
    torch.save(cache.cache_dict, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    for other in (loaded, saved, dict(cache.cache_dict), cache.cache_dict.copy()):
        assert isinstance(other, dict) and list(other) == list(ref)
        assert all(torch.equal(other[n], ref[n]) for n in ref)


def test_transformer_lens_cache_methods_read_derived_entries():
    model, x = _model("gelu"), _images(1)
    ref = _reference(model, x)
    _, cache = model.run_with_cache(x)
    moved = cache.to("cpu")
    assert all(torch.equal(moved[n], ref[n]) for n in ref)
    _, cache = model.run_with_cache(x)
    cache.remove_batch_dim()
    assert all(torch.equal(cache[n], ref[n][0]) for n in ref)
    _, unbatched = model.run_with_cache(x, remove_batch_dim=True)
    assert all(torch.equal(unbatched[n], ref[n][0]) for n in ref)


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc settings only")
def test_later_caches_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    # a cache of about 95 MiB: past glibc's trim threshold, so by default its freed pages go back
    # to the kernel (a 64-pixel model's 18 MiB cache takes no faults either way)
    model = HookedViT.from_timm(
        create_timm_vit("vit_base_patch16_224", **dict(SMALL, embed_dim=256, img_size=128))
    )
    x = torch.randn(8, 3, 128, 128)

    def faults_and_pages_of_a_cache() -> tuple:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        _, cache = model.run_with_cache(x)
        held = _storage_bytes(cache.cache_dict.held_tensors().values())
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, held // 4096

    for _ in range(3):  # the first cache turns retention on, the next ones settle the heap
        faults_and_pages_of_a_cache()
    assert host_memory.retain_freed_memory()
    # the fewest of three: other work in the process (the suite's earlier tests, torch's thread
    # pools) faults in a few hundred pages of its own now and then
    faults, pages = min(faults_and_pages_of_a_cache() for _ in range(3))
    # glibc's defaults fault in every page of every cache (37-40k faults for these 24k pages,
    # measured in a process with retention switched off); kept memory, next to none (0-1)
    assert pages > 20000 and faults < pages / 4
    assert isinstance(host_memory.release_freed_memory(), bool)


def test_retention_can_be_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_SWITCH, "0")
    monkeypatch.setattr(host_memory, "_retained", False)
    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(1) or True)
    assert host_memory.retain_freed_memory_by_default() is False and not calls
    monkeypatch.setenv(host_memory.ENV_SWITCH, "1")
    assert host_memory.retain_freed_memory_by_default() is True and calls == [1]
