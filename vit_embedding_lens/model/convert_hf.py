"""Hugging Face ``transformers`` vision models -> HookedViT weights, exact and strict.

The twin of :mod:`vit_embedding_lens.model.convert` (timm) for live ``transformers`` modules:
``ViTModel`` / ``ViTForImageClassification``, ``DeiTModel`` / ``DeiTForImageClassification`` /
``DeiTForImageClassificationWithTeacher``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` (projection -> ``proj.W_proj``),
``SiglipVisionModel`` (its attention-pool head -> ``global_pool="map"``, ``attn_pool.*``), and the
image towers of ``CLIPModel`` / ``SiglipModel``. The architecture is read from the module and
its config; every parameter and buffer is consumed or set aside for a stated reason
(:attr:`HFConversion.set_aside`), else the conversion fails; a feature HookedViT does not
reproduce raises :class:`~vit_embedding_lens.errors.UnsupportedArchitectureError` naming it.
``transformers`` is never imported here: modules are recognised by their class names.

Decisions (see ``docs/api/conversion.md``):

- ``position_ids`` buffers (CLIP, SigLIP) are checked to be ``arange(n)``, the identity lookup the
  conversion assumes, and consumed; anything else is an error.
- ``mask_token`` (ViT/DeiT with ``use_mask_token``, Dinov2) replaces patch embeddings only when a
  caller passes ``bool_masked_pos`` (masked image modelling); HookedViT has no masked input, so it
  is set aside, listed in :attr:`HFConversion.set_aside`.
- ``ViTModel`` / ``DeiTModel`` with their tanh pooler (``pooler.dense``, the default
  ``add_pooling_layer=True``) are refused unless ``ignore_pooler=True``: then the pooler's weights
  are set aside and the HookedViT's output is the final-normed CLS token (HF's
  ``last_hidden_state[:, 0]``), not ``pooler_output``.
- ``DeiTForImageClassification`` (no teacher) has a distillation token that its single head does not
  read. It becomes a distilled HookedViT whose CLS head is twice HF's classifier and whose
  distillation head is zero, with HF's bias on both: the average of the two heads (what HookedViT
  and the lens's default ``head="mean"`` compute) is exactly HF's classifier on the CLS token.
- Dinov2 (with registers): the CLS token's position embedding is folded into the CLS token for the
  register variant (HF adds position embeddings before inserting the registers, which get none).
- ``CLIPModel`` / ``SiglipModel``: the text tower (``text_model.*``, ``text_projection``) and the
  image-text ``logit_scale`` / ``logit_bias`` are set aside: they define a class space, not the
  image model (the output is ``get_image_features``).
- Input sizes other than the config's ``image_size`` (HF's ``interpolate_pos_encoding``, and
  Dinov2's always-on interpolation) are not reproduced: the HookedViT refuses other sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import einops
import torch
from torch import Tensor, nn

from vit_embedding_lens.errors import ConversionError, UnsupportedArchitectureError
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.model.convert import TimmConversion
from vit_embedding_lens.model.weight_consumer import WeightConsumer

#: HF ``hidden_act`` -> HookedViT activation; ``gelu_new`` is HF's Python tanh formula, equal to
#: torch's tanh approximation to float rounding (well inside the 1e-5 promise)
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_new": "gelu_new",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


@dataclass(frozen=True)
class _LayerNames:
    """Where a family keeps a block's tensors (relative to the block)."""

    ln1: str
    ln2: str
    q: str
    k: str
    v: str
    o: str
    fc1: str
    fc2: str
    ls1: Optional[str] = None
    ls2: Optional[str] = None


_VIT_LAYER = _LayerNames(
    "layernorm_before",
    "layernorm_after",
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "mlp.fc1",
    "mlp.fc2",
)
_DINO_LAYER = _LayerNames(
    "norm1",
    "norm2",
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
    "attention.o_proj",
    "mlp.fc1",
    "mlp.fc2",
    "layer_scale1.lambda1",
    "layer_scale2.lambda1",
)
_CLIP_LAYER = _LayerNames(
    "layer_norm1",
    "layer_norm2",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)

