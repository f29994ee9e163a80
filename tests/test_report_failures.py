"""A finished run never loses its report (issue 17, 1): a failing table or figure is skipped and
named, the rest is written; all-NaN p-values draw without stars."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from vit_embedding_lens import HookedViT
from vit_embedding_lens.cli import main
from vit_embedding_lens.data import bundled_eval_dataset
from vit_embedding_lens.loading.twin import random_init_twin
from vit_embedding_lens.runner import (
    ANALYSES,
    Analysis,
    build_analyses,
    register_analysis,
    run_analyses,
    summarize_run,
)
from vit_embedding_lens.runner.manifest import read_manifest
from vit_embedding_lens.viz import plot_identifiability_evolution

pytestmark = pytest.mark.usefixtures("one_thread")


def test_all_nan_pvalues_draw_without_stars_and_say_so():
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(
        {
            "block": np.repeat([0, 1, 2], 20),
            "group": "image",
            "score": rng.uniform(size=60),
        }
    )
    pvalues = pd.DataFrame({"block": [0, 1, 2], "group": "image", "p_value": np.nan})
    fig = plot_identifiability_evolution(scores, scores, pvalues)
    assert isinstance(fig, Figure)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert not any("*" in t for t in texts)
    assert any("no significance stars" in t and "NaN" in t for t in texts)


def test_a_model_equal_to_its_random_twin_still_gets_its_figures(tmp_path):
    """The issue's case: a checkpoint equal to the seed-0 random-init twin makes every Wilcoxon
    p-value NaN; the identifiability figure is drawn anyway."""
    model = random_init_twin(HookedViT.from_bundled(), seed=0)
    dataset = bundled_eval_dataset(model, n=6, name="mnist-vit")
    analyses = build_analyses(["lens"])
    results = run_analyses(model, dataset, analyses, tmp_path, batch_size=6, progress=False)
    tables, figures = summarize_run(results, analyses, model)
    assert tables["lens"]["trained_vs_random"]["p_value"].isna().all()
    assert isinstance(figures["lens"]["identifiability"], Figure)


class BrokenFigures(Analysis):
    name = "broken_figures"

    def run(self, model, batch):
        return {"x": np.arange(len(batch), dtype=np.float32)}

    def summarize(self, results, model):
        return {"values": pd.DataFrame({"x": results["x"]})}

    def figures(self, tables, model):
        raise ValueError("pvalues: no finite values to plot")


class BrokenTables(BrokenFigures):
    name = "broken_tables"

    def summarize(self, results, model):
        raise RuntimeError("a bug in summarize")


@pytest.fixture
def broken():
    register_analysis("broken_figures", BrokenFigures)
    register_analysis("broken_tables", BrokenTables)
    yield
    ANALYSES.pop("broken_figures", None)
    ANALYSES.pop("broken_tables", None)


def test_a_failing_table_or_figure_is_skipped_and_named(broken, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n", "6", "--batch-size", "6", "--no-progress"]
    code = main(args + ["--analyses", "accuracy,broken_figures,broken_tables"])
    err = capsys.readouterr().err
    assert code == 1  # an internal failure, not a user error (2), and the report is written
    report = out / "report"
    assert (report / "tables" / "accuracy__summary.csv").is_file()
    assert (report / "tables" / "broken_figures__values.csv").is_file()
    assert any((report / "figures").glob("accuracy__*.png"))
    failures = read_manifest(out)["report"]["failures"]
    by_analysis = {f["analysis"]: f for f in failures}
    assert set(by_analysis) == {"broken_figures", "broken_tables"}
    assert by_analysis["broken_figures"]["part"] == "figures"
    assert "no finite values" in by_analysis["broken_figures"]["error"]
    assert by_analysis["broken_tables"]["part"] == "tables"
    assert "RuntimeError: a bug in summarize" in by_analysis["broken_tables"]["error"]
    assert "Traceback" in by_analysis["broken_tables"]["traceback"]
    page = (report / "index.html").read_text()
    assert "broken_tables" in page and "a bug in summarize" in page
    assert "broken_figures" in err and "broken_tables" in err
    json.dumps(read_manifest(out))  # plain JSON
