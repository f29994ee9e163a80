"""Context removal as a runner analysis (METHODS §5): is the prediction still right when the model
sees only the object's tokens, or only the context's?

Three forwards per batch: all tokens; prefix + class tokens (the image tokens on the object,
:func:`~vit_embedding_lens.interventions.keep_class_tokens`); prefix + context tokens
(:func:`~vit_embedding_lens.interventions.keep_context_tokens`). Tokens are removed after the
position embedding (``model(images, keep_mask=...)``). An image with no token of the kept kind is
run with its prefix tokens only (CLS alone), as the reference code does; only a model that pools
image tokens and has nothing else to read skips it. Beside the accuracy it reports the
identifiability of the tokens the model saw at the last block (the paper's measure,
:func:`kept_token_identifiability`): of the kept image tokens (``tokens="image"``, default) or of
every kept token, CLS included (``tokens="all"``, the reference's). It needs the data set's token
masks; without them it stores nothing but ``has_mask`` and its table says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import numpy as np
import pandas as pd
import torch

from vit_embedding_lens.runner.analyses._kept_tokens import (
    TOKEN_SETS,
    kept_token_identifiability,
    prefix_only_allowed,
)
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
    """Per image: ``correct [conditions]`` (1.0/0.0; NaN only where the model cannot run without
    image tokens), ``n_kept [conditions]`` (tokens the model saw, prefix included) and
    ``pct_identifiable [conditions]`` (% of the kept tokens of ``tokens`` whose label is top-1 at
    the last block; NaN when there are none).

    Tables: ``accuracy`` (one row per condition: accuracy, % identifiable kept tokens, images,
    images run with the prefix only, mean tokens kept), or a ``note`` when there are no masks.
    """

    name = "context_removal"
    description = (
        "Is the prediction still right when the model sees only the object's tokens (class tokens, "
        "from the segmentation mask) or only the background (context tokens)? Compare each bar "
        "with all_tokens: a model that keeps its accuracy on context alone classifies by the "
        "background."
    )

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        return {
            "context_removal_accuracy": (
                "Top-1 accuracy with all tokens, with the prefix and the object's tokens only, and "
                "with the prefix and the context tokens only; the label over a bar is the mean "
                f"number of tokens the model saw. No test is drawn. n = {n_images} images (see "
                "the table for images run on the prefix alone)."
            )
        }

    def __init__(self, tokens: str = "image") -> None:
        if tokens not in TOKEN_SETS:
            raise ValueError(f"tokens must be one of {TOKEN_SETS}, got {tokens!r}")
        self.tokens = tokens

    def config(self) -> Dict[str, Any]:
        return {
            "conditions": list(CONDITIONS),
            "removal": "after position embedding",
            "no_kept_token": "prefix only",
            "identifiability": {"tokens": self.tokens, "block": "last", "stream": "resid_post"},
        }

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
        pct = np.full((n, len(CONDITIONS)), np.nan, dtype=np.float32)
        n_kept = np.zeros((n, len(CONDITIONS)), dtype=np.int32)
        labels = batch.labels.long()
        for c, condition in enumerate(CONDITIONS):
            keep = keeps[condition]
            # an image with no token of the kind runs with its prefix only (the reference's CLS
            # alone), unless the model pools image tokens and has nothing else to read
            usable = (keep & image).any(-1) | prefix_only_allowed(model)
            # an image that cannot run kept nothing, whatever the rest of its batch
            n_kept[:, c] = torch.where(usable, keep.sum(-1), 0).cpu().numpy()
            if not bool(usable.any()):
                continue
            keep = torch.where(usable[:, None], keep, torch.ones_like(keep))  # placeholder rows
            logits, ident = kept_token_identifiability(
                model, batch.images, labels, keep.to(batch.images.device), self.tokens
            )
            hit = (logits.argmax(-1) == labels.to(logits.device)).float().cpu()
            nan = torch.full_like(hit, float("nan"))
            correct[:, c] = torch.where(usable.cpu(), hit, nan).numpy()
            pct[:, c] = torch.where(usable.cpu(), 100 * ident, nan).numpy()
        return {
            "has_mask": np.ones(n, dtype=bool),
            "correct": correct,
            "n_kept": n_kept,
            "pct_identifiable": pct,
        }

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        if "correct" not in results:
            return {"note": pd.DataFrame([{"analysis": self.name, "note": NO_MASK_NOTE}])}
        correct, n_kept = results["correct"], results["n_kept"]
        pct = results.get("pct_identifiable", np.full(correct.shape, np.nan))
        if correct.shape[1] != len(CONDITIONS):
            raise ValueError(
                f"the stored results have {correct.shape[1]} conditions, expected "
                f"{list(CONDITIONS)}"
            )
        rows = []
        prefix = model.layout.n_prefix
        for c, condition in enumerate(CONDITIONS):
            valid = ~np.isnan(correct[:, c])
            has_pct = ~np.isnan(pct[:, c])
            rows.append(
                {
                    "condition": condition,
                    "accuracy": float(correct[valid, c].mean()) if valid.any() else np.nan,
                    f"pct_identifiable_{self.tokens}_tokens": float(pct[has_pct, c].mean())
                    if has_pct.any()
                    else np.nan,
                    "n_images": int(valid.sum()),
                    "n_images_prefix_only": int((valid & (n_kept[:, c] == prefix)).sum()),
                    "n_images_skipped": int((~valid).sum()),
                    "mean_tokens_kept": float(n_kept[valid, c].mean()) if valid.any() else np.nan,
                }
            )
        return {"accuracy": pd.DataFrame(rows)}

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        if "accuracy" not in tables:
            return {}
        from vit_embedding_lens.viz._figures import new_figure
        from vit_embedding_lens.viz.palette import token_group_color

        table = tables["accuracy"]
        fig = new_figure(figsize=(5, 3.2))
        ax = fig.add_subplot()
        colors = [token_group_color(str(c), i) for i, c in enumerate(table["condition"])]
        bars = ax.bar(table["condition"], table["accuracy"], color=colors)
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
        table = tables["accuracy"]
        pct = [c for c in table.columns if c.startswith("pct_identifiable")]
        return table[["condition", "accuracy", *pct, "n_images", "mean_tokens_kept"]].round(3)