#: class name -> family
HF_FAMILIES: Dict[str, str] = {
    "ViTModel": "vit",
    "ViTForImageClassification": "vit",
    "DeiTModel": "deit",
    "DeiTForImageClassification": "deit",
    "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "dinov2",
    "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": "dinov2",
    "Dinov2WithRegistersForImageClassification": "dinov2",
    "CLIPVisionModel": "clip",
    "CLIPVisionModelWithProjection": "clip",
    "SiglipVisionModel": "siglip",
    "CLIPModel": "clip",
    "SiglipModel": "siglip",
}
_LAYERS = {
    "vit": _VIT_LAYER,
    "deit": _VIT_LAYER,
    "dinov2": _DINO_LAYER,
    "clip": _CLIP_LAYER,
    "siglip": _CLIP_LAYER,
}
_REFUSED_CLASSES = {
    "ViTForMaskedImageModeling": "the masked-image-modelling decoder (ViTForMaskedImageModeling)",
    "DeiTForMaskedImageModeling": "the masked-image-modelling decoder (DeiTForMaskedImageModeling)",
    "ViTMSNModel": "ViT-MSN (convert its weights into a ViTModel)",
    "Dinov2Backbone": "the Dinov2 backbone API (multi-level feature maps); use Dinov2Model",
    "Siglip2VisionModel": "SigLIP 2's variable-resolution patch packing (NaFlex)",
}


@dataclass(frozen=True)
class HFConversion(TimmConversion):
    """A :class:`TimmConversion` (config, HookedViT state dict, class names) from a transformers
    module, plus ``set_aside``: each HF tensor that has no HookedViT counterpart and why."""

    set_aside: Dict[str, str] = field(default_factory=dict)


def _refuse(name: str, feature: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{name}: {feature} is not supported by HookedViT, which converts only Hugging Face "
        f"architectures it reproduces exactly (see docs/api/conversion.md for the supported "
        f"classes)",
        model=name,
        feature=feature,
    )


def _pair(x: Any) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


def _find_prefix(model: nn.Module, name: str) -> str:
    """The prefix of the vision tower inside ``model`` (``""``, ``"vit."``, ``"vision_model."``):
    where its ``embeddings`` module sits."""
    hits = [
        n[: -len("embeddings")]
        for n, m in model.named_modules()
        if (n == "embeddings" or n.endswith(".embeddings"))
        and "Embeddings" in type(m).__name__
        and "Text" not in type(m).__name__
    ]
    if len(hits) != 1:
        raise ConversionError(f"{name}: cannot find one vision embeddings module (found {hits})")
    return hits[0]


def _layers_prefix(c: WeightConsumer, base: str) -> str:
    for cand in ("layers", "encoder.layer", "encoder.layers"):
        if c.has(f"{base}{cand}.0.mlp.fc1.weight") or any(
            k.startswith(f"{base}{cand}.0.") for k in c.tensors
        ):
            return f"{base}{cand}"
    raise ConversionError(f"{c.name}: cannot find the transformer layers under {base!r}")


def _submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path.rstrip(".")) if path.rstrip(".") else model


def hf_class_names(config: Any, n_classes: int) -> Optional[List[str]]:
    """Class names from ``config.id2label`` when they are real labels (not ``LABEL_0``...)."""
    id2label = getattr(config, "id2label", None) or {}
    if not n_classes or len(id2label) != n_classes:
        return None
    try:
        names = [str(id2label[i]) for i in range(n_classes)]
    except KeyError:
        names = [str(id2label[str(i)]) for i in range(n_classes)]
    if all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def _vision_config(model: nn.Module) -> Any:
    """The vision tower's config (``config.vision_config`` of an image-text model)."""
    cfg: Any = model.config
    return getattr(cfg, "vision_config", None) or cfg


