"""The token-removal benchmark for attributions (METHODS §6).

Image tokens are ranked by importance; the model then sees the prefix tokens plus ``n`` image
tokens (``n = 1 .. N-1``, ``N`` image tokens), the rest removed with ``model(images,
keep_mask=...)``. In the *positive* order the most important tokens are removed first, so the
``n`` least important are kept (accuracy should fall fast: a lower area is better); in the
*negative* order the least important are removed first, so the ``n`` most important are kept (a
higher area is better). ``AUC = sum_n acc(n) / (max_n acc(n) · N)``, over every ``n`` (a curve
evaluated at some ``n`` only is interpolated between them, see :func:`perturbation_auc`).

All (n, method, seed, order, image) rows are run in forward batches of ``batch_size`` rows in
order of ``n``: a forward mixes at most a few neighbouring ``n`` (little padding), and small image
sets still fill whole batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.attribution.methods import get_attribution_method
from vit_embedding_lens.attribution.random_map import random_attribution
from vit_embedding_lens.attribution.readout import batch_slices, image_layout
from vit_embedding_lens.attribution.result import AttributionMap
from vit_embedding_lens.model.targets import class_targets, predicted_classes

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

ORDERS = ("positive", "negative")
MethodSpec = Union[str, Callable, AttributionMap, Tensor]


@dataclass
class PerturbationResult:
    """Accuracy curves and areas of a token-removal benchmark.

    ``curves``: one row per (method, order, seed, n): ``accuracy`` over the images with ``n`` image
    tokens kept (``seed`` is NA for deterministic methods). ``auc``: one row per (method, order,
    seed), with ``mean_accuracy`` over the evaluated ``n`` next to the AUC (the AUC divides by the
    curve's own maximum, so a curve that stays low everywhere can still score well; compare curves
    that end near the full-image accuracy, i.e. include ``n`` close to ``N-1``). ``n_patches``:
    ``N``, the number of image tokens.
    """

    curves: pd.DataFrame
    auc: pd.DataFrame
    n_patches: int

    @classmethod
    def from_accuracy(
        cls,
        rankings: Sequence[Tuple[str, Optional[int]]],
        orders: Sequence[str],
        n_values: Sequence[int],
        accuracy: Float[Tensor, "n_rankings n_orders n_values"],
        n_patches: int,
    ) -> "PerturbationResult":
        """The tables from ``accuracy[r, o, k]``: ranking ``r`` = ``(method, seed or None)``, order
        ``o``, ``n_values[k]`` image tokens kept (the benchmark's and the runner's common
        ending)."""
        if tuple(accuracy.shape) != (len(rankings), len(orders), len(n_values)):
            raise ValueError(
                f"accuracy has shape {tuple(accuracy.shape)}, expected "
                f"{(len(rankings), len(orders), len(n_values))} (rankings, orders, n values)"
            )
        curve_rows, auc_rows = [], []
        for r, (name, seed) in enumerate(rankings):
            for o, order in enumerate(orders):
                acc = accuracy[r, o].numpy()
                curve_rows += [
                    (name, order, n, float(acc[k]), seed) for k, n in enumerate(n_values)
                ]
                auc = perturbation_auc(acc, n_patches, n_values)
                auc_rows.append((name, order, seed, auc, float(acc.mean())))
        curves = pd.DataFrame(curve_rows, columns=["method", "order", "n", "accuracy", "seed"])
        auc = pd.DataFrame(auc_rows, columns=["method", "order", "seed", "auc", "mean_accuracy"])
        auc["auc_estimator"] = auc_estimator(n_values, n_patches)
        for frame in (curves, auc):
            frame["seed"] = frame["seed"].astype("Int64")
        curves["fraction_kept"] = curves["n"] / n_patches
        return cls(curves=curves, auc=auc, n_patches=n_patches)

    def summary(self) -> pd.DataFrame:
        """AUC and mean accuracy per method and order, averaged over seeds (``auc_std`` over
        seeds)."""
        grouped = self.auc.groupby(["method", "order"], sort=False)["auc"]
        out = grouped.agg(auc="mean", auc_std=_nan_std, n_seeds="size").reset_index()
        means = (
            self.auc.groupby(["method", "order"], sort=False)["mean_accuracy"].mean().reset_index()
        )
        out = out.merge(means, on=["method", "order"])
        if "auc_estimator" in self.auc:
            out["auc_estimator"] = self.auc["auc_estimator"].iloc[0]
        return out

    def auc_of(self, method: str, order: str) -> float:
        """Mean AUC of one method in one order."""
        rows = self.auc[(self.auc.method == method) & (self.auc.order == order)]
        if rows.empty:
            raise ValueError(
                f"no AUC for method {method!r}, order {order!r}; have "
                f"{sorted(set(self.auc.method))}"
            )
        return float(rows.auc.mean())

    def plot(self, **kwargs):
        """A matplotlib figure of the curves (see :func:`plot_perturbation_curves`)."""
        from vit_embedding_lens.attribution.figures import plot_perturbation_curves

        return plot_perturbation_curves(self, **kwargs)


def perturbation_auc(
    accuracy: Union[Sequence[float], np.ndarray],
    n_patches: int,
    n_values: Optional[Sequence[int]] = None,
) -> float:
    """``sum(acc) / (max(acc) · N)`` over the curve ``n = 1 .. N-1`` (METHODS §6).

    ``accuracy`` is the whole curve (``N-1`` points, ``n = 1 .. N-1``), or a curve sampled at
    ``n_values``: its sum is then integrated over every ``n`` by linear interpolation between the
    sampled points (constant beyond the first and last), which is exact when every ``n`` is present
    and unbiased for a curve that is linear between samples; a plain mean of the samples is not
    (on a grid dense at small ``n`` it weights them far too much). NaN when the accuracy is 0
    everywhere.
    """
    acc = np.asarray(accuracy, dtype=float)
    if n_values is None:
        if acc.size != n_patches - 1:
            raise ValueError(
                f"expected the whole curve, {n_patches - 1} accuracies (n = 1..N-1), got "
                f"{acc.size}; pass n_values= for a curve sampled at some n"
            )
        n_values = range(1, n_patches)
    n = np.asarray(list(n_values), dtype=float)
    if acc.size == 0 or acc.size > n_patches - 1 or n.shape != acc.shape:
        raise ValueError(
            f"expected 1..{n_patches - 1} accuracies (n = 1..N-1), one per n value; got "
            f"{acc.size} accuracies for {n.size} n values"
        )
    if (np.diff(n) <= 0).any() or n[0] < 1 or n[-1] > n_patches - 1:
        raise ValueError(f"n_values must increase within 1..{n_patches - 1}, got {n.tolist()}")
    top = acc.max()
    if top <= 0:
        return float("nan")
    curve = np.interp(np.arange(1, n_patches), n, acc)
    return float(curve.sum() / (top * n_patches))


def auc_estimator(n_values: Sequence[int], n_patches: int) -> str:
    """How :func:`perturbation_auc` gets the curve's sum from these ``n``: ``"full curve"`` (every
    ``n`` evaluated, exact) or ``"interpolated grid"`` (linear between the evaluated ``n``)."""
    full = sorted(int(n) for n in n_values) == list(range(1, n_patches))
    return "full curve" if full else "interpolated grid"


def keep_masks(
    token_rank: Int[Tensor, "rows n_patches"],
    n: Int[Tensor, " rows"],
    negative: Tensor,
    n_prefix: int,
) -> Tensor:
    """Bool ``[rows, n_prefix + n_patches]``: prefix tokens, plus the ``n`` most important image
    tokens (``negative``) or the ``n`` least important ones (positive). ``token_rank[r, p]`` is the
    0-based importance rank of patch ``p`` (0 = most important)."""
    n_patches = token_rank.shape[1]
    most = token_rank < n[:, None]
    least = token_rank >= (n_patches - n)[:, None]
    image = torch.where(negative[:, None], most, least)
    prefix = torch.ones(token_rank.shape[0], n_prefix, dtype=torch.bool, device=token_rank.device)
    return torch.cat([prefix, image], dim=1)


def importance_rank(scores: Float[Tensor, "batch n_patches"]) -> Int[Tensor, "batch n_patches"]:
    """Rank of every patch by score, 0 = highest (ties broken by token order)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank


