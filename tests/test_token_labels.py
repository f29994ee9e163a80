"""Token labels from pixel masks, checked against explicit per-patch loops."""

import pytest
import torch

from vit_embedding_lens import HookedViT, TokenLayout
from vit_embedding_lens.data import area_fractions, mask_to_grid, token_mask_from_mask
from vit_embedding_lens.zoo import load_mnist_eval

LAYOUTS = {
    "no_prefix": TokenLayout((4, 5), (8, 8), cls_index=None),
    "cls": TokenLayout((4, 5), (8, 8)),
    "cls_dist": TokenLayout((4, 5), (8, 8), cls_index=0, dist_index=1),
    "cls_4_registers": TokenLayout((4, 5), (8, 8), cls_index=0, register_indices=(1, 2, 3, 4)),
}


def _reference_nearest(mask, gh, gw):
    H, W = mask.shape[-2:]
    out = torch.empty(*mask.shape[:-2], gh, gw, dtype=mask.dtype)
    for r in range(gh):
        for c in range(gw):
            # the pixel at the centre of cell (r, c)
            out[..., r, c] = mask[..., int((r + 0.5) * H / gh), int((c + 0.5) * W / gw)]
    return out


def _reference_area(mask, gh, gw):
    H, W = mask.shape[-2:]
    out = torch.empty(*mask.shape[:-2], gh, gw)
    for r in range(gh):
        for c in range(gw):
            r0, r1 = (r * H) // gh, -((-(r + 1) * H) // gh)  # adaptive pooling's cell bounds
            c0, c1 = (c * W) // gw, -((-(c + 1) * W) // gw)
            out[..., r, c] = (mask[..., r0:r1, c0:c1] != 0).float().mean(dim=(-2, -1))
    return out


@pytest.mark.parametrize("size", [(32, 40), (37, 53), (224, 224)])
def test_grid_resampling_matches_explicit_loops(size):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (3, *size), generator=gen)
    assert torch.equal(mask_to_grid(labels, (4, 5), "nearest"), _reference_nearest(labels, 4, 5))
    torch.testing.assert_close(
        mask_to_grid(labels == 2, (4, 5), "area"), _reference_area(labels == 2, 4, 5)
    )


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_corner_labels_are_the_reference_top_left_pixels(patch):
    """``corner`` is ``mask[::p, ::p]``: what the reference's OpenCV nearest resize to the grid
    samples; on a mask whose object covers only patch centres it differs from ``nearest``."""
    gen = torch.Generator().manual_seed(patch)
    mask = torch.rand(2, 7 * patch, 5 * patch, generator=gen) < 0.4
    assert torch.equal(mask_to_grid(mask, (7, 5), "corner"), mask[..., ::patch, ::patch])
    layout = TokenLayout((7, 5), (patch, patch))
    tokens = token_mask_from_mask(mask, layout, method="corner")
    assert torch.equal(tokens[:, 1:], mask[..., ::patch, ::patch].flatten(1))
    centres = torch.zeros(7 * patch, 5 * patch, dtype=torch.bool)
    centres[patch // 2 :: patch, patch // 2 :: patch] = True
    assert token_mask_from_mask(centres, layout).sum() == 35
    assert token_mask_from_mask(centres, layout, method="corner").sum() == 0


def test_corner_labels_on_the_bundled_digits_differ_from_centres():
    """The two rules disagree on a sizeable share of the bundled digits' image tokens (the reason
    the paper preset uses the reference's rule)."""
    data = load_mnist_eval()
    layout = HookedViT.from_bundled().layout
    p = layout.patch_size[0]
    corner = data.class_token_mask(layout, method="corner")[:, layout.n_prefix :]
    assert torch.equal(corner, data.masks[:, ::p, ::p].flatten(1))
    centre = data.class_token_mask(layout)[:, layout.n_prefix :]
    assert 0.05 < (corner != centre).float().mean() < 0.5


@pytest.mark.parametrize("layout_id", list(LAYOUTS))
def test_prefix_tokens_are_never_labelled(layout_id):
    layout = LAYOUTS[layout_id]
    everything = torch.ones(2, 32, 40, dtype=torch.bool)
    tokens = token_mask_from_mask(everything, layout)
    assert tokens.shape == (2, layout.n_tokens)
    assert not tokens[:, : layout.n_prefix].any()
    assert tokens[:, layout.n_prefix :].all()


def test_a_known_object_lands_on_the_right_tokens():
    layout = LAYOUTS["cls_4_registers"]
    mask = torch.zeros(32, 40, dtype=torch.bool)
    mask[8:16, 24:32] = True  # exactly patch (1, 3)
    mask[26:30, 0:8] = True  # half of patch (3, 0), through its centre row 28
    nearest = token_mask_from_mask(mask, layout)
    assert nearest.nonzero().flatten().tolist() == [
        layout.token_index(1, 3),
        layout.token_index(3, 0),
    ]
    area = area_fractions(mask, layout)
    assert area[layout.token_index(1, 3) - layout.n_prefix] == 1.0
    assert area[layout.token_index(3, 0) - layout.n_prefix] == 0.5
    strict = token_mask_from_mask(mask, layout, method="area", threshold=0.75)
    assert strict.nonzero().flatten().tolist() == [layout.token_index(1, 3)]


def test_label_masks_select_one_class():
    layout = LAYOUTS["cls"]
    labels = torch.zeros(32, 40, dtype=torch.long)
    labels[0:8, 0:8] = 7
    labels[0:8, 8:16] = 3
    assert token_mask_from_mask(labels, layout, label=7).nonzero().flatten().tolist() == [
        layout.token_index(0, 0)
    ]
    assert token_mask_from_mask(labels, layout, label=3).nonzero().flatten().tolist() == [
        layout.token_index(0, 1)
    ]


def test_bad_masks_and_methods():
    layout = LAYOUTS["cls"]
    with pytest.raises(ValueError, match="smaller than"):
        token_mask_from_mask(torch.ones(3, 3), layout)
    with pytest.raises(ValueError, match="'nearest', 'corner', 'area'"):
        token_mask_from_mask(torch.ones(32, 40), layout, method="bilinear")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        mask_to_grid(torch.ones(5), (2, 2))


def test_bundled_digits_have_class_and_context_tokens():
    model = HookedViT.from_bundled()
    digits = load_mnist_eval(n=50)
    tokens = digits.class_token_mask(model.layout)
    assert tokens.shape == (50, model.layout.n_tokens)
    on_digit = tokens[:, model.layout.n_prefix :].float().mean(dim=1)
    # every digit covers some tokens and leaves most of the 7x7 grid as context
    assert (on_digit > 0).all() and (on_digit < 0.7).all()
