"""timm -> HookedViT weights, exact and strict: the converter returns what it converts.

The configuration is read from the live timm module (never from the model name or hub metadata);
every timm parameter and buffer is consumed exactly once or the conversion fails; an architecture
feature HookedViT does not implement raises :class:`UnsupportedArchitectureError` naming it (its
``feature`` field says which). :func:`convert_timm` returns a :class:`TimmConversion` (config,
state dict, class names); :meth:`HookedViT.from_conversion` builds the model from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import einops
import torch
from torch import Tensor, nn

from vit_embedding_lens.errors import UnsupportedArchitectureError
from vit_embedding_lens.model.activations import activation_name
from vit_embedding_lens.model.checkpoint import load_checkpoint_ as load_checkpoint_
from vit_embedding_lens.model.checkpoint import read_state_dict as read_state_dict
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.model.weight_consumer import WeightConsumer

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

# Old addresses of names that live above this floor, which model/ may not import: the packages that
# own them set them here when they are imported (vit_embedding_lens.model: convert_timm_vit;
# vit_embedding_lens.loading: hub_reachable, load_timm_model). Declared for the type checker.
convert_timm_vit: Callable[..., HookedViT]
hub_reachable: Callable[..., bool]
load_timm_model: Callable[..., Tuple[nn.Module, str]]


def __getattr__(name: str) -> Any:
    """The hand-downs above before their owners were imported: the root imports the loading floor
    lazily, so ask it to (the model package sets ``convert_timm_vit`` when it is imported)."""
    if name in ("hub_reachable", "load_timm_model"):
        from vit_embedding_lens.model.registry import _import_default_loaders

        _import_default_loaders()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: timm classes that are ViTs but whose computation HookedViT does not reproduce, and why
_UNSUPPORTED_MODEL_CLASSES = {
    "Eva": "rotary position embeddings (EVA family)",
    "VisionTransformerRelPos": "relative position embeddings (relpos ViT)",
    "VisionTransformerSAM": "windowed attention with relative positions (SAM ViT)",
    "Beit": "relative position bias (BEiT)",
    "NaFlexVit": "variable-resolution patch packing (NaFlexViT)",
}
_UNSUPPORTED_BLOCKS = {
    "ParallelScalingBlock": "parallel attention/MLP blocks",
    "DiffParallelScalingBlock": "parallel blocks with differential attention",
    "ParallelThingsBlock": "parallel blocks",
}
_NORMS = ("LayerNorm",)


# -------------------------------------------------------------------------------------------------
# Architecture checks and configuration
# -------------------------------------------------------------------------------------------------
def _refuse(name: str, feature: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{name}: {feature} is not supported by HookedViT, which converts only architectures it "
        f"reproduces exactly (see `vit-lens models` / the README for the supported families)",
        model=name,
        feature=feature,
    )


def check_supported(model: nn.Module, name: str) -> None:
    """Raise UnsupportedArchitectureError naming the first feature HookedViT cannot reproduce."""
    kind = type(model).__name__
    if kind in _UNSUPPORTED_MODEL_CLASSES:
        raise _refuse(name, _UNSUPPORTED_MODEL_CLASSES[kind])
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise _refuse(
            name, f"the model class {kind} (only timm VisionTransformer and DeiT are converted)"
        )
    if model.global_pool == "prr" or type(getattr(model, "attn_pool", None)).__name__ not in (
        "NoneType",
        "AttentionPoolLatent",
    ):
        raise _refuse(
            name,
            f"the attention-pool head {type(model.attn_pool).__name__} (global_pool="
            f"{model.global_pool!r}); only SigLIP's AttentionPoolLatent (global_pool='map') is "
            "supported",
        )
    if model.global_pool == "map" or getattr(model, "attn_pool", None) is not None:
        _check_attention_pool(model, name)
    if model.global_pool not in ("token", "avg", "max", "avgmax", "map"):
        raise _refuse(name, f"global_pool={model.global_pool!r} (no pooling before the head)")
    if isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity):
        raise _refuse(name, "a model without a final norm (final_norm=False)")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        raise _refuse(name, f"the classifier head {type(model.head).__name__}")
    if getattr(model, "num_reg_tokens", 0) and hasattr(model, "dist_token"):
        raise _refuse(name, "register tokens together with a distillation token")
    embed = model.patch_embed
    if type(embed).__name__ != "PatchEmbed" or not isinstance(embed.proj, nn.Conv2d):
        raise _refuse(name, f"the patch embedding {type(embed).__name__}")
    conv = embed.proj
    if (
        tuple(conv.kernel_size) != tuple(conv.stride)
        or tuple(conv.kernel_size) != tuple(embed.patch_size)
        or any(conv.padding)
        or conv.groups != 1
        or any(d != 1 for d in conv.dilation)
    ):
        raise _refuse(
            name, "a patch embedding whose convolution is not one non-overlapping patch per token"
        )
    if not isinstance(embed.norm, nn.Identity):
        raise _refuse(name, "a norm inside the patch embedding (embed_norm_layer)")
    for i, block in enumerate(model.blocks):
        _check_block(block, i, name)
    for module_name, module in model.named_modules():
        if type(module).__name__ in ("AttentionRope", "RotaryEmbedding", "RotaryEmbeddingCat"):
            raise _refuse(name, f"rotary position embeddings ({module_name})")
    for norm_name, norm in _all_norms(model):
        _check_norm(norm, norm_name, name)


def _check_attention_pool(model: Any, name: str) -> None:  # a timm VisionTransformer
    """Refuse, by name, what of timm's ``AttentionPoolLatent`` HookedViT does not reproduce."""
    pool = model.attn_pool
    if model.global_pool != "map" or pool is None:
        raise _refuse(name, f"an attention pool with global_pool={model.global_pool!r}")
    d = model.embed_dim
    if pool.latent_len != 1:
        raise _refuse(name, f"an attention pool with {pool.latent_len} latent queries (latent_len)")
    if getattr(pool, "pos_embed", None) is not None:
        raise _refuse(name, "position embeddings inside the attention pool (attn_pool.pos_embed)")
    for which in ("q_norm", "k_norm"):
        if not isinstance(getattr(pool, which, nn.Identity()), nn.Identity):
            raise _refuse(name, f"a norm on the attention pool's queries/keys (attn_pool.{which})")
    if pool.mlp is None or not isinstance(pool.proj, nn.Linear):
        raise _refuse(name, "an attention pool without its output projection and MLP")
    if pool.kv.in_features != d or pool.kv.out_features != 2 * d or pool.proj.out_features != d:
        raise _refuse(name, "an attention pool whose width differs from the residual width")
    if pool.latent.shape[-1] != d:
        raise _refuse(name, "an attention pool whose latent width differs from the residual width")
    if pool.pool != "token":
        raise _refuse(name, f"the attention pool's pool_type={pool.pool!r}")
    if not isinstance(model.fc_norm, nn.Identity) or isinstance(model.norm, nn.Identity):
        raise _refuse(name, "an attention pool without the final norm before it (fc_norm)")
    mlp = pool.mlp
    if type(mlp).__name__ != "Mlp" or not isinstance(mlp.fc1, nn.Linear):
        raise _refuse(name, f"the attention pool's MLP {type(mlp).__name__}")
    if not isinstance(mlp.norm, nn.Identity):
        raise _refuse(name, "a norm inside the attention pool's MLP (attn_pool.mlp.norm)")
    if activation_name(mlp.act) is None:
        raise _refuse(name, f"the attention pool's MLP activation {type(mlp.act).__name__}")
    block_act = activation_name(model.blocks[0].mlp.act)
    if activation_name(mlp.act) != block_act:
        raise _refuse(name, "an attention pool whose MLP activation differs from the blocks'")


