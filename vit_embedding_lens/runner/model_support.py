"""The survey behind ``vit-lens models``: which timm ViT families convert, and why not.

Each model is checked by :func:`vit_embedding_lens.loading.check_model_support` (the converter's
own refusal, read from its ``feature`` field). A survey of all ViT families takes a while, so its
result is cached per timm version, library version and converter source.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
from tqdm.auto import tqdm

# the per-model check lives on the loading floor; these names stay importable from here
from vit_embedding_lens.loading.support import (
    VIT_MODULES,
    SupportEntry,
    check_model_support,
    refusal_feature,
    vit_model_names,
)

__all__ = [
    "VIT_MODULES",
    "SupportEntry",
    "check_model_support",
    "refusal_feature",
    "refusal_reasons",
    "support_by_module",
    "survey_models",
    "vit_model_names",
]


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
