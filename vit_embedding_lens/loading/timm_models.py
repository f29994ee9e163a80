"""timm modules from model sources, and HookedViTs from timm modules.

:func:`load_timm` creates the timm module a :class:`~vit_embedding_lens.loading.names.ModelSource`
names (bundled weights, a timm name with optional pretrained weights, a checkpoint, a timm model
folder); :func:`to_hooked` converts it (weight processing in float64, cast once). The functions
registered for ``HookedViT.from_timm`` / ``from_bundled`` are :func:`hooked_from_timm` and
:func:`hooked_from_bundled`. timm is imported inside the functions, so importing the package stays
cheap.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from vit_embedding_lens.errors import ConversionError, HubUnreachableError
from vit_embedding_lens.loading.names import ModelSource, parse_model_name
from vit_embedding_lens.model.checkpoint import load_checkpoint_, read_state_dict
from vit_embedding_lens.model.convert import convert_timm
from vit_embedding_lens.model.hooked_vit import HookedViT
from vit_embedding_lens.model.processing import process_weights_

#: the bundled models' preprocessing as a timm data config: 28x28, no crop, (x/255 - 0.5)/0.5
BUNDLED_DATA_CONFIG: Dict[str, Any] = {
    "interpolation": "bilinear",
    "mean": (0.5,),
    "std": (0.5,),
    "crop_pct": 1.0,
    "crop_mode": "center",
}


@dataclass(frozen=True)
class LoadedTimm:
    """A timm module made from a source, what to call it, and its class names (when known)."""

    module: nn.Module
    source: ModelSource
    class_names: Optional[List[str]] = None

    @property
    def label(self) -> str:
        return self.source.label

    def data_config(self) -> Dict[str, Any]:
        """The timm data config (input size, interpolation, mean/std, crop) its weights expect."""
        if self.source.kind == "bundled":
            return dict(BUNDLED_DATA_CONFIG)
        from timm.data import resolve_data_config

        return dict(resolve_data_config(model=self.module))


def create_timm_model(name: str, pretrained: bool, timm_kwargs: Dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with clear errors: an unknown name suggests close names, a failed
    download says how to work without the hub."""
    import timm

    known = timm.list_models()
    arch, _, tag = name.partition(".")
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        raise ValueError(
            f"{name!r} is not a timm model name (close: {close}); see timm.list_models('vit*')"
        )
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise ValueError(
                f"{name!r}: {tag!r} is not a pretrained tag of {arch} (its tags: {tags}); name "
                f"the architecture alone for random weights or your own checkpoint"
            )
    try:
        return timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    except (
        OSError
    ) as err:  # the hub is unreachable (HF_HUB_OFFLINE, no network) or the file is gone
        if not pretrained:
            raise
        raise HubUnreachableError(
            f"could not fetch the pretrained weights of {name!r} ({type(err).__name__}: {err}). "
            f"Without a model hub, create the model with pretrained=False and pass your own "
            f"weights as checkpoint_path=..., or use the bundled model (HookedViT.from_bundled()).",
            model=name,
            reason=f"{type(err).__name__}: {err}",
        ) from err


def _create_from_folder(source: ModelSource, timm_kwargs: Dict[str, Any]) -> nn.Module:
    """The timm module of a model folder, its weights read by timm; a weights file timm cannot
    read (corrupt, or pickled objects beyond tensors, which are refused) is a ConversionError."""
    import timm

    try:
        return timm.create_model(source.name, pretrained=True, **timm_kwargs)
    except (OSError, ValueError, TypeError):
        raise
    except Exception as err:  # noqa: BLE001 - timm's and torch's reading errors have no common type
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(
            f"could not load the weights of the timm model folder {source.path}: {first}. "
            f"Weights that need pickled objects beyond tensors are refused (unpickling can run "
            f"code); save the model's state_dict as model.safetensors."
        ) from err