def perturbation_benchmark(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    labels: Optional[Int[Tensor, " batch"]] = None,
    methods: Union[Sequence[MethodSpec], Mapping[str, MethodSpec]] = (
        "class_space",
        "chefer",
        "rollout",
        "random",
    ),
    *,
    orders: Sequence[str] = ORDERS,
    n_keep: Optional[Sequence[int]] = None,
    seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 256,
    progress: bool = True,
) -> PerturbationResult:
    """Accuracy of the model when it sees only the ``n`` tokens each method ranks first/last.

    ``labels``: the true classes (the class each attribution explains and the one accuracy is
    measured against); without labels the model's predictions on the full images stand in.
    ``methods``: names (see :data:`ATTRIBUTION_METHODS`), or a mapping name -> a name, a callable
    ``f(model, images, classes, progress=...) -> AttributionMap``, an :class:`AttributionMap` or a
    ``[batch, n_patches]`` score tensor. ``"random"`` is run once per seed in ``seeds``.
    ``n_keep``: the ``n`` values (default every ``n`` in ``1 .. N-1``).
    """
    layout = image_layout(model, images)
    n_patches = layout.n_patches
    if n_patches < 2:
        raise ValueError(f"the benchmark needs at least 2 image tokens, the layout has {n_patches}")
    bad = [o for o in orders if o not in ORDERS]
    if bad or not orders:
        raise ValueError(f"orders must be among {ORDERS}, got {list(orders)}")
    n_values = _check_n_keep(n_keep, n_patches)
    if labels is None:
        targets = predicted_classes(model, images, batch_size)
    else:
        targets = class_targets(model, labels, images.shape[0], what="labels", device=images.device)
    rankings = _rankings(model, images, targets, methods, seeds, progress)

    # one row per (n, ranking, order, image), n outermost so that each forward pads little; rows
    # are decoded from a flat index batch by batch instead of being materialized
    n_rank, n_order, n_img = len(rankings), len(orders), images.shape[0]
    ranks = torch.stack([rank for _, _, rank in rankings]).to(images.device)  # [R, B, P]
    n_tensor = torch.tensor(n_values, device=images.device)
    negative = torch.tensor([o == "negative" for o in orders], device=images.device)
    hits = torch.zeros(len(n_values), n_rank, n_order, dtype=torch.long)
    total = len(n_values) * n_rank * n_order * n_img
    for sl in tqdm(batch_slices(total, batch_size), desc="token removal", disable=not progress):
        flat = torch.arange(sl.start, sl.stop, device=images.device)
        group, i = flat // n_img, flat % n_img  # group = (n, ranking, order)
        k, r, o = group // (n_rank * n_order), (group // n_order) % n_rank, group % n_order
        keep = keep_masks(ranks[r, i], n_tensor[k], negative[o], layout.n_prefix)
        with torch.no_grad():
            correct = (model(images[i], keep_mask=keep).argmax(-1) == targets[i]).long()
        hits.view(-1).index_add_(0, group.cpu(), correct.cpu())
    hits = hits.permute(1, 2, 0)  # [R, O, n]
    accuracy = hits.double() / images.shape[0]
    names = [(name, seed) for name, seed, _ in rankings]
    return PerturbationResult.from_accuracy(names, orders, n_values, accuracy, n_patches)


