"""``HookedViT.from_pretrained``: one entry point that picks the converter from what it is given
(live timm / transformers / OpenCLIP modules, timm names, ``hf:NAME`` and save_pretrained folders,
``open_clip:ARCH[:PRETRAINED]``, ``bundled:NAME``), and ``vit-lens analyze --model`` with the same
strings (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vit_embedding_lens import HookedViT
from vit_embedding_lens.cli import main
from vit_embedding_lens.errors import HubUnreachableError
from vit_embedding_lens.loading.text_space import class_space_of
from vit_embedding_lens.runner import load_results
from vit_embedding_lens.testing import assert_close_scaled, create_timm_vit, randomize_vit_weights_
from vit_embedding_lens.zoo import load_mnist_eval

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "vit-lens-test-tiny"  # an OpenCLIP config registered for these tests only
TINY_CFG = dict(
    embed_dim=24,
    vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32, mlp_ratio=2.0),
    text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1),
)


@pytest.fixture
def tiny_arch(monkeypatch):
    """``open_clip:vit-lens-test-tiny`` names a small OpenCLIP CLIP (random weights)."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY, TINY_CFG)
    return TINY


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY, pretrained=None)
    return randomize_vit_weights_(model, seed=seed)


def tiny_hf_vit(seed: int = 0):
    cfg = transformers.ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        num_labels=3,
        id2label={0: "ant", 1: "bee", 2: "cat"},
        label2id={"ant": 0, "bee": 1, "cat": 2},
    )
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(cfg)
    return randomize_vit_weights_(model, seed=seed)


def test_live_modules_go_to_their_own_converter(tiny_arch, make_images):
    images = make_images(2, 32)
    timm_vit = create_timm_vit(
        "vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=4, img_size=32, num_classes=5
    )
    hooked = HookedViT.from_pretrained(timm_vit)
    with torch.no_grad():
        assert_close_scaled(hooked(images), timm_vit(images))
    assert_close_scaled(hooked(images), HookedViT.from_timm(timm_vit)(images))

    hf = tiny_hf_vit().eval()
    hooked = HookedViT.from_pretrained(hf)
    assert hooked.class_names == ["ant", "bee", "cat"]
    with torch.no_grad():
        assert_close_scaled(hooked(images), hf(pixel_values=images).logits)

    clip = tiny_clip().eval()
    hooked = HookedViT.from_pretrained(clip)
    with torch.no_grad():
        assert_close_scaled(hooked(images), clip.encode_image(images))
    assert hooked.cfg.d_embed == 24 and hooked.cfg.n_classes == 0


def test_open_clip_names_with_a_weights_file_and_text_classes(tiny_arch, tmp_path, make_images):
    clip = tiny_clip(seed=3).eval()
    torch.save(clip.state_dict(), tmp_path / "weights.pt")
    images = make_images(2, 32, seed=1)
    by_name = HookedViT.from_pretrained(
        f"open_clip:{tiny_arch}", checkpoint_path=tmp_path / "weights.pt"
    )
    with torch.no_grad():
        assert_close_scaled(by_name(images), clip.encode_image(images))
    names = ["cat", "dog"]
    headed = HookedViT.from_pretrained(
        f"open_clip:{tiny_arch}",
        checkpoint_path=tmp_path / "weights.pt",
        class_names=names,
        templates=["a photo of a {}."],
    )  # the tokenizer defaults to open_clip's own for the architecture
    direct = HookedViT.from_open_clip(clip, class_names=names, templates=["a photo of a {}."])
    assert headed.class_names == names and headed.cfg.head_type == "cosine"
    torch.testing.assert_close(headed(images), direct(images), atol=1e-5, rtol=0)
    random = HookedViT.from_pretrained(f"open_clip:{tiny_arch}")  # random weights, offline
    assert random.cfg.n_layers == 2 and random.cfg.d_embed == 24


