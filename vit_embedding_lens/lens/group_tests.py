"""Two group comparisons of the paper's reference code that the per-set tables do not make
(METHODS §3–§5), each a difference of means with a one-sided permutation test:

- :func:`kv_agreement_by_correctness`: the key-value agreement rate of correctly vs incorrectly
  classified images, per block and sublayer (do images the model gets right use the label's
  memories more?);
- :func:`class_vs_context_changes`: the attention and MLP class-similarity change rates of class-
  vs context-labelled image tokens, per block (do the sublayers push the object's tokens more?).
"""

from __future__ import annotations

from typing import Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor

from vit_embedding_lens.lens.memory_usage import TOKEN_GROUPS, PerImageMemoryCounts
from vit_embedding_lens.lens.metrics import token_groups
from vit_embedding_lens.lens.stats import compare_groups
from vit_embedding_lens.lens.streaming import LensResult


def kv_agreement_by_correctness(
    counts: PerImageMemoryCounts,
    correct: Bool[Tensor, " batch"],
    groups: Optional[Sequence[str]] = ("cls", "image"),
    n_permutations: int = 2_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Key-value agreement (% of a group's tokens whose top memories include one of the label's)
    of correctly vs incorrectly classified images, per block × sublayer × token group.

    Per image the rate is its agreeing tokens over its tokens of the group (0 or 100 for CLS, as the
    reference code); the two sets of images are compared by a one-sided permutation test
    (correct > incorrect) over images. Columns: block, sublayer, token_group, agreement_correct,
    agreement_incorrect, difference, p_value, stars, n_correct, n_incorrect.
    """
    is_correct = torch.as_tensor(correct).bool().cpu().numpy()
    if is_correct.shape != (counts.labels.shape[0],):
        raise ValueError(
            f"correct has shape {is_correct.shape}, expected one flag per image "
            f"({counts.labels.shape[0]})"
        )
    tokens = counts.tokens.double().numpy()  # [image, group]
    agree = counts.agree.double().numpy()  # [image, kind, block, group]
    rows = []
    for g, group in enumerate(TOKEN_GROUPS):
        if groups is not None and group not in groups:
            continue
        has = tokens[:, g] > 0
        if not has.any():
            continue
        for k, kind in enumerate(counts.kinds):
            for block in range(agree.shape[2]):
                rate = 100 * agree[has, k, block, g] / tokens[has, g]
                right, wrong = rate[is_correct[has]], rate[~is_correct[has]]
                rows.append(
                    dict(
                        block=block,
                        sublayer=kind,
                        token_group=group,
                        **compare_groups(
                            right,
                            wrong,
                            means=("agreement_correct", "agreement_incorrect"),
                            sizes=("n_correct", "n_incorrect"),
                            n_permutations=n_permutations,
                            seed=seed,
                        ),
                    )
                )
    return pd.DataFrame(rows)


def class_vs_context_changes(
    result: LensResult,
    comparisons: Sequence[str] = ("attn", "mlp"),
    n_permutations: int = 2_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Class-similarity change rate (% of tokens whose correct-class logit rises, METHODS §3) of
    class- vs context-labelled image tokens, per block × comparison (``attn``, ``mlp``, or any of
    :data:`~vit_embedding_lens.lens.streaming.CHANGES`), with a one-sided permutation test (class >
    context) over the pooled tokens, as the reference code compares them. Columns: block,
    comparison, class_rate, context_rate, difference (points), p_value, stars, n_class_tokens,
    n_context_tokens."""
    if result.token_mask is None:
        raise ValueError(
            "class vs context needs token labels: pass token_mask (True = token on the object)"
        )
    unknown = [c for c in comparisons if c not in result.rose]
    if unknown:
        raise ValueError(f"unknown comparisons {unknown}; available: {sorted(result.rose)}")
    groups = token_groups(result)
    rows = []
    for comparison in comparisons:
        rose = result.rose[comparison].to(torch.float64)  # [image, block, token]
        for block in range(result.n_blocks):
            on = 100 * rose[:, block][groups["class"]].numpy()
            off = 100 * rose[:, block][groups["context"]].numpy()
            rows.append(
                dict(
                    block=block,
                    comparison=comparison,
                    **compare_groups(
                        on,
                        off,
                        means=("class_rate", "context_rate"),
                        sizes=("n_class_tokens", "n_context_tokens"),
                        n_permutations=n_permutations,
                        seed=seed,
                    ),
                )
            )
    return pd.DataFrame(rows)