def _check_supported(model: nn.Module, name: str, family: str, ignore_pooler: bool) -> None:
    """Raise UnsupportedArchitectureError naming the first feature HookedViT cannot reproduce."""
    cfg = _vision_config(model)
    kind = type(model).__name__
    act = getattr(cfg, "hidden_act", None)
    if act not in _HF_ACTIVATIONS:
        raise _refuse(name, f"the MLP activation hidden_act={act!r}")
    if family == "dinov2":
        if getattr(cfg, "use_swiglu_ffn", False):
            raise _refuse(name, "the SwiGLU MLP (Dinov2 use_swiglu_ffn=True)")
        if kind.endswith("ForImageClassification"):
            raise _refuse(
                name,
                "the Dinov2 classifier on concat(CLS, mean of patch tokens) "
                "(Dinov2ForImageClassification); convert its backbone (model.dinov2 or "
                "model.dinov2_with_registers) for the pooled CLS features",
            )
    if family in ("vit", "deit") and not ignore_pooler:
        pooler = getattr(model, "pooler", None)
        if pooler is not None:
            raise _refuse(
                name,
                f"the tanh pooler of {kind} (pooler.dense + tanh on the CLS token); load it "
                f"with add_pooling_layer=False, or pass ignore_pooler=True to convert without it "
                f"(output: the final-normed CLS token)",
            )
    base = _find_prefix(model, name)
    tower = _submodule(model, base)
    if family == "siglip":
        head = getattr(tower, "head", None)
        if not getattr(cfg, "vision_use_head", True) or head is None:
            raise _refuse(
                name, "SigLIP without its attention-pool head (vision_use_head=False: no pooling)"
            )
        if type(head).__name__ != "SiglipMultiheadAttentionPoolingHead":
            raise _refuse(name, f"the SigLIP head {type(head).__name__}")
        attn = head.attention
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise _refuse(name, "an attention pool whose q, k, v widths differ")
        if attn.bias_k is not None or attn.add_zero_attn or attn.in_proj_bias is None:
            raise _refuse(name, "an attention pool with bias_k/v, zero attention or no bias")
    if kind in ("CLIPVisionModelWithProjection", "CLIPModel"):
        projection = getattr(model, "visual_projection", None)
        if not isinstance(projection, nn.Linear):
            raise _refuse(name, f"the visual projection {type(projection).__name__}")
    for mod_name, mod in tower.named_modules():
        if "norm" in mod_name.split(".")[-1] or "layrnorm" in mod_name:
            if not isinstance(mod, nn.LayerNorm):
                raise _refuse(name, f"the norm layer {type(mod).__name__} ({mod_name})")
            if mod.weight is None or mod.bias is None:
                raise _refuse(name, f"a LayerNorm without affine weight and bias ({mod_name})")
    for mod_name, mod in tower.named_modules():
        if mod_name.endswith(".mlp") and "head" not in mod_name:
            if not hasattr(mod, "fc1") or not isinstance(mod.fc1, nn.Linear):
                raise _refuse(name, f"the MLP {type(mod).__name__} ({mod_name})")
    conv = _submodule(model, base + "embeddings").get_submodule(
        "patch_embeddings.projection" if family not in ("clip", "siglip") else "patch_embedding"
    )
    if not isinstance(conv, nn.Conv2d) or (
        tuple(conv.kernel_size) != tuple(conv.stride)
        or (conv.padding != "valid" and any(conv.padding))
        or conv.groups != 1
        or any(d != 1 for d in conv.dilation)
    ):
        raise _refuse(
            name, "a patch embedding whose convolution is not one non-overlapping patch per token"
        )


def _config_from_hf(
    model: nn.Module, c: WeightConsumer, name: str, family: str, base: str, layers: str
) -> HookedViTConfig:
    cfg = _vision_config(model)
    names = _LAYERS[family]
    n_layers = int(cfg.num_hidden_layers)
    H = int(cfg.num_attention_heads)
    q_w = c.tensors[f"{layers}.0.{names.q}.weight"]
    fc1_w = c.tensors[f"{layers}.0.{names.fc1}.weight"]
    d = int(q_w.shape[1])
    shapes = {
        (
            tuple(c.tensors[f"{layers}.{i}.{names.q}.weight"].shape),
            tuple(c.tensors[f"{layers}.{i}.{names.fc1}.weight"].shape),
        )
        for i in range(n_layers)
    }
    if len(shapes) != 1:
        raise _refuse(name, f"blocks of different shapes {sorted(shapes)}")
    if q_w.shape[0] % H:
        raise _refuse(name, f"attention width {q_w.shape[0]} not divisible by {H} heads")
    tower = _submodule(model, base)
    eps_values = {float(m.eps) for m in tower.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps_values) != 1:
        raise _refuse(name, f"norms with different eps values {sorted(eps_values)}")
    n_classes = _n_classes(model, family)
    qkv_bias = c.has(f"{layers}.0.{names.q}.bias")
    n_registers = int(getattr(cfg, "num_register_tokens", 0) or 0) if family == "dinov2" else 0
    emb = f"{base}embeddings."
    has_pos = c.has(emb + "position_embeddings") or c.has(emb + "position_embedding.weight")
    pool_heads = pool_d_mlp = 0
    if family == "siglip":
        head: Any = model.get_submodule(f"{base}head")
        pool_heads, pool_d_mlp = int(head.attention.num_heads), int(head.mlp.fc1.out_features)
    return HookedViTConfig(
        n_layers=n_layers,
        d_model=d,
        n_heads=H,
        d_head=int(q_w.shape[0]) // H,
        d_mlp=int(fc1_w.shape[0]),
        n_classes=n_classes,
        image_size=_pair(cfg.image_size),
        patch_size=_pair(cfg.patch_size),
        in_chans=int(cfg.num_channels),
        has_cls_token=family != "siglip",
        has_dist_token=family == "deit",
        n_registers=n_registers,
        no_embed_class=n_registers > 0,
        has_pos_embed=has_pos,
        pre_norm=family == "clip",
        block_norm="pre",
        final_norm="pooled" if family == "clip" else "tokens",
        global_pool="map" if family == "siglip" else "token",
        pool_n_heads=pool_heads,
        pool_d_mlp=pool_d_mlp,
        d_embed=_d_embed(model),
        proj_bias=_proj_bias(model),
        qkv_bias=qkv_bias,
        layer_scale=family == "dinov2",
        act_fn=_HF_ACTIVATIONS[cfg.hidden_act],
        eps=eps_values.pop(),
        model_name=name,
    )


