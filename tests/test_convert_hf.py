"""Hugging Face transformers vision models convert exactly and strictly into HookedViT.

Every HF model is built from a small config with realistic random weights
(``vit_embedding_lens.testing_hf``); the reference is HF's own forward in fp32 with
``output_hidden_states=True`` (``hidden_states[0]`` = input of the first layer, ``[l + 1]`` = output
of layer ``l``) and eager attention unless a test says otherwise. Nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn

from vit_embedding_lens import HookedViT
from vit_embedding_lens.errors import (
    ConversionError,
    HubUnreachableError,
    UnsupportedArchitectureError,
)
from vit_embedding_lens.loading import hooked_from_hf, is_hf_folder
from vit_embedding_lens.model.convert_hf import convert_hf
from vit_embedding_lens.testing import assert_close_scaled
from vit_embedding_lens.testing_hf import hf_reference, randomize_hf_weights_

REL = 1e-5
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    image_size=32,
    patch_size=8,
    attn_implementation="eager",
)

#: id -> (model class, config class, config overrides, from_hf kwargs)
CASES = {
    "vit-classifier": (T.ViTForImageClassification, T.ViTConfig, dict(num_labels=7), {}),
    "vit-no-qkv-bias-gelu-new": (
        T.ViTForImageClassification,
        T.ViTConfig,
        dict(num_labels=5, qkv_bias=False, hidden_act="gelu_new", num_attention_heads=2),
        {},
    ),
    "vit-nonsquare-relu": (
        T.ViTForImageClassification,
        T.ViTConfig,
        dict(num_labels=3, image_size=(32, 48), hidden_act="relu"),
        {},
    ),
    "vit-model-headless": (T.ViTModel, T.ViTConfig, {}, dict(ignore_pooler=True)),
    "deit-teacher": (
        T.DeiTForImageClassificationWithTeacher,
        T.DeiTConfig,
        dict(num_labels=6),
        {},
    ),
    "deit-plain": (T.DeiTForImageClassification, T.DeiTConfig, dict(num_labels=6), {}),
    "dinov2": (T.Dinov2Model, T.Dinov2Config, dict(layer_norm_eps=1e-6), {}),
    "dinov2-registers": (
        T.Dinov2WithRegistersModel,
        T.Dinov2WithRegistersConfig,
        dict(num_register_tokens=4),
        {},
    ),
    "clip-vision": (T.CLIPVisionModel, T.CLIPVisionConfig, {}, {}),
    "clip-vision-projection": (
        T.CLIPVisionModelWithProjection,
        T.CLIPVisionConfig,
        dict(projection_dim=48),
        {},
    ),
    "siglip-vision": (T.SiglipVisionModel, T.SiglipVisionConfig, {}, {}),
}


def make_hf(case: str, seed: int = 0, **overrides) -> nn.Module:
    cls, config_cls, extra, _ = CASES[case]
    config = config_cls(**{**SMALL, **extra, **overrides})
    return randomize_hf_weights_(cls(config), seed=seed)


def images_for(model: nn.Module, batch: int = 3, seed: int = 0) -> torch.Tensor:
    size = model.config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference_output(model: nn.Module, images: torch.Tensor):
    out, hidden = hf_reference(model, images)
    if isinstance(model, T.ViTModel):  # converted with ignore_pooler: the final-normed CLS token
        out = model(pixel_values=images).last_hidden_state[:, 0]
    return out, hidden


def assert_matches_hf(model: nn.Module, hooked: HookedViT, images: torch.Tensor) -> None:
    expected, hidden = reference_output(model, images)
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images)
    assert_close_scaled(out, expected, rel=REL, msg="output")
    assert len(hidden) == hooked.cfg.n_layers + 1
    assert_close_scaled(cache["blocks.0.hook_resid_pre"], hidden[0], rel=REL, msg="embeddings")
    for i in range(hooked.cfg.n_layers):
        assert_close_scaled(
            cache[f"blocks.{i}.hook_resid_post"], hidden[i + 1], rel=REL, msg=f"block {i}"
        )


@pytest.mark.parametrize("case", list(CASES))
def test_equals_hf_outputs_and_every_block(case: str) -> None:
    model = make_hf(case)
    hooked = HookedViT.from_hf(model, **CASES[case][3])
    assert_matches_hf(model, hooked, images_for(model))


def test_sdpa_attention_agrees_too() -> None:
    model = make_hf("vit-classifier", attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert_matches_hf(model, HookedViT.from_hf(model), images_for(model))


def test_attention_patterns_equal_hf_attentions() -> None:
    """The hook means what HF means: the pattern of every head equals HF's attention weights."""
    model = make_hf("dinov2-registers")
    hooked = HookedViT.from_hf(model)
    images = images_for(model)
    with torch.no_grad():
        attentions = model(pixel_values=images, output_attentions=True).attentions
        _, cache = hooked.run_with_cache(images, names_filter=lambda n: "hook_pattern" in n)
    for i, attn in enumerate(attentions):
        assert_close_scaled(cache[f"blocks.{i}.attn.hook_pattern"], attn, rel=REL)


