"""The ImageNet-S layout: ImageNet validation images with pixel-level segmentation masks.

Layout (LUSSeg/ImageNet-S; ``<root>`` may also be the folder holding ``ImageNetS919``)::

    <root>/<split>/<synset>/<name>.JPEG                  images, e.g. split = "validation"
    <root>/<split>-segmentation/<synset>/<name>.png      masks

A mask PNG is RGB and encodes a label per pixel as ``R + 256 * G``: ``0`` is "other" (background),
``1000`` is "ignored", and ``k`` in ``1..919`` is the ImageNet-S class ``k``. ImageNet-S numbers its
classes from 1 in the *sorted* order of their synsets: its README derives the ids by sorting
``ImageNetS_categories_im919.txt``, whose published line order is not sorted (numbering its lines
as they stand, as the reference code's ``vis.py`` does, mislabels the masks unless the file was
sorted first). What we assume, and check:

- the segmentation id of a synset is its 1-based position in the sorted list of ImageNet-S synsets;
  that list comes from a categories file when one is given (or found as
  ``ImageNetS_categories_im919.txt`` in ``<root>`` or ``<root>/data/categories``), else from the
  synset folders of ``<split>``, which is the same list when the split folder is complete (all
  919, or all 50/300 for ImageNet-S-50/300);
- the model's class index of a synset comes from ``LOC_synset_mapping.txt`` (line order, as the
  reference code reads it) when given or found in ``<root>``, else from timm's ImageNet info;
- at construction, the masks of up to 16 classes spread over the data set are decoded and the
  expected id must be the most frequent object id in them; otherwise the mapping is wrong (e.g. a
  partial split folder without a categories file) and the error says so.

ImageNet-S-919 merged 5 ImageNet synsets into others (``n04356056`` into ``n04355933``, ...), so
those validation folders mix two ImageNet classes; the reference excludes both sides of each merge
(:data:`AMBIGUOUS_SYNSETS`, on by default). The reference takes the first 5 JPEGs per class and
skips classes with fewer (``drop_short_classes``); it lists files in directory order, we sort them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from vit_embedding_lens.data.images import (
    ImageDataset,
    ImageRecord,
    UnusableImageError,
    class_indices,
    list_images,
    open_image,
    read_synset_mapping,
)
from vit_embedding_lens.data.transforms import Preprocessing

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: both sides of ImageNet-S-919's five synset merges: their folders mix two ImageNet classes
AMBIGUOUS_SYNSETS = (
    "n04356056",
    "n04355933",
    "n04493381",
    "n02808440",
    "n03642806",
    "n03832673",
    "n04008634",
    "n03773504",
    "n03887697",
    "n15075141",
)
SEGMENTATION_OTHER = 0
SEGMENTATION_IGNORED = 1000
CATEGORIES_FILE = "ImageNetS_categories_im919.txt"
SYNSET_MAPPING_FILE = "LOC_synset_mapping.txt"
IMAGE_SUFFIXES = (".JPEG", ".jpeg", ".jpg", ".JPG")
_N_VERIFIED_CLASSES = 16


def decode_segmentation(img: Image.Image) -> np.ndarray:
    """ImageNet-S mask PNG -> integer label array ``[H, W]``: ``R + 256 * G``."""
    if img.mode not in ("RGB", "RGBA"):
        raise UnusableImageError(f"an ImageNet-S mask must be an RGB PNG, got mode {img.mode}")
    rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1]


def encode_segmentation(labels: np.ndarray) -> Image.Image:
    """Integer labels ``[H, W]`` -> an ImageNet-S RGB mask (``R = id % 256``, ``G = id // 256``)."""
    labels = np.asarray(labels).astype(np.int64)
    rgb = np.stack([labels % 256, labels // 256, np.zeros_like(labels)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def split_folders(root: Union[str, Path], split: str = "validation") -> Tuple[Path, Path]:
    """``(images, masks)`` folders of ``split`` under ``root`` or ``root/ImageNetS919``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageNet-S root {root} does not exist or is not a folder")
    for base in (root, root / "ImageNetS919"):
        images, masks = base / split, base / f"{split}-segmentation"
        if images.is_dir():
            if not masks.is_dir():
                raise FileNotFoundError(
                    f"found ImageNet-S images in {images} but no masks folder {masks}; download "
                    f"the segmentation annotations (datapreparation_anno.sh) or use --layout folder"
                )
            return images, masks
    raise FileNotFoundError(
        f"no ImageNet-S split {split!r} in {root}: expected {root}/{split}/<synset>/*.JPEG and "
        f"{root}/{split}-segmentation/<synset>/*.png (or the same under {root}/ImageNetS919)"
    )


def read_categories(path: Union[str, Path]) -> List[str]:
    """Synsets of an ImageNet-S categories file (any order; ids come from the sorted list)."""
    return read_synset_mapping(path)


def _find_file(
    root: Path, images_dir: Path, name: str, subdirs: Sequence[str] = ()
) -> Optional[Path]:
    for base in dict.fromkeys((root, images_dir.parent)):
        for sub in ("", *subdirs):
            candidate = base / sub / name if sub else base / name
            if candidate.is_file():
                return candidate
    return None


def segmentation_ids(
    synset_folders: Sequence[str], categories: Optional[Sequence[str]] = None
) -> Dict[str, int]:
    """Segmentation id (1-based) of each synset: its position in the sorted ``categories`` (all of
    ImageNet-S's synsets), else in the sorted folder list."""
    table = sorted(set(categories if categories is not None else synset_folders))
    ids = {s: i + 1 for i, s in enumerate(table)}
    missing = [s for s in synset_folders if s not in ids]
    if missing:
        raise ValueError(f"synset folders not in the ImageNet-S categories file: {missing[:20]}")
    return ids


def imagenet_s_records(
    images_dir: Path,
    masks_dir: Path,
    class_index: Dict[str, int],
    seg_ids: Dict[str, int],
    per_class: Optional[int] = 5,
    drop_short_classes: bool = True,
) -> List[ImageRecord]:
    """Records (image, mask, class, mask id) of the first ``per_class`` JPEGs (sorted) of each
    class."""
    records: List[ImageRecord] = []
    short, empty = [], []
    for synset in sorted(class_index):
        files = list_images(images_dir / synset, IMAGE_SUFFIXES)
        if not files:
            empty.append(synset)
            continue
        if per_class is not None and len(files) < per_class:
            short.append(f"{synset} ({len(files)})")
            if drop_short_classes:
                continue
        for path in files[:per_class] if per_class is not None else files:
            records.append(
                ImageRecord(
                    path=path,
                    label=class_index[synset],
                    image_id=f"{synset}/{path.name}",
                    mask_path=masks_dir / synset / f"{path.stem}.png",
                    mask_label=seg_ids[synset],
                )
            )
    if empty:
        raise ValueError(
            f"{len(empty)} ImageNet-S class folders in {images_dir} have no JPEG images: "
            f"{empty[:20]}"
        )
    if short:
        action = (
            "skipped, as the reference does" if drop_short_classes else "kept with fewer images"
        )
        warnings.warn(
            f"{len(short)} classes have fewer than {per_class} images ({action}): {short[:20]}",
            stacklevel=2,
        )
    if not records:
        raise ValueError(f"no ImageNet-S images selected from {images_dir}")
    return records


def verify_segmentation_ids(
    records: Sequence[ImageRecord], n_classes: int = _N_VERIFIED_CLASSES
) -> None:
    """Check, on the first mask of up to ``n_classes`` classes spread over the data set, that the
    record's mask id is the most frequent object id of its mask. Raise when it is not."""
    firsts: Dict[str, ImageRecord] = {}
    for r in records:
        firsts.setdefault(r.image_id.split("/")[0], r)
    chosen = list(firsts.values())
    if len(chosen) > n_classes:
        chosen = [chosen[round(i * (len(chosen) - 1) / (n_classes - 1))] for i in range(n_classes)]
    wrong = []
    for r in chosen:
        assert r.mask_path is not None  # ImageNet-S records always carry their mask
        try:
            labels = decode_segmentation(open_image(r.mask_path, None, what="segmentation mask"))
        except UnusableImageError:
            continue  # reported (and skipped) when the image is loaded
        ids, counts = np.unique(labels, return_counts=True)
        keep = (ids != SEGMENTATION_OTHER) & (ids != SEGMENTATION_IGNORED)
        if not keep.any():
            continue
        dominant = int(ids[keep][np.argmax(counts[keep])])
        if dominant != r.mask_label:
            wrong.append(f"{r.image_id}: expected id {r.mask_label}, mask has {dominant}")
    if wrong:
        raise ValueError(
            f"segmentation ids do not match the masks ({len(wrong)} of {len(chosen)} checked): "
            f"{wrong[:5]}. Without a categories file ids are positions in the sorted synset "
            f"folders, which holds only for a complete split; pass the official {CATEGORIES_FILE} "
            "(categories=... / --categories)"
        )


def imagenet_s_dataset(
    root: Union[str, Path],
    model: "HookedViT",
    preprocessing: Preprocessing,
    split: str = "validation",
    per_class: Optional[int] = 5,
    exclude_ambiguous: bool = True,
    drop_short_classes: bool = True,
    categories: Optional[Union[str, Path]] = None,
    synset_mapping: Optional[Union[str, Path]] = None,
    token_labels: str = "nearest",
    threshold: float = 0.5,
    verify: bool = True,
    on_error: str = "skip",
) -> ImageDataset:
    """ImageNet-S images with their masks as per-token class masks for ``model`` (see module
    doc)."""
    root = Path(root).resolve()
    images_dir, masks_dir = split_folders(root, split)
    folders = sorted(
        p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not folders:
        raise ValueError(f"{images_dir} has no synset folders")
    categories = categories or _find_file(root, images_dir, CATEGORIES_FILE, ("data/categories",))
    seg_ids = segmentation_ids(folders, read_categories(categories) if categories else None)
    synset_mapping = synset_mapping or _find_file(root, images_dir, SYNSET_MAPPING_FILE)
    excluded = set(AMBIGUOUS_SYNSETS) if exclude_ambiguous else set()
    used = [s for s in folders if s not in excluded]
    if not used:
        raise ValueError(f"every synset folder in {images_dir} is excluded as ambiguous")
    synsets = read_synset_mapping(synset_mapping) if synset_mapping else None
    mapping = class_indices(used, model.cfg.n_classes, None, synsets)
    records = imagenet_s_records(
        images_dir, masks_dir, mapping, seg_ids, per_class, drop_short_classes
    )
    if verify:
        verify_segmentation_ids(records)
    source = {
        "layout": "imagenet-s",
        "root": str(root),
        "split": split,
        "per_class": per_class,
        "exclude_ambiguous": exclude_ambiguous,
        "drop_short_classes": drop_short_classes,
        "categories": str(categories) if categories else None,
        "synset_mapping": str(synset_mapping) if synset_mapping else None,
    }
    return ImageDataset(
        records,
        preprocessing,
        model.layout,
        mask_decoder=decode_segmentation,
        token_labels=token_labels,
        threshold=threshold,
        source=source,
        on_error=on_error,
    )
