"""What a newcomer reads in the report: descriptions, captions, flagged findings, run details
(versions, commit, command line, skipped images, failures), and one colour per sublayer with
legends off the data. Fast: no run, synthetic tables."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib.metadata import version

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer

from vit_embedding_lens.report import write_report
from vit_embedding_lens.runner import available_analyses, build_analyses
from vit_embedding_lens.runner.analyses.attribution import AttributionBenchmark
from vit_embedding_lens.runner.analysis import Analysis
from vit_embedding_lens.runner.manifest import (
    command_line,
    git_commit,
    recorded_command_line,
    run_environment,
)
from vit_embedding_lens.viz import plot_change_rates, plot_identifiability_evolution
from vit_embedding_lens.viz.kv_agreement import plot_kv_agreement
from vit_embedding_lens.viz.palette import (
    SUBLAYER_COLORS,
    TOKEN_GROUP_COLORS,
    sublayer_color,
    token_group_color,
)


def test_every_builtin_analysis_says_what_it_shows():
    for analysis in build_analyses(available_analyses()):
        sentences = [s for s in re.split(r"(?<=[.?!])\s+", analysis.description) if s]
        assert 2 <= len(sentences) <= 5, (analysis.name, analysis.description)


def _summary(class_space_negative: float, random_negative: float, nan_chefer: bool = False):
    rows = [
        ("class_space", "negative", class_space_negative),
        ("class_space", "positive", 0.4),
        ("random", "negative", random_negative),
        ("random", "positive", 0.6),
        ("chefer", "negative", float("nan") if nan_chefer else 0.9),
    ]
    return pd.DataFrame(rows, columns=["method", "order", "auc"])


def test_attribution_flags_the_known_finding_and_nan_aucs_only_when_the_tables_show_them():
    bench = AttributionBenchmark()
    losing = bench.notes({"summary": _summary(0.5, 0.66)})
    assert len(losing) == 1 and "known finding" in losing[0] and "0.500" in losing[0]
    assert "reference code" in losing[0] and "0.660" in losing[0]
    assert bench.notes({"summary": _summary(0.8, 0.66)}) == []
    nan = bench.notes({"summary": _summary(0.8, 0.66, nan_chefer=True)})
    assert len(nan) == 1 and "chefer (negative)" in nan[0] and "accuracy is 0" in nan[0]


class _Captioned(Analysis):
    name = "toy"
    description = "Shows a toy curve. Read it upwards."

    def run(self, model, batch):  # pragma: no cover - the report never runs it
        return {}

    def summarize(self, results, model):  # pragma: no cover
        return {}

    def figure_captions(self, tables, n_images):
        return {"curve": f"One line per thing; n = {n_images} images."}

    def notes(self, tables):
        return ["A flagged finding."]


class _Broken(_Captioned):
    name = "broken"

    def figure_captions(self, tables, n_images):
        raise KeyError("no such table")


def _figure():
    from vit_embedding_lens.viz._figures import new_figure

    fig = new_figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [0, 1])
    return fig


def test_report_shows_descriptions_captions_notes_and_run_details(tmp_path):
    tables = {
        "toy": {"t": pd.DataFrame({"a": [1]})},
        "broken": {"auc": pd.DataFrame({"method": ["x"], "auc": [float("nan")]})},
    }
    figures = {"toy": {"curve": _figure()}, "broken": {"curve": _figure()}}
    manifest = {
        "config": {"n_images": 7},
        "environment": {
            "versions": {"torch": "9.9", "timm": None},
            "git_commit": None,
            "command_line": "vit-lens demo --n 7",
        },
        "skipped": [{"index": 3, "image_id": "bad.png", "reason": "cannot identify image file"}],
        "n_skipped": 1,
        "failures": [{"analysis": "toy", "kind": "figure", "name": "f2", "error": "ValueError: x"}],
    }
    page = write_report(
        tmp_path, tables, figures, {"title": "t"}, manifest, analyses=[_Captioned(), _Broken()]
    ).read_text()
    assert "Shows a toy curve. Read it upwards." in page
    assert "One line per thing; n = 7 images." in page  # n from the manifest's config
    assert '<p class="finding">A flagged finding.</p>' in page
    # a caption that raises costs its captions only, and is listed under "What failed"
    assert "broken captions: KeyError" in page and "toy figure f2: ValueError: x" in page
    assert "NaN in an AUC column" in page  # next to the broken table with a NaN AUC
    details = page[page.index('id="run-details"') :]
    assert "vit-lens demo --n 7" in details and "9.9" in details
    assert "not installed" in details and "not a git checkout" in details
    assert "bad.png" in details and "cannot identify image file" in details


def test_run_environment_records_versions_and_the_command_line():
    env = run_environment()
    assert env["versions"]["torch"] == version("torch")
    assert env["versions"]["numpy"] == version("numpy")
    assert env["versions"]["transformer-lens"] == version("transformer-lens")
    assert set(env["versions"]) >= {"vit-embedding-lens", "timm"}
    with recorded_command_line("vit-lens demo --n 3"):
        assert run_environment()["command_line"] == "vit-lens demo --n 3"
    assert command_line() != "vit-lens demo --n 3"  # the interpreter's again outside the block


def test_git_commit_names_the_checkout_or_none(tmp_path):
    assert git_commit(tmp_path) is None  # not a checkout
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    run = dict(cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q"], **run)
    (tmp_path / "f").write_text("1")
    subprocess.run(["git", "add", "f"], **run)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"], **run
    )
    head = subprocess.run(["git", "rev-parse", "HEAD"], text=True, **run).stdout.strip()
    assert git_commit(tmp_path) == head
    (tmp_path / "f").write_text("2")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_sublayers_and_token_groups_have_one_colour_each_everywhere():
    assert not set(SUBLAYER_COLORS.values()) & set(TOKEN_GROUP_COLORS.values())
    assert sublayer_color("attn_out") == sublayer_color("attention") == SUBLAYER_COLORS["attn"]
    assert token_group_color("CLS") == token_group_color("cls")
    rows = [
        dict(block=b, sublayer=s, group="image", value=v)
        for b in range(3)
        for s, v in (("attn", 0.6), ("mlp", 0.4))
    ]
    changes = plot_change_rates(pd.DataFrame(rows), value_col="value")
    bars = {
        c.get_label(): to_hex(c.patches[0].get_facecolor())
        for c in changes.axes[0].containers
        if isinstance(c, BarContainer)
    }
    kv = plot_kv_agreement(pd.DataFrame(rows), value_col="value", group_col="sublayer")
    lines = {ln.get_label(): to_hex(ln.get_color()) for ln in kv.axes[0].get_lines()}
    for sub in ("attn", "mlp"):
        assert bars[sub] == lines[sub] == SUBLAYER_COLORS[sub]


def _overlap(fig, legend_owner) -> bool:
    """Whether the legend overlaps an axes (or it or a title is cut off at the figure's edge)."""
    fig.draw_without_rendering()  # runs the layout engine, as saving does
    legend = legend_owner.get_legend().get_window_extent()
    texts = [legend] + [ax.title.get_window_extent() for ax in fig.axes if ax.get_title()]
    if any(t.x0 < -1 or t.x1 > fig.bbox.x1 + 1 for t in texts):
        return True
    return any(legend.overlaps(ax.get_window_extent()) for ax in fig.axes if ax.get_visible())


def test_legends_cover_no_data():
    rng = np.random.default_rng(0)
    data = {g: rng.uniform(0, 1, size=(4, 20)) for g in ("cls", "image")}
    fig = plot_identifiability_evolution(data, {g: v * 0.5 for g, v in data.items()})
    assert not _overlap(fig, fig.axes[0])
    rows = [
        dict(block=b, sublayer=s, group="image", value=v)
        for b in range(3)
        for s, v in (("attn", 0.6), ("mlp", 0.4))
    ]
    changes = plot_change_rates(pd.DataFrame(rows), value_col="value")
    assert not _overlap(changes, changes.axes[-1])
    kv = plot_kv_agreement(
        pd.DataFrame(rows), value_col="value", title="key-value agreement, image tokens (dashed)"
    )
    assert not _overlap(kv, kv.axes[0])


def test_the_outside_legend_stays_inside_the_figure():
    """The legend right of the axes is laid out inside the figure, not cut off when saved."""
    rng = np.random.default_rng(0)
    fig = plot_identifiability_evolution({"image": rng.uniform(0, 1, size=(3, 10))})
    fig.draw_without_rendering()  # runs the layout engine, as saving does
    legend = fig.axes[0].get_legend().get_window_extent()
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.x1 + 1
