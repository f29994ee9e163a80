"""Image data sets for whole-data-set runs: class-subfolder image folders.

A data set is a list of items in a fixed order; item ``i`` is a :class:`Sample` (the preprocessed
image, its class index, an id, and optionally a per-token class mask from a segmentation mask) or a
:class:`SkippedImage` when its file cannot be used (unreadable, truncated, a mask of the wrong
size). A long run skips such a file, counts it and records why, instead of crashing on it.

Class folders are matched to the model's classes: ImageNet synset names (``n01440764``) through
timm's ImageNet label sets (or a ``LOC_synset_mapping.txt`` whose line order is the class order),
other names through ``model.class_names``; anything unmatched is an error that lists the names.

Decoding (:func:`open_image`) never saturates or leaks hidden pixels: 16-bit images (``I;16``,
``I``) are scaled from 0..65535 to 0..255 (divided by 257, rounded), float images (``F``) from
0..1 (values outside it, NaN or inf make the image unusable: their range is unknown), and images
with transparency (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparent colour) are
composited onto a solid background, ``"white"`` by default (how viewers show them) or
``"black"``, so the colour hidden under transparent pixels never reaches the model. Each image's
conversion (``"16-bit"``, ``"float"``, ``"alpha on white"``) is recorded in the run's manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
    overload,
)

import numpy as np
import torch
from PIL import Image

from vit_embedding_lens.data.samples import InMemoryDataset as InMemoryDataset  # its old address
from vit_embedding_lens.data.samples import Sample, SkippedImage
from vit_embedding_lens.data.transforms import Preprocessing, binary_mask_image, mask_from_image
from vit_embedding_lens.zoo.eval_dataset import (  # its old address
    bundled_eval_dataset as bundled_eval_dataset,
)

if TYPE_CHECKING:
    from vit_embedding_lens.data.token_labels import Method
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: file name endings read as images (case-insensitive)
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
SYNSET_PATTERN = re.compile(r"^n\d{8}$")
OnError = str  # "skip" (default: count, warn, go on) or "raise"
#: backgrounds transparent pixels are composited onto, and their RGB value
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
DEFAULT_BACKGROUND = "white"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

#: a decoded segmentation mask: PIL image -> integer class-label array [H, W]
MaskDecoder = Callable[[Image.Image], np.ndarray]


# -------------------------------------------------------------------------------------------------
# Items
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    """One image of a data set on disk: where it is, its class, and where its mask is."""

    path: Path
    label: int
    image_id: (
        str  # path relative to the data set root, e.g. "n01440764/ILSVRC2012_val_00000293.JPEG"
    )
    mask_path: Optional[Path] = None
    mask_label: Optional[int] = None  # the value that marks this image's class in its mask


class UnusableImageError(ValueError):
    """An image (or its mask) cannot be read or does not fit; the item is skipped."""


# -------------------------------------------------------------------------------------------------
# The data set of image files
# -------------------------------------------------------------------------------------------------
class ImageDataset(torch.utils.data.Dataset):
    """Image files (and optional segmentation masks) -> :class:`Sample` items, in record order.

    ``layout`` (the model's TokenLayout) is needed only when records carry masks: a mask is reduced
    to ``mask == record.mask_label``, brought to the model's input pixels with the image's own
    geometry (nearest), then to tokens with :func:`token_mask_from_mask` (``token_labels`` =
    ``"nearest"`` at patch centres, ``"corner"`` at their top-left pixels as the reference code, or
    ``"area"`` with ``threshold``). ``on_error="skip"`` turns an
    unusable file into a :class:`SkippedImage`; ``"raise"`` raises :class:`UnusableImageError`.
    ``background`` (``"white"`` or ``"black"``) is what transparent pixels are composited onto
    (see :func:`open_image`).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        preprocessing: Preprocessing,
        layout: Any = None,
        *,
        mask_decoder: Optional[MaskDecoder] = None,
        token_labels: str = "nearest",
        threshold: float = 0.5,
        source: Optional[Mapping[str, Any]] = None,
        on_error: OnError = "skip",
        background: str = DEFAULT_BACKGROUND,
    ) -> None:
        if not records:
            raise ValueError("the data set has no images")
        check_background(background)
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        from vit_embedding_lens.data.token_labels import METHODS

        if token_labels not in METHODS:
            raise ValueError(f"token_labels must be one of {METHODS}, got {token_labels!r}")
        self.has_masks = any(r.mask_path is not None for r in records)
        if self.has_masks and not all(r.mask_path is not None for r in records):
            raise ValueError("either every record has a mask or none has")
        if self.has_masks and layout is None:
            raise ValueError(
                "records with masks need the model's layout (layout=model.layout) for token masks"
            )
        self.records = list(records)
        self.preprocessing = preprocessing
        self.layout = layout
        self.mask_decoder = mask_decoder or decode_label_mask
        self.token_labels = cast("Method", token_labels)  # checked above
        self.threshold = float(threshold)
        self.source = dict(source or {})
        self.on_error = on_error
        self.background = background
        #: (image transform, mask transform), built lazily in each (worker) process
        self._transforms: Optional[
            Tuple[Callable[[Image.Image], torch.Tensor], Callable[[Image.Image], Image.Image]]
        ] = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> List[int]:
        return [r.label for r in self.records]

    @property
    def image_ids(self) -> List[str]:
        return [r.image_id for r in self.records]

    def __getitem__(self, index: int) -> Union[Sample, SkippedImage]:
        record = self.records[index]
        try:
            return self._load(index, record)
        except UnusableImageError as err:
            if self.on_error == "raise":
                raise
            return SkippedImage(index=index, image_id=record.image_id, reason=str(err))

    def _load(self, index: int, record: ImageRecord) -> Sample:
        if self._transforms is None:
            self._transforms = (
                self.preprocessing.image_transform(),
                self.preprocessing.mask_transform(),
            )
        image_tf, mask_tf = self._transforms
        image, conversion = open_image(
            record.path,
            self.preprocessing.image_mode,
            background=self.background,
            with_conversion=True,
        )
        token_mask = None
        if record.mask_path is not None:
            labels = self.mask_decoder(open_image(record.mask_path, None, what="segmentation mask"))
            if labels.shape != (image.height, image.width):
                raise UnusableImageError(
                    f"{record.mask_path}: the mask is {labels.shape[1]}x{labels.shape[0]} but its "
                    f"image {record.path.name} is {image.width}x{image.height}; masks must cover "
                    "their image pixel for pixel"
                )
            on_object = mask_from_image(mask_tf(binary_mask_image(labels == record.mask_label)))
            from vit_embedding_lens.data.token_labels import token_mask_from_mask

            assert self.layout is not None  # __init__ requires it for records with masks
            token_mask = token_mask_from_mask(
                on_object, self.layout, method=self.token_labels, threshold=self.threshold
            )
        tensor = image_tf(image)
        if not bool(torch.isfinite(tensor).all()):
            raise UnusableImageError(f"{record.path}: the preprocessed image has NaN or inf values")
        return Sample(
            index=index,
            image=tensor,
            label=record.label,
            image_id=record.image_id,
            token_mask=token_mask,
            conversion=conversion,
        )

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies this data set's content and preprocessing (for resumable runs).

        Besides ids, labels and mask labels it covers every image's and mask's bytes (size and a
        blake2b digest, :func:`content_digest`), so changed pixels under the same file names are
        never resumed from results of the old ones."""
        digest = hashlib.sha256()
        for r in self.records:
            digest.update(f"{r.image_id}\t{r.label}\t{r.mask_label}\n".encode())
        return {
            "source": self.source,
            "n_images": len(self.records),
            "files_sha256": digest.hexdigest(),
            "content_blake2b": content_digest(self.records),
            "background": self.background,
            "preprocessing": self.preprocessing.as_dict(),
            "token_labels": {"method": self.token_labels, "threshold": self.threshold}
            if self.has_masks
            else None,
        }


def check_background(background: str) -> str:
    """``background`` if it names one of :data:`BACKGROUNDS`, else a ValueError."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {background!r}")
    return background


