"""The ``vit-lens`` command: demo and report, analyze on folders and checkpoints, errors, models."""

from __future__ import annotations

import json
import re
import time

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
                "vit_relpos_base_patch16_224",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "vit_tiny_patch16_224 (vision_transformer): supported"
    assert lines[1].startswith("eva02_tiny_patch14_224 (eva): refused: rotary position embeddings")
    assert "relative position embeddings" in lines[2]

    from vit_embedding_lens.model.convert import check_supported
    from vit_embedding_lens.runner import model_support

    names = [
        "deit_tiny_distilled_patch16_224",
        "vit_relpos_base_patch16_224",
        "vit_small_patch16_224",
    ]
    survey = model_support.survey_models(names, progress=False, cache_dir=tmp_path)
    assert survey["supported"].tolist() == [True, False, True]
    # the reason is the converter's own refusal, not a restatement
    import timm

    with torch.device("meta"):
        relpos = timm.create_model("vit_relpos_base_patch16_224", pretrained=False)
    with pytest.raises(Exception) as refusal:
        check_supported(relpos, "vit_relpos_base_patch16_224")
    assert survey["reason"][1] == model_support.refusal_feature(refusal.value)
    cache = list(tmp_path.glob("model-support-*.json"))
    assert len(cache) == 1 and len(json.loads(cache[0].read_text())) == 3
    monkeypatch.setattr(
        model_support, "check_model_support", lambda name: pytest.fail("not cached")
    )
    assert model_support.survey_models(names, progress=False, cache_dir=tmp_path).equals(survey)
    reasons = model_support.refusal_reasons(survey)
    assert reasons["models"].tolist() == [1] and "relpos" in reasons["examples"][0]
    by_module = model_support.support_by_module(survey)
    assert by_module.set_index("module").loc["vision_transformer", "supported"] == 1


# -------------------------------------------------------------------------------------------------
# Custom checkpoints: class count and names from flags, files or a timm folder's config.json
# -------------------------------------------------------------------------------------------------
def named_class_folder(root, names, n=2, size=48):
    for c in names:
        (root / c).mkdir(parents=True)
        for k in range(n):
            rgb = np.random.default_rng(k).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / c / f"{k}.png")
    return root


def timm_predictions(timm_model, data, image_ids):
    """timm's own preprocessing and forward pass over the run's images, in its order."""
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config(model=timm_model))
    images = torch.stack([transform(Image.open(data / i).convert("RGB")) for i in image_ids])
    with torch.no_grad():
        return timm_model(images).argmax(-1).numpy()


