"""Accuracy: the model's top-1 / top-k accuracy over a data set, overall and per class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import numpy as np
import pandas as pd

from vit_embedding_lens.lens.ranks import class_rank
from vit_embedding_lens.runner.analyses._common import class_names
from vit_embedding_lens.runner.analysis import Analysis

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


class Accuracy(Analysis):
    """Per image: the prediction, the rank of the correct class, the predicted class's probability.

    Tables: ``summary`` (one row: images, top-1, top-k), ``per_class`` (one row per class present).
    Reads the logits of the shared forward pass, so it costs no forward of its own.
    """

    name = "accuracy"
    description = (
        "How often the model's top-1 prediction is the image's label, overall and per class. "
        "Every other analysis is read against it: a class the model gets wrong cannot be "
        "identifiable in its final layers."
    )

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        return {
            "accuracy_per_class": (
                f"Bar height: the share of a class's images whose top-1 prediction is right, over "
                f"{n_images} images (see the per_class table for each class's count)."
            )
        }

    def __init__(self, top_k: int = 5) -> None:
        self.top_k = int(top_k)

    def config(self) -> Dict[str, Any]:
        return {"top_k": self.top_k}

    def run(self, model: HookedViT, batch: Any) -> Dict[str, np.ndarray]:
        logits, _ = batch.shared_forward(model)
        logits = logits.float()
        probs = logits.softmax(-1)
        pred = logits.argmax(-1)
        return {
            "pred": pred.cpu().numpy(),
            "correct_rank": class_rank(logits, batch.labels).int().cpu().numpy(),
            "confidence": probs.gather(-1, pred[:, None])[:, 0].cpu().numpy(),
        }

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        k = min(self.top_k, model.cfg.n_classes)
        rank, labels = results["correct_rank"], results["label"]
        names = class_names(model)
        df = pd.DataFrame({"label": labels, "top1": rank == 0, f"top{k}": rank < k})
        summary = pd.DataFrame(
            [{"n_images": len(df), "top1": df["top1"].mean(), f"top{k}": df[f"top{k}"].mean()}]
        )
        per_class = df.groupby("label", sort=True).agg(
            n_images=("top1", "size"), top1=("top1", "mean"), **{f"top{k}": (f"top{k}", "mean")}
        )
        per_class = per_class.reset_index().rename(columns={"label": "class"})
        per_class.insert(1, "class_name", [names[c] for c in per_class["class"]])
        return {"summary": summary, "per_class": per_class}

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        from matplotlib.figure import Figure

        per_class = tables["per_class"]
        fig = Figure(figsize=(7, 3.2))
        ax = fig.add_subplot()
        if len(per_class) <= 60:
            ax.bar(per_class["class_name"].astype(str), per_class["top1"], color="0.35")
            ax.set_xlabel("class")
            ax.tick_params(axis="x", labelrotation=90 if len(per_class) > 12 else 0, labelsize=7)
        else:
            ax.hist(per_class["top1"], bins=20, range=(0, 1), color="0.35")
            ax.set_xlabel("top-1 accuracy of a class")
            ax.set_ylabel("classes")
        if len(per_class) <= 60:
            ax.set_ylabel("top-1 accuracy")
            ax.set_ylim(0, 1.02)
        overall = tables["summary"]["top1"].iloc[0]
        ax.set_title(f"Top-1 accuracy per class (overall {overall:.1%})")
        fig.tight_layout()
        return {"accuracy_per_class": fig}