def _nan_std(values: pd.Series) -> float:
    return float(np.nanstd(values)) if values.notna().any() else float("nan")


def _check_n_keep(n_keep: Optional[Sequence[int]], n_patches: int) -> List[int]:
    if n_keep is None:
        return list(range(1, n_patches))
    values = sorted({int(n) for n in n_keep})
    if not values or values[0] < 1 or values[-1] > n_patches - 1:
        raise ValueError(
            f"n_keep values must lie in 1..{n_patches - 1} (image tokens kept), got {list(n_keep)}"
        )
    return values


def _rankings(
    model: HookedViT, images, targets, methods, seeds, progress
) -> List[Tuple[str, Optional[int], Tensor]]:
    """``(method name, seed, importance rank [B, P])`` per ranking to evaluate."""
    if isinstance(methods, Mapping):
        items = list(methods.items())
    else:
        items = [(m if isinstance(m, str) else _name(m), m) for m in methods]
    out: List[Tuple[str, Optional[int], Tensor]] = []
    expected = (images.shape[0], image_layout(model, images).n_patches)
    for name, spec in items:
        if isinstance(spec, str) and spec == "random":
            if not seeds:
                raise ValueError("the random baseline needs at least one seed")
            for seed in seeds:
                amap = random_attribution(model, images, targets, seed=seed)
                out.append((name, int(seed), importance_rank(amap.scores)))
            continue
        if isinstance(spec, str):
            spec = get_attribution_method(spec)
        if isinstance(spec, AttributionMap):
            scores = spec.scores
        elif isinstance(spec, Tensor):
            scores = spec
        elif callable(spec):
            scores = spec(model, images, targets, progress=progress).scores
        else:
            raise TypeError(
                f"method {name!r}: expected a name, a callable, an AttributionMap or a tensor, "
                f"got {type(spec).__name__}"
            )
        if tuple(scores.shape) != expected:
            raise ValueError(
                f"method {name!r} gives scores of shape {tuple(scores.shape)}, expected {expected}"
            )
        out.append((name, None, importance_rank(scores.detach().to(images.device))))
    names = [(n, s) for n, s, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {[n for n, _ in names]}")
    return out


def _name(spec) -> str:
    if isinstance(spec, AttributionMap):
        return spec.method
    return getattr(spec, "__name__", type(spec).__name__)
