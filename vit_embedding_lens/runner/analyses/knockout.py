"""Attention knockout as a runner analysis (METHODS §5): class identifiability of the image tokens
and accuracy when image tokens cannot attend to other tokens (``self_only``) or to CLS (``no_cls``).

Each condition is one forward pass of its own, read by the lens's hooks
(:class:`~vit_embedding_lens.lens.streaming.LensRecorder`, as :func:`lens_batch` does) while the
knockout (:func:`~vit_embedding_lens.interventions.knockout`, all blocks) is active; the same
forward gives the logits for the accuracy. A model without a CLS token has no ``no_cls`` condition:
its values are NaN.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from vit_embedding_lens.lens.metrics import per_image_identifiability
from vit_embedding_lens.lens.streaming import LensRecorder
from vit_embedding_lens.runner.analysis import Analysis

if TYPE_CHECKING:
    from vit_embedding_lens.interventions.knockout import Mode
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: the conditions, in the order of the stored arrays' condition axis
NONE = "none"
CONDITIONS = (NONE, "self_only", "no_cls")


class KnockoutAnalysis(Analysis):
    """Per image: ``pct_identifiable [conditions, blocks]`` (% of image tokens, or of all tokens
    with ``tokens="all"`` as the reference counts, whose correct class is top-1 at
    ``resid_post``) and ``correct [conditions]`` (1.0/0.0, NaN where a condition does not apply
    to the model).

    Tables: ``identifiability`` (block × condition: mean % identifiable image tokens) and
    ``accuracy`` (one row per condition).
    """

    name = "knockout"
    description = (
        "Blocks attention paths in every block and measures, per block, the share of image tokens "
        "whose correct class is top-1 in the residual stream, with the accuracy of each condition. "
        "none: the intact model; self_only: image tokens attend only to themselves; no_cls: image "
        "tokens cannot attend to CLS. A curve that stays low under a knockout means the image "
        "tokens need that path to become class-identifiable."
    )

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        return {
            "knockout_identifiability": (
                "Mean over images of the % of an image's tokens whose correct class ranks first, "
                "per block and knockout condition; the legend gives each condition's top-1 "
                f"accuracy. No test is drawn. n = {n_images} images."
            )
        }

    def __init__(
        self,
        conditions: Sequence[str] = CONDITIONS,
        mode: Mode = "pre_softmax",
        tokens: str = "image",
    ) -> None:
        from vit_embedding_lens.runner.analyses._kept_tokens import TOKEN_SETS

        if tokens not in TOKEN_SETS:  # "all": every token, CLS included, as the reference counts
            raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")
        self.tokens = tokens
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown or not conditions:
            raise ValueError(
                f"knockout conditions must be among {CONDITIONS}, got {list(conditions)}"
            )
        self.conditions = tuple(conditions)
        self.mode = mode
        self._recorder: Optional[LensRecorder] = None

    def config(self) -> Dict[str, Any]:
        return {
            "conditions": list(self.conditions),
            "mode": self.mode,
            "blocks": "all",
            "stream": "resid_post",
            "tokens": self.tokens,
        }

    def applies(self, model: HookedViT, condition: str) -> bool:
        """Whether ``condition`` can be run on ``model`` (``no_cls`` needs a CLS token)."""
        return condition != "no_cls" or model.layout.cls_index is not None

    def run(self, model: HookedViT, batch: Any) -> Dict[str, np.ndarray]:
        from vit_embedding_lens.interventions import knockout

        if self._recorder is None or self._recorder.model is not model:
            self._recorder = LensRecorder(model)
        images = batch.images
        self._recorder.layout = (
            model.layout_for(images.shape[-2:]) if model.cfg.dynamic_img_size else model.layout
        )
        n, n_layers = len(batch), model.cfg.n_layers
        pct = np.full((n, len(self.conditions), n_layers), np.nan, dtype=np.float32)
        correct = np.full((n, len(self.conditions)), np.nan, dtype=np.float32)
        labels = batch.labels.long()
        for c, condition in enumerate(self.conditions):
            if not self.applies(model, condition):
                continue
            context = (
                nullcontext() if condition == NONE else knockout(model, condition, mode=self.mode)
            )
            with context, torch.no_grad(), self._recorder.recording(labels):
                logits = model(images)
            result = self._recorder.result
            if self.tokens == "all":
                frac = (result.rank["resid"] == 0).double().mean(-1)
            else:
                frac = per_image_identifiability(result, "resid", "image", metric="identifiable")
            pct[:, c] = 100 * frac.numpy()
            correct[:, c] = (logits.argmax(-1) == labels).float().cpu().numpy()
        return {"pct_identifiable": pct, "correct": correct}

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        pct, correct = results["pct_identifiable"], results["correct"]
        _check_axis(pct.shape[1], self.conditions)
        rows = []
        for c, condition in enumerate(self.conditions):
            for block in range(pct.shape[2]):
                values = pct[:, c, block]
                valid = ~np.isnan(values)
                rows.append(
                    {
                        "block": block,
                        "condition": condition,
                        "pct_identifiable": float(values[valid].mean()) if valid.any() else np.nan,
                        "tokens": self.tokens,
                        "n_images": int(valid.sum()),
                    }
                )
        accuracy = []
        for c, condition in enumerate(self.conditions):
            valid = ~np.isnan(correct[:, c])
            accuracy.append(
                {
                    "condition": condition,
                    "accuracy": float(correct[valid, c].mean()) if valid.any() else np.nan,
                    "n_images": int(valid.sum()),
                    "note": "" if valid.any() else "not applicable to this model (no CLS token)",
                }
            )
        return {"identifiability": pd.DataFrame(rows), "accuracy": pd.DataFrame(accuracy)}

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        from vit_embedding_lens.viz._figures import legend_outside, new_figure
        from vit_embedding_lens.viz.palette import OTHER_COLORS

        table = tables["identifiability"]
        accuracy = tables["accuracy"].set_index("condition")["accuracy"]
        fig = new_figure(figsize=(7.5, 3.5))  # the legend sits right of the axes
        ax = fig.add_subplot()
        for ci, (condition, rows) in enumerate(table.groupby("condition", sort=False)):
            if rows["pct_identifiable"].isna().all():
                continue
            ax.plot(
                rows["block"],
                rows["pct_identifiable"],
                marker="o",
                color=OTHER_COLORS[ci % len(OTHER_COLORS)],
                label=f"{condition} (accuracy {accuracy[condition]:.1%})",
            )
        ax.set_xlabel("block")
        ax.set_ylabel("% identifiable image tokens")
        ax.set_ylim(-2, 102)
        ax.set_title(f"Attention knockout ({self.mode}, all blocks)")
        legend_outside(ax)
        fig.tight_layout()
        return {"knockout_identifiability": fig}

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        """% identifiable image tokens per block (rows) and condition (columns), plus accuracy."""
        t = tables["identifiability"]
        wide = t.pivot(index="block", columns="condition", values="pct_identifiable")
        wide = wide[list(dict.fromkeys(t["condition"]))].round(1)
        wide.columns = [f"% ident. {c}" for c in wide.columns]
        wide = wide.reset_index()
        acc = tables["accuracy"].set_index("condition")["accuracy"]
        last = {"block": "accuracy", **{f"% ident. {c}": round(100 * acc[c], 1) for c in acc.index}}
        wide["block"] = wide["block"].astype(object)
        return pd.concat([wide, pd.DataFrame([last])], ignore_index=True)


def _check_axis(size: int, conditions: Sequence[str]) -> None:
    if size != len(conditions):
        raise ValueError(
            f"the stored results have {size} conditions but this analysis has {list(conditions)}; "
            f"summarize with the configuration the run used"
        )
