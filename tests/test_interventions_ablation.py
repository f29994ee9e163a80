"""Zero, mean and resample ablation: checked against linear algebra on the clean run (a head's or a
neuron's contribution subtracted by hand), reference means and reference images."""

from __future__ import annotations

import functools

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.interventions import ablate, ablation_hooks
from vit_embedding_lens.testing import assert_close_scaled, create_timm_vit


@functools.lru_cache(maxsize=None)
def model_and_images():
    model = HookedViT.from_timm(
        create_timm_vit(
            "vit_tiny_patch16_224",
            depth=2,
            img_size=32,
            patch_size=8,
            embed_dim=64,
            num_heads=4,
            reg_tokens=2,
        )
    )
    gen = torch.Generator().manual_seed(0)
    return model, torch.randn(3, 3, 32, 32, generator=gen), torch.randn(5, 3, 32, 32, generator=gen)


def test_zero_head_equals_subtracting_its_write_in():
    model, images, _ = model_and_images()
    names = ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"]
    _, clean = model.run_with_cache(images, names_filter=names)
    with ablate(model, "head", blocks=1, heads=2):
        _, cache = model.run_with_cache(images, names_filter=names)
    z = clean["blocks.1.attn.hook_z"][:, :, 2]  # [B, N, d_head]
    expected = clean["blocks.1.hook_attn_out"] - z @ model.blocks[1].attn.W_O[2]
    assert_close_scaled(cache["blocks.1.hook_attn_out"], expected, rel=1e-5)
    assert (cache["blocks.1.attn.hook_z"][:, :, 2] == 0).all()
    torch.testing.assert_close(
        cache["blocks.1.attn.hook_z"][:, :, [0, 1, 3]],
        clean["blocks.1.attn.hook_z"][:, :, [0, 1, 3]],
    )


def test_zero_neurons_equal_subtracting_their_values_at_chosen_tokens():
    model, images, _ = model_and_images()
    names = ["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"]
    _, clean = model.run_with_cache(images, names_filter=names)
    neurons, image_tokens = [3, 17, 40], model.layout.image_token_mask()
    with ablate(model, "neuron", blocks=0, neurons=neurons, tokens="image"):
        _, cache = model.run_with_cache(images, names_filter=names)
    post = clean["blocks.0.mlp.hook_post"][..., neurons]
    delta = post @ model.blocks[0].mlp.W_out[neurons]  # the neurons' write-in [B, N, d]
    expected = clean["blocks.0.hook_mlp_out"] - delta * image_tokens[None, :, None]
    assert_close_scaled(cache["blocks.0.hook_mlp_out"], expected, rel=1e-5)


def test_mean_ablation_of_mlp_and_attn_uses_reference_means_on_chosen_tokens():
    model, images, reference = model_and_images()
    name = "blocks.1.hook_mlp_out"
    _, ref_cache = model.run_with_cache(reference, names_filter=name)
    _, clean = model.run_with_cache(images, names_filter=name)
    groups = torch.zeros(3, model.layout.n_tokens, dtype=torch.bool)  # one token group per image
    groups[0, [3, 4]] = True
    groups[2, -1] = True
    with ablate(model, "mlp", blocks=1, tokens=groups, method="mean", reference=reference):
        _, cache = model.run_with_cache(images, names_filter=name)
    mean = ref_cache[name].mean(0)
    for b in range(3):
        for t in range(model.layout.n_tokens):
            want = mean[t] if groups[b, t] else clean[name][b, t]
            torch.testing.assert_close(cache[name][b, t], want)
    # a cache of the reference works as well as the reference images
    with ablate(model, "mlp", blocks=1, tokens=groups, method="mean", reference=ref_cache):
        _, again = model.run_with_cache(images, names_filter=name)
    torch.testing.assert_close(again[name], cache[name])


def test_resample_ablation_takes_whole_reference_images_deterministically():
    model, images, reference = model_and_images()
    name = "blocks.0.hook_attn_out"
    _, ref_cache = model.run_with_cache(reference, names_filter=name)
    hooks = ablation_hooks(model, "attn", blocks=0, method="resample", reference=reference, seed=3)
    with model.hooks(fwd_hooks=hooks):
        _, first = model.run_with_cache(images, names_filter=name)
        _, second = model.run_with_cache(images, names_filter=name)
    torch.testing.assert_close(first[name], second[name])
    for b in range(3):
        distances = (ref_cache[name] - first[name][b]).abs().amax(dim=(1, 2))
        assert distances.min() < 1e-6, "each ablated image carries one reference image's activation"


def test_ablation_errors():
    model, images, _ = model_and_images()
    with pytest.raises(ValueError, match="reference"):
        ablation_hooks(model, "mlp", method="mean")
    with pytest.raises(ValueError, match="heads= applies"):
        ablation_hooks(model, "mlp", heads=[0])
    with pytest.raises(ValueError, match="unknown component"):
        ablation_hooks(model, "ffn")
    with pytest.raises(IndexError, match="head"):
        ablation_hooks(model, "head", heads=[9])
    with pytest.raises(ValueError, match="set_use_attn_result"):
        ablation_hooks(model, "result")
