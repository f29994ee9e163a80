"""The runner's analysis protocol: what an analysis declares reaches it, a minimal subclass runs on
the defaults, the batch carries no state set by the runner; cls_identifiability against the lens;
names that moved still import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.data import bundled_eval_dataset
from vit_embedding_lens.lens import lens_batch, per_image_identifiability
from vit_embedding_lens.report import headline_tables
from vit_embedding_lens.runner import Analysis, Batch, run_analyses, summarize_run
from vit_embedding_lens.runner.analyses import ClsIdentifiability, LensAnalysis
from vit_embedding_lens.runner.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")
N, BATCH = 24, 8


@pytest.fixture(scope="module")
def model():
    return HookedViT.from_bundled()


@pytest.fixture(scope="module")
def dataset(model):
    return bundled_eval_dataset(model, n=N)  # balanced over the classes, with stroke masks


class Minimal(Analysis):
    """Only what an analysis must give: the rest comes from the defaults."""

    name = "minimal"

    def run(self, model, batch):
        return {"n_pixels": np.full(len(batch), batch.images[0].numel())}

    def summarize(self, results, model):
        import pandas as pd

        return {"summary": pd.DataFrame({"n_images": [len(results["n_pixels"])]})}


class Counter:
    """A forward reader: counts the images that pass block 0 during the shared forward."""

    def __init__(self):
        self.seen = 0

    def hooks(self):
        return [("blocks.0.hook_resid_post", self.count)]

    def count(self, resid, hook):
        self.seen += resid.shape[0]


class Declaring(Analysis):
    """Declares activations, a forward reader and a config; records what it receives."""

    name = "declaring"

    def __init__(self):
        self.batches, self.readers = [], []

    def config(self):
        return {"setting": 3}

    def hook_names(self, model):
        return ["blocks.1.hook_attn_out"]

    def forward_reader(self, model, batch):
        reader = Counter()
        self.readers.append(reader)
        return reader

    def run(self, model, batch):
        self.batches.append(batch)
        logits, cache = batch.shared_forward(model)
        reader = batch.reader(model, self.name)
        assert reader is self.readers[-1] and reader.seen == len(batch)
        assert "blocks.1.hook_attn_out" in cache.cache_dict
        return {"norm": cache["blocks.1.hook_attn_out"].norm(dim=(-1, -2)).cpu().numpy()}

    def summarize(self, results, model):
        return {}


def test_a_minimal_subclass_runs_on_the_defaults(model, dataset, tmp_path):
    analysis = Minimal()
    assert analysis.config() == {} and analysis.hook_names(model) == ()
    assert analysis.forward_reader(model, None) is None and analysis.headline({}) is None
    results = run_analyses(model, dataset, [analysis], tmp_path, batch_size=BATCH, progress=False)
    assert (results["minimal"]["n_pixels"] == 28 * 28).all() and len(results) == N
    assert read_manifest(tmp_path)["config"]["analyses"] == {"minimal": {}}
    tables, figures = summarize_run(results, [analysis], model)
    assert figures == {"minimal": {}}
    assert headline_tables(tables, [analysis])["minimal"] is tables["minimal"]["summary"]


def test_declared_hooks_and_readers_reach_the_analysis_in_one_forward(model, dataset, tmp_path):
    declaring = Declaring()
    calls = []
    handle = model.embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        results = run_analyses(
            model,
            dataset,
            [declaring, ClsIdentifiability()],
            tmp_path,
            batch_size=BATCH,
            progress=False,
        )
    finally:
        handle.remove()
    assert len(calls) == N // BATCH  # both analyses, their hooks and the reader: one forward each
    resid = [f"blocks.{b}.hook_resid_post" for b in range(model.cfg.n_layers)]
    assert declaring.batches[0].forward.hook_names == ("blocks.1.hook_attn_out", *resid)
    assert [r.seen for r in declaring.readers] == [BATCH] * (N // BATCH)
    assert read_manifest(tmp_path)["config"]["analyses"]["declaring"] == {"setting": 3}
    with torch.no_grad():
        _, cache = model.run_with_cache(dataset.images, names_filter=["blocks.1.hook_attn_out"])
    expected = cache["blocks.1.hook_attn_out"].norm(dim=(-1, -2)).numpy()
    np.testing.assert_allclose(results["declaring"]["norm"], expected, rtol=1e-5)


def test_the_runner_sets_no_attributes_on_the_batch(model, dataset, tmp_path):
    declaring = Declaring()
    run_analyses(model, dataset, [declaring], tmp_path, batch_size=BATCH, progress=False)
    fields = {f.name for f in dataclasses.fields(Batch)}
    for batch in declaring.batches:
        assert set(vars(batch)) == fields  # nothing beyond the declared fields
        with pytest.raises(dataclasses.FrozenInstanceError):
            batch.hook_names = ("blocks.0.hook_resid_post",)
    assert declaring.batches[0].forward.hook_names == ("blocks.1.hook_attn_out",)


def test_objects_that_are_not_analyses_are_refused(model, dataset, tmp_path):
    class Duck:
        name = "duck"

        def run(self, model, batch):
            return {}

    with pytest.raises(TypeError, match=r"lacks \['config', 'hook_names', 'forward_reader'"):
        run_analyses(model, dataset, [Duck()], tmp_path, progress=False)
    with pytest.raises(TypeError, match="abstract"):
        type("NoRun", (Analysis,), {"name": "no_run"})()


def test_the_lens_reads_a_hand_built_batch_as_the_runner_does(model, dataset, tmp_path):
    lens = LensAnalysis(random_twin=False)
    results = run_analyses(model, dataset, [lens], tmp_path, batch_size=BATCH, progress=False)
    batch = Batch(
        dataset.images[:BATCH], dataset.label_tensor[:BATCH], ["x"] * BATCH, torch.arange(8)
    )
    alone = LensAnalysis(random_twin=False).run(model, batch)  # no forward_reader call first
    for key, value in alone.items():
        assert np.array_equal(value, results["lens"][key][:BATCH]), key


def test_cls_identifiability_is_the_lens_identifiability(model, dataset, tmp_path):
    analysis = ClsIdentifiability()
    results = run_analyses(model, dataset, [analysis], tmp_path, batch_size=BATCH, progress=False)
    arrays = results["cls_identifiability"]
    lens = lens_batch(model, dataset.images, dataset.label_tensor, dataset.token_masks)
    assert np.array_equal(arrays["token_rank"], lens.rank["resid"].numpy())
    tables = analysis.summarize(arrays, model)
    by_block = tables["by_block"].set_index(["tokens", "block"])
    for group in ("image", "class", "context"):
        frac = per_image_identifiability(lens, "resid", group, "identifiable").numpy()
        score = per_image_identifiability(lens, "resid", group, "score").numpy()
        for block in range(model.cfg.n_layers):
            row = by_block.loc[(group, block)]
            assert row["pct_identifiable"] == pytest.approx(
                100 * np.nanmean(frac[:, block]), abs=1e-12
            )
            assert row["mean_score"] == pytest.approx(np.nanmean(score[:, block]), abs=1e-12)
        per_image = tables["per_image"][f"pct_{group}_identifiable"].to_numpy()
        np.testing.assert_array_equal(per_image, 100 * frac.reshape(-1))
    cls = model.layout.cls_index
    cls_rows = by_block.loc["CLS"]["pct_identifiable"].to_numpy()
    expected = 100 * (lens.rank["resid"][:, :, cls] == 0).double().mean(0).numpy()
    np.testing.assert_allclose(cls_rows, expected, atol=1e-12)


def test_moved_names_still_import():
    import vit_embedding_lens.attribution as attribution
    import vit_embedding_lens.attribution.figures as old_figures
    import vit_embedding_lens.data as data
    import vit_embedding_lens.data.images as images
    import vit_embedding_lens.viz as viz
    from vit_embedding_lens.data import samples
    from vit_embedding_lens.viz import attribution as figures
    from vit_embedding_lens.zoo.eval_dataset import bundled_eval_dataset

    for name in ("plot_attribution_maps", "plot_perturbation_curves", "plot_probe_comparison"):
        home = getattr(figures, name)
        assert getattr(attribution, name) is home and getattr(old_figures, name) is home
        assert (
            getattr(viz, name) is home and home.__module__ == "vit_embedding_lens.viz.attribution"
        )
    assert data.bundled_eval_dataset is images.bundled_eval_dataset is bundled_eval_dataset
    for name in ("Sample", "SkippedImage", "InMemoryDataset"):
        assert getattr(images, name) is getattr(data, name) is getattr(samples, name)


@pytest.mark.parametrize(
    "first", ["vit_embedding_lens.viz", "vit_embedding_lens.zoo", "vit_embedding_lens.data"]
)
def test_every_package_imports_first(first):
    """The compatibility re-exports must not make the import order matter."""
    code = (
        f"import {first}\n"
        "from vit_embedding_lens.attribution import plot_attribution_maps\n"
        "from vit_embedding_lens.data import bundled_eval_dataset\n"
        "from vit_embedding_lens.viz import plot_perturbation_curves\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