def _d_embed(model: nn.Module) -> int:
    projection = getattr(model, "visual_projection", None)
    return int(projection.out_features) if isinstance(projection, nn.Linear) else 0


def _proj_bias(model: nn.Module) -> bool:
    projection = getattr(model, "visual_projection", None)
    return isinstance(projection, nn.Linear) and projection.bias is not None


def _n_classes(model: nn.Module, family: str) -> int:
    for head in ("classifier", "cls_classifier"):
        mod = getattr(model, head, None)
        if isinstance(mod, nn.Linear):
            return int(mod.out_features)
    return 0


def _state_dict_from_hf(
    model: nn.Module,
    c: WeightConsumer,
    cfg: HookedViTConfig,
    family: str,
    base: str,
    layers: str,
    ignore_pooler: bool,
) -> Dict[str, Tensor]:
    names = _LAYERS[family]
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    emb = f"{base}embeddings."
    sd: Dict[str, Tensor] = {}

    # embeddings
    conv = emb + (
        "patch_embedding" if family in ("clip", "siglip") else "patch_embeddings.projection"
    )
    w_e = c.take(f"{conv}.weight")
    sd["embed.W_E"] = w_e
    sd["embed.b_E"] = _or_zeros(c.maybe(f"{conv}.bias"), d, w_e)
    pos: Optional[Tensor] = None
    prefix: List[Tensor] = []
    if family in ("clip", "siglip"):
        pos = c.take(emb + "position_embedding.weight")
        _check_position_ids(c, emb + "position_ids", int(pos.shape[0]))
        if family == "clip":
            prefix.append(c.take(emb + "class_embedding").reshape(1, d))
    else:
        if cfg.has_pos_embed:
            pos = c.take(emb + "position_embeddings").reshape(-1, d)
        prefix.append(c.take(emb + "cls_token").reshape(1, d))
    if family == "deit":
        prefix.append(c.take(emb + "distillation_token").reshape(1, d))
    if cfg.n_registers:
        registers = c.take(emb + "register_tokens").reshape(-1, d)
        if pos is not None:  # HF adds the CLS position before inserting the registers
            prefix[0] = prefix[0] + pos[:1]
            pos = pos[1:]
        prefix.append(registers)
    sd["embed.W_prefix"] = torch.cat(prefix, dim=0) if prefix else w_e.new_zeros(0, d)
    if pos is not None:
        sd["pos_embed.W_pos"] = pos
    if c.has(emb + "mask_token"):
        c.put_aside(
            emb + "mask_token",
            "replaces patch embeddings only for bool_masked_pos (masked image modelling), an "
            "input HookedViT does not take",
        )
    if cfg.pre_norm:
        sd["ln_pre.w"], sd["ln_pre.b"] = (
            c.take(f"{base}pre_layrnorm.weight"),
            c.take(f"{base}pre_layrnorm.bias"),
        )

    # blocks
    for i in range(cfg.n_layers):
        t, h = f"{layers}.{i}", f"blocks.{i}"
        for theirs, ours in ((names.ln1, "ln1"), (names.ln2, "ln2")):
            sd[f"{h}.{ours}.w"] = c.take(f"{t}.{theirs}.weight")
            sd[f"{h}.{ours}.b"] = c.take(f"{t}.{theirs}.bias")
        for which, key in (("Q", names.q), ("K", names.k), ("V", names.v)):
            w = c.take(f"{t}.{key}.weight")
            sd[f"{h}.attn.W_{which}"] = einops.rearrange(w, "(h e) d -> h d e", h=H, e=dh)
            b = _or_zeros(c.maybe(f"{t}.{key}.bias"), H * dh, w)
            sd[f"{h}.attn.b_{which}"] = b.reshape(H, dh)
        o_w = c.take(f"{t}.{names.o}.weight")
        gamma1 = _gamma(c, t, names.ls1, d, o_w)
        sd[f"{h}.attn.W_O"] = einops.rearrange(o_w, "d (h e) -> h e d", h=H, e=dh) * gamma1
        sd[f"{h}.attn.b_O"] = _or_zeros(c.maybe(f"{t}.{names.o}.bias"), d, o_w) * gamma1
        fc1_w, fc2_w = c.take(f"{t}.{names.fc1}.weight"), c.take(f"{t}.{names.fc2}.weight")
        gamma2 = _gamma(c, t, names.ls2, d, fc2_w)
        sd[f"{h}.mlp.W_in"] = fc1_w.T
        sd[f"{h}.mlp.b_in"] = _or_zeros(c.maybe(f"{t}.{names.fc1}.bias"), cfg.d_mlp, fc1_w)
        sd[f"{h}.mlp.W_out"] = fc2_w.T * gamma2
        sd[f"{h}.mlp.b_out"] = _or_zeros(c.maybe(f"{t}.{names.fc2}.bias"), d, fc2_w) * gamma2

    # final norm, pooler, heads
    final = f"{base}post_layernorm" if family in ("clip", "siglip") else f"{base}layernorm"
    sd["ln_final.w"], sd["ln_final.b"] = c.take(f"{final}.weight"), c.take(f"{final}.bias")
    if ignore_pooler and c.has(f"{base}pooler.dense.weight"):
        why = "the tanh pooler, not converted (ignore_pooler=True): the output is the CLS token"
        c.put_aside(f"{base}pooler.dense.weight", why)
        c.put_aside(f"{base}pooler.dense.bias", why)
    if cfg.global_pool == "map":
        sd.update(_attention_pool(c, cfg, f"{base}head"))
    if cfg.d_embed:
        w = c.take("visual_projection.weight")
        sd["proj.W_proj"] = w.T
        if cfg.proj_bias:
            sd["proj.b_proj"] = c.take("visual_projection.bias")
    if cfg.n_classes:
        sd.update(_heads(c, cfg))
    return sd


