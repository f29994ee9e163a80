"""Clear errors: bad images, unsupported architectures, bad checkpoints.

Also the positive side of each: supported options are not refused, correct
checkpoints (safetensors and torch) load to exactly the source model's logits.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Attention

from vit_embedding_lens import HookedViT, UnsupportedArchitectureError
from vit_embedding_lens.testing import assert_close_scaled, create_timm_vit

REL = 1e-5
RTOL = 1e-5
SMALL = dict(depth=2, embed_dim=64, num_heads=4, img_size=64, num_classes=10)


@pytest.fixture(scope="module")
def small_model():
    tm = create_timm_vit("vit_base_patch16_224", **SMALL)
    return tm, HookedViT.from_timm(tm)


# --------------------------------------------------------------------------------------
# Image validation
# --------------------------------------------------------------------------------------
def _good(batch=2, size=64, chans=3):
    torch.manual_seed(0)
    return torch.randn(batch, chans, size, size)


def test_valid_input_is_accepted(small_model):
    tm, hm = small_model
    x = _good()
    assert_close_scaled(hm(x), tm(x), rel=REL, rtol=RTOL)


@pytest.mark.parametrize(
    "make_bad,pattern",
    [
        pytest.param(
            lambda: _good()[0],
            r"(?i)4-?d|four|rank|ndim|dimension|\[B, ?C, ?H, ?W\]",
            id="3d-tensor",
        ),
        pytest.param(
            lambda: _good()[None],
            r"(?i)4-?d|four|rank|ndim|dimension|\[B, ?C, ?H, ?W\]",
            id="5d-tensor",
        ),
        pytest.param(lambda: _good(chans=1), r"(?i)channel", id="1-channel"),
        pytest.param(lambda: _good(chans=4), r"(?i)channel", id="4-channels"),
        pytest.param(
            lambda: _good(size=80), r"(?i)size|resolution|height|width", id="80x80-for-64"
        ),
        pytest.param(
            lambda: _good()[..., :48], r"(?i)size|resolution|height|width", id="64x48-for-64"
        ),
        pytest.param(lambda: (_good() * 100).to(torch.uint8), r"(?i)dtype|float", id="uint8"),
        pytest.param(lambda: (_good() * 100).to(torch.int64), r"(?i)dtype|float", id="int64"),
        pytest.param(lambda: _good() > 0, r"(?i)dtype|float", id="bool"),
    ],
)
def test_bad_image_shape_or_dtype_raises(small_model, make_bad, pattern):
    _, hm = small_model
    with pytest.raises((ValueError, TypeError), match=pattern):
        hm(make_bad())


@pytest.mark.parametrize(
    "value,pattern",
    [
        (float("nan"), r"(?i)nan|finite"),
        (float("inf"), r"(?i)inf|finite"),
        (float("-inf"), r"(?i)inf|finite"),
    ],
)
def test_non_finite_image_raises(small_model, value, pattern):
    _, hm = small_model
    x = _good()
    x[1, 2, 37, 5] = value  # a single pixel of the second image
    with pytest.raises((ValueError, TypeError), match=pattern):
        hm(x)
    with pytest.raises((ValueError, TypeError), match=pattern):
        hm.run_with_cache(x)


def test_dynamic_img_size_model_accepts_other_sizes(make_images):
    tm = create_timm_vit("vit_base_patch16_224", dynamic_img_size=True, **SMALL)
    hm = HookedViT.from_timm(tm)
    for size in [(64, 64), (96, 80), (48, 112)]:
        x = make_images(2, size)
        assert_close_scaled(hm(x), tm(x), rel=REL, rtol=RTOL, msg=f"dynamic size {size}")


# --------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------
_T = dict(depth=1, embed_dim=64, num_heads=4, num_classes=10)


def _gated_vit():
    tm = create_timm_vit("vit_base_patch16_224", img_size=64, **_T)
    tm.blocks[0].attn = Attention(64, num_heads=4, qkv_bias=True, gated=True)
    return tm


def _map_two_latents():
    from timm.layers import AttentionPoolLatent

    tm = create_timm_vit("vit_base_patch16_siglip_224", img_size=64, **_T)
    tm.attn_pool = AttentionPoolLatent(64, num_heads=4, latent_len=2, norm_layer=torch.nn.LayerNorm)
    return tm


UNSUPPORTED = [
    # id, factory, regex the message must match (names the feature)
    (
        "siglip-map-pool-two-latents",
        lambda: _map_two_latents(),
        r"(?i)attention pool.*latent",
    ),
    (
        "eva02-rope",
        lambda: create_timm_vit("eva02_tiny_patch14_224", img_size=56, **_T),
        r"(?i)eva|rope|rotary",
    ),
    (
        "vit-rope",
        lambda: create_timm_vit("vit_base_patch16_rope_224", img_size=64, **_T),
        r"(?i)eva|rope|rotary",
    ),
    (
        "relpos",
        lambda: create_timm_vit("vit_relpos_small_patch16_224", img_size=64, **_T),
        r"(?i)rel(ative)?[ _-]?pos",
    ),
    (
        "parallel-blocks",
        lambda: create_timm_vit("vit_small_patch16_18x2_224", img_size=64, **_T),
        r"(?i)parallel",
    ),
    (
        "parallel-scaling-rmsnorm",
        lambda: create_timm_vit("vit_base_patch16_xp_224", img_size=64, **_T),
        r"(?i)parallel|rms",
    ),
    (
        "swiglu-packed",
        lambda: create_timm_vit("vit_giant_patch14_dinov2", img_size=56, **dict(_T, embed_dim=96)),
        r"(?i)swiglu|glu|gated mlp",
    ),
    (
        "swiglu-rmsnorm-aimv2",
        lambda: create_timm_vit("aimv2_large_patch14_224", img_size=56, **_T),
        r"(?i)swiglu|glu|rms|embed.?norm",
    ),  # several unsupported features; any may be named
    (
        "rmsnorm",
        lambda: create_timm_vit("vit_base_patch16_224", img_size=64, norm_layer="rmsnorm", **_T),
        r"(?i)rms",
    ),
    (
        "scale-attn-norm",
        lambda: create_timm_vit("vit_base_patch16_224", img_size=64, scale_attn_norm=True, **_T),
        r"(?i)scale.?(attn.?)?norm|scale norm",
    ),
    (
        "scale-mlp-norm",
        lambda: create_timm_vit("vit_base_patch16_224", img_size=64, scale_mlp_norm=True, **_T),
        r"(?i)scale.?(mlp.?)?norm|scale norm",
    ),
    (
        "final-norm-false",
        lambda: create_timm_vit("vit_base_patch16_224", img_size=64, final_norm=False, **_T),
        r"(?i)final.?norm",
    ),
    (
        "diff-attention",
        lambda: create_timm_vit("vit_dwee_patch16_reg1_gap_256", img_size=64, **_T),
        r"(?i)diff",
    ),
    ("gated-attention", _gated_vit, r"(?i)gate"),
]


@pytest.mark.parametrize(
    "factory,pattern", [u[1:] for u in UNSUPPORTED], ids=[u[0] for u in UNSUPPORTED]
)
def test_unsupported_architecture_is_refused_naming_the_feature(factory, pattern):
    tm = factory()
    before = {k: v.clone() for k, v in tm.state_dict().items()}
    with pytest.raises(UnsupportedArchitectureError, match=pattern):
        HookedViT.from_timm(tm)
    after = tm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_error_is_a_value_error_and_names_the_model():
    assert issubclass(UnsupportedArchitectureError, ValueError)
    name = "vit_relpos_base_patch16_224"
    with pytest.raises(UnsupportedArchitectureError) as info:
        HookedViT.from_timm(name, img_size=64, **_T)
    msg = str(info.value)
    assert name in msg, msg
    assert re.search(r"(?i)relative position", msg), msg


def test_non_vit_model_is_refused():
    tm = timm.create_model("resnet18", pretrained=False, num_classes=10)
    with pytest.raises(
        (UnsupportedArchitectureError, TypeError),
        match=r"(?i)resnet|vision ?transformer|vit|support",
    ):
        HookedViT.from_timm(tm)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(qk_norm=True),
        dict(init_values=1e-5),
        dict(qkv_bias=False),
        dict(qk_norm=True, init_values=0.1),
    ],
    ids=["qk_norm", "init_values", "no_qkv_bias", "qk_norm+init_values"],
)
def test_supported_options_are_not_refused(overrides, make_images):
    tm = create_timm_vit("vit_base_patch16_224", **dict(SMALL, **overrides))
    hm = HookedViT.from_timm(tm)
    x = make_images(2, 64)
    logits, cache = hm.run_with_cache(x)
    assert_close_scaled(logits, tm(x), rel=REL, rtol=RTOL)
    assert_close_scaled(hm(x), tm(x), rel=REL, rtol=RTOL)
    if overrides.get("qk_norm"):
        # hook_q is after q_norm: every head vector is LayerNormed with timm's q_norm
        blk = tm.blocks[0]
        q_raw = blk.attn.qkv(blk.norm1(cache["blocks.0.hook_resid_pre"]))[..., :64].reshape(
            2, -1, 4, 16
        )
        assert_close_scaled(
            cache["blocks.0.attn.hook_q"], blk.attn.q_norm(q_raw), rel=REL, rtol=RTOL
        )


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
CKPT_NAME = (
    "deit3_small_patch16_224"  # LayerScale gammas and no_embed_class pos_embed must load too
)
CKPT_KW = dict(depth=2, embed_dim=64, num_heads=4, img_size=64, num_classes=10)
CKPT_ERRORS = (ValueError, KeyError, RuntimeError)


@pytest.fixture(scope="module")
def source():
    return create_timm_vit(CKPT_NAME, seed=7, **CKPT_KW)


def _x():
    torch.manual_seed(11)
    return torch.randn(2, 3, 64, 64)


def _state_dict(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def test_safetensors_checkpoint_loads_exactly(source, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(_state_dict(source), str(path))
    hm = HookedViT.from_timm(CKPT_NAME, checkpoint_path=str(path), **CKPT_KW)
    x = _x()
    expected = source(x)
    assert_close_scaled(hm(x), expected, rel=REL, rtol=RTOL)
    # the checkpoint is what made it match: the same name without it is another model
    other = HookedViT.from_timm(CKPT_NAME, **CKPT_KW)
    assert (other(x) - expected).abs().max() > 1e-2


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(lambda sd: {"state_dict": sd}, id="state_dict-key"),
        pytest.param(
            lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
            id="model-key+module",
        ),
    ],
)
def test_torch_checkpoint_loads_exactly(source, tmp_path, wrap):
    path = tmp_path / "weights.pth"
    torch.save(wrap(_state_dict(source)), path)
    hm = HookedViT.from_timm(CKPT_NAME, checkpoint_path=path, **CKPT_KW)
    x = _x()
    assert_close_scaled(hm(x), source(x), rel=REL, rtol=RTOL)


def _edit_missing(sd):
    del sd["blocks.1.ls2.gamma"]
    return "blocks.1.ls2.gamma"


def _edit_extra(sd):
    sd["blocks.0.attn.extra_proj.weight"] = torch.randn(4, 4)
    return "blocks.0.attn.extra_proj.weight"


def _edit_shape(sd):
    sd["blocks.0.mlp.fc1.bias"] = torch.randn(7)
    return "blocks.0.mlp.fc1.bias"


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize(
    "edit", [_edit_missing, _edit_extra, _edit_shape], ids=["missing", "extra", "shape"]
)
def test_bad_checkpoint_fails_naming_the_key(source, tmp_path, fmt, edit):
    sd = _state_dict(source)
    key = edit(sd)
    path = tmp_path / f"bad.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    with pytest.raises(CKPT_ERRORS, match=re.escape(key)):
        HookedViT.from_timm(CKPT_NAME, checkpoint_path=path, **CKPT_KW)


_UNPICKLE_SIDE_EFFECTS: list[str] = []


def _record_unpickle():
    _UNPICKLE_SIDE_EFFECTS.append("executed")
    return {}


class _CodeOnUnpickle:
    """Unpickling this calls _record_unpickle: what weights_only=True must prevent."""

    def __reduce__(self):
        return (_record_unpickle, ())


class _PlainObject:
    def __init__(self, sd):
        self.sd = sd


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            lambda sd: {"state_dict": sd, "extra": _CodeOnUnpickle()}, id="reduce-callable"
        ),
        pytest.param(lambda sd: _PlainObject(sd), id="custom-class-instance"),
    ],
)
def test_pickled_objects_are_refused(source, tmp_path, payload):
    path = tmp_path / "unsafe.pth"
    torch.save(payload(_state_dict(source)), path)
    _UNPICKLE_SIDE_EFFECTS.clear()
    with pytest.raises(Exception) as info:
        HookedViT.from_timm(CKPT_NAME, checkpoint_path=path, **CKPT_KW)
    assert not isinstance(info.value, (AttributeError, NameError, AssertionError)), repr(info.value)
    assert re.search(
        r"(?i)weights.?only|unpickl|global|unsafe|refus|not allowed|pickle", str(info.value)
    ), str(info.value)
    assert _UNPICKLE_SIDE_EFFECTS == [], "checkpoint code ran: torch.load without weights_only=True"


def test_missing_checkpoint_file_is_a_clear_error(tmp_path):
    path = tmp_path / "does_not_exist.safetensors"
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(path.name)):
        HookedViT.from_timm(CKPT_NAME, checkpoint_path=path, **CKPT_KW)


def test_pretrained_weights_without_a_hub_say_what_to_do_instead(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="checkpoint_path=.*from_bundled"):
        HookedViT.from_timm("deit_tiny_patch16_224", pretrained=True)


class _Connection:
    def close(self):
        pass


@pytest.mark.parametrize(
    "offline, connect, expected",
    [
        ("1", None, False),  # never tries the network
        ("TRUE", None, False),
        ("0", "ok", True),
        ("", "ok", True),
        ("false", "refused", False),
    ],
)
def test_hub_reachable_reads_hf_hub_offline_then_tries_the_host(
    monkeypatch, offline, connect, expected
):
    from vit_embedding_lens.loading import hub

    calls = []

    def create_connection(address, timeout):
        calls.append((address, timeout))
        if connect == "refused":
            raise ConnectionRefusedError("no route")
        return _Connection()

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub.socket, "create_connection", create_connection)
    assert hub.hub_reachable(timeout=0.5) is expected
    assert calls == ([] if connect is None else [(("huggingface.co", 443), 0.5)])


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(ValueError, match="not a timm model name.*deit_tiny_patch16_224"):
        HookedViT.from_timm("deit_tiny_patch16_244")


def test_input_validation_can_be_switched_off_for_trusted_loops():
    model = HookedViT.from_timm(
        create_timm_vit("vit_base_patch16_224", depth=1, embed_dim=64, num_heads=4, img_size=32)
    )
    x = torch.randn(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(x)
    model.validate_inputs = False
    assert torch.isnan(model(x)).any()  # garbage in, garbage out - but no check, no sync
