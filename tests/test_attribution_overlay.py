"""Upsampling maps onto images, overlays as float RGB arrays, and the figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from vit_embedding_lens.attribution import (  # noqa: E402
    AttributionMap,
    colorize,
    image_to_rgb,
    overlay,
    plot_attribution_maps,
    plot_perturbation_curves,
    plot_probe_comparison,
    upsample_map,
)
from vit_embedding_lens.attribution.perturbation import PerturbationResult  # noqa: E402
from vit_embedding_lens.model.layout import TokenLayout  # noqa: E402

LAYOUT = TokenLayout(grid_size=(2, 3), patch_size=(4, 4), cls_index=0, register_indices=(1,))


def test_nearest_upsampling_fills_each_patch_with_its_score():
    scores = torch.arange(6.0)
    up = upsample_map(scores, (8, 12), layout=LAYOUT, mode="nearest")
    for p in range(6):
        r, c = divmod(p, 3)
        assert (up[r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] == p).all()
    batch = upsample_map(torch.stack([scores, -scores]), (8, 12), layout=LAYOUT)
    assert batch.shape == (2, 8, 12)
    assert batch[0].min() >= 0 and batch[0].max() <= 5  # bilinear stays within the data range


def test_overlay_is_a_float_rgb_array_with_the_hot_spot_in_the_right_place():
    image = torch.zeros(1, 8, 12)
    scores = torch.zeros(6)
    scores[5] = 1.0  # bottom-right patch
    out = overlay(scores, image, layout=LAYOUT, alpha=1.0, mode="nearest")
    assert out.shape == (8, 12, 3) and out.dtype == np.float64
    assert out.min() >= 0 and out.max() <= 1
    assert np.allclose(out[5, 10], [1, 1, 1]) and np.allclose(out[1, 1], [0, 0, 0])
    grey = overlay(torch.zeros(2, 3), np.full((8, 12), 7.0), alpha=0.0)
    assert np.allclose(grey, 0.0)  # a constant image scales to 0; alpha 0 shows only the image
    with pytest.raises(ValueError, match="alpha"):
        overlay(scores, image, layout=LAYOUT, alpha=2)


def test_image_to_rgb_undoes_normalization_and_colorize_uses_the_ramp():
    image = torch.tensor([[[-1.0, 1.0]]])  # 1 channel, 1x2
    rgb = image_to_rgb(image, mean=[0.5], std=[0.5])
    assert rgb.shape == (1, 2, 3) and np.allclose(rgb[0, 0], 0) and np.allclose(rgb[0, 1], 1)
    assert np.allclose(colorize(np.array([0.0, 1.0])), [[0, 0, 0], [1, 1, 1]])
    assert colorize(np.array([0.5]), cmap="viridis").shape == (1, 3)


def test_figures_draw_one_panel_per_order_layer_and_method():
    curves = PerturbationResult.from_accuracy(
        [("a", None), ("random", 0), ("random", 1)],
        ["positive", "negative"],
        [1, 2, 3],
        torch.rand(3, 2, 3, dtype=torch.float64),
        n_patches=4,
    )
    fig = plot_perturbation_curves(curves)
    assert len(fig.axes) == 2
    import pandas as pd

    table = pd.DataFrame(
        {
            "layer": ["attn_out"] * 4 + ["mlp_out"] * 4,
            "block": [0, 1] * 4,
            "kind": ["cls", "cls", "image", "image"] * 2,
            "readout": (["probe"] * 2 + ["projection"] * 2) * 2,
            "accuracy": np.linspace(0, 1, 8),
        }
    )
    assert len(plot_probe_comparison(table).axes) == 2
    maps = [
        AttributionMap(torch.rand(3, 6), LAYOUT, torch.tensor([0, 1, 2]), m) for m in ("x", "y")
    ]
    fig = plot_attribution_maps(torch.randn(3, 3, 8, 12), maps, indices=[0, 2])
    assert len(fig.axes) == 2 * 3
