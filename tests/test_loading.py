"""The loading floor: the one parser of model names, the seam HookedViT loads through, the
random-init twin built from the config, and the model survey reading the converter's own field."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import timm
import torch
from timm.layers import LayerNorm
from timm.layers.activations import QuickGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from vit_embedding_lens import HookedViT, UnsupportedArchitectureError, loading
from vit_embedding_lens.loading import (
    ModelSource,
    check_model_support,
    parse_model_name,
    random_init_twin,
    refusal_feature,
    timm_from_config,
)
from vit_embedding_lens.model import registry
from vit_embedding_lens.model.convert import check_supported, convert_timm
from vit_embedding_lens.zoo.bundled import create_bundled_timm_model

SMALL = dict(depth=2, img_size=32, patch_size=8)


# -------------------------------------------------------------------------------------------------
# The parser
# -------------------------------------------------------------------------------------------------
def test_parser_reads_every_kind_of_name(tmp_path):
    bundled = parse_model_name("bundled:fashion-vit")
    assert bundled == ModelSource("bundled", "fashion-vit")
    assert bundled.label == "bundled:fashion-vit" and bundled.tag is None

    tagged = parse_model_name("vit_base_patch16_224.augreg_in21k_ft_in1k")
    assert tagged.kind == "timm" and tagged.path is None
    assert tagged.architecture == "vit_base_patch16_224"
    assert tagged.tag == "augreg_in21k_ft_in1k"
    assert tagged.label == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert parse_model_name("vit_tiny_patch16_224").tag is None

    weights = tmp_path / "w.safetensors"
    weights.touch()
    checkpoint = parse_model_name("vit_tiny_patch16_224", checkpoint=weights)
    assert checkpoint == ModelSource("checkpoint", "vit_tiny_patch16_224", weights)
    assert checkpoint.architecture == "vit_tiny_patch16_224"

    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for source in (
        parse_model_name(None, checkpoint=folder),
        parse_model_name(f"local-dir:{folder}"),
    ):
        assert source.kind == "timm-folder" and source.path == folder.resolve()
        assert source.label == f"local-dir:{folder.resolve()}"


@pytest.mark.parametrize(
    "name, checkpoint, error, match",
    [
        (None, None, ValueError, "name a model"),
        ("", None, ValueError, "model name is empty"),
        ("bundled:", None, ValueError, "names no bundled model"),
        ("bundled:mnist-vit", "w.pt", ValueError, "bundled model takes no checkpoint"),
        ("hf-hub:timm/vit_tiny", None, ValueError, "not a timm model name or a known source"),
        ("vit_tiny_patch16_224.", None, ValueError, "not a timm model name"),
        (None, "w.pt", ValueError, "does not say which architecture"),
    ],
)
def test_parser_refuses_bad_names_clearly(tmp_path, monkeypatch, name, checkpoint, error, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").touch()
    with pytest.raises(error, match=match):
        parse_model_name(name, checkpoint)


def test_parser_refuses_a_folder_without_config_and_a_non_string(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        parse_model_name(None, checkpoint=tmp_path)
    with pytest.raises(TypeError, match="a model name is a string"):
        parse_model_name(3)


def test_bundled_names_everywhere_go_through_the_one_parser():
    from vit_embedding_lens.zoo import bundled

    assert bundled.bundled_name is loading.bundled_name
    assert bundled.BUNDLED_PREFIX == loading.BUNDLED_PREFIX == "bundled:"
    assert loading.bundled_name("bundled:mnist-vit") == "mnist-vit"
    assert loading.bundled_name(None) is None


# -------------------------------------------------------------------------------------------------
# The seam: model/ looks loaders up, loading/ registers them
# -------------------------------------------------------------------------------------------------
def test_the_loading_floor_registers_hookedvits_loaders():
    assert {"timm", "bundled"} <= set(registry.registered_kinds())
    assert registry.loader("timm") is loading.hooked_from_timm
    assert registry.loader("bundled") is loading.hooked_from_bundled


def test_a_missing_loader_is_a_clear_error(monkeypatch):
    monkeypatch.delitem(registry._LOADERS, "timm")
    with pytest.raises(LookupError, match="no model loader is registered for 'timm'.*import"):
        HookedViT.from_timm("vit_tiny_patch16_224")
    with pytest.raises(LookupError, match="'openclip'"):
        registry.loader("openclip")


def test_a_fresh_interpreter_loads_by_name_through_any_import_path():
    """The package root is lazy (no torch on ``import vit_embedding_lens``); a model imported
    without it (``vit_embedding_lens.model``) still finds the loaders, and the old hand-downs of
    ``model.convert`` still resolve."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
