"""The statistical tests the paper uses: one-sided Wilcoxon (trained vs random init) and a one-sided
permutation test on a difference of means (class vs context tokens), plus significance stars."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class TestResult:
    """A one-sided test of "first > second": the statistic, its p-value and the effect
    (difference)."""

    statistic: float
    p_value: float
    effect: float

    @property
    def stars(self) -> str:
        return significance_stars(self.p_value)


def significance_stars(p_value: float) -> str:
    """``***`` p < 0.001, ``**`` p < 0.01, ``*`` p < 0.05, else ``""`` (``"n/a"`` for NaN)."""
    if p_value != p_value:
        return "n/a"
    return "***" if p_value < 1e-3 else "**" if p_value < 1e-2 else "*" if p_value < 0.05 else ""


def wilcoxon_greater(first, second, paired: bool = True) -> TestResult:
    """One-sided Wilcoxon test that ``first`` is larger than ``second``.

    ``paired`` (default): the signed-rank test on matched samples (the same images through the
    trained and the random model). Unpaired: the rank-sum (Mann-Whitney U) test. NaN p-value when
    every difference is zero or a side is empty.
    """
    a, b = np.asarray(first, dtype=np.float64).ravel(), np.asarray(second, dtype=np.float64).ravel()
    if paired and a.shape != b.shape:
        raise ValueError(f"a paired test needs matched samples, got {a.size} and {b.size} values")
    if a.size == 0 or b.size == 0:
        return TestResult(float("nan"), float("nan"), float("nan"))
    effect = float(np.mean(a) - np.mean(b))
    if paired:
        if np.all(a == b):
            return TestResult(0.0, float("nan"), effect)
        res = stats.wilcoxon(a, b, alternative="greater", zero_method="wilcox")
    else:
        res = stats.mannwhitneyu(a, b, alternative="greater")
    return TestResult(float(res.statistic), float(res.pvalue), effect)


def permutation_test_greater(
    first, second, n_permutations: int = 2_000, seed: Optional[int] = 0
) -> TestResult:
    """One-sided permutation test that ``mean(first) > mean(second)`` (labels shuffled between the
    pooled samples). The p-value counts the observed split, so it is never 0:
    ``(k + 1) / (n + 1)``."""
    a, b = np.asarray(first, dtype=np.float64).ravel(), np.asarray(second, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        return TestResult(float("nan"), float("nan"), float("nan"))
    observed = float(a.mean() - b.mean())
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    chunk = max(1, 5_000_000 // pooled.size)
    while done < n_permutations:  # chunks keep memory flat for large token sets
        n = min(chunk, n_permutations - done)
        perm = rng.permuted(np.broadcast_to(pooled, (n, pooled.size)), axis=1)
        diffs = perm[:, : a.size].mean(1) - perm[:, a.size :].mean(1)
        hits += int((diffs >= observed - 1e-12).sum())
        done += n
    return TestResult(observed, (hits + 1) / (n_permutations + 1), observed)


def compare_groups(
    first,
    second,
    means: Tuple[str, str],
    sizes: Tuple[str, str],
    n_permutations: int = 2_000,
    seed: Optional[int] = 0,
) -> Dict[str, object]:
    """A table row's columns comparing two groups with :func:`permutation_test_greater`: each
    group's mean (columns ``means``; NaN for an empty group), ``difference``, ``p_value``,
    ``stars`` and each group's size (columns ``sizes``)."""
    a = np.asarray(first, dtype=np.float64).ravel()
    b = np.asarray(second, dtype=np.float64).ravel()
    test = permutation_test_greater(a, b, n_permutations=n_permutations, seed=seed)
    return {
        means[0]: float(a.mean()) if a.size else float("nan"),
        means[1]: float(b.mean()) if b.size else float("nan"),
        "difference": test.effect,
        "p_value": test.p_value,
        "stars": test.stars,
        sizes[0]: int(a.size),
        sizes[1]: int(b.size),
    }
