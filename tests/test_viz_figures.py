"""Static figures: the drawn numbers equal the data tables, the tables equal hand-computed
references (explicit loops, numpy written differently), and nothing needs a display.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from vit_embedding_lens import HookedViT
from vit_embedding_lens.attribution.overlay import overlay, upsample_map
from vit_embedding_lens.testing import create_timm_vit
from vit_embedding_lens.viz import (
    attention_table,
    change_rates_table,
    figure_to_png,
    heatmap_grid_table,
    identifiability_evolution_table,
    kv_agreement_table,
    plot_attention,
    plot_change_rates,
    plot_heatmap_grid,
    plot_identifiability_evolution,
    plot_kv_agreement,
    plot_overlay,
    plot_token_grid,
    token_grid_table,
)
from vit_embedding_lens.viz._figures import stars_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reg_model():
    """CLS + 4 registers over a 4x4 grid: 21 tokens."""
    tm = create_timm_vit(
        "vit_small_patch16_224",
        depth=2,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        num_heads=2,
        reg_tokens=4,
        num_classes=5,
    )
    return HookedViT.from_timm(tm)


def _line(ax, label):
    hits = [ln for ln in ax.get_lines() if ln.get_label() == label]
    assert len(hits) == 1, [ln.get_label() for ln in ax.get_lines()]
    return hits[0]


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


# -------------------------------------------------------------------------------------------------
def test_identifiability_table_matches_loops_and_both_input_forms():
    rng = np.random.default_rng(0)
    cls, img = rng.uniform(0.4, 1, (4, 30)), rng.uniform(0.2, 1, (4, 10, 6))  # [block, ...]
    table = identifiability_evolution_table({"CLS": cls, "image": img}, band=(10, 90))
    for b in range(4):
        values = sorted(img[b].ravel())
        row = table[(table.block == b) & (table.group == "image")].iloc[0]
        assert row.n == 60
        assert row["mean"] == pytest.approx(sum(values) / len(values))
        assert row["median"] == pytest.approx((values[29] + values[30]) / 2)
        assert row["low"] == pytest.approx(np.quantile(values, 0.1))
    tidy = pd.DataFrame(
        [{"layer": b, "tokens": "CLS", "s": v} for b in range(4) for v in cls[b]]
        + [{"layer": b, "tokens": "image", "s": v} for b in range(4) for v in img[b].ravel()]
    )
    same = identifiability_evolution_table(
        tidy, block_col="layer", group_col="tokens", value_col="s", band=(10, 90)
    )
    pd.testing.assert_frame_equal(table, same)
    # per-image tables [batch, block] (the lens's layout) with block_axis=1
    per_image = {"CLS": cls.T, "image": np.moveaxis(img, 0, 1)}
    pd.testing.assert_frame_equal(
        identifiability_evolution_table(per_image, block_axis=1, band=(10, 90)), table
    )


def test_identifiability_figure_draws_the_table_with_random_band_and_stars():
    rng = np.random.default_rng(1)
    data = {"CLS": rng.uniform(0.5, 1, (3, 20)), "image": rng.uniform(0.3, 1, (3, 20))}
    random = {"CLS": rng.uniform(0.3, 0.7, (3, 20)), "image": rng.uniform(0.3, 0.7, (3, 20))}
    pvalues = {"CLS": [0.2, 0.004, 1e-5], "image": [0.5, 0.03, 0.5]}
    table = identifiability_evolution_table(data, random, pvalues)
    assert table.set_index(["group", "block"]).loc[("CLS", 1), "stars"] == "**"
    fig = plot_identifiability_evolution(data, random, pvalues)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    for group in ("CLS", "image"):
        rows = table[table.group == group]
        np.testing.assert_allclose(_line(ax, f"{group} (mean)").get_ydata(), rows["mean"])
        np.testing.assert_allclose(
            _line(ax, f"{group} (random init)").get_ydata(), rows["random_mean"]
        )
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["n.s.", "**", "***", "n.s.", "*", "n.s."])
    assert all(
        t.get_position()[1] < ax.get_ylim()[1] for t in ax.texts
    )  # stars stay inside the axes
    bodies = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bodies) >= 6 + 2  # 3 blocks x 2 groups violins + 2 random bands
    assert figure_to_png(fig).startswith(PNG_MAGIC)


def test_identifiability_box_kind_on_given_axes_and_errors():
    fig = Figure()
    ax = fig.add_subplot(1, 2, 2)
    out = plot_identifiability_evolution(
        np.random.default_rng(0).uniform(0, 1, (2, 5)), kind="box", ax=ax
    )
    assert out is fig and ax.get_xlabel() == "block"
    with pytest.raises(ValueError, match="kind"):
        plot_identifiability_evolution(np.ones((2, 3)), kind="bars")
    with pytest.raises(ValueError, match="no column"):
        plot_identifiability_evolution(pd.DataFrame({"block": [0], "value": [1.0]}))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        identifiability_evolution_table(np.ones((2, 3)), pvalues=[0.5, 2.0])


def test_stars_label():
    assert [stars_label(p) for p in (0.2, 0.05, 0.049, 0.009, 0.0009, float("nan"))] == [
        "n.s.",
        "n.s.",
        "*",
        "**",
        "***",
        "",
    ]


# -------------------------------------------------------------------------------------------------
def test_change_rates_bars_are_the_per_block_means_in_percent():
    rng = np.random.default_rng(2)
    attn_img = rng.uniform(0, 1, (3, 8))  # per image rates
    data = {
        "attention": {"CLS": [0.2, 0.6, 0.9], "image": attn_img},
        "mlp": {"CLS": [0.7, 0.4, 0.5], "image": rng.uniform(0, 1, (3, 8))},
    }
    table = change_rates_table(data)
    row = table[
        (table.block == 1) & (table.sublayer == "attention") & (table.group == "image")
    ].iloc[0]
    assert row.rate == pytest.approx(attn_img[1].mean())
    assert row["sem"] == pytest.approx(attn_img[1].std(ddof=1) / np.sqrt(8))
    fig = plot_change_rates(data)
    ax_cls, ax_img = fig.axes[:2]
    heights = sorted(round(p.get_height(), 6) for p in ax_cls.patches)
    assert heights == sorted(round(100 * v, 6) for v in [0.2, 0.6, 0.9, 0.7, 0.4, 0.5])
    assert "CLS" in ax_cls.get_title() and "image" in ax_img.get_title()
    tidy = table.rename(columns={"rate": "share"})[["block", "sublayer", "group", "share"]]
    pd.testing.assert_frame_equal(
        change_rates_table(tidy, value_col="share")[["block", "sublayer", "group", "rate"]],
        change_rates_table(table)[["block", "sublayer", "group", "rate"]],
    )
    with pytest.raises(ValueError, match="percent=True"):
        change_rates_table({"mlp": {"CLS": [50.0, 60.0]}})
    in_percent = tidy.assign(share=100 * tidy.share)
    pd.testing.assert_frame_equal(
        change_rates_table(in_percent, value_col="share", percent=True),
        change_rates_table(tidy, value_col="share"),
    )


def test_kv_agreement_lines_and_baseline_column():
    rng = np.random.default_rng(3)
    per_class = rng.uniform(0.2, 0.9, (4, 10))  # [block, class]
    base = rng.uniform(0.0, 0.2, (4, 10))
    table = kv_agreement_table({"mlp": per_class}, {"mlp": base})
    np.testing.assert_allclose(table["mean"], per_class.mean(1))
    np.testing.assert_allclose(table["baseline_mean"], base.mean(1))
    fig = plot_kv_agreement({"mlp": per_class}, {"mlp": base})
    ax = fig.axes[0]
    np.testing.assert_allclose(_line(ax, "mlp").get_ydata(), 100 * per_class.mean(1))
    np.testing.assert_allclose(_line(ax, "mlp (random classes)").get_ydata(), 100 * base.mean(1))
    frame = pd.DataFrame(
        {
            "block": np.repeat(np.arange(4), 10),
            "agreement": per_class.ravel(),
            "random": base.ravel(),
        }
    )
    pd.testing.assert_frame_equal(kv_agreement_table(frame, "random"), table)


# -------------------------------------------------------------------------------------------------
def test_token_grid_from_tokens_puts_each_token_in_its_cell(reg_model):
    layout = reg_model.layout  # 5 prefix tokens, 4x4 grid
    values = (
        torch.arange(2 * layout.n_tokens, dtype=torch.float32).reshape(2, layout.n_tokens) / 100
    )
    fig = plot_token_grid(values, layout=layout)
    drawn = _images(fig)
    assert len(drawn) == 2
    for block, im in enumerate(drawn):
        arr = im.get_array()
        for r in range(4):
            for c in range(4):
                assert arr[r, c] == pytest.approx(float(values[block, layout.token_index(r, c)]))
    title = fig.axes[1].get_title()
    assert "block 1" in title and "REG3: 0.25" in title  # prefix values go to the titles
    table = token_grid_table(values, layout=layout)
    assert set(table.loc[table.row.isna(), "token"]) == {"CLS", "REG0", "REG1", "REG2", "REG3"}
    assert table.loc[(table.panel == 1) & (table.token == "P3,2"), "value"].item() == pytest.approx(
        float(values[1, layout.token_index(3, 2)])
    )


def test_token_grid_classes_over_an_image_are_annotated_with_names():
    classes = np.array([[[0, 1], [2, 1]], [[2, 2], [0, 1]]])  # [block, 2, 2] top-1 classes
    names = ["cat", "dog", "eel"]
    image = np.random.default_rng(0).uniform(size=(3, 16, 16))
    fig = plot_token_grid(classes, image=image, class_names=names)
    ax = fig.axes[0]
    ims = ax.get_images()
    assert len(ims) == 2  # the picture, then the class grid
    assert ims[1].get_extent() == ims[0].get_extent() == [0, 16, 16, 0]
    assert [t.get_text() for t in ax.texts] == ["cat", "dog", "eel", "dog"]
    with pytest.raises(ValueError, match="labels have shape"):
        plot_token_grid(classes, labels=np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="layout="):
        plot_token_grid(np.zeros(21))


# -------------------------------------------------------------------------------------------------
def test_upsample_nearest_is_a_kronecker_product_and_bilinear_keeps_constants():
    grid = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(
        upsample_map(grid, (12, 16), mode="nearest"), np.kron(grid, np.ones((4, 4)))
    )
    np.testing.assert_allclose(upsample_map(np.full((3, 4), 2.5), (9, 8)), 2.5)
    smooth = upsample_map(grid, (30, 40))
    assert grid.min() - 1e-9 <= smooth.min() and smooth.max() <= grid.max() + 1e-9
    # bilinear against a pixel-by-pixel reference: patch centres are the knots, borders clamp
    wide = np.random.default_rng(0).normal(size=(3, 5))
    out_h, out_w = 12, 15
    reference = np.zeros((out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            y = min(max((i + 0.5) * 3 / out_h - 0.5, 0.0), 2.0)
            x = min(max((j + 0.5) * 5 / out_w - 0.5, 0.0), 4.0)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, 2), min(x0 + 1, 4)
            top = wide[y0, x0] * (1 - (x - x0)) + wide[y0, x1] * (x - x0)
            bottom = wide[y1, x0] * (1 - (x - x0)) + wide[y1, x1] * (x - x0)
            reference[i, j] = top * (1 - (y - y0)) + bottom * (y - y0)
    np.testing.assert_allclose(upsample_map(wide, (out_h, out_w)), reference, atol=1e-12)
    with pytest.raises(ValueError, match="to_grid"):
        upsample_map(np.zeros(16), (8, 8))


def test_overlay_blends_image_and_colormap():
    from matplotlib import colormaps

    rng = np.random.default_rng(4)
    chw = rng.uniform(size=(3, 8, 8))
    heat = rng.uniform(size=(2, 2))
    only_image = overlay(heat, chw, alpha=0.0)
    np.testing.assert_allclose(
        only_image, (np.moveaxis(chw, 0, -1) - chw.min()) / (chw.max() - chw.min())
    )
    np.testing.assert_allclose(
        overlay(heat, np.moveaxis(chw, 0, -1), alpha=0.3), overlay(heat, chw, alpha=0.3)
    )
    only_map = overlay(heat, chw, alpha=1.0, mode="nearest", cmap="jet")
    expected = colormaps["jet"]((np.kron(heat, np.ones((4, 4))) - heat.min()) / np.ptp(heat))[
        ..., :3
    ]
    np.testing.assert_allclose(only_map, expected)
    grey = overlay(heat, torch.rand(1, 8, 8))
    assert grey.shape == (8, 8, 3)
    fig = plot_overlay(chw, heat, title="x")
    assert fig.axes[0].get_title() == "x" and len(fig.axes) == 2  # image + colour bar
    with pytest.raises(ValueError, match="colour channels"):
        overlay(heat, rng.uniform(size=(2, 3, 8, 8)))


# -------------------------------------------------------------------------------------------------
def test_heatmap_grid_shares_a_symmetric_scale_and_reports_prefix_tokens(reg_model):
    layout = reg_model.layout
    rng = np.random.default_rng(5)
    sweep = rng.normal(size=(3, layout.n_tokens))  # e.g. patching effect per block x token
    fig = plot_heatmap_grid(sweep, layout=layout)
    ims = _images(fig)
    assert len(ims) == 3
    limit = np.abs(sweep).max()
    assert all(im.get_clim() == pytest.approx((-limit, limit)) for im in ims)
    np.testing.assert_allclose(
        ims[2].get_array(), layout.to_grid(torch.as_tensor(sweep[2])).numpy()
    )
    assert "CLS" in fig.axes[0].get_title() and "REG0" in fig.axes[0].get_title()
    table = heatmap_grid_table(sweep, layout=layout)
    assert len(table) == 3 * layout.n_tokens
    four = rng.normal(size=(2, 3, 4, 4))
    fig = plot_heatmap_grid(four, col_labels=["a", "b", "c"], center=None)
    titles = [ax.get_title() for ax in fig.axes if ax.get_images()]
    assert titles == [f"block {r} · {c}" for r in range(2) for c in "abc"]
    assert _images(fig)[0].get_clim() == pytest.approx((four.min(), four.max()))
    fig = plot_heatmap_grid({"no_cls": np.ones((4, 4)), "self_only": -np.ones((4, 4))})
    assert [ax.get_title() for ax in fig.axes if ax.get_images()] == ["no_cls", "self_only"]
    with pytest.raises(ValueError, match="titles"):
        plot_heatmap_grid(four[0], titles=["x"])


# -------------------------------------------------------------------------------------------------
def test_attention_table_and_figure_use_the_layout_labels(reg_model):
    layout = reg_model.layout
    _, cache = reg_model.run_with_cache(torch.randn(1, 3, 32, 32))
    pattern = cache["blocks.1.attn.hook_pattern"][0]  # [head, N, N]
    table = attention_table(pattern, reg_model)
    labels = layout.token_labels()
    for h, q, k in [(0, 0, 5), (1, 3, 20), (1, 20, 0)]:
        row = table[(table["head"] == f"H{h}") & (table["query"] == q) & (table["key"] == k)].iloc[
            0
        ]
        assert row.weight == pytest.approx(float(pattern[h, q, k]))
        assert (row.query_label, row.key_label) == (labels[q], labels[k])
    fig = plot_attention(pattern, layout)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[:5] == ["CLS", "REG0", "REG1", "REG2", "REG3"] and all(
        t.startswith("P") for t in ticks[5:]
    )
    np.testing.assert_allclose(
        ax.get_images()[0].get_array(), pattern[0].detach().numpy(), rtol=1e-6
    )
    single = plot_attention(pattern, layout, heads=[1], title="one head")
    assert single.axes[0].get_title() == "one head"
    with pytest.raises(ValueError, match="layout"):
        plot_attention(pattern[:, :10, :10], layout)
    with pytest.raises(ValueError, match="one image"):
        plot_attention(
            cache["blocks.1.attn.hook_pattern"].expand(2, -1, -1, -1)[:, 0, None], layout
        )


def test_figures_never_touch_pyplot():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plot_identifiability_evolution(np.random.default_rng(0).uniform(size=(2, 4)))
    plot_heatmap_grid(np.zeros((2, 3, 3)))
    assert plt.get_fignums() == before  # no figure registered in pyplot's global state


def test_figures_display_as_png_in_ipython(monkeypatch):
    """Without pyplot, Jupyter has no PNG formatter for Figures; the library installs one (once)."""
    import IPython
    from IPython.core.formatters import DisplayFormatter

    import vit_embedding_lens.viz._figures as figures

    class Shell:
        display_formatter = DisplayFormatter()

    shell = Shell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setattr(figures, "_DISPLAY_CHECKED", False)
    fig = plot_heatmap_grid(np.zeros((1, 2, 2)))
    data, _ = shell.display_formatter.format(fig)
    assert data["image/png"].startswith(PNG_MAGIC)
    # a formatter that is already there (e.g. the inline backend's) is kept
    mine = lambda f: b"mine"  # noqa: E731
    shell.display_formatter = DisplayFormatter()
    shell.display_formatter.formatters["image/png"].for_type(Figure, mine)
    monkeypatch.setattr(figures, "_DISPLAY_CHECKED", False)
    plot_heatmap_grid(np.zeros((1, 2, 2)))
    assert shell.display_formatter.formatters["image/png"].lookup_by_type(Figure) is mine