def _folder_class_names(module: nn.Module) -> Optional[List[str]]:
    """The ``label_names`` a timm folder's config.json gives (timm puts them in the module's
    pretrained config), when there is one per class."""
    cfg = getattr(module, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    n_classes = getattr(module, "num_classes", None)
    if isinstance(names, dict):  # {"0": "cat", ...}
        names = [names[k] for k in sorted(names, key=int)] if len(names) else None
    if isinstance(names, (list, tuple)) and len(names) == n_classes:
        return [str(n) for n in names]
    return None


def load_timm(
    source: ModelSource, pretrained: bool = False, timm_kwargs: Optional[Dict[str, Any]] = None
) -> LoadedTimm:
    """The timm module (evaluation mode) a parsed source names; one creation, weights loaded.

    ``pretrained`` downloads a timm name's weights (a checkpoint then overwrites them);
    ``timm_kwargs`` go to ``timm.create_model``. A bundled model takes neither.
    """
    timm_kwargs = dict(timm_kwargs or {})
    if source.kind == "bundled":
        if pretrained or timm_kwargs:
            raise ValueError(
                f"{source.label}: a bundled model takes no pretrained= or timm arguments (its "
                f"trained weights ship with the package)"
            )
        from vit_embedding_lens.zoo.bundled import bundled_class_names, load_bundled_timm
        from vit_embedding_lens.zoo.clip import BUNDLED_CLIP_MODELS

        if source.name in BUNDLED_CLIP_MODELS:
            raise ValueError(
                f"{source.label} is an OpenCLIP image-text model, not a timm one: load it with "
                f"HookedViT.from_pretrained({source.label!r}) or from_open_clip"
            )

        return LoadedTimm(load_bundled_timm(source.name), source, bundled_class_names(source.name))
    if source.kind == "timm-folder":
        module = _create_from_folder(source, timm_kwargs)
        return LoadedTimm(module.eval(), source, _folder_class_names(module))
    else:
        if source.kind == "checkpoint" and "num_classes" not in timm_kwargs:
            assert source.path is not None  # a checkpoint source names its file
            n_classes = checkpoint_num_classes(source.path)
            if n_classes is not None:  # a fine-tuned head: size the classifier to the weights
                timm_kwargs["num_classes"] = n_classes
        module = create_timm_model(source.name, pretrained, timm_kwargs)
        if source.kind == "checkpoint":
            assert source.path is not None  # a checkpoint source names its file
            load_checkpoint_(module, source.path)
    return LoadedTimm(module.eval(), source)


def checkpoint_num_classes(path: Union[str, Path]) -> Optional[int]:
    """The class count of a weights file's classifier (the rows of ``head.weight``), or None when
    it has no such head. A safetensors file is read for its header only."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as weights:
                if "head.weight" not in weights.keys():
                    return None
                shape = weights.get_slice("head.weight").get_shape()
        except Exception:  # noqa: BLE001 - a damaged file is reported when it is read
            return None
    else:
        try:
            state = read_state_dict(path)
        except (OSError, ValueError):  # reported, with the reason, when it is loaded
            return None
        head = state.get("head.weight")
        shape = list(head.shape) if head is not None else []
    return int(shape[0]) if len(shape) == 2 else None


def load_timm_model(
    model_or_name: Union[str, nn.Module],
    pretrained: bool,
    checkpoint_path: Optional[Union[str, Path]],
    timm_kwargs: Dict[str, Any],
) -> Tuple[nn.Module, str]:
    """The timm module to convert and its name: a live module as given, or one made from a name."""
    if isinstance(model_or_name, nn.Module):
        if pretrained or timm_kwargs:
            raise ValueError(
                "pretrained= and timm keyword arguments apply only when a timm model name is given"
            )
        if checkpoint_path is not None:
            load_checkpoint_(model_or_name, checkpoint_path)
        cfg = getattr(model_or_name, "pretrained_cfg", {})
        return model_or_name, cfg.get("architecture") or type(model_or_name).__name__
    if not isinstance(model_or_name, str):
        raise TypeError(
            f"expected a timm model or a timm model name, got {type(model_or_name).__name__}"
        )
    loaded = load_timm(parse_model_name(model_or_name, checkpoint_path), pretrained, timm_kwargs)
    return loaded.module, loaded.label


def to_hooked(
    timm_model: nn.Module,
    name: str,
    *,
    class_names: Optional[Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
) -> HookedViT:
    """Convert a timm module and apply the requested weight processing.

    Processing runs in float64 and is cast once to ``dtype`` (default: the timm weights'), so it
    adds no rounding of its own.
    """
    steps = dict(
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    target_dtype = dtype or next(timm_model.parameters()).dtype
    work_dtype = torch.float64 if any(steps.values()) else target_dtype
    conversion = convert_timm(timm_model, name, class_names, work_dtype)
    model = HookedViT.from_conversion(conversion, device=device)
    return process_weights_(model, **steps).to(target_dtype)


#: ``HookedViT.from_timm`` keywords that :func:`to_hooked` takes; the others go to timm
CONVERSION_OPTIONS = (
    "device",
    "dtype",
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
)


def hooked_from_timm(
    model_or_name: Union[str, nn.Module],
    pretrained: bool = False,
    checkpoint_path: Optional[Union[str, Path]] = None,
    *,
    class_names: Optional[Sequence[str]] = None,
    model_name: Optional[str] = None,
    **options: Any,
) -> HookedViT:
    """``HookedViT.from_timm`` (its arguments are documented there): parse the name once, create
    the module once, convert it. ``options`` in :data:`CONVERSION_OPTIONS` go to
    :func:`to_hooked`, the others to ``timm.create_model``."""
    steps = {key: options.pop(key) for key in CONVERSION_OPTIONS if key in options}
    if isinstance(model_or_name, str):
        loaded = load_timm(parse_model_name(model_or_name, checkpoint_path), pretrained, options)
        module, label, names = loaded.module, loaded.label, loaded.class_names
    else:
        module, label = load_timm_model(model_or_name, pretrained, checkpoint_path, options)
        names = None
    return to_hooked(module, model_name or label, class_names=class_names or names, **steps)


def hooked_from_bundled(name: str = "mnist-vit", **kwargs: Any) -> HookedViT:
    """``HookedViT.from_bundled``: the bundled model ``name`` through :func:`hooked_from_timm`,
    or, for a bundled image-text model (``mnist-clip``), through ``from_open_clip``."""
    from vit_embedding_lens.zoo.clip import BUNDLED_CLIP_MODELS

    if name in BUNDLED_CLIP_MODELS:
        from vit_embedding_lens.loading.open_clip_models import hooked_from_open_clip

        return hooked_from_open_clip(ModelSource("bundled", name).label, **kwargs)
    return hooked_from_timm(ModelSource("bundled", name).label, **kwargs)
