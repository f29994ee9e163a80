"""The ``vit-lens`` command: demo and report, analyze on folders and checkpoints, errors, models."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vit_embedding_lens import HookedViT
from vit_embedding_lens.cli import main
from vit_embedding_lens.data.images import bundled_eval_dataset
from vit_embedding_lens.runner import load_results
from vit_embedding_lens.runner.manifest import read_manifest
from vit_embedding_lens.testing import create_timm_vit
from vit_embedding_lens.zoo import load_mnist_eval

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_writes_a_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--n",
        "48",
        "--batch-size",
        "16",
        "--no-progress",
        "--analyses",
        "accuracy,lens",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert (
        "== accuracy ==" in printed and "== lens ==" in printed and "% cls identifiable" in printed
    )
    report = out / "report"
    page = (report / "index.html").read_text()
    pngs = sorted(p.relative_to(report).as_posix() for p in (report / "figures").glob("*.png"))
    csvs = sorted(p.relative_to(report).as_posix() for p in (report / "tables").glob("*.csv"))
    assert len(pngs) == 3 and len(csvs) == 9  # lens: 8 tables + class_vs_context_changes
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs
    assert all(f'href="{c}"' in page for c in csvs)
    summary = (report / "tables" / "accuracy__summary.csv").read_text().splitlines()
    assert summary[0] == "n_images,top1,top5" and summary[1].startswith("48,")
    assert read_manifest(out)["config"]["data"]["source"]["layout"] == "bundled"

    assert main(args + ["--no-report"]) == 0
    assert read_manifest(out)["attempts"][-1]["pending_batches"] == 0  # nothing left to compute
    other_batch = [a if a != "16" else "8" for a in args]
    assert main(other_batch) == 2
    err = capsys.readouterr().err
    assert "batch_size: 16 -> 8" in err and "--overwrite" in err and "Traceback" not in err
    assert main(other_batch + ["--overwrite"]) == 0


def test_demo_paper_preset_configures_the_analyses_and_says_so(tmp_path, capsys):
    """``--preset paper``: post-softmax knockout, corner token labels, CLS-inclusive percentages,
    recorded in the manifest and shown in the report; the default preset's run differs."""
    from vit_embedding_lens.data.token_labels import token_mask_from_mask
    from vit_embedding_lens.zoo.bundled import load_bundled_eval

    common = ["--n", "20", "--no-progress", "--analyses", "knockout,context_removal"]
    paper, library = tmp_path / "paper", tmp_path / "library"
    assert main(["demo", "--preset", "paper", "--out", str(paper), *common]) == 0
    assert main(["demo", "--out", str(library), *common]) == 0
    config = read_manifest(paper)["config"]
    assert config["preset"]["name"] == "paper"
    assert config["analyses"]["knockout"]["mode"] == "post_softmax"
    assert config["analyses"]["knockout"]["tokens"] == "all"
    assert config["analyses"]["context_removal"]["identifiability"]["tokens"] == "all"
    assert config["data"]["source"]["token_labels"] == "corner"
    default = read_manifest(library)["config"]
    assert default["preset"]["name"] == "library"
    assert default["analyses"]["knockout"]["mode"] == "pre_softmax"
    assert default["data"]["source"]["token_labels"] == "nearest"
    page = (paper / "report" / "index.html").read_text()
    assert "<b>preset</b></td><td>paper (knockout_mode=post_softmax" in page
    # the stored token masks are the corner rule's
    model = HookedViT.from_bundled()
    expected = bundled_eval_dataset(model, n=20, token_labels="corner")
    data = load_bundled_eval("mnist-vit")
    assert torch.equal(
        token_mask_from_mask(data.masks[:1], model.layout, method="corner"),
        data.class_token_mask(model.layout, method="corner")[:1],
    )
    got = load_results(paper)["context_removal"]["n_kept"][:, 1]
    assert np.array_equal(got, expected.token_masks.sum(-1).numpy() + model.layout.n_prefix)
    capsys.readouterr()


