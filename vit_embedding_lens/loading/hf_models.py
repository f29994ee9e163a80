"""Hugging Face ``transformers`` vision models from any source, and their HookedViTs.

A source is a live module, a local folder written by ``save_pretrained`` (read offline), or a hub
name (``"hf:google/vit-base-patch16-224"``; with no reachable hub, from the local cache only, else
a :class:`~vit_embedding_lens.errors.HubUnreachableError`). :func:`hooked_from_hf` is the loader
registered for ``HookedViT.from_hf``; the pure weight mapping is
:func:`vit_embedding_lens.model.convert_hf.convert_hf`. ``transformers`` is imported inside
functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from vit_embedding_lens.errors import ConversionError, HubUnreachableError
from vit_embedding_lens.loading.hub import hub_reachable
from vit_embedding_lens.loading.names import is_hf_folder, without_hf_prefix
from vit_embedding_lens.model.convert_hf import HF_FAMILIES, HFConversion, convert_hf
from vit_embedding_lens.model.hooked_vit import HookedViT
from vit_embedding_lens.model.processing import process_weights_

HFSource = Union[str, Path, nn.Module]


def _class_for(config: Any, where: str) -> type:
    """The transformers class a config names (its first ``architectures`` entry), checked."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "?")
    defaults = {
        "vit": "ViTForImageClassification",
        "deit": "DeiTForImageClassificationWithTeacher",
        "dinov2": "Dinov2Model",
        "dinov2_with_registers": "Dinov2WithRegistersModel",
        "clip_vision_model": "CLIPVisionModel",
        "siglip_vision_model": "SiglipVisionModel",
        "clip": "CLIPModel",
        "siglip": "SiglipModel",
    }
    name = archs[0] if archs else defaults.get(model_type, "")
    if not name:
        raise ConversionError(
            f"{where}: its config.json (model_type={model_type!r}) names no architecture; "
            f"load the module yourself and pass it to HookedViT.from_hf"
        )
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ConversionError(f"{where}: transformers has no class {name!r} (from config.json)")
    return cls


def load_hf_module(source: Union[str, Path]) -> nn.Module:
    """The transformers module a folder or hub name holds, in eval mode (eager attention).

    A folder is read with ``local_files_only=True``. A hub name (``hf:`` prefix optional) is
    downloaded when the hub is reachable, else read from the local cache; failing that, a
    :class:`HubUnreachableError` says why.
    """
    from transformers import AutoConfig

    text = str(source)
    name = without_hf_prefix(text)
    path = Path(name).expanduser()
    if path.is_dir():
        if not is_hf_folder(path):
            raise ConversionError(
                f"{path} is not a Hugging Face model folder (no config.json with a model_type, "
                f"as save_pretrained writes)"
            )
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        cls: Any = _class_for(config, str(path))
        return cls.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    offline = not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=offline)
        cls = _class_for(config, name)
        module = cls.from_pretrained(name, local_files_only=offline, attn_implementation="eager")
    except OSError as err:
        why = "no model hub is reachable (HF_HUB_OFFLINE or no network) and it is not cached"
        raise HubUnreachableError(
            f"could not load the Hugging Face model {name!r}: "
            f"{why if offline else f'{type(err).__name__}: {err}'}. Without a hub, save the "
            f"model with save_pretrained on a machine that has one and pass the folder, or pass "
            f"a live module to HookedViT.from_hf.",
            model=name,
            reason=why if offline else f"{type(err).__name__}: {err}",
        ) from err
    return module.eval()


def convert_hf_source(
    source: HFSource,
    *,
    dtype: Optional[torch.dtype] = None,
    class_names: Optional[Sequence[str]] = None,
    model_name: Optional[str] = None,
    ignore_pooler: bool = False,
) -> HFConversion:
    """:func:`~vit_embedding_lens.model.convert_hf.convert_hf` of a module, folder or hub name."""
    if isinstance(source, nn.Module):
        module, label = source, model_name
    elif isinstance(source, (str, Path)):
        module = load_hf_module(source)
        label = model_name or str(source)
    else:
        raise TypeError(
            f"a Hugging Face source is a transformers module, a save_pretrained folder or "
            f"'hf:NAME', got {type(source).__name__}"
        )
    return convert_hf(module, label, class_names, dtype, ignore_pooler=ignore_pooler)


def hooked_from_hf(
    source: HFSource,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    class_names: Optional[Sequence[str]] = None,
    model_name: Optional[str] = None,
    ignore_pooler: bool = False,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> HookedViT:
    """The HookedViT of a transformers vision model: a live module, a ``save_pretrained`` folder,
    or a hub name (``"hf:NAME"``). Registered as ``HookedViT.from_hf``'s loader.

    The weight-processing flags are ``from_timm``'s (opt-in, TransformerLens semantics); they run
    in float64 and the result is cast once to ``dtype`` (default: the module's weights').

    ``dtype``/``device`` default to the module's weights'; ``class_names`` to ``config.id2label``
    when those are real labels; ``model_name`` labels the result (default: the config's
    ``_name_or_path``, the source, or the class name). ``ignore_pooler``: convert a
    ``ViTModel``/``DeiTModel`` without its tanh pooler (see :mod:`~vit_embedding_lens.model.
    convert_hf`).
    """
    steps = dict(
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    conversion = convert_hf_source(
        source,
        dtype=torch.float64 if any(steps.values()) else dtype,
        class_names=class_names,
        model_name=model_name,
        ignore_pooler=ignore_pooler,
    )
    model = HookedViT.from_conversion(conversion, device=device)
    if not any(steps.values()):
        return model
    target = dtype or _source_dtype(source)
    return process_weights_(model, **steps).to(target)


def _source_dtype(source: HFSource) -> torch.dtype:
    if isinstance(source, nn.Module):
        return next(source.parameters()).dtype
    return torch.float32  # a folder or hub model is loaded in float32 by default


def supported_hf_classes() -> Sequence[str]:
    """The transformers classes :func:`hooked_from_hf` converts (others are refused by name)."""
    return sorted(HF_FAMILIES)