def test_attention_pool_pattern_equals_hf_multihead_attention() -> None:
    """SigLIP's MAP head: the probe's attention per head over the tokens equals HF's
    ``nn.MultiheadAttention`` weights, and its value/output path is the attention output."""
    model = make_hf("siglip-vision")
    hooked = HookedViT.from_hf(model)
    images = images_for(model)
    with torch.no_grad():
        tokens = model(pixel_values=images).last_hidden_state  # post_layernorm'd
        probe = model.head.probe.repeat(images.shape[0], 1, 1)
        attn_out, weights = model.head.attention(
            probe, tokens, tokens, need_weights=True, average_attn_weights=False
        )
        _, cache = hooked.run_with_cache(images)
    assert hooked.cfg.global_pool == "map" and hooked.layout.n_prefix == 0
    assert_close_scaled(cache["attn_pool.hook_pattern"], weights, rel=REL)
    assert_close_scaled(cache["attn_pool.hook_attn_out"], attn_out[:, 0], rel=REL)
    assert_close_scaled(cache["hook_pooled"], model(pixel_values=images).pooler_output, rel=REL)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_image_text_models_convert_their_image_tower(which: str) -> None:
    """``CLIPModel`` / ``SiglipModel``: the image tower (and CLIP's projection) is converted, the
    output equals ``get_image_features``; the text tower and logit scale/bias are set aside."""
    vision = {**SMALL, "layer_norm_eps": 1e-5}
    vision.pop("attn_implementation")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    if which == "clip":
        config = T.CLIPConfig(vision_config=vision, text_config=text, projection_dim=48)
        model = randomize_hf_weights_(T.CLIPModel(config))
    else:
        config = T.SiglipConfig(vision_config=vision, text_config=text)
        model = randomize_hf_weights_(T.SiglipModel(config))
    conversion = convert_hf(model)
    hooked = HookedViT.from_conversion(conversion)
    images = images_for(model.vision_model)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=images)
        expected = getattr(expected, "pooler_output", expected)
        assert_close_scaled(hooked(images), expected, rel=REL)
    aside = set(conversion.set_aside)
    assert "logit_scale" in aside and any(k.startswith("text_model.") for k in aside)
    assert not any(k.startswith("vision_model.") for k in aside)
    assert hooked.cfg.d_embed == (48 if which == "clip" else 0)


def test_layouts_and_configs() -> None:
    reg = HookedViT.from_hf(make_hf("dinov2-registers"))
    assert reg.layout.cls_index == 0 and reg.layout.register_indices == (1, 2, 3, 4)
    assert reg.cfg.n_registers == 4 and reg.cfg.layer_scale
    deit = HookedViT.from_hf(make_hf("deit-teacher"))
    assert deit.layout.dist_index == 1 and deit.cfg.has_dist_token
    clip = HookedViT.from_hf(make_hf("clip-vision"))
    assert clip.cfg.pre_norm and clip.cfg.final_norm == "pooled" and clip.cfg.act_fn == "quick_gelu"
    vit = HookedViT.from_hf(make_hf("vit-nonsquare-relu"))
    assert vit.cfg.image_size == (32, 48) and vit.cfg.grid_size == (4, 6)


def test_deit_without_teacher_reads_cls_only() -> None:
    """DeiTForImageClassification's head reads the CLS token alone: the distillation token (kept,
    with its position) changes nothing, and the lens's class directions are HF's classifier."""
    model = make_hf("deit-plain")
    hooked = HookedViT.from_hf(model)
    w = model.classifier.weight.detach()
    torch.testing.assert_close(hooked.tokens_to_residual_directions(torch.arange(6)), w)
    torch.testing.assert_close(hooked.head.W_head_dist, torch.zeros_like(hooked.head.W_head_dist))
    resid = torch.randn(2, hooked.cfg.n_ctx, hooked.cfg.d_model)
    moved = resid.clone()
    moved[:, 1] += 5.0  # the distillation token
    torch.testing.assert_close(hooked.readout(resid), hooked.readout(moved), atol=1e-5, rtol=0)


def test_dinov2_mask_token_is_set_aside_and_unused() -> None:
    model = make_hf("dinov2")
    conversion = convert_hf(model)
    assert list(conversion.set_aside) == ["embeddings.mask_token"]
    assert "bool_masked_pos" in conversion.set_aside["embeddings.mask_token"]
    # its value cannot matter to the converted model: another mask token converts identically
    with torch.no_grad():
        model.embeddings.mask_token.add_(3.0)
    again = convert_hf(model)
    for key, value in conversion.state_dict.items():
        torch.testing.assert_close(again.state_dict[key], value, atol=0, rtol=0)


def test_every_weight_is_consumed_or_the_conversion_fails() -> None:
    model = make_hf("vit-classifier")
    model.extra = nn.Parameter(torch.ones(3))  # a tensor the converter does not know
    with pytest.raises(ConversionError, match="not consumed.*extra"):
        convert_hf(model)