def _check_block(block: Any, i: int, name: str) -> None:  # a timm block (duck-typed)
    kind = type(block).__name__
    if kind in _UNSUPPORTED_BLOCKS:
        raise _refuse(name, f"{_UNSUPPORTED_BLOCKS[kind]} ({kind} in blocks.{i})")
    if kind not in ("Block", "ResPostBlock"):
        raise _refuse(name, f"the block type {kind} (blocks.{i})")
    attn, mlp = block.attn, block.mlp
    if type(attn).__name__ != "Attention":
        raise _refuse(name, f"the attention layer {type(attn).__name__} (blocks.{i}.attn)")
    if not isinstance(attn.norm, nn.Identity):
        raise _refuse(
            name, f"a norm on the attention output (scale_attn_norm, blocks.{i}.attn.norm)"
        )
    if getattr(attn, "gate", None) is not None:
        raise _refuse(name, f"gated attention (blocks.{i}.attn.gate)")
    if attn.attn_dim != attn.proj.out_features or attn.qkv.in_features != attn.proj.out_features:
        raise _refuse(
            name, f"attention whose width differs from the residual width (blocks.{i}.attn)"
        )
    if type(mlp).__name__ != "Mlp" or not isinstance(mlp.fc1, nn.Linear):
        raise _refuse(
            name, f"the MLP {type(mlp).__name__} (a gated MLP such as SwiGLU; blocks.{i}.mlp)"
        )
    if not isinstance(mlp.norm, nn.Identity):
        raise _refuse(name, f"a norm inside the MLP (scale_mlp_norm, blocks.{i}.mlp.norm)")
    if activation_name(mlp.act) is None:
        raise _refuse(name, f"the MLP activation {type(mlp.act).__name__} (blocks.{i}.mlp.act)")
    for ls_name in ("ls1", "ls2"):
        ls = getattr(block, ls_name, None)
        if ls is not None and not isinstance(ls, nn.Identity) and type(ls).__name__ != "LayerScale":
            raise _refuse(name, f"the layer scale {type(ls).__name__} (blocks.{i}.{ls_name})")


