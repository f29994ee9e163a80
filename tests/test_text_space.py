"""Text-defined class spaces (METHODS section 8) from OpenCLIP and Hugging Face CLIP / SigLIP text
towers; the zero-shot head equals the models' own image-text logits (issue 13)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
import torch.nn.functional as F

from vit_embedding_lens import HookedViT
from vit_embedding_lens.loading.text_space import (
    DEFAULT_TEMPLATES,
    class_space_from_embeddings,
    fill_templates,
    text_class_space,
    text_tower_kind,
)
from vit_embedding_lens.model.class_space import ClassSpace
from vit_embedding_lens.model.registry import registered_kinds
from vit_embedding_lens.testing import assert_close_scaled, randomize_vit_weights_

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "dog", "tree"]
TEMPLATES = ["a photo of a {}.", "art of the {}."]
needs_hf_converter = pytest.mark.skipif(
    "hf" not in registered_kinds() and not hasattr(HookedViT, "from_hf"),
    reason="the Hugging Face vision converter (h-13hf) is not merged yet",
)


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """A real Hugging Face CLIPTokenizer built offline from open_clip's BPE files."""
    import open_clip.tokenizer as oct

    folder = tmp_path_factory.mktemp("clip-tokenizer")
    encoder = dict(oct.SimpleTokenizer().encoder)
    encoder["<|startoftext|>"] = encoder.pop("<start_of_text>")
    encoder["<|endoftext|>"] = encoder.pop("<end_of_text>")
    (folder / "vocab.json").write_text(json.dumps(encoder))
    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(lines[1 : 49152 - 256 - 2 + 1]) + "\n"
    )
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _text_cfg(**extra):
    return dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        **extra,
    )


def _vision_cfg():
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )


@pytest.fixture(scope="module")
def hf_clip():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=_text_cfg(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=_vision_cfg(),
        projection_dim=16,
    )
    model = transformers.CLIPModel(cfg)
    randomize_vit_weights_(model, seed=0)
    with torch.no_grad():
        model.logit_scale.fill_(4.6)
    return model.eval()


@pytest.fixture(scope="module")
def hf_siglip():
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(text_config=_text_cfg(), vision_config=_vision_cfg())
    model = transformers.SiglipModel(cfg)
    randomize_vit_weights_(model, seed=1)
    with torch.no_grad():
        model.logit_scale.fill_(4.7)
        model.logit_bias.fill_(-10.0)
    return model.eval()


def _template_average(encode, names, templates):
    rows = []
    for name in names:
        emb = F.normalize(encode([t.format(name) for t in templates]), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def test_fill_templates_and_its_errors():
    assert fill_templates(["a", "b"], ["x {}", "{} y"]) == ["x a", "a y", "x b", "b y"]
    with pytest.raises(ValueError, match="exactly one"):
        fill_templates(["a"], ["no slot"])
    with pytest.raises(ValueError, match="no prompt templates"):
        fill_templates(["a"], [])
    with pytest.raises(TypeError, match="not one string"):
        fill_templates("abc", ["{}"])
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES) and len(DEFAULT_TEMPLATES) >= 5


def test_other_modules_have_no_text_tower():
    with pytest.raises(TypeError, match="no text tower"):
        text_tower_kind(torch.nn.Linear(2, 2))


def test_hf_clip_text_space_is_the_template_average(hf_clip, clip_tokenizer):
    space = text_class_space(hf_clip, NAMES, TEMPLATES, tokenizer=clip_tokenizer)

    def encode(texts):
        with torch.no_grad():
            out = hf_clip.get_text_features(
                **clip_tokenizer(texts, padding=True, return_tensors="pt")
            )
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    torch.testing.assert_close(space.embeddings, _template_average(encode, NAMES, TEMPLATES))
    assert space.logit_scale == pytest.approx(float(torch.tensor(4.6).exp()), rel=1e-6)
    assert space.logit_bias == 0.0 and space.names == NAMES
    assert space.metadata["templates"] == TEMPLATES


def test_hf_siglip_text_space_pads_to_the_trained_length_and_keeps_the_bias(
    hf_siglip, clip_tokenizer
):
    space = text_class_space(hf_siglip, NAMES, TEMPLATES, tokenizer=clip_tokenizer)

    def encode(texts):
        ids = clip_tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
        with torch.no_grad():
            out = hf_siglip.get_text_features(input_ids=ids["input_ids"])
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    torch.testing.assert_close(space.embeddings, _template_average(encode, NAMES, TEMPLATES))
    assert space.logit_bias == pytest.approx(-10.0)
    # a plain callable from texts to ids works as a tokenizer too
    ids_only = text_class_space(
        hf_siglip,
        NAMES,
        TEMPLATES,
        tokenizer=lambda texts: clip_tokenizer(
            texts, padding="max_length", max_length=16, return_tensors="pt"
        )["input_ids"],
    )
    torch.testing.assert_close(ids_only.embeddings, space.embeddings)