def test_hf_folders_and_hub_names(tmp_path, make_images, monkeypatch):
    hf = tiny_hf_vit(seed=1).eval()
    hf.save_pretrained(tmp_path / "fine-tune")
    images = make_images(2, 32, seed=2)
    with torch.no_grad():
        expected = hf(pixel_values=images).logits
    for name in (str(tmp_path / "fine-tune"), f"hf:{tmp_path / 'fine-tune'}"):
        hooked = HookedViT.from_pretrained(name)
        assert hooked.class_names == ["ant", "bee", "cat"]
        assert_close_scaled(hooked(images), expected)
    import vit_embedding_lens.loading.hf_models as hf_models

    monkeypatch.setattr(hf_models, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(HubUnreachableError, match="save_pretrained"):
        HookedViT.from_pretrained("hf:nobody/no-such-vit-for-tests")


def test_bundled_names_and_timm_names(make_images):
    mnist = HookedViT.from_pretrained("bundled:mnist-vit")
    digits = load_mnist_eval().images[:4]
    torch.testing.assert_close(mnist(digits), HookedViT.from_bundled()(digits))
    clip = HookedViT.from_pretrained("bundled:mnist-clip")
    assert clip.cfg.head_type == "cosine" and clip.cfg.n_classes == 10
    headless = HookedViT.from_pretrained("bundled:mnist-clip", zero_shot=False)
    assert headless.cfg.n_classes == 0 and headless.cfg.d_embed == 64
    timm_name = HookedViT.from_pretrained("vit_tiny_patch16_224", img_size=32, num_classes=4)
    assert timm_name.cfg.n_classes == 4 and timm_name.cfg.image_size == (32, 32)


def test_saved_class_embeddings_load_through_from_pretrained(tmp_path):
    digits = load_mnist_eval().images[:6]
    text = HookedViT.from_pretrained("bundled:mnist-clip")
    class_space_of(text).save(tmp_path / "digits")
    again = HookedViT.from_pretrained("bundled:mnist-clip", class_embeddings=tmp_path / "digits")
    assert again.class_names == text.class_names
    torch.testing.assert_close(again(digits), text(digits), atol=1e-6, rtol=0)


def test_dispatch_errors_name_the_problem(tiny_arch):
    with pytest.raises(TypeError, match="not a timm, transformers or OpenCLIP model"):
        HookedViT.from_pretrained(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model name"):
        HookedViT.from_pretrained(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apply to CLIP-like models"):
        HookedViT.from_pretrained("bundled:mnist-vit", templates=["a {}"])
    with pytest.raises(ValueError, match="pretrained weights in the name"):
        HookedViT.from_pretrained(f"open_clip:{tiny_arch}", pretrained=True)
    with pytest.raises(ValueError, match="not an OpenCLIP architecture"):
        HookedViT.from_pretrained("open_clip:ViT-B-17")


def digit_folder(root, per_class: int = 2):
    """Digits in class folders named by the bundled image-text model's classes (zero, one, ...)."""
    from vit_embedding_lens.zoo.clip import DIGIT_WORDS

    data = load_mnist_eval()
    picked = []
    for c in range(10):
        folder = root / DIGIT_WORDS[c]
        folder.mkdir(parents=True)
        for k in range(per_class):
            i = 50 * c + k
            Image.fromarray(data.raw[i]).save(folder / f"{i:03d}.png")
            picked.append(i)
    return data, picked


def analyze(tmp_path, data_dir, out, *extra):
    args = ["analyze", "--data", str(data_dir), "--out", str(tmp_path / out), *extra]
    args += ["--preprocess", "paper", "--analyses", "accuracy", "--no-progress", "--no-report"]
    return main(args)


def test_cli_analyze_takes_the_bundled_image_text_model(tmp_path):
    data, picked = digit_folder(tmp_path / "digits")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert analyze(tmp_path, tmp_path / "digits", "a", "--model", "bundled:mnist-clip") == 0
    results = load_results(tmp_path / "a")
    order = [int(i.split("/")[1][:3]) for i in results.image_ids]
    assert sorted(order) == sorted(picked)
    with torch.no_grad():
        logits = HookedViT.from_pretrained("bundled:mnist-clip")(data.images[order])
    assert np.array_equal(results["accuracy"]["pred"], logits.argmax(-1).numpy())
    # a saved class space gives the same predictions without the text tower
    class_space_of(HookedViT.from_pretrained("bundled:mnist-clip")).save(tmp_path / "space")
    assert (
        analyze(
            tmp_path,
            tmp_path / "digits",
            "b",
            "--model",
            "bundled:mnist-clip",
            "--class-embeddings",
            str(tmp_path / "space"),
        )
        == 0
    )
    assert np.array_equal(load_results(tmp_path / "b")["accuracy"]["pred"], logits.argmax(-1))
    # other prompts: the model's head from the text tower with them (the classes' own names)
    assert (
        analyze(
            tmp_path,
            tmp_path / "digits",
            "c",
            "--model",
            "bundled:mnist-clip",
            "--class-names",
            ",".join(names),
            "--templates",
            "the handwritten digit {}.|a picture of the number {}.",
        )
        == 0
    )
    expected = HookedViT.from_pretrained(
        "bundled:mnist-clip",
        templates=["the handwritten digit {}.", "a picture of the number {}."],
    )(data.images[order]).argmax(-1)
    assert np.array_equal(load_results(tmp_path / "c")["accuracy"]["pred"], expected.numpy())


def test_cli_text_flags_are_refused_for_timm_models(tmp_path, capsys):
    digit_folder(tmp_path / "digits", per_class=1)
    code = analyze(
        tmp_path, tmp_path / "digits", "x", "--model", "bundled:mnist-vit", "--templates", "a {}"
    )
    assert code == 2 and "apply to CLIP-like models" in capsys.readouterr().err
    code = analyze(
        tmp_path, tmp_path / "digits", "y", "--model", "bundled:mnist-clip", "--templates", "none"
    )
    assert code == 2 and "exactly one {}" in capsys.readouterr().err


def test_cli_analyze_takes_an_open_clip_architecture_with_class_names(tiny_arch, tmp_path):
    clip = tiny_clip(seed=5).eval()
    torch.save(clip.state_dict(), tmp_path / "weights.pt")
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for k in range(2):
            rgb = np.random.default_rng(k + 10 * len(name)).integers(0, 256, (40, 48, 3))
            Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "pets" / name / f"{k}.png")
    args = ["analyze", "--model", f"open_clip:{tiny_arch}", "--checkpoint"]
    args += [str(tmp_path / "weights.pt"), "--class-names", "cat,dog", "--templates", "a {}."]
    args += ["--data", str(tmp_path / "pets"), "--out", str(tmp_path / "out")]
    assert main([*args, "--analyses", "accuracy", "--no-progress", "--no-report"]) == 0
    results = load_results(tmp_path / "out")
    assert len(results.image_ids) == 4 and set(results.labels.tolist()) == {0, 1}
    from vit_embedding_lens.runner.manifest import read_manifest

    spec = read_manifest(tmp_path / "out")["config"]
    assert f"open_clip:{tiny_arch}" in str(spec)


def test_runner_analyses_run_unchanged_on_the_text_defined_model(tmp_path):
    digit_folder(tmp_path / "digits", per_class=1)
    analyses = "accuracy,lens,knockout,attribution,memories"
    args = ["analyze", "--model", "bundled:mnist-clip", "--data", str(tmp_path / "digits")]
    args += ["--out", str(tmp_path / "all"), "--preprocess", "paper", "--analyses", analyses]
    assert main([*args, "--no-progress", "--no-report"]) == 0
    results = load_results(tmp_path / "all")
    for name in analyses.split(","):
        assert name in results.analyses, name


def test_open_clip_pretrained_tags_without_a_hub(tiny_arch, monkeypatch):
    with pytest.raises(ValueError, match="no pretrained weights tagged 'openai'"):
        HookedViT.from_pretrained(f"open_clip:{tiny_arch}:openai")

    def offline(name, pretrained=None, **kwargs):  # what open_clip raises without the hub
        raise RuntimeError(f"Failed to download weights for tag {pretrained!r}")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(HubUnreachableError, match="checkpoint_path=FILE"):
        HookedViT.from_pretrained("open_clip:ViT-B-32:openai")


def test_cli_analyze_takes_a_hugging_face_folder(tmp_path):
    hf = tiny_hf_vit(seed=4).eval()
    hf.save_pretrained(tmp_path / "fine-tune")
    for name in ("ant", "bee", "cat"):
        (tmp_path / "bugs" / name).mkdir(parents=True)
        rgb = np.random.default_rng(len(name) + ord(name[0])).integers(0, 256, (32, 32, 3))
        Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "bugs" / name / "0.png")
    args = ["analyze", "--model", f"hf:{tmp_path / 'fine-tune'}", "--data", str(tmp_path / "bugs")]
    args += ["--out", str(tmp_path / "out"), "--analyses", "accuracy,lens"]
    assert main([*args, "--no-progress", "--no-report"]) == 0
    results = load_results(tmp_path / "out")
    assert sorted(results.labels.tolist()) == [0, 1, 2]
