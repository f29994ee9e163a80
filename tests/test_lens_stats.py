"""The lens's statistics against exact enumeration: the permutation test against every split of a
tiny pooled sample, the signed-rank and rank-sum tests against their exact null distributions (every
sign pattern, every split), one-sidedness, and the significance stars' thresholds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vit_embedding_lens.lens.stats import (
    permutation_test_greater,
    significance_stars,
    wilcoxon_greater,
)


def exact_permutation_p(a, b) -> float:
    """Share of all splits of the pooled values into groups of |a| and |b| whose mean difference is
    at least the observed one (the observed split included)."""
    pooled = list(a) + list(b)
    observed = np.mean(a) - np.mean(b)
    hits = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(a)):
        first = [pooled[i] for i in chosen]
        second = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        hits += np.mean(first) - np.mean(second) >= observed - 1e-12
        total += 1
    return hits / total


def exact_signed_rank_p(a, b) -> float:
    """P(W+ >= observed) over all 2^n sign patterns of the ranked |differences| (no ties, no
    zeros)."""
    d = np.asarray(a) - np.asarray(b)
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    observed = ranks[d > 0].sum()
    count = sum(
        sum(r for r, positive in zip(ranks, signs, strict=True) if positive) >= observed
        for signs in itertools.product([False, True], repeat=len(d))
    )
    return count / 2 ** len(d)


def exact_rank_sum_p(a, b) -> float:
    """P(U >= observed) over all splits, ``U = #{(i, j): a_i > b_j}`` (no ties)."""
    pooled = list(a) + list(b)

    def u(first, second):
        return sum(x > y for x in first for y in second)

    observed = u(a, b)
    splits = list(itertools.combinations(range(len(pooled)), len(a)))
    count = 0
    for chosen in splits:
        first = [pooled[i] for i in chosen]
        second = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        count += u(first, second) >= observed
    return count / len(splits)


# -- permutation test ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, b",
    [
        ([0.9, 0.8, 0.95, 0.7], [0.5, 0.6, 0.4, 0.75, 0.55]),  # clearly larger: p small
        ([0.6, 0.4, 0.7, 0.5], [0.5, 0.55, 0.45, 0.6, 0.52]),  # overlapping: p moderate
        ([0.5, 0.5, 0.75, 0.25], [0.5, 0.75, 0.5, 0.25, 0.5]),  # many ties
    ],
)
def test_permutation_test_matches_exact_enumeration(a, b):
    exact = exact_permutation_p(a, b)
    n = 20_000
    test = permutation_test_greater(a, b, n_permutations=n, seed=0)
    # Monte Carlo error: sd <= sqrt(0.25 / n) ~ 0.0035
    assert test.p_value == pytest.approx(exact, abs=0.015)
    assert test.effect == pytest.approx(np.mean(a) - np.mean(b)) and test.statistic == test.effect


def test_permutation_test_is_one_sided_and_never_zero():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 60)
    forward = permutation_test_greater(a, b, n_permutations=999)
    backward = permutation_test_greater(b, a, n_permutations=999)
    assert (
        forward.p_value == pytest.approx(1 / 1000) and forward.stars == "**"
    )  # the floor is 1/(n+1)
    assert backward.p_value > 0.99 and backward.effect == pytest.approx(-forward.effect)
    # deterministic in its seed; chunked in the same way whatever the sample size
    again = permutation_test_greater(a, b, n_permutations=999)
    assert again == forward
    empty = permutation_test_greater([], b)
    assert math.isnan(empty.p_value) and empty.stars == "n/a"


# -- Wilcoxon --------------------------------------------------------------------------------------
def paired_sample(shift: float, n: int = 10, seed: int = 1):
    rng = np.random.default_rng(seed)
    b = rng.normal(0.0, 1.0, n)
    return b + shift + rng.normal(0.0, 0.7, n), b


@pytest.mark.parametrize("shift", [0.9, 0.2, -0.4])
def test_signed_rank_matches_exact_enumeration_of_sign_patterns(shift):
    a, b = paired_sample(shift)
    test = wilcoxon_greater(a, b)
    assert test.p_value == pytest.approx(exact_signed_rank_p(a, b), abs=1e-9)
    assert test.effect == pytest.approx(np.mean(a) - np.mean(b))


def test_wilcoxon_is_one_sided():
    a, b = paired_sample(0.9, n=12)
    forward, backward = wilcoxon_greater(a, b), wilcoxon_greater(b, a)
    assert forward.p_value < 0.01 and backward.p_value > 0.99
    # without ties: P(W >= w) + P(W <= w) = 1 + P(W = w)
    assert 1.0 <= forward.p_value + backward.p_value <= 1.0 + 0.05
    assert forward.stars in ("**", "***") and backward.stars == ""


def test_wilcoxon_rank_sum_matches_exact_enumeration_of_splits():
    a, b = [2.1, 3.4, 1.9, 4.0], [1.2, 2.0, 0.7, 1.5, 2.6]
    test = wilcoxon_greater(a, b, paired=False)
    assert test.p_value == pytest.approx(exact_rank_sum_p(a, b), abs=1e-9)
    assert wilcoxon_greater(b, a, paired=False).p_value > 0.9


def test_wilcoxon_edge_cases():
    with pytest.raises(ValueError, match="matched samples"):
        wilcoxon_greater([1.0, 2.0, 3.0], [1.0, 2.0])
    same = wilcoxon_greater([0.5, 0.7], [0.5, 0.7])
    assert math.isnan(same.p_value) and same.stars == "n/a" and same.effect == 0.0
    assert math.isnan(wilcoxon_greater([], []).p_value)
    # unequal lengths are fine when unpaired
    assert wilcoxon_greater([3.0, 4.0, 5.0], [1.0, 2.0], paired=False).p_value < 0.2


@pytest.mark.parametrize(
    "p, stars",
    [
        (0.0, "***"),
        (0.00099, "***"),
        (0.001, "**"),
        (0.0099, "**"),
        (0.01, "*"),
        (0.049, "*"),
        (0.05, ""),
        (0.5, ""),
        (1.0, ""),
        (float("nan"), "n/a"),
    ],
)
def test_significance_stars_thresholds(p, stars):
    assert significance_stars(p) == stars
