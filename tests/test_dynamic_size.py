"""Models created with ``dynamic_img_size`` take other input sizes, exactly as timm does."""

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.testing import create_timm_vit

SMALL = dict(depth=2, embed_dim=96, num_heads=4, num_classes=10, dynamic_img_size=True)


@pytest.mark.parametrize(
    "name, img, pad, sizes",
    [
        ("vit_base_patch16_224", 64, False, [(64, 64), (48, 80)]),
        ("vit_base_patch16_224", 64, True, [(50, 70)]),
        ("vit_small_patch14_reg4_dinov2", 56, False, [(42, 70)]),  # registers, no_embed_class
        ("vit_little_patch16_reg4_gap_256", 64, False, [(32, 96)]),  # avg pool + fc_norm
    ],
)
def test_other_sizes_match_timm(name, img, pad, sizes):
    timm_model = create_timm_vit(name, img_size=img, dynamic_img_pad=pad, **SMALL)
    model = HookedViT.from_timm(timm_model)
    for size in sizes:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = timm_model(x)
            logits, cache = model.run_with_cache(x, names_filter="blocks.1.hook_resid_post")
        torch.testing.assert_close(
            logits, expected, atol=1e-5 * max(1, expected.abs().max().item()), rtol=1e-5
        )
        layout = model.layout_for(size)
        assert cache["blocks.1.hook_resid_post"].shape[1] == layout.n_tokens
        assert layout.n_prefix == model.layout.n_prefix


def test_fixed_size_model_refuses_other_sizes():
    model = HookedViT.from_timm(create_timm_vit("vit_base_patch16_224", depth=1, img_size=64))
    with pytest.raises(ValueError, match="does not match.*dynamic_img_size"):
        model(torch.randn(1, 3, 48, 64))


def test_dynamic_size_must_be_a_multiple_of_the_patch_without_padding():
    model = HookedViT.from_timm(create_timm_vit("vit_base_patch16_224", img_size=64, **SMALL))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 50, 64))
