"""The loading floor: every kind of model source and name, above :mod:`vit_embedding_lens.model`.

- :func:`parse_model_name` -> :class:`ModelSource` (``kind``: ``"bundled"``, ``"timm"``,
  ``"checkpoint"``, ``"timm-folder"``, ``"hf"``, ``"hf-folder"``, ``"open_clip"``): the one parser
  of model names;
- :func:`hooked_from_open_clip` (``HookedViT.from_open_clip``): OpenCLIP image towers, with
  zero-shot heads from the text tower (:mod:`~vit_embedding_lens.loading.text_space`:
  :func:`text_class_space`);
- :func:`hooked_from_pretrained` (``HookedViT.from_pretrained``): the one entry point that picks
  the converter from what it is given;
- :func:`load_timm` / :func:`to_hooked`: the timm module a source names, and its HookedViT;
- :func:`hooked_from_hf` (``HookedViT.from_hf``): Hugging Face ``transformers`` vision models
  from a live module, a ``save_pretrained`` folder or ``hf:NAME``;
- :func:`random_init_twin`: the same architecture untrained, built from the model's config;
- :func:`check_model_support`: whether the converter takes a timm model, and why not;
- :func:`hub_reachable` / :func:`pretrained_cached`: whether pretrained weights can be downloaded,
  or are cached.

Importing it registers its loaders with :mod:`vit_embedding_lens.model.registry`, which
``HookedViT.from_timm`` and ``from_bundled`` use (``vit_embedding_lens.HookedViT``, or the
registry's first lookup, imports it). timm is imported only inside functions.
"""

from vit_embedding_lens.loading.hf_models import (
    convert_hf_source,
    hooked_from_hf,
    load_hf_module,
)
from vit_embedding_lens.loading.hub import hub_reachable, pretrained_cached
from vit_embedding_lens.loading.names import (
    BUNDLED_PREFIX,
    HF_PREFIX,
    LOCAL_DIR_PREFIX,
    OPEN_CLIP_PREFIX,
    ModelSource,
    SourceKind,
    bundled_name,
    is_hf_folder,
    parse_model_name,
)
from vit_embedding_lens.loading.open_clip_models import (
    convert_open_clip,
    hooked_from_open_clip,
    load_open_clip,
)
from vit_embedding_lens.loading.pretrained import hooked_from_pretrained
from vit_embedding_lens.loading.support import (
    VIT_MODULES,
    SupportEntry,
    check_model_support,
    refusal_feature,
    vit_model_names,
)
from vit_embedding_lens.loading.text_space import DEFAULT_TEMPLATES, text_class_space
from vit_embedding_lens.loading.timm_models import (
    BUNDLED_DATA_CONFIG,
    LoadedTimm,
    checkpoint_num_classes,
    create_timm_model,
    hooked_from_bundled,
    hooked_from_timm,
    load_timm,
    load_timm_model,
    to_hooked,
)
from vit_embedding_lens.loading.twin import (
    layer_scale_init_values,
    random_init_twin,
    timm_from_config,
)
from vit_embedding_lens.model import convert as _convert
from vit_embedding_lens.model.registry import register_loader

register_loader("timm", hooked_from_timm)
register_loader("bundled", hooked_from_bundled)
register_loader("open_clip", hooked_from_open_clip)
register_loader("pretrained", hooked_from_pretrained)
register_loader("hf", hooked_from_hf)

# Old addresses: hub_reachable and load_timm_model were public in model.convert before this floor
# existed. model/ may not import upward, so the floor hands them down to keep those imports
# working; new code imports them from here.
_convert.hub_reachable = hub_reachable
_convert.load_timm_model = load_timm_model

__all__ = [
    "BUNDLED_DATA_CONFIG",
    "BUNDLED_PREFIX",
    "DEFAULT_TEMPLATES",
    "HF_PREFIX",
    "LOCAL_DIR_PREFIX",
    "LoadedTimm",
    "ModelSource",
    "OPEN_CLIP_PREFIX",
    "SourceKind",
    "SupportEntry",
    "VIT_MODULES",
    "bundled_name",
    "check_model_support",
    "checkpoint_num_classes",
    "convert_hf_source",
    "convert_open_clip",
    "create_timm_model",
    "hooked_from_bundled",
    "hooked_from_hf",
    "hooked_from_open_clip",
    "hooked_from_pretrained",
    "hooked_from_timm",
    "hub_reachable",
    "is_hf_folder",
    "layer_scale_init_values",
    "load_hf_module",
    "load_open_clip",
    "load_timm",
    "load_timm_model",
    "parse_model_name",
    "pretrained_cached",
    "random_init_twin",
    "refusal_feature",
    "text_class_space",
    "timm_from_config",
    "to_hooked",
    "vit_model_names",
]
