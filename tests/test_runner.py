"""The runner on the bundled trained model: results against slow references, resume, refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit_embedding_lens import HookedViT
from vit_embedding_lens.data.images import InMemoryDataset
from vit_embedding_lens.runner import (
    ANALYSES,
    ConfigMismatchError,
    IncompleteRunError,
    build_analyses,
    load_results,
    register_analysis,
    run_analyses,
    summarize_run,
)
from vit_embedding_lens.runner.analyses import Accuracy
from vit_embedding_lens.runner.manifest import read_manifest
from vit_embedding_lens.runner.storage import batch_path
from vit_embedding_lens.zoo import load_mnist_eval

PER_CLASS = 12


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return HookedViT.from_bundled()


@pytest.fixture(scope="module")
def dataset(model):
    """12 eval digits per class, with their stroke masks as token masks (the set is sorted by
    class)."""
    data = load_mnist_eval()
    pick = [50 * c + k for c in range(10) for k in range(PER_CLASS)]
    masks = data.class_token_mask(model.layout)[pick]
    ids = [f"digit{i:03d}" for i in pick]
    return InMemoryDataset(
        data.images[pick], data.labels[pick], ids, masks, source={"layout": "test"}
    )


def run(model, dataset, out, analyses=("accuracy", "cls_identifiability"), **kw):
    kw.setdefault("batch_size", 16)
    return run_analyses(model, dataset, list(analyses), out, progress=False, **kw)


def assert_same_results(a, b):
    assert np.array_equal(a.index, b.index) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.image_ids, b.image_ids)
    assert a.analyses == b.analyses
    for name in a.analyses:
        assert a.arrays[name].keys() == b.arrays[name].keys()
        for key in a.arrays[name]:
            x, y = a.arrays[name][key], b.arrays[name][key]
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), f"{name}/{key} differs"  # bitwise


def reference_rank(logits, c):
    """Rank of class c by sorting: how many classes lie strictly above it in ascending order."""
    ascending = logits.sort(-1).values
    return (
        logits.shape[-1]
        - torch.searchsorted(ascending, logits[..., c : c + 1].contiguous(), right=True)[..., 0]
    )


def test_results_match_slow_references(model, dataset, tmp_path):
    results = run(model, dataset, tmp_path / "run")
    n = len(dataset)
    assert (
        np.array_equal(results.index, np.arange(n)) and list(results.image_ids) == dataset.image_ids
    )
    with torch.no_grad():
        logits = model(dataset.images)
    acc = results["accuracy"]
    assert np.array_equal(acc["pred"], logits.argmax(-1).numpy())
    assert np.allclose(acc["confidence"], logits.softmax(-1).max(-1).values.numpy(), atol=1e-6)
    ident = results["cls_identifiability"]
    rank = ident["token_rank"]
    layout = model.layout
    assert rank.shape == (n, model.cfg.n_layers, layout.n_tokens)
    assert np.array_equal(ident["class_token"], dataset.token_masks.numpy())
    # every token, every block, for a few images: explicit layer norm + head, rank by sorting
    check = [0, 37, 64, n - 1]
    with torch.no_grad():
        _, cache = model.run_with_cache(dataset.images[check])
    for row, i in enumerate(check):
        c = int(dataset.label_tensor[i])
        for layer in range(model.cfg.n_layers):
            resid = cache[f"blocks.{layer}.hook_resid_post"][row]
            normed = F.layer_norm(
                resid, (model.cfg.d_model,), model.ln_final.w, model.ln_final.b, model.ln_final.eps
            )
            projected = normed @ model.head.W_head + model.head.b_head
            assert np.array_equal(rank[i, layer], reference_rank(projected, c).numpy()), (i, layer)
    # the last block's CLS projection is the model's readout: identifiable <=> correct top-1
    final_cls = rank[:, -1, layout.cls_index]
    assert np.array_equal(final_cls == 0, acc["pred"] == acc["label"])
    assert np.array_equal(final_cls, acc["correct_rank"])


def test_tables_show_the_trained_models_directions(model, dataset, tmp_path):
    results = run(model, dataset, tmp_path / "run")
    analyses = build_analyses(["accuracy", "cls_identifiability"])
    tables, figures = summarize_run(results, analyses, model)
    summary = tables["accuracy"]["summary"]
    assert summary["n_images"].item() == len(dataset) and summary["top1"].item() > 0.9
    per_class = tables["accuracy"]["per_class"]
    assert (
        list(per_class["class"]) == list(range(10)) and (per_class["n_images"] == PER_CLASS).all()
    )
    by_block = tables["cls_identifiability"]["by_block"].set_index(["tokens", "block"])
    last = model.cfg.n_layers - 1
    cls = by_block.loc["CLS", "pct_identifiable"]
    assert cls[last] > cls[0] + 30  # the CLS token becomes identifiable through the blocks
    assert cls[last] == pytest.approx(100 * summary["top1"].item())
    assert (
        by_block.loc[("class", last), "pct_identifiable"]
        > by_block.loc[("context", last), "pct_identifiable"]
    )
    image = by_block.loc["image", "pct_identifiable"]
    assert image[last] > image[0]
    per_image = tables["cls_identifiability"]["per_image"]
    assert len(per_image) == len(dataset) * model.cfg.n_layers
    assert set(figures["cls_identifiability"]) == {
        "identifiability_by_block",
        "identifiability_per_image",
    }
    headline = analyses[1].headline(tables["cls_identifiability"])
    assert list(headline.columns) == ["block", "% CLS", "% image", "% class", "% context"]


def test_analyses_share_one_forward_per_batch(model, dataset, tmp_path):
    calls = []
    handle = model.embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        run(model, dataset, tmp_path / "run", batch_size=40)
    finally:
        handle.remove()
    assert len(calls) == 3  # 120 images, 3 batches, both analyses on one forward each


class CrashingAccuracy(Accuracy):
    """``accuracy`` that dies on its n-th batch, as a killed process would."""

    def __init__(self, crash_on=None):
        super().__init__()
        self.crash_on, self.calls = crash_on, 0

    def run(self, model, batch):
        self.calls += 1
        if self.calls == self.crash_on:
            raise RuntimeError("simulated crash")
        return super().run(model, batch)


def test_resume_after_a_crash_is_bitwise_identical(model, dataset, tmp_path):
    full = run(model, dataset, tmp_path / "full")
    crashing = CrashingAccuracy(crash_on=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(model, dataset, tmp_path / "resumed", analyses=[crashing, "cls_identifiability"])
    manifest = read_manifest(tmp_path / "resumed")
    assert manifest["status"] == "running" and manifest["finished_batches"] == [0, 1, 2]
    again = CrashingAccuracy()
    resumed = run(model, dataset, tmp_path / "resumed", analyses=[again, "cls_identifiability"])
    assert again.calls == 8 - 3  # only the unfinished batches
    assert_same_results(resumed, full)
    assert_same_results(load_results(tmp_path / "resumed"), full)
    assert read_manifest(tmp_path / "resumed")["status"] == "complete"
    # a finished run reruns as a no-op
    idle = CrashingAccuracy()
    assert_same_results(
        run(model, dataset, tmp_path / "resumed", analyses=[idle, "cls_identifiability"]), full
    )
    assert idle.calls == 0


def test_another_configuration_is_refused(model, dataset, tmp_path):
    out = tmp_path / "run"
    run(model, dataset, out, analyses=["accuracy"])
    with pytest.raises(ConfigMismatchError, match=r"batch_size: 16 -> 32[\s\S]*--overwrite"):
        run(model, dataset, out, analyses=["accuracy"], batch_size=32)
    with pytest.raises(ConfigMismatchError, match="analyses"):
        run(model, dataset, out, analyses=["accuracy", "cls_identifiability"])
    with pytest.raises(ConfigMismatchError, match="analyses.accuracy.top_k: 5 -> 3"):
        run(model, dataset, out, analyses=[Accuracy(top_k=3)])
    other = HookedViT.from_bundled()
    with torch.no_grad():
        other.head.b_head[0] += 1.0
    with pytest.raises(ConfigMismatchError, match="weights_sha256"):
        run(other, dataset, out, analyses=["accuracy"])
    with pytest.raises(ValueError, match="already holds a run"):
        run(model, dataset, out, analyses=["accuracy"], resume=False)
    (out / "notes.txt").write_text("the user's own file")
    results = run(model, dataset, out, analyses=["accuracy"], batch_size=32, overwrite=True)
    assert len(results) == len(dataset) and (out / "notes.txt").exists()


def test_load_results_refuses_missing_or_duplicated_batches(model, dataset, tmp_path):
    out = tmp_path / "run"
    run(model, dataset, out, analyses=["accuracy"])
    saved = batch_path(out, 3).read_bytes()
    batch_path(out, 3).unlink()
    with pytest.raises(
        IncompleteRunError, match=r"1 of 8 batches are not finished \(first: \[3\]\)"
    ):
        load_results(out)
    shutil.copy(batch_path(out, 2), batch_path(out, 3))  # batch 2's items twice, batch 3's never
    with pytest.raises(IncompleteRunError, match="covers items"):
        load_results(out)
    batch_path(out, 3).write_bytes(saved)
    assert len(load_results(out)) == len(dataset)


def test_interrupted_writes_leave_no_trace(model, dataset, tmp_path):
    out = tmp_path / "run"
    crashing = CrashingAccuracy(crash_on=2)
    with pytest.raises(RuntimeError):
        run(model, dataset, out, analyses=[crashing])
    stale = out / "batches" / ".batch_000001.npz.999.abcd.tmp"
    stale.write_bytes(b"half a file")
    results = run(model, dataset, out, analyses=[CrashingAccuracy()])
    assert not stale.exists() and len(results) == len(dataset)
    assert not list(out.rglob("*.tmp"))


def test_unusable_images_are_skipped_counted_and_reported(model, tmp_path):
    from PIL import Image

    from vit_embedding_lens.data.images import image_folder_dataset
    from vit_embedding_lens.data.transforms import resolve_preprocessing
    from vit_embedding_lens.runner import UnusableImageWarning

    data = load_mnist_eval()
    for c in range(3):
        (tmp_path / "data" / str(c)).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(data.raw[50 * c + k]).save(tmp_path / "data" / str(c) / f"{k}.png")
    (tmp_path / "data" / "1" / "1.png").write_bytes(b"broken")
    ds = image_folder_dataset(tmp_path / "data", model, resolve_preprocessing(model, "paper"))
    with pytest.warns(UnusableImageWarning, match="skipped 1/1.png"):
        results = run(
            model, ds, tmp_path / "out", batch_size=1
        )  # one batch holds only the bad file
    assert len(results) == 8 and 4 not in results.index
    assert results.skipped.to_dict(orient="records")[0]["image_id"] == "1/1.png"
    assert "cannot read the image" in results.skipped["reason"][0]
    manifest = read_manifest(tmp_path / "out")
    assert manifest["n_skipped"] == 1 and manifest["skipped"][0]["index"] == 4


class BadShape(Accuracy):
    name = "bad_shape"

    def run(self, model, batch):
        return {"pred": np.zeros(len(batch) + 1)}


class BadKey(Accuracy):
    name = "bad_key"

    def run(self, model, batch):
        return {"label": np.zeros(len(batch))}


class ObjectArray(Accuracy):
    name = "object_array"

    def run(self, model, batch):
        return {"x": np.array([object()] * len(batch))}


@pytest.mark.parametrize(
    "analysis,error,match",
    [
        (BadShape(), ValueError, r"bad_shape.run\(\)\['pred'\] has shape \(17,\)"),
        (BadKey(), ValueError, "must not contain '/' or be one of"),
        (ObjectArray(), TypeError, "only numeric, boolean and string arrays"),
    ],
)
def test_analysis_outputs_are_checked(model, dataset, tmp_path, analysis, error, match):
    with pytest.raises(error, match=match):
        run(model, dataset, tmp_path / "run", analyses=[analysis])


def test_registry(model, dataset, tmp_path):
    assert {"accuracy", "cls_identifiability"} <= {a.name for a in build_analyses(None)}
    with pytest.raises(ValueError, match=r"unknown analyses \['nope'\]; available: \['accuracy'"):
        build_analyses(["nope"])
    with pytest.raises(ValueError, match="already registered"):
        register_analysis("accuracy", BadShape)
    with pytest.raises(ValueError, match="must be letters"):
        register_analysis("a/b", Accuracy)

    class Top3(Accuracy):
        name = "top3"

        def __init__(self):
            super().__init__(top_k=3)

    register_analysis("top3", Top3)
    try:
        results = run(model, dataset, tmp_path / "run", analyses=["top3"])
        assert results.analyses == ["top3"]
        with pytest.raises(KeyError, match="this run has"):
            results["accuracy"]
    finally:
        ANALYSES.pop("top3")


def test_plugins_register_through_entry_points(monkeypatch):
    import importlib.metadata

    from vit_embedding_lens.runner import analysis as registry

    class EntryPoint:
        def __init__(self, name, load):
            self.name, self.value, self.load = name, f"plugin:{name}", load

    def broken():
        raise ImportError("missing dependency")

    class Plugged(Accuracy):
        name = "plugged"

    points = [EntryPoint("plugged", lambda: Plugged), EntryPoint("broken", broken)]
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group: points if group == registry.ENTRY_POINT_GROUP else [],
    )
    monkeypatch.setattr(registry, "_BUILTINS_LOADED", False)
    try:
        with pytest.warns(UserWarning, match="'broken' .* failed to load: missing dependency"):
            names = registry.available_analyses()
        assert (
            names[:2] == ["accuracy", "cls_identifiability"]
            and "plugged" in names
            and "broken" not in names
        )
        assert build_analyses(["plugged"])[0].name == "plugged"
    finally:
        ANALYSES.pop("plugged", None)


def test_reduced_precision_agrees_within_the_documented_tolerance(model, dataset, tmp_path):
    half = HookedViT.from_bundled(dtype=torch.bfloat16)
    pick = list(range(0, len(dataset), 3))
    small = InMemoryDataset(
        dataset.images[pick], dataset.label_tensor[pick], source={"layout": "small"}
    )
    f32 = run(model, small, tmp_path / "f32", analyses=["accuracy"], batch_size=40)
    bf16 = run(half, small, tmp_path / "bf16", analyses=["accuracy"], batch_size=40)
    assert read_manifest(tmp_path / "bf16")["config"]["dtype"] == "bfloat16"
    with torch.no_grad():
        exact = model(small.images)
        approx = half(small.images.bfloat16()).float()
    assert (approx - exact).abs().max() / exact.abs().max() < 2e-2  # ~1e-2 relative
    assert (f32["accuracy"]["pred"] == bf16["accuracy"]["pred"]).mean() > 0.95
