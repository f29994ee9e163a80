"""Class identifiability per block (METHODS §1-2), the demo analysis of the command line.

Every token of every block's residual stream (``resid_post``) is projected onto the class space
(``E · ln_final(v) + b``, :class:`~vit_embedding_lens.lens.ClassProjection`) and the rank of the
image's correct class among all classes is kept: ``r = #{k : p_k > p_c}``, identifiable when
``r == 0``, score ``s = 1 - r / C``. Prefix tokens (CLS, distillation, registers) are reported one
by one, never mixed with the image tokens; with segmentation masks, image tokens on the object
("class") and off it ("context") are reported apart as well.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pandas as pd

from vit_embedding_lens.lens.ranks import class_rank

#: per-image token groups reported besides the prefix tokens
IMAGE, CLASS, CONTEXT = "image", "class", "context"


class ClsIdentifiability:
    """Per image: ``token_rank [n_layers, n_tokens]`` (rank of the correct class per token and block),
    and ``class_token [n_tokens]`` when the data set has masks.

    Tables: ``by_block`` (one row per block and token group: mean score, % identifiable, % of images
    with at least one identifiable token) and ``per_image`` (one row per image and block).
    """

    name = "cls_identifiability"

    def hook_names(self, model: Any) -> List[str]:
        return [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]

    def config(self) -> Dict[str, Any]:
        return {"stream": "resid_post", "rank": "strictly greater logits"}

    def run(self, model: Any, batch: Any) -> Dict[str, np.ndarray]:
        from vit_embedding_lens.lens.projection import ClassProjection

        _, cache = batch.shared_forward(model)
        projection = ClassProjection(model)
        dtype = np.int16 if model.cfg.n_classes <= np.iinfo(np.int16).max else np.int32
        ranks = []
        for name in self.hook_names(model):
            logits = projection(cache[name].float())  # [batch, tokens, classes]
            ranks.append(class_rank(logits, batch.labels[:, None]).cpu().numpy().astype(dtype))
        out = {"token_rank": np.stack(ranks, axis=1)}  # [batch, layers, tokens]
        if batch.token_masks is not None:
            out["class_token"] = batch.token_masks.cpu().numpy()
        return out

    def summarize(self, results: Dict[str, np.ndarray], model: Any) -> Dict[str, pd.DataFrame]:
        rank = results["token_rank"].astype(np.int64)  # [n, L, N]
        n_images, n_layers, n_tokens = rank.shape
        layout = model.layout
        if n_tokens != layout.n_tokens:
            raise ValueError(
                f"results have {n_tokens} tokens, the model's layout {layout.n_tokens}"
            )
        n_classes = model.cfg.n_classes
        identifiable = rank == 0
        score = 1.0 - rank / n_classes
        labels = layout.token_labels()
        groups: Dict[str, np.ndarray] = {}
        for i in layout.prefix_indices:
            groups[labels[i]] = np.zeros(n_tokens, dtype=bool)
            groups[labels[i]][i] = True
        image_tokens = np.zeros(n_tokens, dtype=bool)
        image_tokens[layout.n_prefix :] = True
        rows, per_image = [], {}
        for group, member in self._groups(groups, image_tokens, results).items():
            member = np.broadcast_to(member, (n_images, n_tokens))  # per image
            count = member.sum(-1)  # [n]
            has = count > 0
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = (identifiable & member[:, None, :]).sum(-1) / count[:, None]  # [n, L]
                mean_score = (score * member[:, None, :]).sum(-1) / count[:, None]
            any_ident = (identifiable & member[:, None, :]).any(-1)  # [n, L]
            if group in (IMAGE, CLASS, CONTEXT):
                per_image[group] = frac
            for layer in range(n_layers):
                rows.append(
                    {
                        "block": layer,
                        "tokens": group,
                        "n_images": int(has.sum()),
                        "mean_score": float(np.nanmean(mean_score[has, layer]))
                        if has.any()
                        else np.nan,
                        "pct_identifiable": 100 * float(np.nanmean(frac[has, layer]))
                        if has.any()
                        else np.nan,
                        "pct_images_any": 100 * float(any_ident[has, layer].mean())
                        if has.any()
                        else np.nan,
                    }
                )
        by_block = pd.DataFrame(rows)
        image_rows = {
            "index": np.repeat(results["index"], n_layers),
            "block": np.tile(np.arange(n_layers), n_images),
        }
        for group, frac in per_image.items():
            image_rows[f"pct_{group}_identifiable"] = 100 * frac.reshape(-1)
        if layout.cls_index is not None:
            image_rows["cls_rank"] = rank[:, :, layout.cls_index].reshape(-1)
        return {"by_block": by_block, "per_image": pd.DataFrame(image_rows)}

    def headline(self, tables: Dict[str, pd.DataFrame]) -> pd.DataFrame:
        """% identifiable tokens per block (rows) and token group (columns), for the terminal."""
        wide = tables["by_block"].pivot(index="block", columns="tokens", values="pct_identifiable")
        wide = wide[list(dict.fromkeys(tables["by_block"]["tokens"]))]
        wide.columns = [f"% {c}" for c in wide.columns]
        return wide.reset_index()

    @staticmethod
    def _groups(
        prefix: Dict[str, np.ndarray], image_tokens: np.ndarray, results: Dict[str, np.ndarray]
    ) -> Dict[str, np.ndarray]:
        groups: Dict[str, np.ndarray] = dict(prefix)
        groups[IMAGE] = image_tokens
        if "class_token" in results:
            on_object = results["class_token"].astype(bool) & image_tokens
            groups[CLASS] = on_object
            groups[CONTEXT] = image_tokens & ~on_object
        return groups

    def figures(self, tables: Dict[str, pd.DataFrame], model: Any) -> Dict[str, Any]:
        from matplotlib.figure import Figure

        by_block = tables["by_block"]
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        for group, rows in by_block.groupby("tokens", sort=False):
            ax.plot(rows["block"], rows["pct_identifiable"], marker="o", label=group)
        ax.set_xlabel("block")
        ax.set_ylabel("% identifiable tokens")
        ax.set_ylim(-2, 102)
        ax.set_title("Class identifiability of the residual stream")
        ax.legend(fontsize=8)
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
