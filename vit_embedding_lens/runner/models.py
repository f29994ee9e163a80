"""Loading the model of a command-line run: a timm name (with optional checkpoint or pretrained
weights), a timm model folder, or a bundled model; with the timm data config it expects.

Names are parsed and models created by the loading floor (:mod:`vit_embedding_lens.loading`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Union

import torch

from vit_embedding_lens.loading import BUNDLED_DATA_CONFIG, load_timm, parse_model_name, to_hooked

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
    """
    dtype = parse_dtype(dtype)
    source = parse_model_name(name, checkpoint)
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
