"""Which timm Vision Transformers the converter takes, and why it refuses the others.

Nothing here restates a refusal: every model is built on PyTorch's ``meta`` device (no memory, no
weights; one block where the family allows it, all blocks otherwise) and passed to the converter's
own ``check_supported``; a refusal's reason is the feature named in its
:class:`~vit_embedding_lens.errors.UnsupportedArchitectureError`. A survey of all ViT families takes
a while, so its result is cached per timm version, library version and converter source.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

#: timm modules that define Vision Transformer classifiers (the converter's candidates)
VIT_MODULES = (
    "vision_transformer",
    "deit",
    "eva",
    "beit",
    "vision_transformer_relpos",
    "vision_transformer_sam",
    "vision_transformer_hybrid",
    "naflexvit",
)
_REFUSAL = re.compile(r"^(?P<name>.*?): (?P<feature>.*) is not supported by HookedViT\b", re.S)


@dataclass(frozen=True)
class SupportEntry:
    model: str
    module: str
    supported: bool
    reason: Optional[str] = None  # the refused feature, or why the model could not be built


def refusal_feature(err: Exception) -> str:
    """The feature a converter refusal names (its ``feature`` attribute, or parsed from the message)."""
    feature = getattr(err, "feature", None)
    if feature:
        return str(feature)
    match = _REFUSAL.match(str(err))
    return match.group("feature") if match else str(err)


def _build_on_meta(name: str) -> torch.nn.Module:
    import timm

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            return timm.create_model(name, pretrained=False, depth=1)
        except Exception:  # families whose per-block settings need their full depth
            return timm.create_model(name, pretrained=False)


def check_model_support(name: str) -> SupportEntry:
    """Whether HookedViT converts the timm model ``name`` (no weights are created or downloaded)."""
    import timm

    from vit_embedding_lens.errors import UnsupportedArchitectureError
    from vit_embedding_lens.model.convert import check_supported

    base = name.split(".")[0]
    if base not in timm.list_models():
        raise ValueError(f"{name!r} is not a timm model name; see timm.list_models('vit*')")
    module = _module_of(base)
    try:
        model = _build_on_meta(base)
    except Exception as err:  # noqa: BLE001 - report, never crash a listing
        return SupportEntry(
            name, module, False, f"could not be built ({type(err).__name__}: {err})"
        )
    try:
        check_supported(model, base)
    except UnsupportedArchitectureError as err:
        return SupportEntry(
            name, module, False, re.sub(r"blocks\.\d+", "blocks.N", refusal_feature(err))
        )
    return SupportEntry(name, module, True)


def _module_of(name: str) -> str:
    from timm.models._registry import _model_to_module

    return _model_to_module.get(name, "?")


def vit_model_names(
    modules: Sequence[str] = VIT_MODULES, pattern: Optional[str] = None
) -> List[str]:
    import timm

    names = timm.list_models(pattern or "*", module=list(modules))
    return sorted(names)


def _cache_file(cache_dir: Optional[Path]) -> Path:
    import timm

    import vit_embedding_lens
    from vit_embedding_lens.model import convert

    source = Path(convert.__file__).read_bytes()
    key = hashlib.sha256(
        f"{timm.__version__}|{vit_embedding_lens.__version__}|".encode() + source
    ).hexdigest()[:16]
    base = (
        cache_dir
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vit-embedding-lens"
    )
    return Path(base) / f"model-support-{key}.json"


def survey_models(
    names: Optional[Iterable[str]] = None,
    progress: bool = True,
    cache: bool = True,
    cache_dir: Optional[Path] = None,
) -> pd.DataFrame:
    """One row per timm ViT model: ``model, module, supported, reason`` (cached, see module doc)."""
    names = list(names) if names is not None else vit_model_names()
    path = _cache_file(cache_dir)
    known = {}
    if cache and path.is_file():
        try:
            known = {e["model"]: SupportEntry(**e) for e in json.loads(path.read_text())}
        except (ValueError, TypeError, KeyError):
            known = {}
    todo = [n for n in names if n not in known]
    for name in tqdm(
        todo, desc="checking timm models", unit="model", disable=not progress or not todo
    ):
        known[name] = check_model_support(name)
    if cache and todo:
        from vit_embedding_lens.runner.storage import atomic_write_json

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, [asdict(e) for e in known.values()])
    return pd.DataFrame(
        [asdict(known[n]) for n in names], columns=["model", "module", "supported", "reason"]
    )


def support_by_module(survey: pd.DataFrame) -> pd.DataFrame:
    """One row per timm module: models, supported, refused, a few supported examples."""
    rows = []
    for module, group in survey.groupby("module", sort=False):
        ok = group[group["supported"]]
        rows.append(
            {
                "module": module,
                "models": len(group),
                "supported": len(ok),
                "refused": len(group) - len(ok),
                "examples": ", ".join(ok["model"].head(3)) if len(ok) else "",
            }
        )
    return pd.DataFrame(rows)


def refusal_reasons(survey: pd.DataFrame) -> pd.DataFrame:
    """One row per refusal reason: how many models, which modules, a few examples."""
    refused = survey[~survey["supported"]]
    rows = []
    for reason, group in refused.groupby("reason", sort=False):
        rows.append(
            {
                "reason": reason,
                "models": len(group),
                "modules": ", ".join(sorted(group["module"].unique())),
                "examples": ", ".join(group["model"].head(3)),
            }
        )
    return pd.DataFrame(rows, columns=["reason", "models", "modules", "examples"]).sort_values(
        "models", ascending=False, ignore_index=True
    )