def test_demo_on_the_fashion_model_and_an_unknown_bundled_name(tmp_path, capsys):
    out = tmp_path / "fashion"
    args = [
        "demo",
        "--bundled",
        "fashion-vit",
        "--out",
        str(out),
        "--n",
        "20",
        "--no-progress",
        "--no-report",
    ]
    assert main(args + ["--analyses", "accuracy"]) == 0
    assert "garment masks" in capsys.readouterr().out
    results = load_results(out)
    expected = bundled_eval_dataset(HookedViT.from_bundled("fashion-vit"), n=20)
    assert list(results.image_ids) == expected.image_ids and expected.image_ids[0].startswith(
        "fashion-eval/"
    )
    with torch.no_grad():
        preds = HookedViT.from_bundled("fashion-vit")(expected.images).argmax(-1)
    assert np.array_equal(results["accuracy"]["pred"], preds.numpy())
    assert read_manifest(out)["config"]["data"]["source"]["name"] == "fashion-eval"
    assert (
        main(["demo", "--bundled", "cifar-vit", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    )
    assert "unknown bundled model 'cifar-vit'" in capsys.readouterr().err


def test_analyze_a_png_folder_matches_a_direct_forward(tmp_path):
    data = load_mnist_eval()
    pick = [50 * c + k for c in range(10) for k in range(3)]
    for i in pick:
        folder = tmp_path / "digits" / str(int(data.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.raw[i]).save(folder / f"{i:03d}.png")
    args = [
        "analyze",
        "--model",
        "bundled:mnist-vit",
        "--data",
        str(tmp_path / "digits"),
        "--out",
        str(tmp_path / "out"),
        "--preprocess",
        "paper",
        "--per-class",
        "2",
        "--analyses",
        "accuracy",
        "--no-progress",
        "--no-report",
    ]
    assert main(args) == 0
    results = load_results(tmp_path / "out")
    order = [int(i.split("/")[1][:3]) for i in results.image_ids]
    assert order == [50 * c + k for c in range(10) for k in range(2)]
    with torch.no_grad():
        logits = HookedViT.from_bundled()(data.images[order])
    assert np.array_equal(results["accuracy"]["pred"], logits.argmax(-1).numpy())
    assert np.array_equal(results.labels, data.labels[order].numpy())
    config = read_manifest(tmp_path / "out")["config"]
    assert config["data"]["preprocessing"]["kind"] == "paper" and config["layout"] == "folder"


def synset_folder(root, synsets, n=2, size=40):
    for s in synsets:
        (root / s).mkdir(parents=True)
        for k in range(n):
            rgb = np.random.default_rng(k).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / s / f"{k}.JPEG")
    return root


def test_analyze_a_timm_model_folder_on_synset_folders(tmp_path):
    from timm.models._hub import save_for_hf

    timm_model = create_timm_vit("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8)
    save_for_hf(timm_model, tmp_path / "model")
    data = synset_folder(tmp_path / "data", ["n01440764", "n15075141"])
    out = tmp_path / "out"
    args = [
        "analyze",
        "--checkpoint",
        str(tmp_path / "model"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    results = load_results(out)
    assert results.labels.tolist() == [0, 0, 999, 999]
    assert results["lens"]["rank_resid"].shape == (4, 1, 17)
    assert (out / "report" / "index.html").is_file()
    # the same images through timm's own transform and model: the same predictions
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config(
        model=timm_model
    )  # the pretrained config says 224; the model takes 32
    transform = create_transform(**dict(config, input_size=(3, 32, 32)))
    images = torch.stack(
        [transform(Image.open(data / i).convert("RGB")) for i in results.image_ids]
    )
    with torch.no_grad():
        assert np.array_equal(results["accuracy"]["pred"], timm_model(images).argmax(-1).numpy())


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    data = synset_folder(tmp_path / "data", ["n01440764"], n=1)
    out = str(tmp_path / "out")

    def fails(*args, match):
        assert main(["analyze", *args, "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err
        assert "Traceback" not in err

    fails(
        "--model",
        "eva02_tiny_patch14_224",
        "--data",
        str(data),
        match=r"rotary position embeddings .*not supported",
    )
    fails("--data", str(data), match="name a model")
    fails(
        "--model", "bundled:mnist-vit", "--data", str(tmp_path / "missing"), match="does not exist"
    )
    weights = tmp_path / "w.pt"
    torch.save(
        create_timm_vit("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8).state_dict(),
        weights,
    )
    fails(
        "--checkpoint", str(weights), "--data", str(data), match="does not say which architecture"
    )
    fails(
        "--model",
        "vit_tiny_patch16_224",
        "--checkpoint",
        str(weights),
        "--data",
        str(data),
        match="does not match the timm model",
    )
    fails(
        "--model",
        "bundled:mnist-vit",
        "--data",
        str(data),
        match=r"synsets but the model has 10 classes",
    )
    fails(
        "--model",
        "vit_tiny_patch16_224",
        "--pretrained",
        "--data",
        str(data),
        match="could not fetch the pretrained",
    )


def test_models_command_reports_support_from_the_converter(tmp_path, capsys, monkeypatch):
    assert (
        main(
            [
                "models",
                "--check",
                "vit_tiny_patch16_224",
                "eva02_tiny_patch14_224",
                "vit_base_patch16_siglip_224",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "vit_tiny_patch16_224 (vision_transformer): supported"
    assert lines[1].startswith("eva02_tiny_patch14_224 (eva): refused: rotary position embeddings")
    assert "attention-pool head" in lines[2]

    from vit_embedding_lens.model.convert import check_supported
    from vit_embedding_lens.runner import model_support

    names = [
        "deit_tiny_distilled_patch16_224",
        "vit_base_patch16_siglip_224",
        "vit_small_patch16_224",
    ]
    survey = model_support.survey_models(names, progress=False, cache_dir=tmp_path)
    assert survey["supported"].tolist() == [True, False, True]
    # the reason is the converter's own refusal, not a restatement
    import timm

    with torch.device("meta"):
        siglip = timm.create_model("vit_base_patch16_siglip_224", pretrained=False)
    with pytest.raises(Exception) as refusal:
        check_supported(siglip, "vit_base_patch16_siglip_224")
    assert survey["reason"][1] == model_support.refusal_feature(refusal.value)
    cache = list(tmp_path.glob("model-support-*.json"))
    assert len(cache) == 1 and len(json.loads(cache[0].read_text())) == 3
    monkeypatch.setattr(
        model_support, "check_model_support", lambda name: pytest.fail("not cached")
    )
    assert model_support.survey_models(names, progress=False, cache_dir=tmp_path).equals(survey)
    reasons = model_support.refusal_reasons(survey)
    assert reasons["models"].tolist() == [1] and "siglip" in reasons["examples"][0]
    by_module = model_support.support_by_module(survey)
    assert by_module.set_index("module").loc["vision_transformer", "supported"] == 1
