"""ClassSpace (class embeddings, names, logit scale and bias), the zero-shot (cosine) head and the
projection to a joint image-text space."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vit_embedding_lens import HookedViT
from vit_embedding_lens.model.class_space import ClassSpace
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.testing import create_timm_vit

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["cat", "dog", "bird", "fish"]


def clip_like(num_classes: int = 0) -> HookedViT:
    """A CLIP-like timm tower (ln_pre, CLS pooling, final norm on tokens)."""
    tm = create_timm_vit(
        "vit_base_patch16_clip_224",
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=4,
        num_classes=num_classes,
    )
    return HookedViT.from_timm(tm)


def projected(d_embed: int = 24, proj_bias: bool = True, seed: int = 0) -> HookedViT:
    """A HookedViT with a projection to a joint space, built from a config with random weights."""
    cfg = HookedViTConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_classes=0,
        image_size=(32, 32),
        patch_size=(8, 8),
        pre_norm=True,
        d_embed=d_embed,
        proj_bias=proj_bias,
    )
    model = HookedViT(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def space(d: int, scale: float = 50.0, bias: float = -3.0, seed: int = 1) -> ClassSpace:
    E = torch.randn(len(NAMES), d, generator=torch.Generator().manual_seed(seed))
    return ClassSpace(E, NAMES, logit_scale=scale, logit_bias=bias, metadata={"source": "test"})


def test_class_space_normalizes_and_round_trips(tmp_path):
    s = space(24)
    torch.testing.assert_close(s.embeddings.norm(dim=-1), torch.ones(4))
    s.save(tmp_path / "space")
    back = ClassSpace.load(tmp_path / "space")
    assert torch.equal(back.embeddings, s.embeddings)
    assert back.names == NAMES and back.logit_scale == 50.0 and back.logit_bias == -3.0
    assert back.metadata == {"source": "test"}


@pytest.mark.parametrize(
    "embeddings, names, kwargs, message",
    [
        (torch.randn(4), NAMES, {}, "2-D"),
        (torch.randn(3, 8), NAMES, {}, "4 class names for 3"),
        (torch.tensor([[1.0, float("nan")]] * 4), NAMES, {}, "NaN"),
        (torch.zeros(4, 8), NAMES, {}, "all-zero rows"),
        (torch.randn(4, 8), NAMES, {"logit_scale": 0.0}, "logit_scale must be a positive"),
        (torch.randn(4, 8), NAMES, {"logit_bias": float("inf")}, "logit_bias must be finite"),
    ],
)
def test_class_space_refuses_bad_input(embeddings, names, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassSpace(embeddings, names, **kwargs)


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no class_space.safetensors"):
        ClassSpace.load(tmp_path)


def test_projection_and_image_embed_hook():
    model = projected()
    x = images()
    out, cache = model.run_with_cache(x)
    assert out.shape == (3, 24)  # a headless tower returns its projected features
    proj = model.proj
    expected = cache["hook_pooled"] @ proj.W_proj + proj.b_proj
    torch.testing.assert_close(cache["hook_image_embed"], expected)
    torch.testing.assert_close(out, cache["hook_image_embed"])


@pytest.mark.parametrize("kind", ["clip_like", "projected", "clip_like_with_head"])
def test_zero_shot_head_is_the_cosine_of_the_features(kind):
    model = {
        "clip_like": clip_like,
        "projected": projected,
        "clip_like_with_head": lambda: clip_like(num_classes=10),
    }[kind]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg_before = model.cfg
    s = space(model.cfg.d_features)
    zs = model.with_class_space(s)
    x = images()
    feature_hook = "hook_image_embed" if model.cfg.d_embed else "hook_pooled"
    _, cache = model.run_with_cache(x)
    features = cache[feature_hook]
    expected = 50.0 * F.normalize(features, dim=-1) @ s.embeddings.T - 3.0
    logits, zcache = zs.run_with_cache(x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zcache["hook_logits"], logits)
    torch.testing.assert_close(s.logits(features), expected, atol=1e-5, rtol=1e-5)
    assert zs.cfg.head_type == "cosine" and zs.cfg.n_classes == 4
    assert zs.class_names == NAMES
    assert zs.class_index("dog") == 1
    # the original is untouched
    assert model.cfg == cfg_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(before) == set(model.state_dict())
    # with_class_embeddings is the same head
    same = model.with_class_embeddings(s.embeddings * 3.0, NAMES, logit_scale=50.0, logit_bias=-3.0)
    torch.testing.assert_close(same(x), logits)
    # a cosine model can take another space
    other = zs.with_class_space(space(model.cfg.d_features, scale=10.0, bias=0.0, seed=5))
    assert other(x).shape == (3, 4)


def test_with_class_space_checks_the_width_and_the_model():
    model = projected(d_embed=24)
    with pytest.raises(ValueError, match="24-wide features"):
        model.with_class_space(space(32))
    with pytest.raises(TypeError, match="ClassSpace"):
        model.with_class_space(torch.randn(4, 24))  # type: ignore[arg-type]
    distilled = HookedViT.from_timm(
        create_timm_vit(
            "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48
        )
    )
    with pytest.raises(ValueError, match="distilled"):
        distilled.with_class_space(space(48))


def test_cosine_head_state_dict_keys():
    zs = projected().with_class_space(space(24))
    keys = set(zs.state_dict())
    assert {"head.W_head", "head.logit_scale", "head.logit_bias", "proj.W_proj"} <= keys
    assert "head.b_head" not in keys
    assert zs.head.W_head.shape == (24, 4)
    torch.testing.assert_close(zs.head.W_head.norm(dim=0), torch.ones(4))
    # a model built from the cosine config alone loads that state strictly
    again = HookedViT(dataclasses.replace(zs.cfg), class_names=NAMES, init_weights=False)
    again.load_state_dict(zs.state_dict(), strict=True)
    torch.testing.assert_close(again(images()), zs(images()))


def test_random_init_twin_of_a_projected_tower():
    from vit_embedding_lens.loading.twin import random_init_twin

    model = projected().with_class_space(space(24))
    twin = random_init_twin(model, seed=0)
    assert twin.cfg == model.cfg.__class__(**{**vars(model.cfg), "model_name": twin.cfg.model_name})
    assert torch.equal(twin.head.W_head, model.head.W_head)
    assert twin.proj.W_proj.std().item() == pytest.approx(32**-0.5, rel=0.2)
    assert twin(images(2)).shape == (2, 4)