@overload
def open_image(
    path: Path,
    mode: Optional[str],
    what: str = ...,
    *,
    background: str = ...,
    with_conversion: Literal[False] = ...,
) -> Image.Image: ...


@overload
def open_image(
    path: Path,
    mode: Optional[str],
    what: str = ...,
    *,
    background: str = ...,
    with_conversion: Literal[True],
) -> Tuple[Image.Image, Optional[str]]: ...


def open_image(
    path: Path,
    mode: Optional[str],
    what: str = "image",
    *,
    background: str = DEFAULT_BACKGROUND,
    with_conversion: bool = False,
) -> Union[Image.Image, Tuple[Image.Image, Optional[str]]]:
    """A fully decoded PIL image in ``mode`` (None: as stored, e.g. label masks); raises
    UnusableImageError when it cannot be read or its values have no known range.

    16-bit and float images are scaled to 0..255 and transparency is composited onto
    ``background`` (see the module's docstring). With ``with_conversion`` returns ``(image,
    conversion)``, ``conversion`` naming what was done (``"16-bit"``, ``"float"``,
    ``"alpha on white"``) or None for a plain image.
    """
    check_background(background)
    try:
        with Image.open(path) as img:
            img.load()
            if mode is None:
                out, conversion = img.copy(), None
            else:
                out, conversion = _decode(img, mode, background)
    except FileNotFoundError as err:
        raise UnusableImageError(f"{path}: {what} file not found") from err
    except UnusableImageError as err:
        raise UnusableImageError(f"{path}: {err}") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnusableImageError(
            f"{path}: cannot read the {what} ({type(err).__name__}: {err})"
        ) from err
    return (out, conversion) if with_conversion else out


