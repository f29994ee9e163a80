"""The class-embedding lens as a runner analysis (METHODS §1–§3, §5 class vs context).

Per image it stores the lens's per-token readings (:class:`~vit_embedding_lens.lens.LensResult`:
ranks of the correct class at every block's attention write-in, MLP write-in and residual stream,
change flags, composition bits), and with ``random_twin`` the residual-stream ranks of the
random-init twin on the same image. The readings are taken by hooks during the batch's shared
forward pass, so the analysis adds no forward pass of its own (the twin's pass is its own, by
necessity).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Dict, Literal, Optional, Union, cast

import numpy as np
import pandas as pd
import torch

from vit_embedding_lens.lens.metrics import per_image_identifiability, summarize, token_groups
from vit_embedding_lens.lens.streaming import CHANGES, KINDS, LensRecorder, LensResult, lens_batch
from vit_embedding_lens.runner.analysis import Analysis

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT
    from vit_embedding_lens.runner.batch import Batch

STARS = (
    "Stars: one-sided paired Wilcoxon signed-rank test per block and token group that "
    "the trained model scores higher than its random-init twin on the same images; * "
    "p < 0.05, ** p < 0.01, *** p < 0.001, n.s. otherwise, with no correction for the "
    "many blocks and groups tested."
)

#: token groups drawn in the identifiability figure, when present
FIGURE_GROUPS = ("cls", "image", "class", "context")


class LensAnalysis(Analysis):
    """Identifiability per block and layer type, change rates, composition, class vs context, and
    (``random_twin=True``) the trained-vs-random-init comparison with one-sided Wilcoxon tests."""

    name = "lens"
    description = (
        "Projects every token of every block onto the class embeddings (the class-embedding lens) "
        "and scores how high the image's correct class ranks: 1 means top-1, 0.5 is chance. "
        "Read the identifiability figure from left to right: a curve climbing above its dashed "
        "random-init twin means the trained model writes class information into those tokens; "
        "the change-rate figure shows which sublayer (attention or MLP) raises the "
        "correct-class logit."
    )

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        return {
            "identifiability": (
                "Violins: the distribution over images of each image's mean identifiability "
                "score s = 1 - rank/classes in the residual stream, per block and token group; "
                "solid line: the mean. Dashed line and shaded band (when the random-init twin was "
                "run): the mean and the 5th-95th percentile band of the same images through the "
                f"twin. Dotted: chance (0.5). {STARS} n = {n_images} images."
            ),
            "change_rates": (
                "Share of tokens whose correct-class logit rises across a block's attention (blue) "
                "or MLP (red) sublayer, CLS and image tokens apart; error bars: standard error of "
                f"the mean over images; dotted: 50 %. n = {n_images} images."
            ),
        }

    def __init__(self, random_twin: bool = True, twin_seed: int = 0) -> None:
        self.random_twin = random_twin
        self.twin_seed = twin_seed
        self._recorder: Optional[LensRecorder] = None
        self._twin: Union[HookedViT, Literal[False], None] = None  # False: no twin for this model

    def config(self) -> Dict[str, Any]:
        return {"random_twin": self.random_twin, "twin_seed": self.twin_seed, "kinds": list(KINDS)}

    def forward_reader(self, model: HookedViT, batch: Batch) -> LensRecorder:
        """The lens's recorder, started on this batch's labels: its hooks read every block during
        the batch's shared forward pass, and :meth:`run` gets it back from the batch."""
        recorder = self._recorder_for(model)
        recorder.start(batch.labels)
        return recorder

    def run(self, model: HookedViT, batch: Batch) -> Dict[str, np.ndarray]:
        recorder = batch.reader(model, self.name)
        if recorder is None:  # a batch the runner did not prepare: a forward pass of its own
            result = lens_batch(
                model, batch.images, batch.labels, recorder=self._recorder_for(model)
            )
        else:
            result = cast(LensRecorder, recorder).result
        out = _to_arrays(result)
        if batch.token_masks is not None:
            out["class_token"] = batch.token_masks.cpu().numpy()
        twin = self._twin_of(model) if self.random_twin else None
        if twin is not None:
            out["random_rank_resid"] = (
                lens_batch(twin, batch.images, batch.labels).rank["resid"].numpy()
            )
        return out

    def _recorder_for(self, model: HookedViT) -> LensRecorder:
        """One recorder per model, built once (it holds the folded class projection)."""
        if self._recorder is None or self._recorder.model is not model:
            self._recorder = LensRecorder(model)
        return self._recorder

    def _twin_of(self, model: HookedViT) -> Optional[HookedViT]:
        """The random-init twin, built once; None (with one warning) when the architecture cannot be
        rebuilt from its name, so a long run goes on without the comparison instead of failing."""
        if self._twin is None:
            from vit_embedding_lens.lens.baseline import random_init_twin

            try:
                twin = random_init_twin(model, seed=self.twin_seed)
                twin.validate_inputs = False
                self._twin = twin
            except ValueError as err:
                warnings.warn(f"lens: no random-init comparison: {err}", stacklevel=2)
                self._twin = False
        return self._twin or None

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        result = from_arrays(results, model)
        random = None
        if "random_rank_resid" in results:
            random = from_arrays(results, model, rank_resid=results["random_rank_resid"])
        tables = summarize(result, random)
        if result.token_mask is not None:  # attention / MLP change: class vs context tokens
            from vit_embedding_lens.lens.group_tests import class_vs_context_changes

            tables["class_vs_context_changes"] = class_vs_context_changes(result)
        tables["per_image_scores"] = _per_image_scores(result, random)
        return tables

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        from vit_embedding_lens.viz import plot_change_rates, plot_identifiability_evolution

        scores = tables["per_image_scores"]
        trained = scores[scores["model"] == "trained"]
        random = scores[scores["model"] == "random init"]
        pvalues = None
        if "trained_vs_random" in tables:
            pvalues = tables["trained_vs_random"].rename(columns={"token_group": "group"})[
                ["block", "group", "p_value"]
            ]
        figures = {
            "identifiability": plot_identifiability_evolution(
                trained,
                random if len(random) else None,
                pvalues,
                title=f"class identifiability, {model.cfg.model_name}",
            )
        }
        changes = tables["change_rates"]
        changes = changes[
            changes["comparison"].isin(["attn", "mlp"])
            & changes["token_group"].isin(["cls", "image"])
        ]
        figures["change_rates"] = plot_change_rates(
            changes,
            sublayer_col="comparison",
            group_col="token_group",
            value_col="value",
            percent=True,
            title="tokens whose correct-class logit rises, attention vs MLP",
        )
        return figures

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        """% identifiable residual-stream tokens per block and token group, for the terminal."""
        t = tables["identifiability"]
        t = t[(t["layer_type"] == "resid") & (t["metric"] == "identifiable_pct")]
        wide = t.pivot(index="block", columns="token_group", values="value").round(1)
        wide.columns = [f"% {c} identifiable" for c in wide.columns]
        return wide.reset_index()