@needs_hf_converter
@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_hf_zero_shot_head_equals_logits_per_image(which, hf_clip, hf_siglip, clip_tokenizer,
                                                   make_images):  # fmt: skip
    model = hf_clip if which == "clip" else hf_siglip
    template = ["a photo of a {}."]
    padding = dict(padding=True) if which == "clip" else dict(padding="max_length", max_length=16)
    texts = clip_tokenizer([template[0].format(n) for n in NAMES], return_tensors="pt", **padding)
    if which == "siglip":  # SigLIP's own tokenizer gives ids only (max-length padding, no mask)
        texts = {"input_ids": texts["input_ids"]}
    images = make_images(3, 32, seed=2)
    with torch.no_grad():
        out = model(pixel_values=images, **texts)
    hooked = HookedViT.from_pretrained(
        model, class_names=NAMES, templates=template, tokenizer=clip_tokenizer
    )
    assert hooked.class_names == NAMES
    assert_close_scaled(hooked(images), out.logits_per_image)
    # the embeddings alone (scale and bias from the model) give the same head, saved or not
    space = text_class_space(model, NAMES, template, tokenizer=clip_tokenizer)
    for given in (space.embeddings, space):
        again = HookedViT.from_pretrained(model, class_names=NAMES, class_embeddings=given)
        torch.testing.assert_close(again(images), hooked(images), atol=1e-5, rtol=0)


def test_class_embeddings_tensor_space_and_folder_agree(tmp_path):
    emb = torch.randn(3, 8)
    space = class_space_from_embeddings(None, emb, NAMES, logit_scale=50.0, logit_bias=-1.0)
    assert isinstance(space, ClassSpace) and space.logit_scale == 50.0
    torch.testing.assert_close(space.embeddings, F.normalize(emb, dim=-1))
    space.save(tmp_path / "s")
    again = class_space_from_embeddings(None, str(tmp_path / "s"))
    torch.testing.assert_close(again.embeddings, space.embeddings)
    assert again.names == NAMES and again.logit_bias == -1.0
    with pytest.raises(ValueError, match="differ from the saved"):
        class_space_from_embeddings(None, tmp_path / "s", ["x", "y", "z"])
    with pytest.raises(TypeError, match="class_embeddings must be"):
        class_space_from_embeddings(None, [[1.0, 2.0]])
    assert class_space_from_embeddings(None, emb).names == ["0", "1", "2"]


@needs_hf_converter
def test_a_clip_folder_with_its_tokenizer_gets_its_text_head_from_the_cli(
    hf_clip, clip_tokenizer, tmp_path
):
    import numpy as np
    from PIL import Image

    from vit_embedding_lens.cli import main
    from vit_embedding_lens.runner import load_results

    hf_clip.save_pretrained(tmp_path / "clip")
    clip_tokenizer.save_pretrained(tmp_path / "clip")
    for name in NAMES:
        (tmp_path / "data" / name).mkdir(parents=True)
        rgb = np.random.default_rng(len(name)).integers(0, 256, (32, 32, 3)).astype(np.uint8)
        Image.fromarray(rgb).save(tmp_path / "data" / name / "0.png")
    args = ["analyze", "--model", str(tmp_path / "clip"), "--data", str(tmp_path / "data")]
    args += ["--class-names", ",".join(NAMES), "--templates", "a photo of a {}."]
    args += ["--out", str(tmp_path / "out"), "--analyses", "accuracy", "--no-progress"]
    assert main([*args, "--no-report"]) == 0
    assert sorted(load_results(tmp_path / "out").labels.tolist()) == [0, 1, 2]
    hooked = HookedViT.from_pretrained(
        tmp_path / "clip", class_names=NAMES, templates=["a photo of a {}."]
    )
    direct = HookedViT.from_pretrained(
        hf_clip, class_names=NAMES, templates=["a photo of a {}."], tokenizer=clip_tokenizer
    )
    images = torch.randn(2, 3, 32, 32)
    assert_close_scaled(hooked(images), direct(images))  # logits of order logit_scale = 100