def _decode(img: Image.Image, mode: str, background: str) -> Tuple[Image.Image, Optional[str]]:
    """``img`` in ``mode`` with 16-bit / float values scaled and transparency composited."""
    conversion: Optional[str] = None
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UnusableImageError(
                f"a {img.mode} image with values outside 0..65535 (their range is unknown)"
            )
        img = Image.fromarray(np.round(values / 257.0).astype(np.uint8))
        conversion = "16-bit"
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise UnusableImageError("a float image with NaN or inf values")
        if values.size and (values.min() < 0 or values.max() > 1):
            raise UnusableImageError(
                f"a float image with values in {values.min():.4g}..{values.max():.4g}; float "
                "images are read as 0..1 (their range is unknown otherwise)"
            )
        img = Image.fromarray(np.round(values * 255.0).astype(np.uint8))
        conversion = "float"
    elif img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if int(np.asarray(rgba)[..., 3].min()) < 255:  # some pixel is (partly) transparent
            base = Image.new("RGBA", rgba.size, BACKGROUNDS[background] + (255,))
            img = Image.alpha_composite(base, rgba).convert("RGB")
            conversion = f"alpha on {background}"
        else:
            img = rgba.convert("RGB")
    return (img.convert(mode) if img.mode != mode else img.copy()), conversion


#: blake2b digests of files already read, by (path, size, mtime in ns)
_DIGESTS: Dict[Tuple[str, int, int], str] = {}


def file_digest(path: Path) -> Tuple[int, str]:
    """``(size, blake2b hex digest)`` of a file's bytes; cached by path, size and mtime. A missing
    or unreadable file gives ``(-1, "unreadable")`` (it is skipped when loaded)."""
    try:
        stat = os.stat(path)
    except OSError:
        return -1, "unreadable"
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError:
            return -1, "unreadable"
        digest = _DIGESTS[key] = h.hexdigest()
    return stat.st_size, digest


def content_digest(records: Sequence[ImageRecord], threads: int = 8) -> str:
    """One blake2b digest over every record's image (and mask) file: id, size and bytes digest."""
    paths = [p for r in records for p in (r.path, r.mask_path) if p is not None]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # hashing releases the GIL
        digests = dict(zip(paths, pool.map(file_digest, paths)))
    total = hashlib.blake2b(digest_size=32)
    for r in records:
        for p in (r.path, r.mask_path):
            if p is not None:
                size, digest = digests[p]
                total.update(f"{r.image_id}\t{size}\t{digest}\n".encode())
    return total.hexdigest()


def decode_label_mask(img: Image.Image) -> np.ndarray:
    """A single-channel label mask (``L``, ``P``, ``I``, ``1``) as an integer array ``[H, W]``."""
    if img.mode in ("RGB", "RGBA"):
        raise UnusableImageError(
            "an RGB mask needs a decoder that says how colours map to labels (ImageNet-S: R + "
            "256*G)"
        )
    return np.asarray(img).astype(np.int64)


# -------------------------------------------------------------------------------------------------
# Class folders -> class indices
# -------------------------------------------------------------------------------------------------
def read_synset_mapping(path: Union[str, Path]) -> List[str]:
    """Synsets from a ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca`` per line); line
    order is class order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synset mapping {path} does not exist")
    synsets = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    bad = [s for s in synsets if not SYNSET_PATTERN.match(s)]
    if bad:
        raise ValueError(f"{path}: lines must start with a synset id like n01440764, got {bad[:5]}")
    return synsets


def imagenet_synsets(n_classes: int) -> Optional[List[str]]:
    """The synsets of timm's ImageNet label set with ``n_classes`` classes (1k, 12k, 21k, 22k), or
    None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": n_classes})
    return list(ImageNetInfo(subset).label_names()) if subset else None


def _normalize(name: str) -> str:
    return " ".join(name.replace("_", " ").strip().lower().split())


