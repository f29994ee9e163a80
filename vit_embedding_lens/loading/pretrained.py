"""One entry point for every model source: ``HookedViT.from_pretrained(model_or_name, ...)``.

It picks the converter from what it is given:

- a live module: a timm ``VisionTransformer`` (-> ``from_timm``), a ``transformers`` model
  (-> ``from_hf``; a full ``CLIPModel`` / ``SiglipModel`` converts its image tower, with a zero-shot
  head from its text tower when class names are given), an OpenCLIP model or image tower
  (-> ``from_open_clip``);
- a name, parsed by :func:`~vit_embedding_lens.loading.names.parse_model_name`: a timm name (with
  tag, optional checkpoint), a timm folder, ``hf:NAME`` or a ``save_pretrained`` folder,
  ``open_clip:ARCH[:PRETRAINED]``, ``bundled:NAME`` (``mnist-vit``, ``fashion-vit``: timm;
  ``mnist-clip``: OpenCLIP).

Text-defined classes (CLIP-like models): ``class_names`` with ``templates`` (default
:data:`~vit_embedding_lens.loading.text_space.DEFAULT_TEMPLATES`) and ``tokenizer``, or
``class_embeddings=`` (a ``[class, d_embed]`` tensor, a ``ClassSpace``, or its saved folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union, cast

import torch
from torch import Tensor, nn

from vit_embedding_lens.loading.names import ModelSource, parse_model_name, without_hf_prefix
from vit_embedding_lens.loading.open_clip_models import hooked_from_open_clip
from vit_embedding_lens.loading.text_space import (
    Tokenizer,
    class_space_from_embeddings,
    text_class_space,
)
from vit_embedding_lens.loading.timm_models import hooked_from_timm
from vit_embedding_lens.model.class_space import ClassSpace
from vit_embedding_lens.model.hooked_vit import HookedViT
from vit_embedding_lens.model.registry import loader

__all__ = ["hooked_from_pretrained", "module_family"]

_TEXT_OPTIONS = ("templates", "tokenizer", "class_embeddings", "zero_shot")


def module_family(module: nn.Module) -> str:
    """``"timm"``, ``"hf"`` or ``"open_clip"``: the library a live module comes from."""
    where = type(module).__module__ or ""
    for family, prefix in (("timm", "timm."), ("hf", "transformers."), ("open_clip", "open_clip.")):
        if where.startswith(prefix):
            return family
    raise TypeError(
        f"{type(module).__name__} (from {where or 'an unknown module'}) is not a timm, "
        "transformers or OpenCLIP model; HookedViT converts those (from_timm, from_hf, "
        "from_open_clip)"
    )


def _hf_hooked(
    source: Union[nn.Module, str, Path],
    class_names: Optional[Sequence[str]],
    text: dict,
    **options: Any,
) -> HookedViT:
    """``from_hf`` of a module, folder or hub name; a full CLIP/SigLIP gets its text head."""
    module: Any = source
    if not isinstance(source, nn.Module):
        from vit_embedding_lens.loading.hf_models import load_hf_module

        module = load_hf_module(source)
    full = type(module).__name__ in ("CLIPModel", "SiglipModel")
    wants_text = full and (class_names is not None or text.get("class_embeddings") is not None)
    # the HF converter reads a full CLIPModel / SiglipModel's image tower (text side set aside)
    hooked = loader("hf")(module, class_names=None if wants_text else class_names, **options)
    if not wants_text and text.get("class_embeddings") is None:
        _no_text_options(text, type(module).__name__)
        return hooked
    if text.get("tokenizer") is None and not isinstance(source, nn.Module):
        text = dict(text, tokenizer=_folder_tokenizer(source))
    return hooked.with_class_space(_space(module, class_names, text))


def _folder_tokenizer(source: Union[str, Path]) -> Optional[Tokenizer]:
    """The tokenizer saved beside a model in its ``save_pretrained`` folder (None without one):
    ``processor.save_pretrained(folder)`` or ``tokenizer.save_pretrained(folder)`` writes it."""
    text = str(source)
    folder = Path(without_hf_prefix(text)).expanduser()
    if not folder.is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return cast(Tokenizer, AutoTokenizer.from_pretrained(folder, local_files_only=True))
    except (OSError, ValueError, TypeError):
        return None


def _space(module: nn.Module, class_names: Optional[Sequence[str]], text: dict) -> ClassSpace:
    if text.get("class_embeddings") is not None:
        return class_space_from_embeddings(module, text["class_embeddings"], class_names)
    assert class_names is not None
    return text_class_space(
        module, class_names, text.get("templates"), tokenizer=text.get("tokenizer")
    )


def _no_text_options(text: dict, what: str) -> None:
    given = [k for k, v in text.items() if v is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} apply to CLIP-like models with a text tower (or class_embeddings "
            f"for their image towers); {what} takes none"
        )


def hooked_from_pretrained(
    model_or_name: Union[str, Path, nn.Module],
    pretrained: bool = False,
    checkpoint_path: Optional[Union[str, Path]] = None,
    *,
    class_names: Optional[Sequence[str]] = None,
    templates: Optional[Sequence[str]] = None,
    tokenizer: Optional[Tokenizer] = None,
    class_embeddings: Optional[Union[Tensor, ClassSpace, str, Path]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    model_name: Optional[str] = None,
    **options: Any,
) -> HookedViT:
    """``HookedViT.from_pretrained`` (documented there)."""
    text: Dict[str, Any] = dict(
        templates=templates, tokenizer=tokenizer, class_embeddings=class_embeddings
    )
    common: Dict[str, Any] = dict(device=device, dtype=dtype, model_name=model_name)
    if isinstance(model_or_name, nn.Module):
        family = module_family(model_or_name)
        if family != "timm" and pretrained:
            raise ValueError("pretrained=True applies to timm model names only")
        if family == "open_clip":
            return hooked_from_open_clip(
                model_or_name, checkpoint_path=checkpoint_path, class_names=class_names,
                **text, **common, **options,
            )  # fmt: skip
        if checkpoint_path is not None and family == "hf":
            raise ValueError("a Hugging Face module carries its weights: no checkpoint_path")
        if family == "hf":
            return _hf_hooked(model_or_name, class_names, text, **common, **options)
        return _timm_hooked(model_or_name, pretrained, checkpoint_path, class_names, text, common,
                            options)  # fmt: skip
    if isinstance(model_or_name, Path):
        model_or_name = str(model_or_name)
    if not isinstance(model_or_name, str):
        raise TypeError(
            f"expected a model (timm, transformers, OpenCLIP) or a model name, got "
            f"{type(model_or_name).__name__}"
        )
    source = parse_model_name(model_or_name, checkpoint_path)
    if source.kind == "open_clip" or _is_bundled_clip(source):
        if pretrained:
            raise ValueError(
                f"{source.label}: name OpenCLIP's pretrained weights in the name "
                f"(open_clip:ARCH:PRETRAINED), not with pretrained=True"
            )
        return hooked_from_open_clip(
            source.label, checkpoint_path=checkpoint_path, class_names=class_names,
            **text, **common, **options,
        )  # fmt: skip
    if source.kind in ("hf", "hf-folder"):
        if pretrained:
            raise ValueError(f"{source.label}: a Hugging Face model has its weights; no pretrained")
        target: Union[str, Path] = source.path if source.path is not None else source.name
        return _hf_hooked(target, class_names, text, **common, **options)
    return _timm_hooked(model_or_name, pretrained, checkpoint_path, class_names, text, common,
                        options)  # fmt: skip


def _is_bundled_clip(source: ModelSource) -> bool:
    if source.kind != "bundled":
        return False
    from vit_embedding_lens.zoo.clip import BUNDLED_CLIP_MODELS

    return source.name in BUNDLED_CLIP_MODELS


def _timm_hooked(
    model_or_name: Union[str, nn.Module],
    pretrained: bool,
    checkpoint_path: Optional[Union[str, Path]],
    class_names: Optional[Sequence[str]],
    text: dict,
    common: dict,
    options: dict,
) -> HookedViT:
    embeddings = text.pop("class_embeddings")
    _no_text_options(text, "a timm model")
    hooked = hooked_from_timm(
        model_or_name,
        pretrained,
        checkpoint_path,
        class_names=None if embeddings is not None else class_names,
        **common,
        **options,
    )
    if embeddings is None:
        return hooked
    return hooked.with_class_space(class_space_from_embeddings(None, embeddings, class_names))