def test_permuted_position_ids_are_refused() -> None:
    model = make_hf("clip-vision")
    ids = model.embeddings.position_ids
    ids.copy_(ids.flip(-1))
    with pytest.raises(ConversionError, match="position_ids is not arange"):
        convert_hf(model)


@pytest.mark.parametrize(
    "build, feature",
    [
        (lambda: make_hf("dinov2", use_swiglu_ffn=True), "SwiGLU"),
        (
            lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**SMALL, num_labels=3)),
            "concat(CLS, mean of patch tokens)",
        ),
        (lambda: T.ViTModel(T.ViTConfig(**SMALL)), "tanh pooler"),
        (lambda: T.ViTForMaskedImageModeling(T.ViTConfig(**SMALL)), "masked-image-modelling"),
        (lambda: make_hf("vit-classifier", hidden_act="gelu_fast"), "hidden_act='gelu_fast'"),
        (lambda: nn.Linear(2, 2), "model class Linear"),
        (lambda: make_hf("siglip-vision", vision_use_head=False), "vision_use_head=False"),
    ],
)
def test_refusals_name_the_feature(build, feature: str) -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        convert_hf(build())
    assert feature in str(info.value) and feature in str(info.value.feature)


def test_class_names_from_id2label_only_when_real() -> None:
    plain = HookedViT.from_hf(make_hf("vit-classifier"))
    assert plain.class_names is None  # LABEL_0 ... are not names
    labels = {i: f"kind {i}" for i in range(7)}
    named = make_hf("vit-classifier", id2label=labels, label2id={v: k for k, v in labels.items()})
    hooked = HookedViT.from_hf(named)
    assert hooked.class_names == [f"kind {i}" for i in range(7)]
    assert hooked.to_single_token("kind 3") == 3
    assert HookedViT.from_hf(named, class_names=list("abcdefg")).class_names == list("abcdefg")


def test_save_pretrained_folder_round_trips_offline(tmp_path) -> None:
    labels = {0: "cat", 1: "dog", 2: "fox"}
    model = make_hf("dinov2-registers", seed=3)
    tuned = make_hf("vit-classifier", num_labels=3, id2label=labels, seed=4)
    tuned.save_pretrained(tmp_path / "mine")
    assert is_hf_folder(tmp_path / "mine")
    images = images_for(tuned)
    for source in (tmp_path / "mine", str(tmp_path / "mine"), f"hf:{tmp_path / 'mine'}"):
        hooked = HookedViT.from_hf(source)
        assert hooked.class_names == ["cat", "dog", "fox"]
        assert_matches_hf(tuned, hooked, images)
    model.save_pretrained(tmp_path / "dino")
    assert_matches_hf(model, hooked_from_hf(tmp_path / "dino"), images_for(model))


def test_not_a_hf_folder_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    assert not is_hf_folder(tmp_path)
    with pytest.raises(ConversionError, match="not a Hugging Face model folder"):
        HookedViT.from_hf(tmp_path)


def test_hub_name_without_a_hub_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="no model hub is reachable") as info:
        HookedViT.from_hf("hf:someone/surely-not-cached-vit-xyz")
    assert info.value.model == "someone/surely-not-cached-vit-xyz"


def test_dtype_and_float64_exactness() -> None:
    model = make_hf("dinov2")
    hooked = HookedViT.from_hf(model, dtype=torch.float64)
    assert hooked.embed.W_E.dtype == torch.float64
    images = images_for(model).double()
    with torch.no_grad():
        expected = model.double()(pixel_values=images).pooler_output
    torch.testing.assert_close(hooked(images), expected, atol=1e-10, rtol=1e-10)


def test_weight_processing_keeps_log_probabilities() -> None:
    model = make_hf("deit-teacher")
    images = images_for(model)
    plain = HookedViT.from_hf(model)
    processed = HookedViT.from_hf(
        model,
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
    )
    assert processed.cfg.normalization_type == "LNPre"
    assert processed.embed.W_E.dtype == torch.float32
    with torch.no_grad():
        expected = plain(images).log_softmax(-1)
        assert_close_scaled(processed(images).log_softmax(-1), expected, rel=REL)


# --------------------------------------------------------------------------------------------
# Full-size (ViT-B/16-shaped) configs, one per family
# --------------------------------------------------------------------------------------------
BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    patch_size=16,
    attn_implementation="eager",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        "vit-classifier",
        "deit-teacher",
        "dinov2-registers",
        "clip-vision-projection",
        "siglip-vision",
    ],
)
def test_full_size_equals_hf(case: str) -> None:
    cls, config_cls, extra, kwargs = CASES[case]
    model = randomize_hf_weights_(cls(config_cls(**{**BASE, **extra})))
    assert_matches_hf(model, HookedViT.from_hf(model, **kwargs), images_for(model, batch=2))
