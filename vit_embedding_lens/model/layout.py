"""TokenLayout: which sequence positions are CLS, distillation, register and image-patch tokens.

Every analysis, intervention and plot asks the layout instead of hard-coding ``[:, 1:]`` or 14x14.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import einops
import torch
from jaxtyping import Bool
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    """Positions of the prefix tokens and the patch grid in a ViT's token sequence.

    timm puts prefix tokens first (CLS, then distillation or registers), then the image patches
    in row-major order over the grid.
    """

    grid_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    cls_index: Optional[int] = 0
    dist_index: Optional[int] = None
    register_indices: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        prefix = [i for i in (self.cls_index, self.dist_index) if i is not None]
        prefix += list(self.register_indices)
        if sorted(prefix) != list(range(len(prefix))):
            raise ValueError(
                f"prefix token indices must be 0..n_prefix-1 without gaps, got {prefix}"
            )
        if min(self.grid_size) < 1:
            raise ValueError(f"grid_size must be positive, got {self.grid_size}")

    # -- counts ----------------------------------------------------------------------------------
    @property
    def n_prefix(self) -> int:
        return (
            int(self.cls_index is not None)
            + int(self.dist_index is not None)
            + len(self.register_indices)
        )

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def n_tokens(self) -> int:
        return self.n_prefix + self.n_patches

    @property
    def image_size(self) -> Tuple[int, int]:
        """Pixels covered by the patch grid."""
        return (self.grid_size[0] * self.patch_size[0], self.grid_size[1] * self.patch_size[1])

    # -- index sets ------------------------------------------------------------------------------
    @property
    def prefix_indices(self) -> range:
        return range(0, self.n_prefix)

    @property
    def patch_indices(self) -> range:
        return range(self.n_prefix, self.n_tokens)

    def image_token_mask(self, device: Optional[torch.device] = None) -> Bool[Tensor, " pos"]:
        """Boolean mask over the sequence, True at image-patch tokens."""
        mask = torch.zeros(self.n_tokens, dtype=torch.bool, device=device)
        mask[self.n_prefix :] = True
        return mask

    def token_index(self, row: int, col: int) -> int:
        """Sequence position of the patch at grid (row, col)."""
        gh, gw = self.grid_size
        if not (0 <= row < gh and 0 <= col < gw):
            raise IndexError(f"patch ({row}, {col}) is outside the {gh}x{gw} grid")
        return self.n_prefix + row * gw + col

    def patch_position(self, index: int) -> Tuple[int, int]:
        """Grid (row, col) of the patch token at sequence position ``index``."""
        if not self.n_prefix <= index < self.n_tokens:
            raise IndexError(
                f"token {index} is not an image-patch token (patches are "
                f"{self.n_prefix}..{self.n_tokens - 1})"
            )
        return divmod(index - self.n_prefix, self.grid_size[1])

    def token_kinds(self) -> List[str]:
        """The kind of each position: ``"cls"``, ``"dist"``, ``"register"`` or ``"image"``."""
        kinds = ["image"] * self.n_tokens
        if self.cls_index is not None:
            kinds[self.cls_index] = "cls"
        if self.dist_index is not None:
            kinds[self.dist_index] = "dist"
        for i in self.register_indices:
            kinds[i] = "register"
        return kinds

    def token_labels(self) -> List[str]:
        """Readable names per position: "CLS", "DIST", "REG0", ..., "P{row},{col}"."""
        labels = [""] * self.n_tokens
        if self.cls_index is not None:
            labels[self.cls_index] = "CLS"
        if self.dist_index is not None:
            labels[self.dist_index] = "DIST"
        for k, i in enumerate(self.register_indices):
            labels[i] = f"REG{k}"
        for i in self.patch_indices:
            r, c = self.patch_position(i)
            labels[i] = f"P{r},{c}"
        return labels

    # -- tensor helpers --------------------------------------------------------------------------
    def patch_tokens(self, x: Tensor, dim: int = -2) -> Tensor:
        """The image-patch tokens of ``x`` along its token dimension ``dim``."""
        self._check_tokens(x, dim)
        return x.narrow(dim, self.n_prefix, self.n_patches)

    def prefix_tokens(self, x: Tensor, dim: int = -2) -> Tensor:
        """The prefix tokens (CLS, distillation, registers) of ``x`` along ``dim``."""
        self._check_tokens(x, dim)
        return x.narrow(dim, 0, self.n_prefix)

    def to_grid(self, values: Tensor) -> Tensor:
        """``[..., n_patches]`` (or ``[..., pos]``, prefix dropped) ->
        ``[..., grid_h, grid_w]``."""
        if values.shape[-1] == self.n_tokens and self.n_prefix:
            values = values[..., self.n_prefix :]
        if values.shape[-1] != self.n_patches:
            raise ValueError(
                f"expected a last dimension of {self.n_patches} patches (or {self.n_tokens} "
                f"tokens), got shape {tuple(values.shape)}"
            )
        return einops.rearrange(
            values, "... (h w) -> ... h w", h=self.grid_size[0], w=self.grid_size[1]
        )

    def from_grid(self, grid: Tensor) -> Tensor:
        """``[..., grid_h, grid_w]`` -> ``[..., n_patches]`` in token order."""
        if tuple(grid.shape[-2:]) != tuple(self.grid_size):
            raise ValueError(
                f"expected a trailing {self.grid_size} grid, got shape {tuple(grid.shape)}"
            )
        return einops.rearrange(grid, "... h w -> ... (h w)")

    def with_grid(self, grid_size: Sequence[int]) -> "TokenLayout":
        """The same prefix layout over another patch grid (dynamic image sizes)."""
        return replace(self, grid_size=(int(grid_size[0]), int(grid_size[1])))

    def _check_tokens(self, x: Tensor, dim: int) -> None:
        if x.shape[dim] != self.n_tokens:
            raise ValueError(
                f"dimension {dim} of shape {tuple(x.shape)} has {x.shape[dim]} tokens, "
                f"the layout has {self.n_tokens} ({self.n_prefix} prefix + {self.n_patches} "
                "patches)"
            )