def _to_arrays(result: LensResult) -> Dict[str, np.ndarray]:
    out = {f"rank_{k}": v.numpy() for k, v in result.rank.items()}
    out.update({f"rose_{k}": v.numpy() for k, v in result.rose.items()})
    out["composition"] = result.composition.numpy()
    return out  # the runner stores each image's label beside them (results["label"])


def from_arrays(
    results: Dict[str, np.ndarray], model: HookedViT, rank_resid: Optional[np.ndarray] = None
) -> LensResult:
    """A :class:`LensResult` from the stored per-image arrays (``rank_resid`` swaps in another
    model's residual ranks, e.g. the random twin's, keeping everything else)."""
    rank = {k: torch.from_numpy(np.ascontiguousarray(results[f"rank_{k}"])) for k in KINDS}
    if rank_resid is not None:
        rank["resid"] = torch.from_numpy(np.ascontiguousarray(rank_resid))
    mask = results.get("class_token")
    return LensResult(
        rank=rank,
        rose={k: torch.from_numpy(np.ascontiguousarray(results[f"rose_{k}"])) for k in CHANGES},
        composition=torch.from_numpy(np.ascontiguousarray(results["composition"])),
        labels=torch.from_numpy(np.ascontiguousarray(results["label"])).long(),
        n_classes=model.cfg.n_classes,
        layout=model.layout,
        token_mask=None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).bool(),
        class_names=model.class_names,
    )


def _per_image_scores(result: LensResult, random: Optional[LensResult]) -> pd.DataFrame:
    """Per image × block × token group: the mean residual-stream score (the distributions drawn)."""
    frames = []
    groups = [g for g in FIGURE_GROUPS if g in token_groups(result)]
    for label, res in (("trained", result), ("random init", random)):
        if res is None:
            continue
        for group in groups:
            if label == "random init" and group in ("class", "context"):
                continue
            scores = per_image_identifiability(res, "resid", group).numpy()  # [image, block]
            image, block = np.meshgrid(
                np.arange(scores.shape[0]), np.arange(scores.shape[1]), indexing="ij"
            )
            keep = ~np.isnan(scores.ravel())
            frames.append(
                pd.DataFrame(
                    dict(
                        model=label,
                        image=image.ravel()[keep],
                        block=block.ravel()[keep],
                        group=group,
                        score=scores.ravel()[keep],
                    )
                )
            )
    return pd.concat(frames, ignore_index=True)
