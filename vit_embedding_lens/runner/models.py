"""Loading the model of a command-line run: a timm name (with optional checkpoint or pretrained
weights), a timm model folder, a bundled model, a Hugging Face model (``hf:NAME`` or a
``save_pretrained`` folder) or an OpenCLIP model (``open_clip:ARCH[:PRETRAINED]``,
``bundled:mnist-clip``, with a text-defined class space); with the data config it expects.

Names are parsed and models created by the loading floor (:mod:`vit_embedding_lens.loading`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

import torch

from vit_embedding_lens.loading import (
    BUNDLED_DATA_CONFIG,
    ModelSource,
    load_timm,
    parse_model_name,
    to_hooked,
)

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

__all__ = ["BUNDLED_DATA_CONFIG", "DTYPES", "LoadedModel", "load_model", "parse_dtype"]

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class LoadedModel:
    """A HookedViT, the timm data config of its weights, and what identifies it in a run config."""

    model: "HookedViT"
    data_config: Dict[str, Any]
    spec: Dict[str, Any] = field(default_factory=dict)


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_model(
    name: Optional[str] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    pretrained: bool = False,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = "float32",
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    templates: Optional[Sequence[str]] = None,
    class_embeddings: Optional[Union[str, Path]] = None,
) -> LoadedModel:
    """The HookedViT for ``--model NAME`` / ``--checkpoint PATH`` / ``--pretrained``.

    ``name`` is a timm model name (``vit_base_patch16_224.augreg_in21k_ft_in1k``) or
    ``bundled:mnist-vit`` or ``bundled:fashion-vit``. ``checkpoint`` is a weights file for that
    architecture (safetensors or a plain torch state dict), or, without ``name``, a folder saved by
    timm (``config.json`` + weights), whose config names the architecture. Unsupported
    architectures raise :class:`~vit_embedding_lens.errors.UnsupportedArchitectureError` from the
    converter.

    ``num_classes`` sizes the classifier of a timm architecture (default: a checkpoint's head);
    ``class_names`` (one per class) replace the names the source gives (a timm folder's
    ``label_names``, the bundled models' classes, ImageNet's for 1000 classes).

    CLIP-like models (OpenCLIP, a full Hugging Face CLIP/SigLIP) get a zero-shot head from their
    text tower: ``class_names`` filled into ``templates`` (default: the model's own for a bundled
    one, else :data:`~vit_embedding_lens.loading.text_space.DEFAULT_TEMPLATES`), or
    ``class_embeddings``, the folder of a saved ``ClassSpace``.
    """
    dtype = parse_dtype(dtype)
    source = parse_model_name(name, checkpoint)
    if _non_timm(source):
        if num_classes is not None or pretrained:
            raise ValueError(
                f"{source.label}: --num-classes and --pretrained apply to timm names only"
            )
        return _load_non_timm(source, device, dtype, class_names, templates, class_embeddings)
    if templates is not None or class_embeddings is not None:
        raise ValueError(
            f"{source.label}: --templates and --class-embeddings apply to CLIP-like models "
            f"(open_clip:ARCH, bundled:mnist-clip, a Hugging Face CLIP or SigLIP)"
        )
    timm_kwargs: Dict[str, Any] = {}
    if num_classes is not None:
        if source.kind not in ("timm", "checkpoint"):
            raise ValueError(
                f"{source.label}: the number of classes is set by the model itself; give it only "
                f"with a timm architecture name"
            )
        timm_kwargs["num_classes"] = int(num_classes)
    loaded = load_timm(source, pretrained, timm_kwargs)
    model = to_hooked(
        loaded.module,
        loaded.label,
        class_names=list(class_names) if class_names is not None else loaded.class_names,
        device=device,
        dtype=dtype,
    )
    spec: Dict[str, Any] = {
        "model_name": loaded.label,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        "pretrained": bool(pretrained),
    }
    if num_classes is not None:  # recorded only when given: older runs keep their fingerprint
        spec["num_classes"] = int(num_classes)
    if class_names is not None:
        spec["class_names"] = list(class_names)
    return LoadedModel(model=model, data_config=loaded.data_config(), spec=spec)


def _non_timm(source: ModelSource) -> bool:
    if source.kind in ("open_clip", "hf", "hf-folder"):
        return True
    from vit_embedding_lens.zoo.clip import BUNDLED_CLIP_MODELS

    return source.kind == "bundled" and source.name in BUNDLED_CLIP_MODELS


def _load_non_timm(
    source: ModelSource,
    device: Union[str, torch.device],
    dtype: torch.dtype,
    class_names: Optional[Sequence[str]],
    templates: Optional[Sequence[str]],
    class_embeddings: Optional[Union[str, Path]],
) -> LoadedModel:
    """An OpenCLIP or Hugging Face model for a run, with its data config and run spec."""
    from vit_embedding_lens.loading.pretrained import hooked_from_pretrained

    data_config: Dict[str, Any] = {}
    if source.kind in ("open_clip", "bundled"):
        from vit_embedding_lens.loading.open_clip_models import (
            hooked_from_open_clip,
            load_open_clip,
            open_clip_data_config,
        )

        loaded = load_open_clip(source)
        model = hooked_from_open_clip(
            loaded,
            class_names=class_names,
            templates=templates,
            class_embeddings=class_embeddings,
            device=device,
            dtype=dtype,
        )
        data_config = (
            dict(BUNDLED_DATA_CONFIG)
            if source.kind == "bundled"
            else open_clip_data_config(loaded.module)
        )
    else:
        model = hooked_from_pretrained(
            source.label,
            class_names=class_names,
            templates=templates,
            class_embeddings=class_embeddings,
            device=device,
            dtype=dtype,
        )
        data_config = _hf_data_config(source)
    spec: Dict[str, Any] = {"model_name": source.label, "checkpoint": None, "pretrained": False}
    if source.path is not None and source.kind == "open_clip":
        spec["checkpoint"] = str(Path(source.path).resolve())
    if class_names is not None:
        spec["class_names"] = list(class_names)
    if templates is not None:
        spec["templates"] = list(templates)
    if class_embeddings is not None:
        spec["class_embeddings"] = str(Path(class_embeddings).resolve())
    return LoadedModel(model=model, data_config=data_config, spec=spec)


def _hf_data_config(source: ModelSource) -> Dict[str, Any]:
    """Mean, std and resampling from a save_pretrained folder's ``preprocessor_config.json`` (the
    library's defaults without one)."""
    if source.path is None or not (source.path / "preprocessor_config.json").is_file():
        return {}
    import json

    cfg = json.loads((source.path / "preprocessor_config.json").read_text())
    out: Dict[str, Any] = {}
    if cfg.get("image_mean") and cfg.get("image_std"):
        out.update(mean=tuple(cfg["image_mean"]), std=tuple(cfg["image_std"]))
    out["interpolation"] = {2: "bilinear", 3: "bicubic", 0: "nearest"}.get(
        cfg.get("resample"), "bicubic"
    )
    return out
