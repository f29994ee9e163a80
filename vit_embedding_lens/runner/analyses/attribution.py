"""The token-removal benchmark of attributions as a runner analysis (METHODS §6).

Per image and for every attribution (``class_space``, ``chefer``, ``random`` with several seeds),
order (``positive``: most important removed first; ``negative``: least important removed first)
and ``n`` (``n_keep="full"``, default: every ``n`` in ``1 .. N-1``, the curve the paper sums;
``"grid"``: powers of two below ``N-1`` plus ``N-1``, the AUC then interpolated between them),
whether the model is right when it sees the prefix tokens plus ``n`` image tokens. ``summarize``
averages over images into the same :class:`~vit_embedding_lens.attribution.PerturbationResult` as
:func:`~vit_embedding_lens.attribution.perturbation_benchmark` (AUC by
:func:`~vit_embedding_lens.attribution.perturbation_auc`).

The random ranking of an image depends only on its data set index and the seed (never on which
images share its batch), so a run gives the same numbers for any batch size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from vit_embedding_lens.attribution.perturbation import (
    ORDERS,
    PerturbationResult,
    importance_rank,
    keep_masks,
)
from vit_embedding_lens.runner.analyses._attribution_options import (
    LOSSES,
    N_KEEP,
    method_with_loss,
)
from vit_embedding_lens.runner.analysis import Analysis

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

METHODS = ("class_space", "chefer", "random")
#: rows (image x ranking x order x n) per forward of the removal benchmark
ROWS_PER_FORWARD = 512


def n_keep_grid(n_patches: int) -> List[int]:
    """``1, 2, 4, ...`` below ``N-1``, then ``N-1``: the numbers of image tokens kept."""
    if n_patches < 2:
        raise ValueError(f"the benchmark needs at least 2 image tokens, the layout has {n_patches}")
    grid, n = [], 1
    while n < n_patches - 1:
        grid.append(n)
        n *= 2
    return grid + [n_patches - 1]


class AttributionBenchmark(Analysis):
    """Per image: ``correct [ranking, order, n]`` (bool) for the rankings of :meth:`rankings`.

    Tables: ``curves`` (method, order, seed, n, accuracy), ``auc`` (method, order, seed, auc,
    mean_accuracy) and ``summary`` (per method and order, seeds averaged).
    """

    name = "attribution"
    description = (
        "The token-removal benchmark of attribution maps: image tokens are removed in the order a "
        "map ranks them and the accuracy is measured as tokens are kept. Positive order removes "
        "the most important tokens first (a good map makes accuracy collapse: lower AUC is "
        "better); negative order removes the least important first (a good map keeps accuracy: "
        "higher AUC is better). Random order is the baseline every map should beat."
    )

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        return {
            "perturbation_curves": (
                "Top-1 accuracy against the number of image tokens kept, one panel per order; "
                "random: the mean over seeds with a min-max band. AUC = sum of the curve / (its "
                "maximum x tokens), NaN when the accuracy is 0 everywhere. No test is drawn. "
                f"n = {n_images} images."
            )
        }

    def notes(self, tables: Dict[str, pd.DataFrame]) -> List[str]:
        """The known finding (class_space loses to random in negative order on small models) and
        NaN AUCs (accuracy 0 on the whole curve) explained."""
        out: List[str] = []
        summary = tables.get("summary")
        if summary is None or summary.empty:
            return out
        auc = summary.set_index(["method", "order"])["auc"]
        if ("class_space", "negative") in auc and ("random", "negative") in auc:
            ours, random = auc[("class_space", "negative")], auc[("random", "negative")]
            if np.isfinite(ours) and np.isfinite(random) and ours <= random:
                out.append(
                    f"In negative order the class-space map (AUC {ours:.3f}) does not beat "
                    f"random order ({random:.3f}). On small ViTs this is a known finding, not a "
                    "bug (larger models were not measured here): it is "
                    "measured on every small trained ViT tried (MNIST, Fashion-MNIST, wider and "
                    "deeper variants; benchmarks/attribution_small_models.py) and the reference "
                    "code gives the same: the map is signed, so object tokens whose values point "
                    "away from the class get the most negative scores and are removed first. "
                    "Chefer relevance, clamped at 0, beats random on all of them."
                )
        if summary["auc"].isna().any():
            nan = summary[summary["auc"].isna()]
            which = ", ".join(f"{m} ({o})" for m, o in zip(nan["method"], nan["order"]))
            out.append(
                f"NaN AUC for {which}: the accuracy is 0 at every number of kept tokens, so the "
                "curve has no maximum to normalize by (AUC = sum / (max x tokens)). It happens "
                "when the model gets none of these images right (see the accuracy section); it "
                "is not a failure of the run."
            )
        return out

    def __init__(
        self,
        methods: Sequence[str] = METHODS,
        seeds: Sequence[int] = (0, 1, 2),
        n_keep: str = "full",
        loss: str = "cross_entropy",
    ) -> None:
        from vit_embedding_lens.attribution.methods import get_attribution_method

        for m in methods:
            if m != "random":
                get_attribution_method(m)  # a clear error for unknown names
        if n_keep not in N_KEEP:
            raise ValueError(f"n_keep must be one of {N_KEEP}, got {n_keep!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.n_keep, self.loss = n_keep, loss
        self.methods = tuple(methods)
        self.seeds = tuple(int(s) for s in seeds)
        if "random" in self.methods and not self.seeds:
            raise ValueError("the random baseline needs at least one seed")

    def rankings(self) -> List[Tuple[str, Optional[int]]]:
        """``(method, seed)`` along the ranking axis (seed None for deterministic methods)."""
        out: List[Tuple[str, Optional[int]]] = []
        for m in self.methods:
            out += [(m, s) for s in self.seeds] if m == "random" else [(m, None)]
        return out

    def config(self) -> Dict[str, Any]:
        return {
            "methods": list(self.methods),
            "seeds": list(self.seeds),
            "orders": list(ORDERS),
            "n_keep": self.n_keep,
            "class_space_loss": self.loss,
        }

    def n_values(self, n_patches: int) -> List[int]:
        """The numbers of image tokens kept: every ``n`` (``"full"``) or the grid."""
        return list(range(1, n_patches)) if self.n_keep == "full" else n_keep_grid(n_patches)

    def scores(
        self, model: HookedViT, batch: Any, method: str, seed: Optional[int]
    ) -> torch.Tensor:
        """``[batch, n_patches]`` importance of every image token for the image's label."""
        from vit_embedding_lens.attribution import random_attribution
        from vit_embedding_lens.attribution.methods import get_attribution_method

        images, labels = batch.images, batch.labels.long()
        if method == "random":
            if seed is None:
                raise ValueError("the random ranking needs a seed")
            rows = [
                random_attribution(
                    model, images[i : i + 1], seed=self.image_seed(seed, int(idx))
                ).scores
                for i, idx in enumerate(batch.indices.tolist())
            ]
            return torch.cat(rows)
        compute = method_with_loss(get_attribution_method(method), method, self.loss)
        return compute(model, images, labels, progress=False).scores.detach()

    @staticmethod
    def image_seed(seed: int, index: int) -> int:
        """The random ranking's seed of the image at data set position ``index``."""
        return seed * 1_000_003 + index

    def run(self, model: HookedViT, batch: Any) -> Dict[str, np.ndarray]:
        layout = model.layout
        grid = self.n_values(layout.n_patches)
        rankings = self.rankings()
        images, labels = batch.images, batch.labels.long().to(batch.images.device)
        n = len(batch)
        ranks = torch.stack(
            [
                importance_rank(self.scores(model, batch, method, seed).to(images.device))
                for method, seed in rankings
            ]
        )  # [R, B, P]
        # every (n, ranking, order, image) row, n outermost so that a forward pads little, run in
        # forwards of ROWS_PER_FORWARD rows
        R, O, K = len(rankings), len(ORDERS), len(grid)
        flat = torch.arange(K * R * O * n, device=images.device)
        k, r = flat // (R * O * n), (flat // (O * n)) % R
        o, i = (flat // n) % O, flat % n
        n_kept = torch.tensor(grid, device=images.device)[k]
        negative = torch.tensor([x == "negative" for x in ORDERS], device=images.device)[o]
        hits = torch.empty(flat.shape[0], dtype=torch.bool)
        for start in range(0, flat.shape[0], ROWS_PER_FORWARD):
            sl = slice(start, start + ROWS_PER_FORWARD)
            keep = keep_masks(ranks[r[sl], i[sl]], n_kept[sl], negative[sl], layout.n_prefix)
            with torch.no_grad():
                pred = model(images[i[sl]], keep_mask=keep).argmax(-1)
            hits[sl] = (pred == labels[i[sl]]).cpu()
        correct = hits.view(K, R, O, n).permute(3, 1, 2, 0).numpy()
        return {"correct": correct}

    def result(self, results: Dict[str, np.ndarray], model: HookedViT) -> PerturbationResult:
        """The :class:`PerturbationResult` of the stored images (accuracy = mean over images)."""
        correct = np.asarray(results["correct"])
        rankings = self.rankings()
        grid = self.n_values(model.layout.n_patches)
        if correct.shape[1:] != (len(rankings), len(ORDERS), len(grid)):
            raise ValueError(
                f"the stored results have shape {correct.shape[1:]} per image, expected "
                f"{(len(rankings), len(ORDERS), len(grid))}; summarize with the configuration the "
                "run used"
            )
        accuracy = torch.from_numpy(correct.mean(axis=0, dtype=np.float64))  # [R, O, n]
        return PerturbationResult.from_accuracy(
            rankings, ORDERS, grid, accuracy, model.layout.n_patches
        )

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        result = self.result(results, model)
        return {"curves": result.curves, "auc": result.auc, "summary": result.summary()}

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        from vit_embedding_lens.attribution import plot_perturbation_curves

        result = PerturbationResult(tables["curves"], tables["auc"], model.layout.n_patches)
        return {"perturbation_curves": plot_perturbation_curves(result)}

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        """AUC per method (rows) and order (columns), the estimator named in the column."""
        summary = tables["summary"]
        wide = summary.pivot(index="method", columns="order", values="auc").round(3)
        how = summary["auc_estimator"].iloc[0] if "auc_estimator" in summary else "AUC"
        wide.columns = [f"AUC {o} ({how})" for o in wide.columns]
        return wide.reset_index()