def _all_norms(model: Any):  # a timm VisionTransformer (duck-typed)
    yield "norm_pre", model.norm_pre
    yield "norm", model.norm
    yield "fc_norm", model.fc_norm
    for i, block in enumerate(model.blocks):
        yield f"blocks.{i}.norm1", block.norm1
        yield f"blocks.{i}.norm2", block.norm2
        yield f"blocks.{i}.attn.q_norm", block.attn.q_norm
        yield f"blocks.{i}.attn.k_norm", block.attn.k_norm
    pool = getattr(model, "attn_pool", None)
    if pool is not None and hasattr(pool, "norm"):
        yield "attn_pool.norm", pool.norm


def _check_norm(norm: nn.Module, norm_name: str, name: str) -> None:
    if isinstance(norm, nn.Identity):
        return
    if type(norm).__name__ not in _NORMS or not isinstance(norm, nn.LayerNorm):
        raise _refuse(
            name, f"the norm layer {type(norm).__name__} ({norm_name}; only LayerNorm is supported)"
        )
    if norm.weight is None or norm.bias is None:
        raise _refuse(name, f"a LayerNorm without affine weight and bias ({norm_name})")


def config_from_timm(model: nn.Module, name: str) -> HookedViTConfig:
    """Read the architecture from the live timm module."""
    vit: Any = model  # timm's VisionTransformer: its submodules come through nn.Module.__getattr__
    block0 = vit.blocks[0]
    attn = block0.attn
    eps_values = {float(n.eps) for _, n in _all_norms(vit) if not isinstance(n, nn.Identity)}
    if len(eps_values) != 1:
        raise _refuse(name, f"norms with different eps values {sorted(eps_values)}")
    embed = vit.patch_embed
    n_classes = vit.head.out_features if isinstance(vit.head, nn.Linear) else 0
    dims = {(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features) for b in vit.blocks}
    if len(dims) != 1:
        raise _refuse(name, f"blocks of different shapes {sorted(dims)}")
    act_fn = activation_name(block0.mlp.act)
    if act_fn is None:
        raise _refuse(
            name, f"the MLP activation {type(block0.mlp.act).__name__} (blocks.0.mlp.act)"
        )
    pool = getattr(vit, "attn_pool", None)
    return HookedViTConfig(
        n_layers=len(vit.blocks),
        d_model=vit.embed_dim,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        d_mlp=block0.mlp.fc1.out_features,
        n_classes=n_classes,
        image_size=cast(Tuple[int, int], tuple(int(s) for s in embed.img_size)),
        patch_size=cast(Tuple[int, int], tuple(int(s) for s in embed.patch_size)),
        in_chans=embed.proj.in_channels,
        has_cls_token=vit.cls_token is not None,
        has_dist_token=getattr(vit, "dist_token", None) is not None,
        n_registers=int(getattr(vit, "num_reg_tokens", 0) or 0),
        no_embed_class=bool(vit.no_embed_class),
        has_pos_embed=vit.pos_embed is not None,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity),
        block_norm="post" if type(block0).__name__ == "ResPostBlock" else "pre",
        final_norm="tokens" if not isinstance(vit.norm, nn.Identity) else "pooled",
        global_pool="token" if getattr(vit, "dist_token", None) is not None else vit.global_pool,
        pool_include_prefix=bool(getattr(vit, "pool_include_prefix", False)),
        pool_n_heads=int(pool.num_heads) if pool is not None else 0,
        pool_d_mlp=int(pool.mlp.fc1.out_features) if pool is not None else 0,
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        layer_scale=any(
            type(getattr(b, ls, None)).__name__ == "LayerScale"
            for b in vit.blocks
            for ls in ("ls1", "ls2")
        ),
        act_fn=act_fn,
        eps=eps_values.pop(),
        dynamic_img_size=bool(vit.dynamic_img_size),
        dynamic_img_pad=bool(embed.dynamic_img_pad),
        model_name=name,
    )


