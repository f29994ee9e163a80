"""The ImageNet-S layout on a small tree built with PIL: ids, selection, exclusions, token masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo

from vit_embedding_lens import HookedViT
from vit_embedding_lens.data.imagenet_s import (
    AMBIGUOUS_SYNSETS,
    decode_segmentation,
    encode_segmentation,
    imagenet_s_dataset,
)
from vit_embedding_lens.data.images import SkippedImage
from vit_embedding_lens.data.transforms import resolve_preprocessing
from vit_embedding_lens.testing import create_timm_vit

SYNSETS = ImageNetInfo().label_names()
#: a 300-synset categories list; the tree uses three of them, two with ids (sorted positions) > 255
CATEGORIES = sorted(SYNSETS[::3])[:300]
USED = [CATEGORIES[4], CATEGORIES[259], CATEGORIES[299]]  # segmentation ids 5, 260, 300
SIZE = 32  # = the model's input: with "paper" preprocessing every pixel stays where it is


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return HookedViT.from_timm(
        create_timm_vit("vit_tiny_patch16_224", depth=1, img_size=SIZE, patch_size=8)
    )


def object_mask(seg_id, other_id=None):
    """Label mask: the object on patches (0,1) and (1,1) of the 4x4 grid, noise elsewhere."""
    labels = np.zeros((SIZE, SIZE), dtype=np.int64)
    labels[0:16, 8:16] = seg_id
    labels[24:32, 0:8] = 1000  # ignored region
    if other_id is not None:
        labels[24:32, 24:32] = other_id  # another class in the corner
    return labels


def build_tree(
    root, n_images=6, short=None, with_categories=True, ambiguous=True, split="validation"
):
    images, masks = root / split, root / f"{split}-segmentation"
    synsets = USED + ([AMBIGUOUS_SYNSETS[1]] if ambiguous else [])
    cats = sorted(set(CATEGORIES) | set(synsets))
    for synset in synsets:
        seg_id = cats.index(synset) + 1
        (images / synset).mkdir(parents=True)
        (masks / synset).mkdir(parents=True)
        count = short if synset == USED[1] and short else n_images
        for k in reversed(
            range(count)
        ):  # written in reverse: selection must sort, not trust listing order
            name = f"ILSVRC2012_val_{k:08d}"
            rgb = np.random.default_rng(k).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(images / synset / f"{name}.JPEG")
            encode_segmentation(object_mask(seg_id, other_id=7)).save(
                masks / synset / f"{name}.png"
            )
    if (
        with_categories
    ):  # in a scrambled order, as the published file: ids come from the sorted list
        scrambled = list(np.random.default_rng(0).permutation(cats))
        (root / "ImageNetS_categories_im919.txt").write_text("\n".join(scrambled) + "\n")
    return root


def test_segmentation_png_decodes_as_r_plus_256_g(tmp_path):
    labels = np.array([[0, 1, 255, 256], [300, 919, 1000, 513]])
    encode_segmentation(labels).save(tmp_path / "m.png")
    img = Image.open(tmp_path / "m.png")
    rgb = np.asarray(img)
    assert rgb[1, 0].tolist() == [44, 1, 0]  # 300 = 44 + 256
    assert np.array_equal(decode_segmentation(img), labels)


def test_selection_labels_and_exclusions(tmp_path, model):
    root = build_tree(tmp_path)
    pre = resolve_preprocessing(model, "paper")
    ds = imagenet_s_dataset(root, model, pre)
    # ambiguous synset excluded by default; first 5 of 6 JPEGs per class, in sorted order
    expected = [f"{s}/ILSVRC2012_val_{k:08d}.JPEG" for s in sorted(USED) for k in range(5)]
    assert ds.image_ids == expected
    assert ds.labels == [SYNSETS.index(i.split("/")[0]) for i in expected]
    cats = sorted(set(CATEGORIES) | {AMBIGUOUS_SYNSETS[1]})
    assert [r.mask_label for r in ds.records] == [cats.index(i.split("/")[0]) + 1 for i in expected]
    assert max(r.mask_label for r in ds.records) > 256  # the G channel is exercised
    kept = imagenet_s_dataset(root, model, pre, exclude_ambiguous=False, per_class=2)
    assert (
        f"{AMBIGUOUS_SYNSETS[1]}/ILSVRC2012_val_00000000.JPEG" in kept.image_ids and len(kept) == 8
    )


def test_token_masks_mark_exactly_the_objects_patches(tmp_path, model):
    root = build_tree(tmp_path)
    ds = imagenet_s_dataset(root, model, resolve_preprocessing(model, "paper"))
    layout = model.layout
    expected = torch.zeros(layout.n_tokens, dtype=torch.bool)
    expected[layout.token_index(0, 1)] = expected[layout.token_index(1, 1)] = True
    for i in range(len(ds)):
        sample = ds[i]
        assert torch.equal(sample.token_mask, expected), sample.image_id
        assert sample.image.shape == (3, SIZE, SIZE)


def test_classes_with_too_few_images_are_dropped_with_a_warning(tmp_path, model):
    root = build_tree(tmp_path, short=3)
    pre = resolve_preprocessing(model, "paper")
    with pytest.warns(UserWarning, match=rf"{USED[1]} \(3\)"):
        ds = imagenet_s_dataset(root, model, pre)
    assert not any(i.startswith(USED[1]) for i in ds.image_ids) and len(ds) == 10
    with pytest.warns(UserWarning, match="kept with fewer images"):
        kept = imagenet_s_dataset(root, model, pre, drop_short_classes=False)
    assert sum(i.startswith(USED[1]) for i in kept.image_ids) == 3


def test_ids_from_folders_are_checked_against_the_masks(tmp_path, model):
    pre = resolve_preprocessing(model, "paper")
    # a partial split without the categories file: folder positions are not the official ids
    root = build_tree(tmp_path / "partial", with_categories=False)
    with pytest.raises(ValueError, match="ImageNetS_categories_im919.txt"):
        imagenet_s_dataset(root, model, pre)
    categories = tmp_path / "categories.txt"
    categories.write_text("\n".join(sorted(set(CATEGORIES) | {AMBIGUOUS_SYNSETS[1]})))
    ds = imagenet_s_dataset(root, model, pre, categories=categories)
    assert len(ds) == 15
    # a complete split (every category has its folder): folder order is the official order
    complete = tmp_path / "complete"
    for seg_id, synset in enumerate(sorted(USED), start=1):
        for sub in ("validation", "validation-segmentation"):
            (complete / sub / synset).mkdir(parents=True)
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(
            complete / "validation" / synset / "a.JPEG"
        )
        encode_segmentation(object_mask(seg_id)).save(
            complete / "validation-segmentation" / synset / "a.png"
        )
    ds = imagenet_s_dataset(complete, model, pre, per_class=1)
    assert [r.mask_label for r in ds.records] == [1, 2, 3]


def test_synset_mapping_in_the_root_sets_class_indices(tmp_path, model):
    root = build_tree(tmp_path)
    reversed_order = list(reversed(SYNSETS))
    (root / "LOC_synset_mapping.txt").write_text(
        "\n".join(f"{s} thing {i}" for i, s in enumerate(reversed_order))
    )
    ds = imagenet_s_dataset(root, model, resolve_preprocessing(model, "paper"))
    assert ds.labels == [reversed_order.index(i.split("/")[0]) for i in ds.image_ids]


def test_layout_errors_and_bad_masks(tmp_path, model):
    pre = resolve_preprocessing(model, "paper")
    with pytest.raises(FileNotFoundError, match="no ImageNet-S split 'validation'"):
        imagenet_s_dataset(tmp_path, model, pre)
    (tmp_path / "validation" / USED[0]).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no masks folder"):
        imagenet_s_dataset(tmp_path, model, pre)
    # the ImageNetS919 sub-folder is found; a mask of the wrong size and a missing mask are skipped
    root = build_tree(tmp_path / "data" / "ImageNetS919", n_images=5)
    masks = root / "validation-segmentation" / USED[2]
    encode_segmentation(np.zeros((20, SIZE))).save(masks / "ILSVRC2012_val_00000001.png")
    (masks / "ILSVRC2012_val_00000002.png").unlink()
    ds = imagenet_s_dataset(tmp_path / "data", model, pre)
    skipped = {
        ds[i].image_id: ds[i].reason for i in range(len(ds)) if isinstance(ds[i], SkippedImage)
    }
    assert set(skipped) == {
        f"{USED[2]}/ILSVRC2012_val_00000001.JPEG",
        f"{USED[2]}/ILSVRC2012_val_00000002.JPEG",
    }
    assert "32x20" in skipped[f"{USED[2]}/ILSVRC2012_val_00000001.JPEG"]
    assert "not found" in skipped[f"{USED[2]}/ILSVRC2012_val_00000002.JPEG"]