def _attention_pool(c: WeightConsumer, cfg: HookedViTConfig, head: str) -> Dict[str, Tensor]:
    """SigLIP's ``SiglipMultiheadAttentionPoolingHead``: its ``nn.MultiheadAttention`` packs q, k,
    v in ``in_proj_weight`` [3 d, d] (heads contiguous within each); the probe is the query."""
    H, d = cfg.pool_n_heads, cfg.d_model
    dh = d // H
    w_in = c.take(f"{head}.attention.in_proj_weight")
    b_in = c.take(f"{head}.attention.in_proj_bias")
    W_Q, W_K, W_V = einops.rearrange(w_in, "(three h e) d -> three h d e", three=3, h=H, e=dh)
    b_Q, b_K, b_V = einops.rearrange(b_in, "(three h e) -> three h e", three=3, h=H, e=dh)
    w_o = c.take(f"{head}.attention.out_proj.weight")
    sd = {
        "attn_pool.probe": c.take(f"{head}.probe").reshape(1, d),
        "attn_pool.W_Q": W_Q,
        "attn_pool.W_K": W_K,
        "attn_pool.W_V": W_V,
        "attn_pool.b_Q": b_Q,
        "attn_pool.b_K": b_K,
        "attn_pool.b_V": b_V,
        "attn_pool.W_O": einops.rearrange(w_o, "d (h e) -> h e d", h=H, e=dh),
        "attn_pool.b_O": _or_zeros(c.maybe(f"{head}.attention.out_proj.bias"), d, w_o),
        "attn_pool.ln.w": c.take(f"{head}.layernorm.weight"),
        "attn_pool.ln.b": c.take(f"{head}.layernorm.bias"),
    }
    fc1, fc2 = c.take(f"{head}.mlp.fc1.weight"), c.take(f"{head}.mlp.fc2.weight")
    sd["attn_pool.mlp.W_in"] = fc1.T
    sd["attn_pool.mlp.b_in"] = _or_zeros(c.maybe(f"{head}.mlp.fc1.bias"), cfg.pool_d_mlp, fc1)
    sd["attn_pool.mlp.W_out"] = fc2.T
    sd["attn_pool.mlp.b_out"] = _or_zeros(c.maybe(f"{head}.mlp.fc2.bias"), d, fc2)
    return sd