# -------------------------------------------------------------------------------------------------
# Weights
# -------------------------------------------------------------------------------------------------
def _layer_scale(c: WeightConsumer, prefix: str, d: int, like: Tensor) -> Tensor:
    gamma = c.maybe(f"{prefix}.gamma")
    return gamma if gamma is not None else torch.ones(d, dtype=like.dtype, device=like.device)


def state_dict_from_timm(
    model: nn.Module, cfg: HookedViTConfig, dtype: torch.dtype
) -> Dict[str, Tensor]:
    """HookedViT state dict from a timm ViT: TransformerLens layout, LayerScale folded in.

    Folding is done in float64 and cast once to ``dtype``.
    """
    c = WeightConsumer(model, cfg.model_name, "timm")
    H, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model
    sd: Dict[str, Tensor] = {}
    w_e = c.take("patch_embed.proj.weight")
    sd["embed.W_E"] = w_e
    sd["embed.b_E"] = _or_zeros(c.maybe("patch_embed.proj.bias"), d, w_e)
    prefix = [
        c.take(k).reshape(-1, d) for k in ("cls_token", "dist_token", "reg_token") if k in c.tensors
    ]
    sd["embed.W_prefix"] = torch.cat(prefix, dim=0) if prefix else w_e.new_zeros(0, d)
    if cfg.has_pos_embed:
        sd["pos_embed.W_pos"] = c.take("pos_embed").reshape(-1, d)
    if cfg.pre_norm:
        sd["ln_pre.w"], sd["ln_pre.b"] = c.take("norm_pre.weight"), c.take("norm_pre.bias")

    for i in range(cfg.n_layers):
        t, h = f"blocks.{i}", f"blocks.{i}"
        for timm_norm, ours in (("norm1", "ln1"), ("norm2", "ln2")):
            sd[f"{h}.{ours}.w"] = c.take(f"{t}.{timm_norm}.weight")
            sd[f"{h}.{ours}.b"] = c.take(f"{t}.{timm_norm}.bias")
        qkv_w = c.take(f"{t}.attn.qkv.weight")
        W_Q, W_K, W_V = einops.rearrange(qkv_w, "(three h e) d -> three h d e", three=3, h=H, e=dh)
        qkv_b = _or_zeros(c.maybe(f"{t}.attn.qkv.bias"), 3 * H * dh, qkv_w)
        b_Q, b_K, b_V = einops.rearrange(qkv_b, "(three h e) -> three h e", three=3, h=H, e=dh)
        sd.update({f"{h}.attn.W_Q": W_Q, f"{h}.attn.W_K": W_K, f"{h}.attn.W_V": W_V})
        sd.update({f"{h}.attn.b_Q": b_Q, f"{h}.attn.b_K": b_K, f"{h}.attn.b_V": b_V})
        if cfg.qk_norm:
            for which in ("q_norm", "k_norm"):
                sd[f"{h}.attn.{which}.w"] = c.take(f"{t}.attn.{which}.weight")
                sd[f"{h}.attn.{which}.b"] = c.take(f"{t}.attn.{which}.bias")
        proj_w = c.take(f"{t}.attn.proj.weight")
        gamma1 = _layer_scale(c, f"{t}.ls1", d, proj_w)
        sd[f"{h}.attn.W_O"] = einops.rearrange(proj_w, "d (h e) -> h e d", h=H, e=dh) * gamma1
        sd[f"{h}.attn.b_O"] = _or_zeros(c.maybe(f"{t}.attn.proj.bias"), d, proj_w) * gamma1
        fc1_w, fc2_w = c.take(f"{t}.mlp.fc1.weight"), c.take(f"{t}.mlp.fc2.weight")
        gamma2 = _layer_scale(c, f"{t}.ls2", d, fc2_w)
        sd[f"{h}.mlp.W_in"] = fc1_w.T
        sd[f"{h}.mlp.b_in"] = _or_zeros(c.maybe(f"{t}.mlp.fc1.bias"), cfg.d_mlp, fc1_w)
        sd[f"{h}.mlp.W_out"] = fc2_w.T * gamma2
        sd[f"{h}.mlp.b_out"] = _or_zeros(c.maybe(f"{t}.mlp.fc2.bias"), d, fc2_w) * gamma2

    final = "norm" if cfg.final_norm == "tokens" else "fc_norm"
    sd["ln_final.w"], sd["ln_final.b"] = c.take(f"{final}.weight"), c.take(f"{final}.bias")
    if cfg.global_pool == "map":
        sd.update(_attention_pool_state(c, cfg))
    if cfg.n_classes:
        for timm_head, ours in (("head", ""), ("head_dist", "_dist")):
            if timm_head == "head_dist" and not cfg.has_dist_token:
                continue
            w = c.take(f"{timm_head}.weight")
            sd[f"head.W_head{ours}"] = w.T
            sd[f"head.b_head{ours}"] = _or_zeros(c.maybe(f"{timm_head}.bias"), cfg.n_classes, w)
    c.check_all_taken()
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def _attention_pool_state(c: WeightConsumer, cfg: HookedViTConfig) -> Dict[str, Tensor]:
    """timm's ``AttentionPoolLatent`` in the HookedViT layout (``attn_pool.*``).

    The latent is the probe; ``q`` (or the identity when timm has no q projection) gives
    ``W_Q``/``b_Q``, ``kv`` gives ``W_K``/``W_V``, ``proj`` gives ``W_O``/``b_O``, then ``norm``
    and ``mlp``.
    """
    H, dh, d = cfg.pool_n_heads, cfg.pool_d_head, cfg.d_model
    sd: Dict[str, Tensor] = {}
    latent = c.take("attn_pool.latent")
    sd["attn_pool.probe"] = latent.reshape(1, d)
    q_w = c.maybe("attn_pool.q.weight")
    if q_w is None:  # q_proj=False: the latent is the query
        q_w = torch.eye(d, dtype=latent.dtype, device=latent.device)
    sd["attn_pool.W_Q"] = einops.rearrange(q_w, "(h e) d -> h d e", h=H, e=dh)
    sd["attn_pool.b_Q"] = _or_zeros(c.maybe("attn_pool.q.bias"), d, q_w).reshape(H, dh)
    kv_w = c.take("attn_pool.kv.weight")
    W_K, W_V = einops.rearrange(kv_w, "(two h e) d -> two h d e", two=2, h=H, e=dh)
    kv_b = _or_zeros(c.maybe("attn_pool.kv.bias"), 2 * d, kv_w)
    b_K, b_V = einops.rearrange(kv_b, "(two h e) -> two h e", two=2, h=H, e=dh)
    sd.update({"attn_pool.W_K": W_K, "attn_pool.W_V": W_V})
    sd.update({"attn_pool.b_K": b_K, "attn_pool.b_V": b_V})
    proj_w = c.take("attn_pool.proj.weight")
    sd["attn_pool.W_O"] = einops.rearrange(proj_w, "d (h e) -> h e d", h=H, e=dh)
    sd["attn_pool.b_O"] = _or_zeros(c.maybe("attn_pool.proj.bias"), d, proj_w)
    sd["attn_pool.ln.w"] = c.take("attn_pool.norm.weight")
    sd["attn_pool.ln.b"] = c.take("attn_pool.norm.bias")
    fc1_w, fc2_w = c.take("attn_pool.mlp.fc1.weight"), c.take("attn_pool.mlp.fc2.weight")
    sd["attn_pool.mlp.W_in"] = fc1_w.T
    sd["attn_pool.mlp.b_in"] = _or_zeros(c.maybe("attn_pool.mlp.fc1.bias"), cfg.pool_d_mlp, fc1_w)
    sd["attn_pool.mlp.W_out"] = fc2_w.T
    sd["attn_pool.mlp.b_out"] = _or_zeros(c.maybe("attn_pool.mlp.fc2.bias"), d, fc2_w)
    return sd


