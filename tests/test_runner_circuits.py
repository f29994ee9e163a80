"""The ``circuits`` analysis through ``vit-lens demo`` on the bundled model: the report (tables,
figures, the interactive graph offline), resuming, batch-size independence, and the errors of its
options."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from vit_embedding_lens import HookedViT
from vit_embedding_lens import circuits as circuits_api
from vit_embedding_lens.cli import main
from vit_embedding_lens.data import bundled_eval_dataset
from vit_embedding_lens.runner import run_analyses, summarize_run
from vit_embedding_lens.runner.analyses.circuits import CircuitsAnalysis
from vit_embedding_lens.runner.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")
#: 60 balanced eval digits: 6 of each class
N_IMAGES = 60
COMMON = ["--n", str(N_IMAGES), "--no-progress", "--analyses", "circuits"]
OPTIONS = ["--circuit-classes", "3,8", "--circuit-images", "6", "--circuit-method", "eap"]


def _tables(out):
    folder = out / "report" / "tables"
    return {p.stem.split("__")[1]: pd.read_csv(p) for p in folder.glob("circuits__*.csv")}


def test_demo_finds_a_circuit_reports_it_offline_and_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["demo", "--out", str(out), "--batch-size", "16", *COMMON, *OPTIONS]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "== circuits ==" in printed and "3 vs 8" in printed
    tables = _tables(out)
    assert set(tables) == {"summary", "faithfulness", "circuit", "edge_scores"}
    summary = tables["summary"].iloc[0]
    circuit, scores, curve = tables["circuit"], tables["edge_scores"], tables["faithfulness"]
    assert summary["n_edges"] == len(circuit) and summary["of_edges"] == len(scores)
    assert summary["n_images"] == 6  # the images of class 3
    # the 6 scored images are the run's 6 images of class 3: the per-image runs, averaged, give
    # the faithfulness that discovery measured on the batch of all 6 at once
    assert summary["faithfulness"] == pytest.approx(summary["faithfulness_discovery"], abs=1e-4)
    assert summary["faithfulness"] >= 0.8 - 1e-4
    top = curve[curve["kind"] == "top"].set_index("n_edges")["faithfulness"]
    assert top[0] == pytest.approx(0.0, abs=1e-6) and top[len(scores)] == pytest.approx(1.0)
    assert set(curve.loc[curve["kind"] == "random", "seed"]) == {0, 1, 2}
    assert len(circuit) in set(curve.loc[curve["kind"] == "random", "n_edges"])
    # the circuit's edges are the strongest ones (pruning only drops dangling edges)
    key = ["sender", "receiver", "group"]
    kept = circuit.merge(scores, on=key, suffixes=("", "_all"))
    assert len(kept) == len(circuit)
    assert kept["abs_score"].min() >= scores["abs_score"].nlargest(len(circuit) + 50).min()

    page = (out / "report" / "index.html").read_text()
    assert (out / "report" / "figures" / "circuits__circuit.png").is_file()
    assert (out / "report" / "figures" / "circuits__faithfulness.png").is_file()
    assert '<div class="view">' in page and "Plotly" in page
    external = re.findall(r'<(?:script|link|iframe)[^>]+(?:src|href)="(?:https?:)?//', page)
    assert external == []
    assert (out / "circuits" / "edge_scores.csv").is_file()

    # resumed: nothing left to compute (neither the edge scores nor the circuit), the same tables
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "circuits").iterdir()}

    def recomputed(*args, **kwargs):
        raise AssertionError("a resumed run scored the edges again")

    monkeypatch.setattr(circuits_api, "edge_attribution", recomputed)
    monkeypatch.setattr(circuits_api, "discover_circuit", recomputed)
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "circuits").iterdir()} == saved
    assert read_manifest(out)["attempts"][-1]["pending_batches"] == 0
    again = _tables(out)
    pd.testing.assert_frame_equal(again["faithfulness"], curve)
    # other options: refused over the old results, before any scoring, the saved circuit kept
    capsys.readouterr()
    assert main([*args, "--circuit-target", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "target: 0.8 there, 0.5 now" in err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "circuits").iterdir()} == saved
    # --overwrite scores anew for the new options
    monkeypatch.undo()
    assert main([*args, "--circuit-target", "0.5", "--overwrite"]) == 0
    assert _tables(out)["summary"].iloc[0]["n_edges"] <= summary["n_edges"]


def test_the_faithfulness_is_the_same_for_any_batch_size(tmp_path):
    model = HookedViT.from_bundled()
    dataset = bundled_eval_dataset(model, n=N_IMAGES)
    curves = []
    for batch_size in (7, 32):
        analysis = CircuitsAnalysis(
            classes=(3, "rest"), corruption="noise", method="eap", images=4, n_random=1
        )
        analysis.prepare(model, dataset, tmp_path / str(batch_size))
        results = run_analyses(
            model,
            dataset,
            [analysis],
            tmp_path / str(batch_size),
            batch_size=batch_size,
            progress=False,
        )
        tables, _ = summarize_run(results, [analysis], model, figures=False)
        curves.append(tables["circuits"]["faithfulness"])
        assert tables["circuits"]["summary"]["classes"].iloc[0] == "3 vs rest"
    pd.testing.assert_frame_equal(curves[0], curves[1], rtol=1e-5)


def test_run_without_prepare_and_bad_options_say_what_to_do():
    model = HookedViT.from_bundled()
    with pytest.raises(RuntimeError, match="prepare"):
        CircuitsAnalysis().run(model, None)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        CircuitsAnalysis(target=1.5)
    with pytest.raises(ValueError, match="two different classes"):
        CircuitsAnalysis(classes="3,3")
    with pytest.raises(ValueError, match="put it second"):
        CircuitsAnalysis(classes="rest,3")
    with pytest.raises(ValueError, match="unknown corruption"):
        CircuitsAnalysis(corruption="fog")
    with pytest.raises(ValueError, match="out of range"):
        CircuitsAnalysis(classes="3,12").class_ids(model)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--circuit-target", "1.5"], "--circuit-target 1.5 is not a share"),
        (["--circuit-target", "0"], "(0, 1]"),
        (["--circuit-classes", "3,3"], "needs two classes"),
        (["--circuit-classes", "3"], "give two classes"),
        (["--circuit-classes", "3,cat"], "unknown class name 'cat'"),
    ],
)
def test_circuit_flags_are_checked_before_any_work(tmp_path, capsys, flags, message):
    args = ["demo", "--out", str(tmp_path / "x"), *COMMON, *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_circuit_flags_need_the_circuits_analysis(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "x"), "--analyses", "accuracy"]
    assert main([*args, "--circuit-classes", "3,8"]) == 2
    assert "--analyses circuits" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([*args, "--circuit-method", "acdc"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--analyses", "circuits", "--circuit-images", "0"])
    assert "--circuit-images: expected a positive integer, got 0" in capsys.readouterr().err


def test_a_class_the_data_lack_is_named(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "x"), "--n", "5", "--no-progress"]
    assert main([*args, "--analyses", "circuits", "--circuit-classes", "7,8"]) == 2
    assert "no image of class 7" in capsys.readouterr().err
