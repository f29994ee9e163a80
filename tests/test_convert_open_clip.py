"""OpenCLIP image towers converted exactly and strictly; zero-shot heads from the text tower equal
OpenCLIP's own image-text logits (issue 13)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vit_embedding_lens import HookedViT
from vit_embedding_lens.errors import ConversionError, UnsupportedArchitectureError
from vit_embedding_lens.loading.open_clip_models import convert_open_clip
from vit_embedding_lens.loading.text_space import text_class_space
from vit_embedding_lens.model.class_space import ClassSpace
from vit_embedding_lens.testing import assert_close_scaled, randomize_vit_weights_

open_clip = pytest.importorskip("open_clip")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_CFG = dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1)
SMALL_VISION = dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32, mlp_ratio=2.0)


def small_clip(seed: int = 0, quick_gelu: bool = False, **vision) -> torch.nn.Module:
    """A small OpenCLIP CLIP with realistic random weights (its logit scale a trained model's)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg={**SMALL_VISION, **vision},
        text_cfg=TEXT_CFG,
        quick_gelu=quick_gelu,
    )
    randomize_vit_weights_(model, seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        model.visual.class_embedding.copy_(0.5 * torch.randn(64, generator=gen))
        model.visual.positional_embedding.normal_(0, 0.5, generator=gen)
        model.logit_scale.fill_(math.log(100.0))
    return model.eval()


def open_clip_blocks(model, images):
    """``encode_image`` and the output of every visual block, from OpenCLIP's own forward."""
    outputs = []
    hooks = [
        block.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
        for block in model.visual.transformer.resblocks
    ]
    try:
        with torch.no_grad():
            features = model.encode_image(images)
    finally:
        for h in hooks:
            h.remove()
    return features, outputs


@pytest.mark.parametrize(
    "vision, quick_gelu",
    [
        ({}, False),  # CLS pooling, ln_post before pooling, GELU (ViT-B-16's layout)
        ({}, True),  # the QuickGELU variants (OpenAI weights)
        ({"final_ln_after_pool": True, "pool_type": "avg"}, False),
        ({"ls_init_value": 0.1}, False),  # LayerScale (folded)
        ({"no_ln_pre": True, "pos_embed_type": "sin_cos_2d"}, False),
    ],
    ids=["cls", "quick_gelu", "avg-ln-after-pool", "layer-scale", "no-ln-pre-sincos"],
)
def test_image_features_and_every_block_equal_open_clip(vision, quick_gelu, make_images):
    model = small_clip(quick_gelu=quick_gelu, **vision)
    images = make_images(3, 32)
    features, blocks = open_clip_blocks(model, images)
    hooked = HookedViT.from_open_clip(model)
    assert hooked.cfg.d_embed == 24 and hooked.cfg.n_classes == 0
    assert hooked.cfg.act_fn == ("quick_gelu" if quick_gelu else "gelu")
    out, cache = hooked.run_with_cache(images)
    assert_close_scaled(out, features, msg="encode_image")
    assert_close_scaled(cache["hook_image_embed"], features)
    for i, expected in enumerate(blocks):
        assert_close_scaled(cache[f"blocks.{i}.hook_resid_post"], expected, msg=f"block {i}")


def test_zero_shot_logits_equal_open_clips_image_text_logits(make_images):
    model = small_clip(seed=1)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=12)
    names = ["cat", "dog", "house", "tree"]
    images = make_images(4, 32, seed=3)
    # one template: the head is exactly OpenCLIP's own logits for those prompts
    hooked = HookedViT.from_open_clip(
        model, class_names=names, templates=["a photo of a {}."], tokenizer=tokenizer
    )
    with torch.no_grad():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(
            model.encode_text(tokenizer([f"a photo of a {n}." for n in names])), dim=-1
        )
        expected = model.logit_scale.exp() * img @ txt.T
        _, _, own_scale = model(images, tokenizer([f"a photo of a {n}." for n in names]))
    assert hooked.class_names == names and hooked.cfg.head_type == "cosine"
    assert_close_scaled(hooked(images), expected)
    assert float(own_scale) == pytest.approx(100.0, rel=1e-6)
    # several templates: normalize, average, normalize (METHODS section 8)
    templates = ["a photo of a {}.", "art of the {}.", "{}"]
    space = text_class_space(model, names, templates, tokenizer=tokenizer)
    with torch.no_grad():
        rows = [
            F.normalize(
                F.normalize(
                    model.encode_text(tokenizer([t.format(n) for t in templates])), dim=-1
                ).mean(0),
                dim=-1,
            )
            for n in names
        ]
    torch.testing.assert_close(space.embeddings, torch.stack(rows), atol=1e-6, rtol=0)
    assert space.logit_scale == pytest.approx(100.0, rel=1e-6) and space.logit_bias == 0.0
    many = HookedViT.from_open_clip(
        model, class_names=names, templates=templates, tokenizer=tokenizer
    )
    assert_close_scaled(many(images), model.logit_scale.exp().detach() * img @ torch.stack(rows).T)


