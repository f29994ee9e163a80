"""Key-value memories as a runner analysis (METHODS §4).

Per image it stores the counts of
:func:`~vit_embedding_lens.lens.memory_usage.memory_usage_per_image` (tokens that agree with the
label's top memories, that match a top memory's class, and that agree with randomly drawn classes,
per block × sublayer × token group); ``summarize`` folds them by class into a
:class:`~vit_embedding_lens.lens.MemoryUsage`, so the rates are exactly those of
:func:`~vit_embedding_lens.lens.memory_usage` over the same images and draws. The random classes of
an image are drawn from a generator seeded by ``seed`` and the image's data set index
(:meth:`MemoriesAnalysis.image_seed`), so they are the same for any batch size, worker count,
process count and in a resumed run. The class-value agreement against the random-init twin uses the
weights only and is computed in ``summarize``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np
import pandas as pd
import torch

from vit_embedding_lens.lens.memory_usage import (
    TOKEN_GROUPS,
    MemoryTables,
    PerImageMemoryCounts,
    memory_usage_per_image,
    random_classes,
)
from vit_embedding_lens.lens.ranks import class_rank
from vit_embedding_lens.runner.analysis import Analysis

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

SUBLAYERS = ("mlp", "attn")


class MemoriesAnalysis(Analysis):
    """Per image: ``tokens [group]``, ``agree``/``match [kind, block, group]``, ``drawn [draw]`` and
    ``random_agree [draw, kind, block, group]`` (counts).

    Tables: ``usage`` (block × sublayer × token group × metric: ``kv_agreement``,
    ``kv_agreement_random``, ``composition_match``), ``per_class``,
    ``kv_agreement_by_correctness`` (correctly vs incorrectly classified images, permutation test;
    per image ``correct`` is stored for it) and, with ``class_values``,
    ``class_value_tests`` (trained vs random-init twin, one-sided Wilcoxon) and ``class_values``.
    """

    name = "memories"
    description = (
        "Reads the MLP and attention sublayers as key-value memories (one value vector per "
        "neuron): a token agrees when one of its most activated memories is among those whose "
        "values project most onto its label's class (top 5 of each by default). Solid lines are "
        "the agreement with the image's label, dashed lines the same rate for randomly drawn "
        "classes; agreement well above its dashed line means the memories a token uses carry "
        "its class."
    )

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        text = (
            "Key-value agreement (%) per block, MLP (red) and attention (blue): solid line, the "
            "mean over classes; shaded band, the 25th-75th percentile over classes; dashed, the "
            "agreement with randomly drawn classes (the chance level). No test is drawn. "
            f"n = {n_images} images."
        )
        usage = tables.get("usage")
        groups = [] if usage is None else sorted(set(usage["token_group"]))
        return {f"kv_agreement_{g}": text for g in groups}

    def __init__(
        self,
        k: int = 5,
        top_memories: int = 5,
        n_random_draws: int = 3,
        seed: int = 0,
        class_values: bool = True,
    ) -> None:
        self.k, self.top_memories, self.n_random_draws = (
            int(k),
            int(top_memories),
            int(n_random_draws),
        )
        self.seed, self.class_values = int(seed), bool(class_values)
        self._tables: Optional[MemoryTables] = None
        self._tables_of: Any = None

    def config(self) -> Dict[str, Any]:
        return {
            "k": self.k,
            "top_memories": self.top_memories,
            "n_random_draws": self.n_random_draws,
            "seed": self.seed,
            "kinds": list(SUBLAYERS),
            "head": "mean",
        }

    def run(self, model: HookedViT, batch: Any) -> Dict[str, np.ndarray]:
        if self._tables_of is not model:  # value projections from the weights, once per model
            self._tables = MemoryTables.from_model(model, SUBLAYERS, self.top_memories)
            self._tables_of = model
        counts = memory_usage_per_image(
            model,
            batch.images,
            batch.labels,
            k=self.k,
            top_memories=self.top_memories,
            kinds=SUBLAYERS,
            n_random_draws=self.n_random_draws,
            tables=self._tables,
            drawn=self.drawn_classes(batch.indices, model.cfg.n_classes),
        )
        # correct vs incorrect images (kv_agreement_by_correctness): top-1 as the accuracy counts
        # it, from the forward pass the batch's analyses share
        logits, _ = batch.shared_forward(model)
        correct = class_rank(logits.float(), batch.labels).cpu() == 0
        small = np.int32
        return {
            "correct": correct.numpy(),
            "tokens": counts.tokens.numpy().astype(small),
            "agree": counts.agree.numpy().astype(small),
            "match": counts.match.numpy().astype(small),
            "drawn": counts.drawn.numpy().astype(small),
            "random_agree": counts.random_agree.numpy().astype(small),
        }

    def image_seed(self, index: int) -> int:
        """The random-class generator's seed of the image at data set position ``index``."""
        return self.seed * 1_000_003 + index

    def drawn_classes(self, indices: Any, n_classes: int) -> torch.Tensor:
        """``[n_random_draws, batch]`` random classes, each image's from its own seeded generator
        (:func:`~vit_embedding_lens.lens.memory_usage.random_classes`, one image at a time)."""
        columns = [
            random_classes(
                torch.Generator().manual_seed(self.image_seed(int(i))),
                self.n_random_draws,
                1,
                n_classes,
            )
            for i in torch.as_tensor(indices).tolist()
        ]
        if not columns:
            return torch.zeros(self.n_random_draws, 0, dtype=torch.long)
        return torch.cat(columns, dim=1)

    def usage(self, results: Dict[str, np.ndarray], model: HookedViT):
        """The per-class :class:`~vit_embedding_lens.lens.MemoryUsage` of the stored images."""
        counts = PerImageMemoryCounts(
            kinds=SUBLAYERS,
            labels=torch.from_numpy(np.asarray(results["label"])).long(),
            **{
                key: torch.from_numpy(np.asarray(results[key])).long()
                for key in ("tokens", "agree", "match", "drawn", "random_agree")
            },
        )
        return counts.usage(model.cfg.n_classes, model.class_names)

    def by_correctness(self, results: Dict[str, np.ndarray]) -> pd.DataFrame:
        """Key-value agreement of correctly vs incorrectly classified images, per block, sublayer
        and token group, with a one-sided permutation test (the reference code's comparison)."""
        from vit_embedding_lens.lens.group_tests import kv_agreement_by_correctness

        counts = PerImageMemoryCounts(
            kinds=SUBLAYERS,
            labels=torch.from_numpy(np.asarray(results["label"])).long(),
            **{
                key: torch.from_numpy(np.asarray(results[key])).long()
                for key in ("tokens", "agree", "match", "drawn", "random_agree")
            },
        )
        return kv_agreement_by_correctness(
            counts, torch.from_numpy(np.asarray(results["correct"])), seed=self.seed
        )

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        usage = self.usage(results, model)
        tables = {"usage": usage.to_frame(), "per_class": usage.per_class_frame()}
        if "correct" in results:
            tables["kv_agreement_by_correctness"] = self.by_correctness(results)
        if self.class_values:
            from vit_embedding_lens.lens.memories import compare_class_value_agreement

            try:
                comparison = compare_class_value_agreement(model, seed=self.seed, kinds=SUBLAYERS)
            except (
                ValueError
            ) as err:  # no random-init twin for this model: report it, keep the rest
                warnings.warn(
                    f"memories: no class-value comparison with random init: {err}", stacklevel=2
                )
                tables["class_value_tests"] = pd.DataFrame(
                    {"note": [f"no random-init twin: {err}"]}
                )
            else:
                tables["class_value_tests"] = comparison.tests
                tables["class_values"] = comparison.classes
        return tables

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        from vit_embedding_lens.viz import plot_kv_agreement

        per_class = tables["per_class"]
        usage = tables["usage"]
        figures = {}
        for group in [g for g in TOKEN_GROUPS if g in set(usage["token_group"])]:
            agreement = per_class[
                (per_class["token_group"] == group) & (per_class["metric"] == "kv_agreement")
            ]
            agreement = agreement.dropna(subset=["value"])
            baseline = usage[
                (usage["token_group"] == group) & (usage["metric"] == "kv_agreement_random")
            ]
            if agreement.empty:
                continue
            figures[f"kv_agreement_{group}"] = plot_kv_agreement(
                agreement,
                baseline,
                value_col="value",
                title=f"key-value agreement, {group} tokens (dashed: random class)",
            )
        return figures

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Image-token agreement (%) per block and sublayer next to its random-class baseline."""
        usage = tables["usage"]
        group = "image" if "image" in set(usage["token_group"]) else usage["token_group"].iloc[0]
        t = usage[
            (usage["token_group"] == group)
            & usage["metric"].isin(["kv_agreement", "kv_agreement_random"])
        ]
        wide = t.pivot_table(index="block", columns=["sublayer", "metric"], values="value")
        wide = (100 * wide).round(1)
        wide.columns = [
            f"% {s} {'random' if m.endswith('random') else 'agree'}" for s, m in wide.columns
        ]
        return wide.reset_index()