def class_indices(
    names: Sequence[str],
    n_classes: int,
    class_names: Optional[Sequence[str]] = None,
    synsets: Optional[Sequence[str]] = None,
) -> Dict[str, int]:
    """Map class-folder names to the model's class indices, or raise naming the unmatched ones.

    Synset names (``n01440764``) use ``synsets`` (line order of a synset mapping) or timm's ImageNet
    label set with ``n_classes`` classes. Other names match ``class_names`` exactly, ignoring case
    and ``_`` vs space, or one comma-separated synonym of a class name ("tench" for "tench, Tinca
    tinca"). Without class names, integer folder names are class indices.
    """
    names = list(names)
    if names and all(SYNSET_PATTERN.match(n) for n in names):
        table = list(synsets) if synsets is not None else imagenet_synsets(n_classes)
        if table is None:
            raise ValueError(
                f"the class folders are ImageNet synsets but the model has {n_classes} classes, "
                "which is no ImageNet label set timm knows; pass a synset mapping file "
                f"(LOC_synset_mapping.txt) whose line order is the model's class order"
            )
        if len(table) != n_classes:
            raise ValueError(
                f"the synset mapping lists {len(table)} classes but the model has {n_classes}"
            )
        index = {s: i for i, s in enumerate(table)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ValueError(
                f"{len(unknown)} class folders are not synsets of the model's {n_classes} classes: "
                f"{unknown[:20]}"
            )
        return {n: index[n] for n in names}
    if class_names:
        exact: Dict[str, int] = {}
        synonyms: Dict[str, List[int]] = {}
        for i, full in enumerate(class_names):
            exact.setdefault(_normalize(full), i)
            for part in full.split(","):
                synonyms.setdefault(_normalize(part), []).append(i)
        found, unmatched = {}, []
        for n in names:
            key = _normalize(n)
            if key in exact:
                found[n] = exact[key]
            elif len(synonyms.get(key, [])) == 1:
                found[n] = synonyms[key][0]
            else:
                unmatched.append(n)
        if unmatched:
            raise ValueError(
                f"{len(unmatched)} class folders match none of the model's class names: "
                f"{unmatched[:20]}; rename them to class names (e.g. {list(class_names[:5])}) or "
                "to ImageNet synsets"
            )
        return found
    if names and all(n.isdigit() and int(n) < n_classes for n in names):
        return {n: int(n) for n in names}
    raise ValueError(
        f"cannot match the class folders {names[:20]} to the model's classes: the model has no "
        "class names; name the folders by ImageNet synset (n01440764) or by class index "
        f"(0..{n_classes - 1})"
    )


# -------------------------------------------------------------------------------------------------
# Folders on disk
# -------------------------------------------------------------------------------------------------
def class_folders(root: Union[str, Path]) -> List[Path]:
    """The class subfolders of ``root``, sorted by name; a clear error when there are none."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"data path {root} is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = list_images(root)
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise ValueError(
            f"{root} has no class subfolders{hint}; arrange images as {root}/<class>/<image>, one "
            f"folder per class named by synset (n01440764) or class name"
        )
    return folders


def list_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> List[Path]:
    """Image files directly in ``folder``, sorted by file name."""
    exts = tuple(e.lower() for e in extensions)
    return sorted(
        (
            p
            for p in Path(folder).iterdir()
            if p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")
        ),
        key=lambda p: p.name,
    )


def select_per_class(files: Sequence[Path], per_class: Optional[int]) -> List[Path]:
    """The first ``per_class`` files (already sorted), or all of them."""
    if per_class is None:
        return list(files)
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    return list(files[:per_class])


def image_folder_records(
    root: Union[str, Path],
    class_index: Mapping[str, int],
    per_class: Optional[int] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> List[ImageRecord]:
    """Records of ``root/<class>/<image>`` for the classes in ``class_index``, class folders in name
    order, the first ``per_class`` images (by file name) of each. Empty classes are an error."""
    root = Path(root)
    records: List[ImageRecord] = []
    empty = []
    for name in sorted(class_index):
        files = list_images(root / name, extensions)
        if not files:
            empty.append(name)
            continue
        for path in select_per_class(files, per_class):
            records.append(
                ImageRecord(path=path, label=class_index[name], image_id=f"{name}/{path.name}")
            )
    if empty:
        raise ValueError(
            f"{len(empty)} class folders in {root} have no images ({', '.join(extensions)}): "
            f"{empty[:20]}; add images or remove the folders"
        )
    return records


def image_folder_dataset(
    root: Union[str, Path],
    model: "HookedViT",
    preprocessing: Preprocessing,
    per_class: Optional[int] = None,
    synset_mapping: Optional[Union[str, Path]] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    on_error: OnError = "skip",
    background: str = DEFAULT_BACKGROUND,
) -> ImageDataset:
    """A class-subfolder image folder (``DIR/<class>/*.jpg|png|...``) as an
    :class:`ImageDataset` (``background``: what transparent pixels are composited onto)."""
    root = Path(root).resolve()
    folders = [p.name for p in class_folders(root)]
    synsets = read_synset_mapping(synset_mapping) if synset_mapping else None
    mapping = class_indices(folders, model.cfg.n_classes, model.class_names, synsets)
    records = image_folder_records(root, mapping, per_class, extensions)
    source = {"layout": "folder", "root": str(root), "per_class": per_class}
    return ImageDataset(
        records,
        preprocessing,
        model.layout,
        source=source,
        on_error=on_error,
        background=background,
    )