def test_saved_class_embeddings_give_the_same_head_without_the_text_tower(tmp_path, make_images):
    model = small_clip(seed=2)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=12)
    names = ["zero", "one", "two"]
    images = make_images(2, 32, seed=4)
    space = text_class_space(model, names, ["the number {}"], tokenizer=tokenizer)
    space.save(tmp_path / "space")
    from_text = HookedViT.from_open_clip(
        model, class_names=names, templates=["the number {}"], tokenizer=tokenizer
    )
    expected = from_text(images)
    for given in (tmp_path / "space", ClassSpace.load(tmp_path / "space"), space.embeddings):
        hooked = HookedViT.from_open_clip(model.visual, class_embeddings=given, class_names=names)
        if isinstance(given, torch.Tensor):  # a bare tensor: the scale comes from the caller
            hooked = HookedViT.from_open_clip(model, class_embeddings=given, class_names=names)
        assert hooked.class_names == names
        torch.testing.assert_close(hooked(images), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no text tower"):
        HookedViT.from_open_clip(model.visual, class_names=names)


def test_every_visual_tensor_is_consumed_or_named(monkeypatch):
    model = small_clip()
    extra = torch.nn.Parameter(torch.zeros(3))
    model.visual.register_parameter("mystery", extra)
    with pytest.raises(ConversionError, match="mystery"):
        convert_open_clip(model)


@pytest.mark.parametrize(
    "vision, feature",
    [
        (
            {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
            "attentional pooler",
        ),
        ({"qk_norm": True}, "block type CustomResidualAttentionBlock"),
        ({"pool_type": "none"}, "pool_type='none'"),
    ],
)
def test_unsupported_towers_are_refused_by_name(vision, feature):
    model = small_clip(**vision)
    with pytest.raises(UnsupportedArchitectureError, match=feature) as err:
        HookedViT.from_open_clip(model)
    assert err.value.feature


def test_names_are_checked_before_anything_is_built():
    with pytest.raises(ValueError, match="not an OpenCLIP architecture"):
        HookedViT.from_open_clip("open_clip:ViT-B-17")
    with pytest.raises(ValueError, match="already names its pretrained weights"):
        HookedViT.from_open_clip("ViT-B-32:openai", pretrained="openai")


def siglip_tower(proj: str, seed: int = 0):
    """OpenCLIP's timm adapter (``TimmModel``, as in the SigLIP configs) around a small timm MAP
    ViT: ``proj="none"`` (no projection), ``""`` (timm's own head is the projection) or
    ``"linear"`` (the adapter's ``head.proj``)."""
    import timm
    from open_clip.timm_model import TimmModel

    tower = TimmModel.__new__(TimmModel)
    torch.nn.Module.__init__(tower)
    tower.image_size = (32, 32)
    tower.trunk = timm.create_model(
        "vit_base_patch16_siglip_224",
        pretrained=False,
        num_classes=48 if proj == "" else 0,
        global_pool="map",
        depth=2,
        embed_dim=64,
        num_heads=4,
        img_size=32,
    )
    tower.head = torch.nn.Sequential()
    if proj == "linear":
        tower.head.add_module("drop", torch.nn.Dropout(0.0))
        tower.head.add_module("proj", torch.nn.Linear(64, 48, bias=True))
    return randomize_vit_weights_(tower, seed=seed)


@pytest.mark.parametrize("proj", ["none", "", "linear"])
def test_siglip_image_tower_equals_open_clip(proj, make_images):
    pytest.importorskip("timm")
    tower = siglip_tower(proj)
    images = make_images(2, 32)
    blocks = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: blocks.append(o.detach()))
        for b in tower.trunk.blocks
    ]
    with torch.no_grad():
        expected = tower(images)
    for h in hooks:
        h.remove()
    hooked = HookedViT.from_open_clip(tower)
    assert hooked.cfg.global_pool == "map"
    assert hooked.cfg.d_embed == (0 if proj == "none" else 48)
    out, cache = hooked.run_with_cache(images)
    assert_close_scaled(out, expected)
    for i, block in enumerate(blocks):
        assert_close_scaled(cache[f"blocks.{i}.hook_resid_post"], block, msg=f"block {i}")


