"""The random-init twin: the same architecture, timm's default initialisation (METHODS §2, §4).

The paper compares every metric of a trained model with the same architecture untrained, to show
what training (not the architecture) puts into the class space. The twin's timm module is built
from the model's own config (never from its name), so any converted model has one, and its weights
follow timm's default init (tiny class tokens, truncated-normal weights, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from typing import Any, Dict, Optional

import torch
from torch import nn

from vit_embedding_lens.model.activations import ACTIVATIONS
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.model.convert import TimmConversion, convert_timm
from vit_embedding_lens.model.hooked_vit import HookedViT

#: config fields that describe how a model was converted or processed, not its architecture
_NOT_ARCHITECTURE = {"model_name", "normalization_type", "use_attn_result"}


def timm_from_config(cfg: HookedViTConfig, **timm_kwargs: Any) -> nn.Module:
    """An untrained timm ``VisionTransformer`` (``VisionTransformerDistilled`` for distilled DeiT)
    of ``cfg``'s architecture, with timm's default initialisation from the global RNG.

    ``timm_kwargs`` override or add constructor arguments. LayerScale's initial value
    (``init_values``) is folded into the converted weights, so a config with ``layer_scale`` needs
    it given.
    """
    from timm.layers import LayerNorm
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

    if cfg.layer_scale and "init_values" not in timm_kwargs:
        raise ValueError(
            f"{cfg.model_name} has LayerScale (layer_scale=True), whose initial value is folded "
            f"into its weights and is not in the config; pass init_values=<timm's init_values, "
            f"e.g. 1e-5>"
        )
    kwargs: Dict[str, Any] = dict(
        img_size=tuple(cfg.image_size),
        patch_size=tuple(cfg.patch_size),
        in_chans=cfg.in_chans,
        num_classes=cfg.n_classes,
        global_pool=cfg.global_pool,
        embed_dim=cfg.d_model,
        depth=cfg.n_layers,
        num_heads=cfg.n_heads,
        mlp_ratio=_mlp_ratio(cfg.d_mlp, cfg.d_model),
        qkv_bias=cfg.qkv_bias,
        qk_norm=cfg.qk_norm,
        class_token=cfg.has_cls_token,
        pos_embed="learn" if cfg.has_pos_embed else "none",
        no_embed_class=cfg.no_embed_class,
        reg_tokens=cfg.n_registers,
        pre_norm=cfg.pre_norm,
        fc_norm=cfg.final_norm == "pooled",
        pool_include_prefix=cfg.pool_include_prefix,
        dynamic_img_size=cfg.dynamic_img_size,
        dynamic_img_pad=cfg.dynamic_img_pad,
        norm_layer=partial(LayerNorm, eps=cfg.eps),
        act_layer=ACTIVATIONS[cfg.act_fn],
        block_fn=ResPostBlock if cfg.block_norm == "post" else Block,
    )
    kwargs.update(timm_kwargs)
    kind = VisionTransformerDistilled if cfg.has_dist_token else VisionTransformer
    try:
        return kind(**kwargs)
    except (TypeError, AssertionError, ValueError) as err:
        raise ValueError(
            f"timm could not build {cfg.model_name}'s architecture from its config ({err}); pass "
            f"timm_model=<an untrained timm module of the same architecture> or timm keyword "
            f"arguments"
        ) from err


def _mlp_ratio(d_mlp: int, d_model: int) -> float:
    """A ratio timm turns back into ``d_mlp`` (it takes ``int(d_model * mlp_ratio)``)."""
    ratio = d_mlp / d_model
    while int(d_model * ratio) < d_mlp:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def random_init_twin(
    model: HookedViT,
    seed: int = 0,
    timm_model: Optional[nn.Module] = None,
    **timm_kwargs: Any,
) -> HookedViT:
    """A HookedViT of ``model``'s architecture with timm's default (untrained) initialisation.

    The timm module is built from ``model.cfg`` (:func:`timm_from_config`; ``timm_kwargs`` go to
    its constructor), or pass ``timm_model`` (an untrained timm module) to use your own.
    LayerScale's initial value, which the config lacks, is read from the timm architecture the
    model's name names (:func:`layer_scale_init_values`: a timm name, a checkpoint's architecture,
    a timm folder's ``config.json``), so command-line runs of such models keep their comparison.
    Deterministic in ``seed``; the global RNG is left untouched. Same class names, device and
    dtype as ``model``. Raises ``ValueError`` if the twin's architecture differs from ``model``'s.
    """
    param = next(model.parameters())
    cfg = model.cfg
    if timm_model is None and cfg.layer_scale and "init_values" not in timm_kwargs:
        init_values = layer_scale_init_values(cfg.model_name)
        if init_values is not None:
            timm_kwargs["init_values"] = init_values
    # timm has no projection to a joint space and no cosine head: the twin's tower comes from timm
    # (headless), its projection is drawn as CLIP initialises it, and a cosine head keeps the
    # model's class space (text-defined, not trained by the image tower)
    joint = bool(cfg.d_embed) or cfg.head_type == "cosine"
    tower_cfg = cfg
    if joint:
        tower_cfg = dataclasses.replace(
            cfg, d_embed=0, proj_bias=False, head_type="linear", n_classes=0
        )
    if timm_model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            timm_model = timm_from_config(tower_cfg, **timm_kwargs)
    conversion = convert_timm(
        timm_model,
        f"{cfg.model_name} (random init)",
        class_names=None if joint else model.class_names,
        dtype=param.dtype,
    )
    if joint:
        conversion = _with_joint_head(model, conversion, seed)
    _check_same_architecture(cfg, conversion.cfg)
    return HookedViT.from_conversion(conversion, device=param.device)


def _with_joint_head(model: HookedViT, tower: TimmConversion, seed: int) -> TimmConversion:
    """A headless tower's conversion with ``model``'s projection shape (random, CLIP's init:
    ``randn / sqrt(d_model)``, zero bias) and head (a cosine head's class space copied; a linear
    head drawn as ``0.02 * randn``, zero bias)."""
    cfg = model.cfg
    state = dict(tower.state_dict)
    like = state["embed.W_E"]
    gen = torch.Generator().manual_seed(int(seed) + 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=like.device, dtype=like.dtype)

    if cfg.d_embed:
        state["proj.W_proj"] = randn(cfg.d_model, cfg.d_embed) * cfg.d_model**-0.5
        if cfg.proj_bias:
            state["proj.b_proj"] = like.new_zeros(cfg.d_embed)
    if cfg.n_classes and cfg.head_type == "cosine":
        for key in ("W_head", "logit_scale", "logit_bias"):
            state[f"head.{key}"] = getattr(model.head, key).detach().to(like.device).clone()
    elif cfg.n_classes:
        state["head.W_head"] = randn(cfg.d_features, cfg.n_classes) * 0.02
        state["head.b_head"] = like.new_zeros(cfg.n_classes)
    twin_cfg = dataclasses.replace(
        tower.cfg,
        d_embed=cfg.d_embed,
        proj_bias=cfg.proj_bias,
        head_type=cfg.head_type,
        n_classes=cfg.n_classes,
    )
    return TimmConversion(twin_cfg, state, model.class_names)


def layer_scale_init_values(model_name: str) -> Optional[float]:
    """LayerScale's initial value (timm's ``init_values``) of the architecture a model name names:
    a timm folder's ``config.json`` ``model_args``, else the timm architecture's own default (one
    block of it built on the CPU); None when the name names no timm architecture or it has no
    LayerScale."""
    import timm

    from vit_embedding_lens.loading.names import parse_model_name

    try:
        source = parse_model_name(model_name)
    except (ValueError, OSError):
        return None
    if source.kind == "timm-folder":
        assert source.path is not None  # a folder source names its folder
        try:
            config = json.loads((source.path / "config.json").read_text())
        except (OSError, ValueError):
            return None
        given = (config.get("model_args") or {}).get("init_values")
        if given is not None:
            return float(given)
        architecture = str(config.get("architecture", ""))
    elif source.kind in ("timm", "checkpoint"):
        architecture = source.architecture
    else:
        return None
    if architecture not in timm.list_models():
        return None
    with torch.random.fork_rng(devices=[]):
        try:
            vit: Any = timm.create_model(architecture, pretrained=False, depth=1)  # submodules
            block = vit.blocks[0]
        except Exception:  # noqa: BLE001 - a family that cannot be built with one block
            return None
    gamma = getattr(getattr(block, "ls1", None), "gamma", None)
    return float(gamma.detach().flatten()[0].item()) if isinstance(gamma, torch.Tensor) else None


def _check_same_architecture(cfg: HookedViTConfig, twin_cfg: HookedViTConfig) -> None:
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}
    theirs = {k: v for k, v in dataclasses.asdict(twin_cfg).items() if k not in _NOT_ARCHITECTURE}
    diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
    if diff:
        detail = ", ".join(f"{k}: model {a!r} vs twin {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"the random-init twin differs from the model ({detail}); pass timm_model=<an "
            f"untrained timm module of the same architecture> or the timm keyword arguments that "
            f"make it match"
        )