import vit_embedding_lens
print("torch" in sys.modules)
from vit_embedding_lens.model import HookedViT
print(HookedViT.from_bundled().cfg.model_name)
from vit_embedding_lens.model.convert import hub_reachable, load_timm_model
from vit_embedding_lens.loading import hub_reachable as home
print(hub_reachable is home, vit_embedding_lens.HookedViT is HookedViT)
print(sorted(vit_embedding_lens.model.registered_kinds()))
"""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[:4] == ["False", "bundled:mnist-vit", "True True", "['bundled', 'hf', 'timm']"]


def test_constructors_pass_their_arguments_to_the_registered_loader(monkeypatch):
    calls = []
    monkeypatch.setitem(registry._LOADERS, "bundled", lambda *a, **kw: calls.append((a, kw)))
    HookedViT.from_bundled("fashion-vit", dtype=torch.float64)
    assert calls == [(("fashion-vit",), {"dtype": torch.float64})]
    with pytest.raises(TypeError, match="callable"):
        registry.register_loader("bundled", "not a function")
    with pytest.raises(ValueError, match="non-empty string"):
        registry.register_loader("", lambda: None)


def test_runner_loads_a_checkpoint_with_one_module_creation(tmp_path, monkeypatch):
    from vit_embedding_lens.runner.models import load_model

    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    path = tmp_path / "w.pt"
    torch.save(timm_model.state_dict(), path)
    created = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: created.append(a) or real(*a, **kw))
    with pytest.raises(Exception, match="does not match the timm model"):  # depth 12 vs 1
        load_model("vit_tiny_patch16_224", checkpoint=path)
    assert created == [("vit_tiny_patch16_224",)]

    loaded = load_model("bundled:mnist-vit")
    assert loaded.model.cfg.model_name == "bundled:mnist-vit" and loaded.data_config["std"] == (
        0.5,
    )
    assert len(created) == 1  # the bundled model is built by the zoo, not by name


# -------------------------------------------------------------------------------------------------
# The random-init twin, from the model's config
# -------------------------------------------------------------------------------------------------
def _seeded(build, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _assert_same_weights(twin: HookedViT, timm_module: torch.nn.Module) -> None:
    expected = convert_timm(timm_module, "reference").state_dict
    got = twin.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


TIMM_CASES = {
    # the old twin rebuilt these with timm.create_model(name, **sizes): same weights for the seed
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL),
    "registers_no_cls_avg": lambda: timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        class_token=False,
        reg_tokens=4,
        global_pool="avg",
        **SMALL,
    ),
    "deit_distilled": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, **SMALL
    ),
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_twin_from_config_is_timms_own_model_for_the_seed(case):
    build = TIMM_CASES[case]
    model = HookedViT.from_timm(build())
    twin = random_init_twin(model, seed=5)
    assert twin.cfg == dataclasses.replace(model.cfg, model_name=twin.cfg.model_name)
    assert twin.cfg.model_name.endswith("(random init)")
    _assert_same_weights(twin, _seeded(build, seed=5))
    if case == "deit_distilled":
        rebuilt = _seeded(lambda: timm_from_config(model.cfg))
        assert type(rebuilt) is VisionTransformerDistilled


def test_twin_of_the_bundled_model_matches_the_zoo_recipe():
    model = HookedViT.from_bundled()
    twin = random_init_twin(model, seed=0)
    assert twin.class_names == model.class_names
    _assert_same_weights(twin, _seeded(create_bundled_timm_model))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(block_fn=ResPostBlock),  # residual post-norm
        dict(  # CLIP-like: norm before the blocks, quick GELU, other eps, no patch-embed bias
            pre_norm=True,
            act_layer=QuickGELU,
            norm_layer=partial(LayerNorm, eps=1e-5),
            qk_norm=True,
            qkv_bias=False,
            global_pool="avg",
            fc_norm=False,
        ),
        dict(no_embed_class=True, reg_tokens=2, mlp_ratio=8 / 3, dynamic_img_size=True),
    ],
)
def test_twin_from_config_rebuilds_the_architecture(kwargs):
    original = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, **kwargs
    )
    model = HookedViT.from_timm(original)
    rebuilt = timm_from_config(model.cfg)
    assert type(rebuilt.blocks[0]) is type(original.blocks[0])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in original.state_dict().items()
    }
    twin = random_init_twin(model)
    assert twin.cfg == dataclasses.replace(model.cfg, model_name=twin.cfg.model_name)


def test_twin_needs_layer_scale_init_values_and_takes_a_timm_model():
    original = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=5
    )
    scaled = HookedViT.from_timm(
        VisionTransformer(
            img_size=32,
            patch_size=8,
            embed_dim=48,
            depth=1,
            num_heads=3,
            num_classes=5,
            init_values=1e-5,
        )
    )
    with pytest.raises(ValueError, match="layer_scale.*init_values"):
        random_init_twin(scaled)
    assert random_init_twin(scaled, init_values=1e-5).cfg.layer_scale
    # a timm module of another architecture is refused by the architecture check
    with pytest.raises(ValueError, match="layer_scale: model True vs twin False"):
        random_init_twin(scaled, timm_model=original)


def test_twin_reads_layer_scale_from_the_architecture_a_name_names(tmp_path):
    """A LayerScale model loaded by name (a timm architecture, a checkpoint's, a timm folder's
    config.json) gets its twin without init_values given: timm's own model for the seed."""
    from timm.models._hub import save_for_hf

    from vit_embedding_lens.loading import layer_scale_init_values

    def deit3():
        return timm.create_model(
            "deit3_small_patch16_224", pretrained=False, num_classes=3, **SMALL
        )

    model = HookedViT.from_timm(_seeded(deit3, seed=1))
    assert model.cfg.model_name == "deit3_small_patch16_224" and model.cfg.layer_scale
    _assert_same_weights(random_init_twin(model, seed=5), _seeded(deit3, seed=5))

    def scaled():
        return timm.create_model("vit_tiny_patch16_224", init_values=0.25, num_classes=3, **SMALL)

    save_for_hf(_seeded(scaled, seed=1), tmp_path / "folder")
    folder = HookedViT.from_timm(f"local-dir:{tmp_path / 'folder'}")
    assert layer_scale_init_values(folder.cfg.model_name) == 0.25
    _assert_same_weights(random_init_twin(folder, seed=5), _seeded(scaled, seed=5))
    for name in ("vit_tiny_patch16_224", "VisionTransformer", "bundled:mnist-vit"):
        assert layer_scale_init_values(name) is None