def _or_zeros(t: Optional[Tensor], n: int, like: Tensor) -> Tensor:
    """A bias timm omits (``qkv_bias=False``, CLIP's patch embedding) is exactly zero."""
    return t if t is not None else like.new_zeros(n)


@dataclass(frozen=True)
class TimmConversion:
    """What the converter produces: the architecture, the HookedViT state dict and class names.

    ``state_dict`` is in the TransformerLens layout, cast once to its dtype, on the timm weights'
    device; :meth:`HookedViT.from_conversion` builds the model from it.
    """

    cfg: HookedViTConfig
    state_dict: Dict[str, Tensor]
    class_names: Optional[List[str]]

    @property
    def dtype(self) -> torch.dtype:
        return self.state_dict["embed.W_E"].dtype

    @property
    def device(self) -> torch.device:
        return self.state_dict["embed.W_E"].device


def convert_timm(
    model: nn.Module,
    name: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
    dtype: Optional[torch.dtype] = None,
) -> TimmConversion:
    """Check, configure and convert a timm ViT; the timm module is left untouched.

    ``dtype`` defaults to the timm weights'; converting to a wider dtype than timm's folds in that
    dtype, so a float64 HookedViT of a float32 timm model is exact in float64. ``class_names``
    default to timm's ImageNet labels when the model's label set is known.
    """
    name = name or type(model).__name__
    check_supported(model, name)
    cfg = config_from_timm(model, name)
    vit: Any = model  # timm's VisionTransformer: its submodules come through nn.Module.__getattr__
    state = state_dict_from_timm(model, cfg, dtype or vit.patch_embed.proj.weight.dtype)
    if class_names is None:
        class_names = _timm_class_names(model, cfg.n_classes)
    return TimmConversion(cfg, state, None if class_names is None else list(class_names))


def _timm_class_names(model: nn.Module, n_classes: int) -> Optional[Sequence[str]]:
    """ImageNet class names from timm's own ImageNet info when the model's label set is known."""
    if not n_classes:
        return None
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        if info.num_classes() != n_classes:
            return None
        return [info.index_to_description(i) for i in range(n_classes)]
    except Exception:  # label metadata is a convenience, never a reason to fail a conversion
        return None
