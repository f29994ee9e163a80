"""Data: image folders and the ImageNet-S layout with masks, preprocessing, token labels from
masks."""

from vit_embedding_lens.data.imagenet_s import (
    AMBIGUOUS_SYNSETS,
    decode_segmentation,
    imagenet_s_dataset,
)
from vit_embedding_lens.data.images import (
    ImageDataset,
    ImageRecord,
    UnusableImageError,
    class_indices,
    image_folder_dataset,
)
from vit_embedding_lens.data.samples import InMemoryDataset, Sample, SkippedImage
from vit_embedding_lens.data.token_labels import area_fractions, mask_to_grid, token_mask_from_mask
from vit_embedding_lens.data.transforms import Preprocessing, resolve_preprocessing
from vit_embedding_lens.zoo.eval_dataset import bundled_eval_dataset  # its home is the zoo

__all__ = [
    "AMBIGUOUS_SYNSETS",
    "ImageDataset",
    "ImageRecord",
    "InMemoryDataset",
    "Preprocessing",
    "Sample",
    "SkippedImage",
    "UnusableImageError",
    "area_fractions",
    "bundled_eval_dataset",
    "class_indices",
    "decode_segmentation",
    "image_folder_dataset",
    "imagenet_s_dataset",
    "mask_to_grid",
    "resolve_preprocessing",
    "token_mask_from_mask",
]
