"""Metrics over a :class:`~vit_embedding_lens.lens.streaming.LensResult` (METHODS §2–§3), as tensors
and tidy DataFrames (one row per block × layer type × token group × metric).

Token groups come from the model's :class:`TokenLayout`: ``cls``, ``dist``, ``registers`` (prefix
tokens, each reported on its own) and ``image`` (patch tokens); with a token mask also ``class``
(image tokens on the object) and ``context`` (the other image tokens). Prefix tokens are never image
tokens. Per-image percentages are averaged over images ("mean of per-image %", as the paper
reports).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from vit_embedding_lens.lens.stats import compare_groups, wilcoxon_greater
from vit_embedding_lens.lens.streaming import CHANGES, COMPOSITION_BITS, KINDS, LensResult


def token_groups(result: LensResult) -> Dict[str, Bool[Tensor, "batch pos"]]:
    """Boolean ``[batch, pos]`` membership of every token group present in this result."""
    layout, n = result.layout, result.n_images
    groups: Dict[str, Tensor] = {}

    def positions(indices: Sequence[int]) -> Tensor:
        mask = torch.zeros(layout.n_tokens, dtype=torch.bool)
        mask[list(indices)] = True
        return mask.expand(n, -1)

    if layout.cls_index is not None:
        groups["cls"] = positions([layout.cls_index])
    if layout.dist_index is not None:
        groups["dist"] = positions([layout.dist_index])
    if layout.register_indices:
        groups["registers"] = positions(layout.register_indices)
    groups["image"] = positions(layout.patch_indices)
    if result.token_mask is not None:
        groups["class"] = result.token_mask & groups["image"]
        groups["context"] = ~result.token_mask & groups["image"]
    return groups


def _per_image_mean(
    values: Tensor, mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "batch block"]:
    """Mean of ``values [batch, block, pos]`` over each image's tokens in ``mask`` (NaN if
    none)."""
    m = mask[:, None, :].to(torch.float64)
    count = m.sum(-1)
    total = (values.to(torch.float64) * m).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def identifiability_scores(
    result: LensResult, kind: str = "resid"
) -> Float[Tensor, "batch block pos"]:
    """Per-token score ``1 - rank / C`` for one layer type (``resid``, ``attn`` or ``mlp``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return 1.0 - result.rank[kind].to(torch.float64) / result.n_classes


def per_image_identifiability(
    result: LensResult, kind: str = "resid", group: str = "image", metric: str = "score"
) -> Float[Tensor, "batch block"]:
    """Per image and block: the mean score (``metric="score"``) or the share of identifiable tokens
    (``"identifiable"``, rank 0) of one token group. NaN where an image has no token of the
    group."""
    groups = token_groups(result)
    if group not in groups:
        raise ValueError(
            f"token group {group!r} is not in this result; available: {sorted(groups)}"
        )
    if metric == "score":
        values = identifiability_scores(result, kind)
    elif metric == "identifiable":
        values = (result.rank[kind] == 0).to(torch.float64)
    else:
        raise ValueError(f"metric must be 'score' or 'identifiable', got {metric!r}")
    return _per_image_mean(values, groups[group])


def identifiability_table(result: LensResult) -> pd.DataFrame:
    """Tidy table: per block × layer type × token group, the mean score, the % identifiable tokens
    (mean of per-image %) and, for image-token groups, the % of images with at least one
    identifiable token. Columns: block, layer_type, token_group, metric, value, n_images."""
    rows: List[dict] = []
    groups = token_groups(result)
    for kind in KINDS:
        scores = identifiability_scores(result, kind)
        identifiable = (result.rank[kind] == 0).to(torch.float64)
        for group, mask in groups.items():
            per_image_score = _per_image_mean(scores, mask)
            per_image_ident = _per_image_mean(identifiable, mask)
            metrics: Dict[str, Optional[Tensor]] = {
                "score": _nanmean(per_image_score),
                "identifiable_pct": 100 * _nanmean(per_image_ident),
            }
            if group in ("image", "class", "context"):
                has = (identifiable * mask[:, None, :]).amax(
                    -1
                )  # any identifiable token of the group
                valid = mask.any(-1)
                metrics["images_with_identifiable_pct"] = (
                    100 * has[valid].mean(0) if valid.any() else None
                )
            n_valid = int((~torch.isnan(per_image_score[:, 0])).sum())
            for metric, per_block in metrics.items():
                for block in range(result.n_blocks):
                    value = float("nan") if per_block is None else float(per_block[block])
                    rows.append(
                        dict(
                            block=block,
                            layer_type=kind,
                            token_group=group,
                            metric=metric,
                            value=value,
                            n_images=n_valid,
                        )
                    )
    return pd.DataFrame(rows)


def change_rate_table(result: LensResult) -> pd.DataFrame:
    """% of tokens whose correct-class logit rose, per block × comparison × token group.

    Comparisons (METHODS §2–§3): ``block`` (resid_post vs the block input), ``attn`` and ``mlp``
    (write-in vs the block input, the paper's), ``mlp_vs_resid_mid`` (MLP write-in vs the residual
    after attention). Columns: block, comparison, token_group, value (mean of per-image %)."""
    rows = []
    for comparison in CHANGES:
        rose = result.rose[comparison].to(torch.float64)
        for group, mask in token_groups(result).items():
            per_block = 100 * _nanmean(_per_image_mean(rose, mask))
            for block in range(result.n_blocks):
                rows.append(
                    dict(
                        block=block,
                        comparison=comparison,
                        token_group=group,
                        value=float(per_block[block]),
                    )
                )
    return pd.DataFrame(rows)


def composition_table(result: LensResult) -> pd.DataFrame:
    """Residual composition per block × token group: % of tokens whose top-1 class at ``resid_post``
    equals the top-1 of ``attn_out``, of ``mlp_out``, of ``resid_pre``, and ``composed``: none of
    the three (the reference code's "composed" repeats the attention test; this is the
    definition)."""
    rows = []
    comp = result.composition.to(torch.int64)
    matches = {name: ((comp & bit) > 0).to(torch.float64) for name, bit in COMPOSITION_BITS.items()}
    matches["composed"] = (comp == 0).to(torch.float64)
    for source, flags in matches.items():
        for group, mask in token_groups(result).items():
            per_block = 100 * _nanmean(_per_image_mean(flags, mask))
            for block in range(result.n_blocks):
                rows.append(
                    dict(
                        block=block, source=source, token_group=group, value=float(per_block[block])
                    )
                )
    return pd.DataFrame(rows)


def compare_with_random(
    trained: LensResult,
    random: LensResult,
    groups: Sequence[str] = ("cls", "image"),
    kinds: Sequence[str] = ("resid",),
) -> pd.DataFrame:
    """Trained vs random-init model per block: one-sided paired Wilcoxon test (trained > random) on
    the per-image mean scores of the same images. Columns: block, layer_type, token_group, trained,
    random, statistic, p_value, stars."""
    if not torch.equal(trained.labels, random.labels):
        raise ValueError(
            "the trained and random-init results must cover the same images (labels differ)"
        )
    rows = []
    available = token_groups(trained)
    for kind in kinds:
        for group in groups:
            if group not in available:
                continue
            a = per_image_identifiability(trained, kind, group).numpy()
            b = per_image_identifiability(random, kind, group).numpy()
            for block in range(trained.n_blocks):
                ok = ~(np.isnan(a[:, block]) | np.isnan(b[:, block]))
                test = wilcoxon_greater(a[ok, block], b[ok, block])
                rows.append(
                    dict(
                        block=block,
                        layer_type=kind,
                        token_group=group,
                        trained=float(a[ok, block].mean()) if ok.any() else float("nan"),
                        random=float(b[ok, block].mean()) if ok.any() else float("nan"),
                        statistic=test.statistic,
                        p_value=test.p_value,
                        stars=test.stars,
                    )
                )
    return pd.DataFrame(rows)


def class_vs_context(
    result: LensResult, kind: str = "resid", n_permutations: int = 2_000, seed: int = 0
) -> pd.DataFrame:
    """Identifiability of class- vs context-labelled image tokens per block (METHODS §5): mean
    scores, their difference, and a one-sided permutation test (class > context) over the pooled
    tokens."""
    if result.token_mask is None:
        raise ValueError(
            "class vs context needs token labels: pass token_mask (True = token on the object)"
        )
    groups = token_groups(result)
    scores = identifiability_scores(result, kind)
    rows = []
    for block in range(result.n_blocks):
        cls_scores = scores[:, block][groups["class"]].numpy()
        ctx_scores = scores[:, block][groups["context"]].numpy()
        rows.append(
            dict(
                block=block,
                layer_type=kind,
                **compare_groups(
                    cls_scores,
                    ctx_scores,
                    means=("class_score", "context_score"),
                    sizes=("n_class_tokens", "n_context_tokens"),
                    n_permutations=n_permutations,
                    seed=seed,
                ),
            )
        )
    return pd.DataFrame(rows)


def summarize(result: LensResult, random: Optional[LensResult] = None) -> Dict[str, pd.DataFrame]:
    """Every table of the lens for one result (and the random-init comparison when given)."""
    tables = {
        "identifiability": identifiability_table(result),
        "change_rates": change_rate_table(result),
        "composition": composition_table(result),
    }
    if result.token_mask is not None:
        tables["class_vs_context"] = class_vs_context(result)
    if random is not None:
        tables["trained_vs_random"] = compare_with_random(result, random)
    return tables


def _nanmean(per_image: Tensor) -> Tensor:
    """Mean over images (axis 0), ignoring images without tokens of the group."""
    return torch.nanmean(per_image, dim=0)
