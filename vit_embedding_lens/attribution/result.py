"""AttributionMap: one importance score per image token, per image, with its layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vit_embedding_lens.model.layout import TokenLayout


@dataclass
class AttributionMap:
    """Scores over the image tokens (higher = more important for ``classes``).

    ``scores`` is ``[batch, n_patches]`` in token order; :attr:`grid` is the same as
    ``[batch, grid_h, grid_w]``. Methods that sum over blocks and heads keep the parts in
    ``per_block`` ``[batch, block, n_patches]`` and ``per_head`` ``[batch, block, head,
    n_patches]`` (blocks listed in ``blocks``).
    """

    scores: Float[Tensor, "batch n_patches"]
    layout: TokenLayout
    classes: Int[Tensor, " batch"]
    method: str
    per_block: Optional[Float[Tensor, "batch block n_patches"]] = None
    per_head: Optional[Float[Tensor, "batch block head n_patches"]] = None
    blocks: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or self.scores.shape[-1] != self.layout.n_patches:
            raise ValueError(
                f"scores must be [batch, {self.layout.n_patches}] (one per image token), got "
                f"{tuple(self.scores.shape)}"
            )

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def grid(self) -> Float[Tensor, "batch grid_h grid_w"]:
        """The scores laid out on the patch grid."""
        return self.layout.to_grid(self.scores)

    @property
    def per_block_grid(self) -> Float[Tensor, "batch block grid_h grid_w"]:
        if self.per_block is None:
            raise ValueError(f"the {self.method} map has no per-block parts")
        return self.layout.to_grid(self.per_block)

    @property
    def per_head_grid(self) -> Float[Tensor, "batch block head grid_h grid_w"]:
        if self.per_head is None:
            raise ValueError(f"the {self.method} map has no per-head parts (ask for per_head=True)")
        return self.layout.to_grid(self.per_head)

    def ranking(self) -> Int[Tensor, "batch n_patches"]:
        """Image-token indices (0-based among the patches) from most to least important."""
        return torch.argsort(self.scores, dim=-1, descending=True, stable=True)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (image, token): image, token (sequence position), row, col, class, score."""
        b, p = self.scores.shape
        gw = self.layout.grid_size[1]
        patch = torch.arange(p)
        return pd.DataFrame(
            {
                "method": self.method,
                "image": torch.arange(b).repeat_interleave(p).numpy(),
                "token": (patch + self.layout.n_prefix).repeat(b).numpy(),
                "row": (patch // gw).repeat(b).numpy(),
                "col": (patch % gw).repeat(b).numpy(),
                "class": self.classes.cpu().repeat_interleave(p).numpy(),
                "score": self.scores.detach().cpu().reshape(-1).numpy(),
            }
        )