def test_siglip_mlp_projection_is_refused():
    pytest.importorskip("timm")
    tower = siglip_tower("none")
    tower.head.add_module("mlp", torch.nn.Sequential(torch.nn.Linear(64, 48)))
    with pytest.raises(UnsupportedArchitectureError, match="adapter's head"):
        HookedViT.from_open_clip(tower)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, n_images", [("ViT-B-16", 2), ("ViT-B-32-quickgelu", 2), ("ViT-L-14", 1)]
)
def test_full_size_vit_equals_open_clip(arch, n_images, make_images):
    model = open_clip.create_model(arch, pretrained=None)
    randomize_vit_weights_(model.visual, seed=0)
    images = make_images(n_images, 224)
    features, blocks = open_clip_blocks(model, images)
    hooked = HookedViT.from_open_clip(model)
    out, cache = hooked.run_with_cache(images)
    assert_close_scaled(out, features)
    for i, expected in enumerate(blocks):
        assert_close_scaled(cache[f"blocks.{i}.hook_resid_post"], expected, msg=f"block {i}")


@pytest.mark.slow
def test_full_size_siglip_equals_open_clip(make_images):
    pytest.importorskip("timm")
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None)
    randomize_vit_weights_(model.visual, seed=0)
    images = make_images(2, 224)
    with torch.no_grad():
        features = model.encode_image(images)
    hooked = HookedViT.from_pretrained(model)
    assert hooked.cfg.global_pool == "map"
    assert_close_scaled(hooked(images), features)


def _hashed_ids(vocab: int, ctx: int):
    """A stand-in tokenizer (SigLIP's needs the hub): deterministic ids per text."""

    def tokenize(texts):
        rows = []
        for text in texts:
            gen = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)))
            rows.append(torch.randint(1, vocab, (ctx,), generator=gen))
        return torch.stack(rows)

    return tokenize


def _own_logits(model, images, ids):
    """OpenCLIP's own image-text logits: ``scale * img @ txt.T (+ bias)`` from ``model(x, t)``."""
    with torch.no_grad():
        img, txt, scale, *bias = model(images, ids)
    return scale * img @ txt.T + (bias[0] if bias else 0.0)


def test_zero_shot_head_keeps_open_clips_logit_bias(make_images):
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=SMALL_VISION,
        text_cfg=TEXT_CFG,
        init_logit_bias=0.0,
    )
    model = randomize_vit_weights_(model, seed=5).eval()
    with torch.no_grad():  # SigLIP-like values, set after the randomization
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    tokenizer = _hashed_ids(1000, 12)
    names, template = ["cat", "dog", "bird"], ["a photo of a {}."]
    hooked = HookedViT.from_open_clip(
        model, class_names=names, templates=template, tokenizer=tokenizer
    )
    images = make_images(3, 32, seed=6)
    expected = _own_logits(model, images, tokenizer([template[0].format(n) for n in names]))
    assert float(model.logit_bias.detach()) == -10.0
    assert_close_scaled(hooked(images), expected)


@pytest.mark.slow
def test_full_size_siglip_zero_shot_equals_open_clips_logits(make_images):
    pytest.importorskip("timm")
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None)
    randomize_vit_weights_(model.visual, seed=1)
    model.eval()
    tokenizer = _hashed_ids(int(model.vocab_size), int(model.context_length))
    names, template = ["cat", "dog"], ["a photo of a {}."]
    hooked = HookedViT.from_open_clip(
        model, class_names=names, templates=template, tokenizer=tokenizer
    )
    images = make_images(1, 224, seed=2)
    expected = _own_logits(model, images, tokenizer([template[0].format(n) for n in names]))
    assert hooked.cfg.global_pool == "map" and hooked.cfg.head_type == "cosine"
    assert_close_scaled(hooked(images), expected)
