"""Data utilities: token labels from segmentation masks (more loaders come with the command line)."""

from vit_embedding_lens.data.token_labels import area_fractions, mask_to_grid, token_mask_from_mask

__all__ = ["area_fractions", "mask_to_grid", "token_mask_from_mask"]