def check_named_run(out, names, capsys):
    """The run used the class names (folders mapped by them, tables showing them) and compared
    the trained model with its random-init twin."""
    results = load_results(out)
    assert results.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert results["lens"]["random_rank_resid"].shape == results["lens"]["rank_resid"].shape
    tables = out / "report" / "tables"
    per_class = (tables / "accuracy__per_class.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in per_class[1:]] == names
    trained_vs_random = (tables / "lens__trained_vs_random.csv").read_text().splitlines()
    assert len(trained_vs_random) > 1 and "p_value" in trained_vs_random[0]
    printed = capsys.readouterr()
    assert "no random-init comparison" not in printed.err
    return results


@pytest.mark.parametrize("names_flag", ["--class-names", "--class-names-file"])
def test_analyze_a_fine_tuned_3_class_checkpoint(tmp_path, capsys, names_flag):
    from safetensors.torch import save_file

    timm_model = create_timm_vit("test_vit", num_classes=3)
    weights = tmp_path / "fine-tuned.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, weights)
    names = ["cat", "dog", "fox"]
    data = named_class_folder(tmp_path / "data", names)
    if names_flag == "--class-names":  # the class count read from the checkpoint's head
        given = [",".join(names)]
    else:  # a JSON object {index: name}, out of order, and the class count given
        given = [str(tmp_path / "names.json"), "--num-classes", "3"]
        (tmp_path / "names.json").write_text(json.dumps({"2": "fox", "0": "cat", "1": "dog"}))
    out = tmp_path / "out"
    args = ["analyze", "--model", "test_vit", "--checkpoint", str(weights), names_flag, *given]
    args += ["--data", str(data), "--out", str(out), "--analyses", "accuracy,lens"]
    assert main([*args, "--no-progress"]) == 0
    results = check_named_run(out, names, capsys)
    preds = timm_predictions(timm_model, data, results.image_ids)
    assert np.array_equal(results["accuracy"]["pred"], preds)
    spec = read_manifest(out)["config"]["model_spec"]
    assert spec.get("num_classes") == (None if names_flag == "--class-names" else 3)
    assert spec["class_names"] == names


def test_analyze_a_timm_folder_reads_its_label_names(tmp_path, capsys):
    from timm.models._hub import save_for_hf

    names = ["ant", "bee", "wasp"]
    # LayerScale: its initial value is not in the converted config; the twin reads config.json
    timm_model = create_timm_vit("test_vit", num_classes=3, init_values=1e-5)
    save_for_hf(timm_model, tmp_path / "model", model_config={"label_names": names})
    data = named_class_folder(tmp_path / "data", names)
    out = tmp_path / "out"
    args = ["analyze", "--checkpoint", str(tmp_path / "model"), "--data", str(data)]
    args += ["--out", str(out), "--analyses", "accuracy,lens", "--no-progress"]
    assert main(args) == 0
    results = check_named_run(out, names, capsys)
    assert np.array_equal(
        results["accuracy"]["pred"], timm_predictions(timm_model, data, results.image_ids)
    )


def test_class_names_files_and_their_errors(tmp_path):
    from vit_embedding_lens.cli import build_parser, check_args, class_names_of

    def names(*flags):
        args = build_parser().parse_args(
            ["analyze", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *flags]
        )
        check_args(args)
        return class_names_of(args)

    text, listed = tmp_path / "names.txt", tmp_path / "names.json"
    text.write_text("cat\n dog \n\nfox\n")
    listed.write_text(json.dumps(["cat", "dog", "fox"]))
    assert names("--class-names-file", str(text)) == ["cat", "dog", "fox"]
    assert names("--class-names-file", str(listed)) == ["cat", "dog", "fox"]
    assert names("--class-names", "cat, dog,fox", "--model", "test_vit") == ["cat", "dog", "fox"]
    assert names() is None
    bad = [
        (["--class-names", "cat,,fox"], "must be non-empty"),
        (["--class-names", "cat,cat"], "given twice"),
        (["--class-names", "a,b", "--model", "test_vit", "--num-classes", "3"], "2 class names"),
        (["--num-classes", "3", "--model", "bundled:mnist-vit"], "--num-classes sizes"),
    ]
    for flags, match in bad:
        with pytest.raises(ValueError, match=match):
            names(*flags)
    (tmp_path / "gaps.json").write_text(json.dumps({"0": "cat", "2": "fox"}))
    with pytest.raises(ValueError, match="indices must be 0..1"):
        names("--class-names-file", str(tmp_path / "gaps.json"))


# -------------------------------------------------------------------------------------------------
# Clean errors: exit 2, one line, no traceback (--debug shows it)
# -------------------------------------------------------------------------------------------------
def clean_error(args, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(match, err), err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_loading_errors_are_clean(tmp_path, capsys, monkeypatch):
    import vit_embedding_lens.loading.hub as hub

    data = named_class_folder(tmp_path / "data", ["cat"], n=1)
    common = ["--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"]
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json" + bytes(100))
    clean_error(
        ["analyze", "--model", "test_vit", "--checkpoint", str(corrupt), *common],
        capsys,
        r"could not read .*broken\.safetensors as safetensors",
    )
    clean_error(
        ["analyze", "--model", "vit_tiny_patch16_224.bad_tag", *common],
        capsys,
        r"'bad_tag' is not a pretrained tag of vit_tiny_patch16_224 .*augreg_in21k_ft_in1k",
    )
    # a timm folder whose weights need a code-running pickle: refused, never run, said cleanly
    from timm.models._hub import save_for_hf

    folder = tmp_path / "model"
    save_for_hf(create_timm_vit("test_vit", num_classes=3), folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save({"x": _RunsCode()}, folder / "pytorch_model.bin")
    clean_error(
        ["analyze", "--checkpoint", str(folder), *common],
        capsys,
        r"could not load the weights of the timm model folder .*refused",
    )
    assert not _RunsCode.ran
    # --pretrained without a hub: one probe, no retries, and the way out in the CLI's terms
    probes = []
    monkeypatch.setattr(hub, "hub_reachable", lambda **kw: probes.append(kw) or False)
    start = time.perf_counter()
    err = clean_error(
        ["analyze", "--model", "vit_tiny_patch16_224", "--pretrained", *common],
        capsys,
        r"model hub is unreachable",
    )
    assert time.perf_counter() - start < 30 and probes == [{"timeout": 3.0}]
    assert "--checkpoint" in err and "vit-lens demo" in err and "HookedViT" not in err
    # cached weights without a hub are read offline (here the cache is a lie: timm says so)
    import huggingface_hub.constants

    monkeypatch.setattr(hub, "pretrained_cached", lambda name: True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    clean_error(
        ["analyze", "--model", "vit_tiny_patch16_224", "--pretrained", *common],
        capsys,
        r"pretrained weights of vit_tiny_patch16_224: \w+Error: .* --checkpoint",
    )
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    with pytest.raises(ValueError, match="not a pretrained tag"):
        main(["--debug", "analyze", "--model", "vit_tiny_patch16_224.bad_tag", *common])


class _RunsCode:
    ran = False

    def __reduce__(self):
        return (_RunsCode._run, ())

    @staticmethod
    def _run():
        _RunsCode.ran = True


def test_device_errors_are_clean(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "out"), "--no-progress"]
    err = clean_error(["demo", "--device", "gpu", *out], capsys, r"--device 'gpu' is not")
    assert all(word in err for word in ("auto", "cpu", "cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    clean_error(["demo", "--device", "cuda", *out], capsys, r"CUDA is not available.*cpu")


# -------------------------------------------------------------------------------------------------
# A snappy command line: help, version and argument errors without torch or a model
# -------------------------------------------------------------------------------------------------
def _in_fresh_python(code):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}  # help lines unwrapped
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_version_and_argument_errors_import_no_torch(tmp_path):
    code = f"""
import sys
from vit_embedding_lens.cli import main
codes = []
for argv in (["--help"], ["analyze", "--help"], ["--version"], ["demo", "--batch-size", "0"],
             ["demo", "--device", "gpu"],
             ["analyze", "--model", "test_vit", "--data", {str(tmp_path / "no")!r}, "--out", "o"]):
    try:
        codes.append(main(argv))
    except SystemExit as stop:
        codes.append(stop.code)
print(codes, "torch" in sys.modules, "timm" in sys.modules)
"""
    out = _in_fresh_python(code)
    assert out.strip().splitlines()[-1] == "[0, 0, 0, 2, 2, 2] False False", out
    assert "images per batch (default: 32)" in out and "--threshold (default: 0.5)" not in out
    assert "area fraction for --token-labels area (default: 0.5)" in out
    assert "from: accuracy, cls_identifiability, lens, knockout, context_removal" in out


def test_version_names_the_package_and_torch(capsys):
    from importlib import metadata

    import vit_embedding_lens

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == (
        f"vit-lens {vit_embedding_lens.__version__} (torch {metadata.version('torch')}, "
        f"timm {metadata.version('timm')})"
    )


def test_the_clis_analysis_names_are_the_runners():
    from vit_embedding_lens.cli import ANALYSIS_NAMES, DEFAULT_ANALYSIS_NAMES
    from vit_embedding_lens.runner.analyses import BUILTIN_ANALYSES, DEFAULT_ANALYSES

    assert list(ANALYSIS_NAMES) == list(BUILTIN_ANALYSES)
    assert list(DEFAULT_ANALYSIS_NAMES) == list(DEFAULT_ANALYSES)


def test_analyses_a_script_registered_pass_the_argument_check(tmp_path, monkeypatch):
    from vit_embedding_lens.cli import build_parser, check_args
    from vit_embedding_lens.runner import analysis

    args = build_parser().parse_args(["demo", "--analyses", "accuracy,mine"])
    with pytest.raises(ValueError, match=r"unknown \['mine'\]"):
        check_args(args)
    monkeypatch.setitem(analysis.ANALYSES, "mine", object)
    check_args(args)


def test_bad_arguments_fail_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import vit_embedding_lens.loading.timm_models as timm_models
    import vit_embedding_lens.runner.models as models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr(timm_models, "load_timm", no_loading)
    data = named_class_folder(tmp_path / "data", ["cat"], n=1)
    base = ["analyze", "--model", "test_vit", "--data", str(data), "--out", str(tmp_path / "o")]
    cases = [
        (["--analyses", "lens,lense"], r"unknown \['lense'\]; choose from accuracy"),
        (["--analyses", "lens,lens"], "names an analysis twice"),
        (["--checkpoint", str(tmp_path / "missing.pt")], "--checkpoint .* does not exist"),
        (["--class-names-file", str(tmp_path / "missing.txt")], "does not exist"),
        (["--threshold", "1.5"], r"not an area fraction in \(0, 1\]"),
        (["--device", "cuda0"], "is not a device"),
    ]
    for flags, match in cases:
        clean_error([*base, *flags], capsys, match)
    file = data / "cat" / "0.png"
    clean_error([*base[:4], str(file), *base[5:]], capsys, "is a file")
    for flags in (["--batch-size", "0"], ["--per-class", "-1"], ["--num-workers", "-2"]):
        with pytest.raises(SystemExit) as stop:
            main([*base, *flags])
        assert stop.value.code == 2
        assert "expected" in capsys.readouterr().err
