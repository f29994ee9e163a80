"""Context removal as a runner analysis (METHODS §5): is the prediction still right when the model
sees only the object's tokens, or only the context's?

Three forwards per batch: all tokens; prefix + class tokens (the image tokens on the object,
:func:`~vit_embedding_lens.interventions.keep_class_tokens`); prefix + context tokens
(:func:`~vit_embedding_lens.interventions.keep_context_tokens`). Tokens are removed after the
position embedding (``model(images, keep_mask=...)``). It needs the data set's token masks; without
them it stores nothing but ``has_mask`` and its table says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import numpy as np
import pandas as pd
import torch

from vit_embedding_lens.runner.analysis import Analysis

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: the conditions, in the order of the stored arrays' condition axis
CONDITIONS = ("all_tokens", "class_tokens_only", "context_tokens_only")
NO_MASK_NOTE = (
    "the data set has no segmentation masks, so class and context tokens are unknown; nothing was "
    "run"
)


class ContextRemoval(Analysis):
    """Per image: ``correct [conditions]`` (1.0/0.0; NaN when the image has no class, or no context,
    token) and ``n_kept [conditions]`` (tokens the model saw, prefix included).

    Tables: ``accuracy`` (one row per condition: accuracy, images, mean tokens kept), or a ``note``
    when the data set has no masks.
    """

    name = "context_removal"

    def config(self) -> Dict[str, Any]:
        return {"conditions": list(CONDITIONS), "removal": "after position embedding"}

    def run(self, model: HookedViT, batch: Any) -> Dict[str, np.ndarray]:
        from vit_embedding_lens.interventions import (
            keep_class_tokens,
            keep_context_tokens,
        )

        n = len(batch)
        if batch.token_masks is None:
            return {"has_mask": np.zeros(n, dtype=bool)}
        layout = model.layout
        class_tokens = batch.token_masks.bool() & layout.image_token_mask(batch.token_masks.device)
        keeps = {
            "all_tokens": torch.ones_like(class_tokens),
            "class_tokens_only": keep_class_tokens(class_tokens, layout),
            "context_tokens_only": keep_context_tokens(class_tokens, layout),
        }
        image = layout.image_token_mask(class_tokens.device)
        correct = np.full((n, len(CONDITIONS)), np.nan, dtype=np.float32)
        n_kept = np.zeros((n, len(CONDITIONS)), dtype=np.int32)
        labels = batch.labels.long()
        for c, condition in enumerate(CONDITIONS):
            keep = keeps[condition]
            usable = (keep & image).any(-1)  # an image with no token of the kind is not evaluated
            n_kept[:, c] = keep.sum(-1).cpu().numpy()
            if not bool(usable.any()):
                continue
            keep = torch.where(
                usable[:, None], keep, torch.ones_like(keep)
            )  # placeholder rows, ignored
            with torch.no_grad():
                logits = model(batch.images, keep_mask=keep.to(batch.images.device))
            hit = (logits.argmax(-1) == labels).float()
            correct[:, c] = (
                torch.where(usable, hit, torch.full_like(hit, float("nan"))).cpu().numpy()
            )
            n_kept[~usable.cpu().numpy(), c] = 0
        return {"has_mask": np.ones(n, dtype=bool), "correct": correct, "n_kept": n_kept}

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        if "correct" not in results:
            return {"note": pd.DataFrame([{"analysis": self.name, "note": NO_MASK_NOTE}])}
        correct, n_kept = results["correct"], results["n_kept"]
        if correct.shape[1] != len(CONDITIONS):
            raise ValueError(
                f"the stored results have {correct.shape[1]} conditions, expected "
                f"{list(CONDITIONS)}"
            )
        rows = []
        for c, condition in enumerate(CONDITIONS):
            valid = ~np.isnan(correct[:, c])
            rows.append(
                {
                    "condition": condition,
                    "accuracy": float(correct[valid, c].mean()) if valid.any() else np.nan,
                    "n_images": int(valid.sum()),
                    "n_images_skipped": int((~valid).sum()),
                    "mean_tokens_kept": float(n_kept[valid, c].mean()) if valid.any() else np.nan,
                }
            )
        return {"accuracy": pd.DataFrame(rows)}

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        if "accuracy" not in tables:
            return {}
        from vit_embedding_lens.viz._figures import new_figure

        table = tables["accuracy"]
        fig = new_figure(figsize=(5, 3.2))
        ax = fig.add_subplot()
        bars = ax.bar(
            table["condition"], table["accuracy"], color=["tab:gray", "tab:blue", "tab:orange"]
        )
        for bar, kept in zip(bars, table["mean_tokens_kept"]):
            ax.annotate(
                f"{kept:.1f} tokens",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("top-1 accuracy")
        ax.set_title("Accuracy with the context or the object removed")
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        return {"context_removal_accuracy": fig}

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Accuracy and mean tokens kept per condition (or the note when there were no masks)."""
        if "accuracy" not in tables:
            return tables["note"]
        return tables["accuracy"][["condition", "accuracy", "n_images", "mean_tokens_kept"]].round(
            3
        )