def test_a_fine_tuned_checkpoint_sizes_the_head(tmp_path):
    """A checkpoint's classifier rows set the class count (safetensors: read from its header;
    torch files: from the state dict); an explicit num_classes wins."""
    from safetensors.torch import save_file

    from vit_embedding_lens.loading import checkpoint_num_classes
    from vit_embedding_lens.runner.models import load_model
    from vit_embedding_lens.testing import create_timm_vit

    timm_model = create_timm_vit("test_vit", num_classes=3)
    state = {k: v.contiguous() for k, v in timm_model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    images = torch.randn(2, 3, 160, 160)
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        assert checkpoint_num_classes(path) == 3
        model = load_model("test_vit", path).model
        assert model.cfg.n_classes == 3
        with torch.no_grad():
            torch.testing.assert_close(model(images), timm_model(images), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="wrong shapes.*head.weight"):
        load_model("test_vit", tmp_path / "w.pt", num_classes=5)
    headless = {k: v for k, v in state.items() if not k.startswith("head.")}
    save_file(headless, tmp_path / "headless.safetensors")
    assert checkpoint_num_classes(tmp_path / "headless.safetensors") is None


def test_twin_keeps_old_import_paths():
    from vit_embedding_lens.lens import baseline

    assert baseline.random_init_twin is random_init_twin


# -------------------------------------------------------------------------------------------------
# The survey reads the converter's structured refusal
# -------------------------------------------------------------------------------------------------
def test_refusals_carry_model_and_feature():
    with torch.device("meta"):
        prr_pool = VisionTransformer(
            img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, global_pool="prr"
        )
    with pytest.raises(UnsupportedArchitectureError) as refusal:
        check_supported(prr_pool, "prr-pool")
    assert refusal.value.model == "prr-pool"
    assert refusal.value.feature.startswith("the attention-pool head AttentionPoolPrr")
    assert refusal_feature(refusal.value) == refusal.value.feature


def test_survey_reports_the_field_not_the_wording():
    entry = check_model_support("eva02_tiny_patch14_224")
    assert not entry.supported and entry.module == "eva"
    assert entry.reason == "rotary position embeddings (EVA family)"
    # the field, whatever the message says
    err = UnsupportedArchitectureError("m: x is not supported by HookedViT", model="m", feature="y")
    assert refusal_feature(err) == "y"
    assert refusal_feature(ValueError("plain")) == "plain"
    assert check_model_support("vit_tiny_patch16_224").supported

    from vit_embedding_lens.runner import model_support

    assert model_support.check_model_support is check_model_support


# -------------------------------------------------------------------------------------------------
# model/: the converter returns a conversion; one place builds the model; attention's score mask
# -------------------------------------------------------------------------------------------------
def test_conversion_is_built_in_one_place_strictly():
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)
    conversion = convert_timm(timm_model, "tiny", dtype=torch.float64)
    assert conversion.dtype == torch.float64 and conversion.cfg.model_name == "tiny"
    model = HookedViT.from_conversion(conversion)
    assert next(model.parameters()).dtype == torch.float64
    broken = dataclasses.replace(
        conversion, state_dict={k: v for k, v in conversion.state_dict.items() if k != "embed.b_E"}
    )
    with pytest.raises(RuntimeError, match="embed.b_E"):
        HookedViT.from_conversion(broken)

    from vit_embedding_lens.model.convert import convert_timm_vit, hub_reachable

    assert hub_reachable is loading.hub_reachable
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(convert_timm_vit(timm_model)(x), timm_model.eval()(x))


