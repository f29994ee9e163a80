"""OpenCLIP image towers as HookedViTs, exactly and strictly, with zero-shot heads from the text
tower.

Two kinds of image tower (``model.visual`` of ``open_clip.create_model(ARCH)``):

- ``open_clip.transformer.VisionTransformer`` (ViT-B-32, ViT-B-16, ViT-L-14, the QuickGELU
  variants, custom configs): ``conv1`` (no bias) + ``class_embedding`` + ``positional_embedding``,
  ``ln_pre``, residual blocks whose attention is ``nn.MultiheadAttention`` (packed
  ``in_proj_weight``) with optional LayerScale ``ls_1``/``ls_2``, ``ln_post`` before pooling (or
  after it: ``final_ln_after_pool``), CLS (``tok``) or mean (``avg``) pooling, and ``proj`` to the
  joint space. Read directly here.
- ``open_clip.timm_model.TimmModel`` (the SigLIP towers): a timm ``VisionTransformer`` trunk (with
  SigLIP's attention pool, ``global_pool="map"``) converted by the timm converter, plus the
  adapter's linear projection when it has one.

The projection becomes the HookedViT's ``proj`` (``cfg.d_embed``, ``hook_image_embed``): a
headless tower returns ``model.encode_image(x)`` before normalization. With class names (and
templates) or ``class_embeddings=`` the model gets a zero-shot head from the text tower
(:mod:`vit_embedding_lens.loading.text_space`), whose logits equal OpenCLIP's own image-text logits.

Refused by name: the attentional pooler (CoCa, ``attentional_pool``), custom attention blocks
(``block_type="custom"``: qk-norm, scaled cosine attention, head scales, inner norms),
cross-attention blocks, ``pool_type="none"``, a timm adapter's MLP projection or attention pooling
(``abs_attn``/``rot_attn``), and non-ViT towers (ModifiedResNet, ConvNeXt, ...). Patch dropout is
the identity in evaluation, which is all a HookedViT computes. ``open_clip`` is imported inside
functions only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union, cast

import einops
import torch
from torch import Tensor, nn

from vit_embedding_lens.errors import HubUnreachableError
from vit_embedding_lens.loading.names import ModelSource, parse_model_name
from vit_embedding_lens.loading.text_space import (
    Tokenizer,
    class_space_from_embeddings,
    text_class_space,
)
from vit_embedding_lens.model.activations import activation_name
from vit_embedding_lens.model.class_space import ClassSpace
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.model.convert import TimmConversion, _refuse, convert_timm
from vit_embedding_lens.model.hooked_vit import HookedViT
from vit_embedding_lens.model.weight_consumer import WeightConsumer

__all__ = [
    "LoadedOpenClip",
    "convert_open_clip",
    "hooked_from_open_clip",
    "image_tower",
    "load_open_clip",
    "open_clip_data_config",
]


@dataclasses.dataclass(frozen=True)
class LoadedOpenClip:
    """An OpenCLIP model made from a source, what to call it, its tokenizer, and (for a bundled
    model) its class names and templates."""

    module: nn.Module
    label: str
    tokenizer: Optional[Tokenizer] = None
    class_names: Optional[Sequence[str]] = None
    templates: Optional[Sequence[str]] = None


def load_open_clip(source: ModelSource) -> LoadedOpenClip:
    """The OpenCLIP model (eval mode) a parsed source names: ``open_clip:ARCH`` (random weights),
    ``open_clip:ARCH:PRETRAINED`` (needs the hub unless cached), ``open_clip:ARCH`` with a weights
    file, or a bundled image-text model (``bundled:mnist-clip``)."""
    if source.kind == "bundled":
        from vit_embedding_lens.zoo.clip import (
            bundled_clip_spec,
            bundled_clip_tokenizer,
            load_bundled_clip,
        )

        spec = bundled_clip_spec(source.name)
        return LoadedOpenClip(
            load_bundled_clip(source.name),
            source.label,
            bundled_clip_tokenizer(source.name),
            spec.class_names,
            spec.templates,
        )
    if source.kind != "open_clip":
        raise ValueError(f"{source.label} is not an OpenCLIP model (open_clip:ARCH[:PRETRAINED])")
    import open_clip

    arch, tag = source.architecture, source.tag
    known = open_clip.list_models()
    if not arch.startswith("hf-hub:") and arch not in known:
        import difflib

        close = difflib.get_close_matches(arch, known, n=3)
        raise ValueError(
            f"{arch!r} is not an OpenCLIP architecture (close: {close}); see "
            f"open_clip.list_models()"
        )
    if tag is not None and source.path is None and not arch.startswith("hf-hub:"):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tag not in tags:
            raise ValueError(
                f"{arch!r} has no pretrained weights tagged {tag!r} in OpenCLIP (known: "
                f"{tags or 'none'}); pass a weights file with checkpoint_path="
            )
    pretrained = str(source.path) if source.path is not None else tag
    try:
        module = open_clip.create_model(arch, pretrained=pretrained)
    except (OSError, RuntimeError) as err:
        if pretrained is None or source.path is not None:
            raise
        raise HubUnreachableError(
            f"could not fetch the OpenCLIP weights {arch}:{tag} ({type(err).__name__}: {err}). "
            f"Without a model hub, pass the weights file: HookedViT.from_open_clip("
            f"'open_clip:{arch}', checkpoint_path=FILE), or use the bundled image-text model "
            f"(bundled:mnist-clip).",
            model=source.label,
            reason=f"{type(err).__name__}: {err}",
        ) from err
    tokenizer = None
    if not arch.startswith("hf-hub:"):
        try:
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception:  # noqa: BLE001 - an HF tokenizer that needs the hub: pass tokenizer=
            tokenizer = None
    return LoadedOpenClip(module.eval(), source.label, tokenizer)


# -------------------------------------------------------------------------------------------------
# The image tower: checks, config, weights
# -------------------------------------------------------------------------------------------------
def image_tower(model: nn.Module) -> nn.Module:
    """The image tower of an OpenCLIP model (``model.visual``), or the tower itself."""
    return (
        cast(nn.Module, model.visual)
        if isinstance(getattr(model, "visual", None), nn.Module)
        else model
    )


def _check_vision_transformer(tower: Any, name: str) -> None:
    """Raise UnsupportedArchitectureError naming the first feature HookedViT cannot reproduce."""
    if getattr(tower, "attn_pool", None) is not None:
        raise _refuse(name, "the attentional pooler (attentional_pool, as in CoCa)")
    if tower.pool_type not in ("tok", "avg"):
        raise _refuse(name, f"pool_type={tower.pool_type!r} (no pooling before the projection)")
    conv = tower.conv1
    if (
        not isinstance(conv, nn.Conv2d)
        or tuple(conv.kernel_size) != tuple(conv.stride)
        or any(conv.padding)
        or conv.groups != 1
    ):
        raise _refuse(name, "a patch embedding that is not one non-overlapping patch per token")
    for i, block in enumerate(tower.transformer.resblocks):
        kind = type(block).__name__
        if kind != "ResidualAttentionBlock":
            raise _refuse(
                name,
                f"the block type {kind} (transformer.resblocks.{i}; custom attention blocks: "
                "qk-norm, scaled cosine attention, head scales, inner norms)",
            )
        if hasattr(block, "ln_1_kv"):
            raise _refuse(name, f"cross-attention blocks (transformer.resblocks.{i}.ln_1_kv)")
        if not isinstance(block.attn, nn.MultiheadAttention) or not block.attn._qkv_same_embed_dim:
            raise _refuse(name, f"the attention layer (transformer.resblocks.{i}.attn)")
        if block.attn.in_proj_bias is None or block.attn.bias_k is not None:
            raise _refuse(name, f"attention without a packed qkv bias (resblocks.{i}.attn)")
        if activation_name(block.mlp.gelu) is None:
            raise _refuse(name, f"the MLP activation {type(block.mlp.gelu).__name__} (block {i})")
        for ls in ("ls_1", "ls_2"):
            module = getattr(block, ls)
            if not isinstance(module, nn.Identity) and type(module).__name__ != "LayerScale":
                raise _refuse(name, f"the layer scale {type(module).__name__} (block {i}.{ls})")
    norms = [("ln_post", tower.ln_post)] + [("ln_pre", tower.ln_pre)] * (
        not isinstance(tower.ln_pre, nn.Identity)
    )
    for i, block in enumerate(tower.transformer.resblocks):
        norms += [(f"resblocks.{i}.ln_1", block.ln_1), (f"resblocks.{i}.ln_2", block.ln_2)]
    for norm_name, norm in norms:
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            raise _refuse(name, f"the norm layer {type(norm).__name__} ({norm_name})")


def _config_from_vision_transformer(tower: Any, name: str) -> HookedViTConfig:
    blocks = tower.transformer.resblocks
    block0 = blocks[0]
    d = int(tower.class_embedding.shape[0])
    heads = int(block0.attn.num_heads)
    dims = {(int(b.attn.num_heads), int(b.mlp.c_fc.out_features)) for b in blocks}
    if len(dims) != 1:
        raise _refuse(name, f"blocks of different shapes {sorted(dims)}")
    acts = {activation_name(b.mlp.gelu) for b in blocks}
    if len(acts) != 1:
        raise _refuse(name, f"blocks with different activations {sorted(map(str, acts))}")
    norms = [tower.ln_post] + [m for b in blocks for m in (b.ln_1, b.ln_2)]
    if not isinstance(tower.ln_pre, nn.Identity):
        norms.append(tower.ln_pre)
    eps_values = {float(n.eps) for n in norms}
    if len(eps_values) != 1:
        raise _refuse(name, f"norms with different eps values {sorted(eps_values)}")
    proj = getattr(tower, "proj", None)
    image_size = tuple(int(s) for s in tower.image_size)
    patch_size = tuple(int(s) for s in tower.patch_size)
    return HookedViTConfig(
        n_layers=len(blocks),
        d_model=d,
        n_heads=heads,
        d_head=d // heads,
        d_mlp=int(block0.mlp.c_fc.out_features),
        n_classes=0,
        image_size=cast(Tuple[int, int], image_size),
        patch_size=cast(Tuple[int, int], patch_size),
        in_chans=int(tower.conv1.in_channels),
        has_cls_token=True,
        has_pos_embed=True,
        pre_norm=not isinstance(tower.ln_pre, nn.Identity),
        block_norm="pre",
        final_norm="pooled" if tower.final_ln_after_pool else "tokens",
        global_pool="token" if tower.pool_type == "tok" else "avg",
        qkv_bias=True,
        layer_scale=any(type(b.ls_1).__name__ == "LayerScale" for b in blocks),
        act_fn=cast(str, acts.pop()),
        eps=eps_values.pop(),
        d_embed=int(proj.shape[1]) if proj is not None else 0,
        model_name=name,
    )


def _state_from_vision_transformer(
    tower: nn.Module, cfg: HookedViTConfig, dtype: torch.dtype
) -> Dict[str, Tensor]:
    """HookedViT state dict from an OpenCLIP VisionTransformer (LayerScale folded, in float64)."""
    c = WeightConsumer(tower, cfg.model_name, "OpenCLIP")
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    sd: Dict[str, Tensor] = {}
    w_e = c.take("conv1.weight")
    sd["embed.W_E"] = w_e
    sd["embed.b_E"] = w_e.new_zeros(d)  # OpenCLIP's conv1 has no bias
    sd["embed.W_prefix"] = c.take("class_embedding").reshape(1, d)
    sd["pos_embed.W_pos"] = c.take("positional_embedding").reshape(-1, d)
    if cfg.pre_norm:
        sd["ln_pre.w"], sd["ln_pre.b"] = c.take("ln_pre.weight"), c.take("ln_pre.bias")
    for i in range(cfg.n_layers):
        t, h = f"transformer.resblocks.{i}", f"blocks.{i}"
        for theirs, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
            sd[f"{h}.{ours}.w"] = c.take(f"{t}.{theirs}.weight")
            sd[f"{h}.{ours}.b"] = c.take(f"{t}.{theirs}.bias")
        qkv_w = c.take(f"{t}.attn.in_proj_weight")
        W_Q, W_K, W_V = einops.rearrange(qkv_w, "(three h e) d -> three h d e", three=3, h=H, e=dh)
        qkv_b = c.take(f"{t}.attn.in_proj_bias")
        b_Q, b_K, b_V = einops.rearrange(qkv_b, "(three h e) -> three h e", three=3, h=H, e=dh)
        sd.update({f"{h}.attn.W_Q": W_Q, f"{h}.attn.W_K": W_K, f"{h}.attn.W_V": W_V})
        sd.update({f"{h}.attn.b_Q": b_Q, f"{h}.attn.b_K": b_K, f"{h}.attn.b_V": b_V})
        out_w = c.take(f"{t}.attn.out_proj.weight")
        gamma1 = c.maybe(f"{t}.ls_1.gamma")
        gamma1 = gamma1 if gamma1 is not None else torch.ones_like(out_w[:, 0])
        sd[f"{h}.attn.W_O"] = einops.rearrange(out_w, "d (h e) -> h e d", h=H, e=dh) * gamma1
        sd[f"{h}.attn.b_O"] = c.take(f"{t}.attn.out_proj.bias") * gamma1
        fc_w, proj_w = c.take(f"{t}.mlp.c_fc.weight"), c.take(f"{t}.mlp.c_proj.weight")
        gamma2 = c.maybe(f"{t}.ls_2.gamma")
        gamma2 = gamma2 if gamma2 is not None else torch.ones_like(proj_w[:, 0])
        sd[f"{h}.mlp.W_in"], sd[f"{h}.mlp.b_in"] = fc_w.T, c.take(f"{t}.mlp.c_fc.bias")
        sd[f"{h}.mlp.W_out"] = proj_w.T * gamma2
        sd[f"{h}.mlp.b_out"] = c.take(f"{t}.mlp.c_proj.bias") * gamma2
    sd["ln_final.w"], sd["ln_final.b"] = c.take("ln_post.weight"), c.take("ln_post.bias")
    if cfg.d_embed:
        sd["proj.W_proj"] = c.take("proj")  # pooled @ proj: [d_model, d_embed]
    c.check_all_taken()
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _convert_timm_tower(tower: Any, name: str, dtype: Optional[torch.dtype]) -> TimmConversion:
    """A TimmModel adapter (SigLIP): the timm trunk by the timm converter, then its projection,
    which is the adapter's ``head.proj`` or, without one, the trunk's own linear head."""
    extra = {
        type(m).__name__ for key, m in tower.head.named_children() if key not in ("drop", "proj")
    }
    if extra:
        raise _refuse(
            name, f"the OpenCLIP timm adapter's head {sorted(extra)} (an MLP or attention pool)"
        )
    proj = getattr(tower.head, "proj", None)
    if proj is not None and not isinstance(proj, nn.Linear):
        raise _refuse(name, f"the projection {type(proj).__name__} (head.proj)")
    conversion = convert_timm(tower.trunk, name, None, dtype)
    cfg, state = conversion.cfg, dict(conversion.state_dict)
    like = state["embed.W_E"]
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    if cfg.n_classes:  # the trunk's head maps the pooled vector to the joint space
        if proj is not None:
            raise _refuse(name, "a timm trunk with a classifier head before the adapter's head")
        weight, bias = state.pop("head.W_head").T, state.pop("head.b_head")
        cfg = dataclasses.replace(cfg, n_classes=0)
    elif proj is not None:
        weight = proj.weight.detach()
        bias = proj.bias.detach() if proj.bias is not None else None
    if weight is None:
        return TimmConversion(cfg, state, None)
    state["proj.W_proj"] = weight.T.to(like.dtype).contiguous()
    if bias is not None:
        state["proj.b_proj"] = bias.to(like.dtype).contiguous()
    cfg = dataclasses.replace(cfg, d_embed=int(weight.shape[0]), proj_bias=bias is not None)
    return TimmConversion(cfg, state, None)


def convert_open_clip(
    model: nn.Module, name: Optional[str] = None, dtype: Optional[torch.dtype] = None
) -> TimmConversion:
    """Config and HookedViT weights of an OpenCLIP image tower (``model`` or ``model.visual``).

    The result has no classifier head (``n_classes=0``); its output is the projected image
    features, ``model.encode_image(x)`` before normalization. ``dtype`` defaults to the tower's.
    """
    tower: Any = image_tower(model)
    name = name or type(model).__name__
    kind = type(tower).__name__
    if kind == "TimmModel":
        return _convert_timm_tower(tower, name, dtype)
    if kind != "VisionTransformer" or not hasattr(tower, "class_embedding"):
        raise _refuse(
            name,
            f"the OpenCLIP image tower {kind} (only open_clip's VisionTransformer and timm ViT "
            "towers such as SigLIP's are converted)",
        )
    _check_vision_transformer(tower, name)
    cfg = _config_from_vision_transformer(tower, name)
    state = _state_from_vision_transformer(tower, cfg, dtype or tower.conv1.weight.dtype)
    return TimmConversion(cfg, state, None)


# -------------------------------------------------------------------------------------------------
# The loader of HookedViT.from_open_clip
# -------------------------------------------------------------------------------------------------
def _loaded(
    model_or_name: Union[str, nn.Module, LoadedOpenClip],
    checkpoint_path: Optional[Union[str, Path]],
) -> LoadedOpenClip:
    if isinstance(model_or_name, LoadedOpenClip):
        return model_or_name
    if isinstance(model_or_name, nn.Module):
        if checkpoint_path is not None:
            from vit_embedding_lens.model.checkpoint import load_checkpoint_

            load_checkpoint_(model_or_name, checkpoint_path)
        return LoadedOpenClip(model_or_name.eval(), type(model_or_name).__name__)
    if not isinstance(model_or_name, str):
        raise TypeError(
            f"expected an OpenCLIP model or a name (open_clip:ARCH[:PRETRAINED], "
            f"bundled:mnist-clip), got {type(model_or_name).__name__}"
        )
    name = model_or_name.strip()
    if not name.startswith(("open_clip:", "bundled:")):
        name = f"open_clip:{name}"  # from_open_clip("ViT-B-16") reads as an OpenCLIP name
    return load_open_clip(parse_model_name(name, checkpoint_path))


def open_clip_data_config(module: nn.Module) -> Dict[str, Any]:
    """The preprocessing an OpenCLIP model's weights expect, as a timm data config: its mean and
    std and interpolation (``visual.preprocess_cfg``), shortest side resized then center-cropped."""
    cfg: Dict[str, Any] = dict(getattr(image_tower(module), "preprocess_cfg", None) or {})
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "mean": tuple(cfg.get("mean") or OPENAI_DATASET_MEAN),
        "std": tuple(cfg.get("std") or OPENAI_DATASET_STD),
        "interpolation": str(cfg.get("interpolation") or "bicubic"),
        "crop_pct": 1.0,
        "crop_mode": "center" if cfg.get("resize_mode", "shortest") == "shortest" else "squash",
    }


def hooked_from_open_clip(
    model_or_name: Union[str, nn.Module, LoadedOpenClip],
    pretrained: Optional[str] = None,
    *,
    checkpoint_path: Optional[Union[str, Path]] = None,
    class_names: Optional[Sequence[str]] = None,
    templates: Optional[Sequence[str]] = None,
    tokenizer: Optional[Tokenizer] = None,
    class_embeddings: Optional[Union[Tensor, ClassSpace, str, Path]] = None,
    zero_shot: Optional[bool] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    model_name: Optional[str] = None,
) -> HookedViT:
    """``HookedViT.from_open_clip`` (documented there)."""
    if isinstance(model_or_name, str) and pretrained is not None:
        if ":" in model_or_name.removeprefix("open_clip:"):
            raise ValueError(f"{model_or_name} already names its pretrained weights")
        model_or_name = f"{model_or_name}:{pretrained}"
    elif pretrained is not None:
        raise ValueError("pretrained= applies only when an OpenCLIP architecture name is given")
    loaded = _loaded(model_or_name, checkpoint_path)
    module = loaded.module
    label = model_name or loaded.label
    conversion = convert_open_clip(module, label)
    hooked = HookedViT.from_conversion(conversion, device=device, dtype=dtype)
    names = class_names if class_names is not None else loaded.class_names
    if zero_shot is False:
        return hooked
    if class_embeddings is not None:
        space = class_space_from_embeddings(module, class_embeddings, names)
    elif names is not None:
        if image_tower(module) is module:
            raise ValueError(
                "an image tower alone has no text tower: pass the whole OpenCLIP model, or "
                "class_embeddings= (a [class, d_embed] tensor or a saved ClassSpace)"
            )
        space = text_class_space(
            module,
            names,
            templates if templates is not None else loaded.templates,
            tokenizer=tokenizer if tokenizer is not None else loaded.tokenizer,
        )
    elif zero_shot:
        raise ValueError("zero_shot=True needs class_names= (and templates) or class_embeddings=")
    else:
        return hooked
    return hooked.with_class_space(space)
