"""Loading the model of a command-line run: a timm name (with optional checkpoint or pretrained
weights), a timm model folder, or the bundled model; with the timm data config it expects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

#: the bundled models' preprocessing as a timm data config: 28x28, no crop, (x/255 - 0.5)/0.5
BUNDLED_DATA_CONFIG: Dict[str, Any] = {
    "interpolation": "bilinear",
    "mean": (0.5,),
    "std": (0.5,),
    "crop_pct": 1.0,
    "crop_mode": "center",
}
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@dataclass
class LoadedModel:
    """A HookedViT, the timm data config of its weights, and what identifies it in a run's config."""

    model: Any
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
) -> LoadedModel:
    """The HookedViT for ``--model NAME`` / ``--checkpoint PATH`` / ``--pretrained``.

    ``name`` is a timm model name (``vit_base_patch16_224.augreg_in21k_ft_in1k``) or
    ``bundled:mnist-vit`` or ``bundled:fashion-vit``. ``checkpoint`` is a weights file for that architecture (safetensors or a
    plain torch state dict), or, without ``name``, a folder saved by timm (``config.json`` +
    weights), whose config names the architecture. Unsupported architectures raise
    :class:`~vit_embedding_lens.errors.UnsupportedArchitectureError` from the converter.
    """
    from timm.data import resolve_data_config

    from vit_embedding_lens.model.convert import load_timm_model
    from vit_embedding_lens.model.hooked_vit import HookedViT

    dtype = parse_dtype(dtype)
    class_names = None
    if name is None and checkpoint is None:
        raise ValueError(
            "name a model: --model NAME (a timm name or bundled:mnist-vit) or --checkpoint PATH"
        )
    from vit_embedding_lens.zoo.bundled import bundled_class_names, bundled_name, load_bundled_timm

    bundled = bundled_name(name)
    if bundled is not None:
        if checkpoint is not None or pretrained:
            raise ValueError(
                f"{name} is a bundled trained model: it takes no --checkpoint or --pretrained"
            )
        timm_model, label = load_bundled_timm(bundled), name
        class_names = bundled_class_names(bundled)
        data_config = dict(BUNDLED_DATA_CONFIG)
    else:
        if name is None:
            path = Path(checkpoint)
            if not path.is_dir():
                raise ValueError(
                    f"{path} is a weights file, which does not say which architecture it is for: name "
                    f"it with --model (e.g. --model vit_base_patch16_224 --checkpoint {path}), or pass "
                    f"a folder saved by timm (config.json + weights)"
                )
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"{path} has no config.json; a timm model folder holds config.json and the weights"
                )
            import timm

            timm_model, label = (
                timm.create_model(f"local-dir:{path.resolve()}", pretrained=True),
                f"local-dir:{path.resolve()}",
            )
        else:
            timm_model, label = load_timm_model(name, pretrained, checkpoint, {})
            label = name
        data_config = dict(resolve_data_config(model=timm_model))
    timm_model.eval()
    model = HookedViT.from_timm(
        timm_model, class_names=class_names, model_name=label, device=device, dtype=dtype
    )
    spec = {
        "model_name": label,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        "pretrained": bool(pretrained),
    }
    return LoadedModel(model=model, data_config=data_config, spec=spec)