def test_masked_scores_nests_restores_and_checks_its_mask():
    model = HookedViT.from_timm(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL)
    )
    attn = model.blocks[0].attn
    n = model.layout.n_tokens
    a = torch.ones(n, n, dtype=torch.bool)
    a[1:, 0] = False
    b = torch.ones(attn.cfg.n_heads, n, n, dtype=torch.bool)
    b[0, 1:, 2] = False
    assert attn.score_mask is None
    with attn.masked_scores(a):
        assert torch.equal(attn.score_mask, a)
        with attn.masked_scores(b):
            assert torch.equal(attn.score_mask, a & b)
        assert torch.equal(attn.score_mask, a)
    assert attn.score_mask is None
    with pytest.raises(TypeError, match="bool"):
        with attn.masked_scores(a.float()):
            pass
    with pytest.raises(ValueError, match="heads"):
        with attn.masked_scores(torch.ones(7, n, n, dtype=torch.bool)):
            pass
    with pytest.raises(AttributeError):
        attn.score_mask = a  # read-only: set it with masked_scores


def test_token_slot_kernels_live_in_the_model():
    from vit_embedding_lens import interventions
    from vit_embedding_lens.interventions import token_removal
    from vit_embedding_lens.model import token_slots

    assert interventions.kept_positions is token_slots.kept_positions
    assert token_removal.check_keep_mask is token_slots.check_keep_mask
    assert token_removal.gather_tokens is token_slots.gather_tokens
    index, valid = token_slots.kept_positions(torch.tensor([[True, False, True], [True] * 3]))
    assert index.tolist() == [[0, 2, -1], [0, 1, 2]]
    assert token_slots.padding_mask(index)[0, 0].tolist() == [
        [True, True, False],
        [True, True, False],
        [False, False, True],
    ]
