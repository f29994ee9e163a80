"""The random-init twin: the same architecture with timm's default initialisation (METHODS §2, §4).

The paper compares every metric of a trained model with the same architecture untrained, to show what
training (not the architecture) puts into the class space. The twin is rebuilt with timm itself, so its
weights follow timm's own default init (LayerScale at its ``init_values``, tiny class tokens, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
from torch import nn

#: config fields that describe how a model was converted or processed, not its architecture
_NOT_ARCHITECTURE = {"model_name", "normalization_type", "use_attn_result"}


def random_init_twin(
    model,
    seed: int = 0,
    timm_model: Optional[nn.Module] = None,
    **timm_kwargs: Any,
):
    """A HookedViT of ``model``'s architecture with timm's default (untrained) initialisation.

    The architecture is rebuilt from ``model.cfg`` (the bundled model's own recipe, or the timm name
    with the sizes read from the config). Pass ``timm_model`` (an untrained timm module) when the
    model came from a custom timm module that a name cannot rebuild; ``timm_kwargs`` go to
    ``timm.create_model``. Deterministic in ``seed``; the global RNG is left untouched. Raises
    ``ValueError`` if the rebuilt architecture differs from ``model``'s.
    """
    from vit_embedding_lens.model.hooked_vit import HookedViT

    param = next(model.parameters())
    if timm_model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            timm_model = _rebuild_timm(model.cfg, timm_kwargs)
    twin = HookedViT.from_timm(
        timm_model,
        class_names=model.class_names,
        model_name=f"{model.cfg.model_name} (random init)",
    )
    _check_same_architecture(model.cfg, twin.cfg)
    return twin.to(device=param.device, dtype=param.dtype)


def _rebuild_timm(cfg, extra: Dict[str, Any]) -> nn.Module:
    from vit_embedding_lens.zoo.bundled import bundled_name, create_bundled_timm_model

    name = cfg.model_name
    bundled = bundled_name(name)
    if bundled is not None:
        return create_bundled_timm_model(bundled)
    import timm

    arch = name.split(".")[0]
    if arch not in timm.list_models():
        raise ValueError(
            f"cannot rebuild {name!r} with timm to make its random-init twin: pass "
            f"timm_model=<an untrained timm module of the same architecture>"
        )
    sizes = dict(
        depth=cfg.n_layers,
        embed_dim=cfg.d_model,
        num_heads=cfg.n_heads,
        mlp_ratio=cfg.d_mlp / cfg.d_model,
        num_classes=cfg.n_classes,
        img_size=tuple(cfg.image_size),
        patch_size=cfg.patch_size[0],
        in_chans=cfg.in_chans,
        reg_tokens=cfg.n_registers,
        global_pool=cfg.global_pool,
    )
    if cfg.patch_size[0] != cfg.patch_size[1]:
        sizes["patch_size"] = tuple(cfg.patch_size)
    if not cfg.has_dist_token:  # distilled models take no class_token argument
        sizes["class_token"] = cfg.has_cls_token
    if not cfg.n_registers:
        sizes.pop("reg_tokens")
    if cfg.global_pool != "token":  # timm's default fc_norm follows the pool; the model may differ
        sizes["fc_norm"] = cfg.final_norm == "pooled"
    sizes.update(extra)
    try:
        return timm.create_model(arch, pretrained=False, **sizes)
    except TypeError as err:  # a family whose constructor takes other arguments
        raise ValueError(
            f"timm could not rebuild {arch!r} from the config ({err}); pass timm_model=<an untrained timm "
            f"module of the same architecture> or timm keyword arguments"
        ) from err


def _check_same_architecture(cfg, twin_cfg) -> None:
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}
    theirs = {k: v for k, v in dataclasses.asdict(twin_cfg).items() if k not in _NOT_ARCHITECTURE}
    diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
    if diff:
        detail = ", ".join(f"{k}: model {a!r} vs twin {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"the rebuilt random-init twin differs from the model ({detail}); pass timm_model=<an untrained "
            f"timm module of the same architecture> or the timm keyword arguments that make it match"
        )
