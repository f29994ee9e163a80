"""Class identifiability per block (METHODS §1-2), the demo analysis of the command line.

Every token of every block's residual stream (``resid_post``) is projected onto the class space
(``E · ln_final(v) + b``, :class:`~vit_embedding_lens.lens.ClassProjection`) and the rank of the
image's correct class among all classes is kept: ``r = #{k : p_k > p_c}``, identifiable when
``r == 0``, score ``s = 1 - r / C``; the tables come from the lens's identifiability metrics
(:mod:`vit_embedding_lens.lens.metrics`) over these ranks. Prefix tokens (CLS, distillation,
registers) are reported one by one, never mixed with the image tokens; with segmentation masks,
image tokens on the object ("class") and off it ("context") are reported apart as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import numpy as np
import pandas as pd
import torch

from vit_embedding_lens.lens.metrics import (
    identifiability_scores,
    per_image_identifiability,
    token_groups,
)
from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.lens.ranks import class_rank, rank_dtype
from vit_embedding_lens.lens.streaming import LensResult
from vit_embedding_lens.runner.analysis import Analysis

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT
    from vit_embedding_lens.runner.batch import Batch

#: per-image token groups reported besides the prefix tokens
IMAGE, CLASS, CONTEXT = "image", "class", "context"


class ClsIdentifiability(Analysis):
    """Per image: ``token_rank [block, pos]`` (rank of the correct class per token and
    block), and ``class_token [pos]`` when the data set has masks.

    Tables: ``by_block`` (one row per block and token group: mean score, % identifiable, % of images
    with at least one identifiable token) and ``per_image`` (one row per image and block).
    """

    name = "cls_identifiability"
    description = (
        "Projects every token's residual stream onto the class space and counts, per block, the "
        "share of tokens whose correct class ranks first (identifiable), by token group. A curve "
        "that rises over the blocks means class information accumulates in those tokens."
    )

    def figure_captions(self, tables: Dict[str, pd.DataFrame], n_images: int) -> Dict[str, str]:
        return {
            "identifiability_by_block": (
                "Mean over images of the % of a group's tokens whose correct class is top-1, per "
                f"block. No test is drawn. n = {n_images} images."
            ),
            "identifiability_per_image": (
                "Boxes: the distribution over images of the % of an image's tokens that are "
                "identifiable (box: quartiles, whiskers: 1.5 x the interquartile range). "
                f"n = {n_images} images."
            ),
        }

    def hook_names(self, model: HookedViT) -> List[str]:
        return [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]

    def config(self) -> Dict[str, Any]:
        return {"stream": "resid_post", "rank": "strictly greater logits"}

    def run(self, model: HookedViT, batch: Batch) -> Dict[str, np.ndarray]:
        _, cache = batch.shared_forward(model)
        projection = ClassProjection(model)
        dtype = rank_dtype(model.cfg.n_classes)
        if cache is None:  # the runner caches what hook_names() asks for
            raise RuntimeError(
                "cls_identifiability needs the batch's cached resid_post activations"
            )
        ranks = []
        for name in self.hook_names(model):
            logits = projection(cache[name].float())  # [batch, tokens, classes]
            ranks.append(class_rank(logits, batch.labels[:, None]).to(dtype).cpu().numpy())
        out = {"token_rank": np.stack(ranks, axis=1)}  # [batch, layers, tokens]
        if batch.token_masks is not None:
            out["class_token"] = batch.token_masks.cpu().numpy()
        return out

    def summarize(
        self, results: Dict[str, np.ndarray], model: HookedViT
    ) -> Dict[str, pd.DataFrame]:
        reading = resid_reading(results, model)
        rank = reading.rank["resid"]  # [n, L, N]
        n_images, n_layers, _ = rank.shape
        layout = model.layout
        identifiable = rank == 0
        scores = identifiability_scores(reading, "resid")
        labels = layout.token_labels()
        # group -> (per-image % identifiable, mean score, any identifiable token: [n, L]; has: [n])
        groups: Dict[str, Tuple[torch.Tensor, ...]] = {}
        for i in layout.prefix_indices:  # one by one, never mixed with the image tokens
            ident = identifiable[:, :, i]
            groups[labels[i]] = (
                ident.double(),
                scores[:, :, i],
                ident,
                torch.ones(n_images).bool(),
            )
        members = token_groups(reading)
        for group in (IMAGE, CLASS, CONTEXT):
            if group in members:
                member = members[group]
                groups[group] = (
                    per_image_identifiability(reading, "resid", group, "identifiable"),
                    per_image_identifiability(reading, "resid", group, "score"),
                    (identifiable & member[:, None, :]).any(-1),
                    member.any(-1),
                )
        rows = []
        for group, tensors in groups.items():
            frac, mean_score, any_ident, has = (t.numpy() for t in tensors)
            for layer in range(n_layers):
                rows.append(
                    {
                        "block": layer,
                        "tokens": group,
                        "n_images": int(has.sum()),
                        "mean_score": _nanmean(mean_score[has, layer]),
                        "pct_identifiable": 100 * _nanmean(frac[has, layer]),
                        "pct_images_any": 100 * _nanmean(any_ident[has, layer]),
                    }
                )
        image_rows = {
            "index": np.repeat(results["index"], n_layers),
            "block": np.tile(np.arange(n_layers), n_images),
        }
        for group in (IMAGE, CLASS, CONTEXT):
            if group in groups:
                image_rows[f"pct_{group}_identifiable"] = 100 * groups[group][0].numpy().reshape(-1)
        if layout.cls_index is not None:
            image_rows["cls_rank"] = rank[:, :, layout.cls_index].numpy().reshape(-1)
        return {"by_block": pd.DataFrame(rows), "per_image": pd.DataFrame(image_rows)}

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        """% identifiable tokens per block (rows) and token group (columns), for the terminal."""
        wide = tables["by_block"].pivot(index="block", columns="tokens", values="pct_identifiable")
        wide = wide[list(dict.fromkeys(tables["by_block"]["tokens"]))]
        wide.columns = [f"% {c}" for c in wide.columns]
        return wide.reset_index()

    def figures(self, tables: Dict[str, pd.DataFrame], model: HookedViT) -> Dict[str, Any]:
        from matplotlib.figure import Figure

        from vit_embedding_lens.viz._figures import legend_outside
        from vit_embedding_lens.viz.palette import token_group_color

        by_block = tables["by_block"]
        fig = Figure(figsize=(7, 3.5))  # the legend sits right of the axes
        ax = fig.add_subplot()
        for gi, (group, rows) in enumerate(by_block.groupby("tokens", sort=False)):
            color = token_group_color(str(group), gi)
            ax.plot(rows["block"], rows["pct_identifiable"], marker="o", color=color, label=group)
        ax.set_xlabel("block")
        ax.set_ylabel("% identifiable tokens")
        ax.set_ylim(-2, 102)
        ax.set_title("Class identifiability of the residual stream")
        legend_outside(ax)
        fig.tight_layout()

        per_image = tables["per_image"]
        dist = Figure(figsize=(6, 3.5))
        ax = dist.add_subplot()
        blocks = sorted(per_image["block"].unique())
        data = [
            per_image.loc[per_image["block"] == b, "pct_image_identifiable"].dropna().to_numpy()
            for b in blocks
        ]
        ax.boxplot(data, positions=blocks, widths=0.6)
        ax.set_xlabel("block")
        ax.set_ylabel("% identifiable image tokens per image")
        ax.set_title("Distribution over images")
        dist.tight_layout()
        return {"identifiability_by_block": fig, "identifiability_per_image": dist}


def resid_reading(results: Dict[str, np.ndarray], model: HookedViT) -> LensResult:
    """The stored ranks as a residual-stream-only :class:`~vit_embedding_lens.lens.LensResult`
    (no change flags, no composition), for the lens's identifiability metrics."""
    rank = torch.from_numpy(results["token_rank"].astype(np.int64))  # [n, L, N]
    n_images, n_layers, n_tokens = rank.shape
    if n_tokens != model.layout.n_tokens:
        raise ValueError(
            f"results have {n_tokens} tokens, the model's layout {model.layout.n_tokens}"
        )
    mask = results.get("class_token")
    return LensResult(
        rank={"resid": rank},
        rose={},
        composition=torch.zeros((n_images, n_layers, 0), dtype=torch.uint8),
        labels=torch.from_numpy(np.asarray(results["label"])).long(),
        n_classes=model.cfg.n_classes,
        layout=model.layout,
        token_mask=None if mask is None else torch.from_numpy(mask.astype(bool)),
        class_names=model.class_names,
    )


def _nanmean(values: np.ndarray) -> float:
    """The mean over images that have tokens of a group; NaN when none has."""
    return float(np.nanmean(values)) if values.size else np.nan