def _heads(c: WeightConsumer, cfg: HookedViTConfig) -> Dict[str, Tensor]:
    if c.has("cls_classifier.weight"):  # DeiT with teacher: the two heads, averaged as in HF
        w, w_d = c.take("cls_classifier.weight"), c.take("distillation_classifier.weight")
        return {
            "head.W_head": w.T,
            "head.b_head": c.take("cls_classifier.bias"),
            "head.W_head_dist": w_d.T,
            "head.b_head_dist": c.take("distillation_classifier.bias"),
        }
    w = c.take("classifier.weight")
    b = _or_zeros(c.maybe("classifier.bias"), cfg.n_classes, w)
    if cfg.has_dist_token:  # DeiT without teacher: the head reads CLS only (see module docstring)
        return {
            "head.W_head": 2 * w.T,
            "head.b_head": b,
            "head.W_head_dist": torch.zeros_like(w.T),
            "head.b_head_dist": b.clone(),
        }
    return {"head.W_head": w.T, "head.b_head": b}


def _gamma(c: WeightConsumer, t: str, key: Optional[str], d: int, like: Tensor) -> Tensor:
    if key is None:
        return torch.ones(d, dtype=like.dtype, device=like.device)
    return c.take(f"{t}.{key}")


def _set_aside_text_tower(c: WeightConsumer, base: str) -> None:
    """An image-text model's (``CLIPModel``, ``SiglipModel``) text side: not part of the image
    tower. Its class space comes from the text tower separately (``ClassSpace``)."""
    if not base:
        return
    for key in sorted(set(c.tensors) - c.taken):
        if key.startswith(("text_model.", "text_projection.")):
            c.put_aside(key, "the text tower, not part of the image model (see text class spaces)")
        elif key in ("logit_scale", "logit_bias"):
            c.put_aside(
                key, "the image-text logit scale/bias: part of a class space, not the tower"
            )


def _check_position_ids(c: WeightConsumer, key: str, n: int) -> None:
    """A ``position_ids`` buffer must be the identity lookup ``arange(n)`` assumed here."""
    if not c.has(key):
        return
    ids = c.take(key).reshape(-1)
    if ids.numel() != n or not torch.equal(ids.long().cpu(), torch.arange(n)):
        raise ConversionError(
            f"{c.name}: {key} is not arange({n}); the position embedding lookup would be permuted, "
            f"which HookedViT does not reproduce"
        )


def _or_zeros(t: Optional[Tensor], n: int, like: Tensor) -> Tensor:
    return t if t is not None else like.new_zeros(n)


def convert_hf(
    model: nn.Module,
    name: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
    *,
    ignore_pooler: bool = False,
) -> HFConversion:
    """Check, configure and convert a live transformers vision model; the module is untouched.

    ``dtype`` defaults to the module's weights' (folding happens in float64, cast once).
    ``class_names`` default to ``config.id2label`` when those are real labels. ``ignore_pooler``:
    see the module docstring.
    """
    kind = type(model).__name__
    name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or kind
    if kind in _REFUSED_CLASSES:
        raise _refuse(name, _REFUSED_CLASSES[kind])
    if kind not in HF_FAMILIES or not hasattr(model, "config"):
        raise _refuse(
            name,
            f"the model class {kind} (converted: {', '.join(sorted(HF_FAMILIES))})",
        )
    family = HF_FAMILIES[kind]
    _check_supported(model, name, family, ignore_pooler)
    c = WeightConsumer(model, name, "Hugging Face")
    base = _find_prefix(model, name)
    layers = _layers_prefix(c, base)
    cfg = _config_from_hf(model, c, name, family, base, layers)
    state = _state_dict_from_hf(model, c, cfg, family, base, layers, ignore_pooler)
    _set_aside_text_tower(c, base)
    c.check_all_taken()
    target = dtype or next(model.parameters()).dtype
    state = {k: v.to(target).contiguous() for k, v in state.items()}
    if class_names is None:
        class_names = hf_class_names(model.config, cfg.n_classes)
    names = None if class_names is None else list(class_names)
    return HFConversion(cfg, state, names, set_aside=dict(c.set_aside))
