"""Image folders: class matching, selection, preprocessing geometry, and bad files that are
skipped."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vit_embedding_lens import HookedViT
from vit_embedding_lens.data.images import (
    ImageDataset,
    ImageRecord,
    SkippedImage,
    UnusableImageError,
    class_indices,
    image_folder_dataset,
    read_synset_mapping,
)
from vit_embedding_lens.data.transforms import Preprocessing, resolve_preprocessing
from vit_embedding_lens.runner.models import load_model
from vit_embedding_lens.zoo import load_mnist_eval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled:mnist-vit")


@pytest.fixture(scope="module")
def digits():
    """Six eval digits of each class (the eval set is sorted by class, 50 each)."""
    data = load_mnist_eval()
    pick = [50 * c + k for c in range(10) for k in range(6)]
    return SimpleNamespace(raw=data.raw[pick], labels=data.labels[pick], images=data.images[pick])


def write_digit_folder(root, digits, names=None):
    """One folder per digit class, PNGs named by their position in the eval set."""
    for i, (raw, label) in enumerate(zip(digits.raw, digits.labels.tolist())):
        folder = root / (names[label] if names else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw).save(folder / f"img{i:03d}.png")
    return root


@pytest.mark.parametrize("kind", ["timm", "paper"])
def test_png_folder_reproduces_the_bundled_tensors_bitwise(tmp_path, bundled, digits, kind):
    root = write_digit_folder(tmp_path, digits)
    pre = resolve_preprocessing(bundled.model, kind, bundled.data_config)
    ds = image_folder_dataset(root, bundled.model, pre)
    assert len(ds) == len(digits.labels)
    # class folders in name order, files in name order within a class
    expected_ids = sorted(f"{l}/img{i:03d}.png" for i, l in enumerate(digits.labels.tolist()))
    assert ds.image_ids == expected_ids
    for k in range(len(ds)):
        sample = ds[k]
        i = int(sample.image_id.split("img")[1][:3])
        assert sample.index == k and sample.label == int(digits.labels[i])
        assert torch.equal(sample.image, digits.images[i]), sample.image_id


def test_per_class_takes_the_first_files_by_name(tmp_path, bundled, digits):
    root = write_digit_folder(tmp_path, digits)
    pre = resolve_preprocessing(bundled.model, "paper")
    ds = image_folder_dataset(root, bundled.model, pre, per_class=2)
    for digit in range(10):
        files = sorted(p.name for p in (root / str(digit)).iterdir())
        assert [i for i in ds.image_ids if i.startswith(f"{digit}/")] == [
            f"{digit}/{f}" for f in files[:2]
        ]
    with pytest.raises(ValueError, match="per_class must be at least 1"):
        image_folder_dataset(root, bundled.model, pre, per_class=0)


def test_synset_folders_map_through_timm_imagenet_info():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = ["n01440764", "n15075141", "n02808440"]
    got = class_indices(names, 1000)
    assert got == {n: info.label_names().index(n) for n in names}
    assert got["n01440764"] == 0 and got["n15075141"] == 999
    with pytest.raises(ValueError, match=r"n99999999"):
        class_indices(["n01440764", "n99999999"], 1000)
    with pytest.raises(ValueError, match="no ImageNet label set"):
        class_indices(["n01440764"], 10)


def test_synset_mapping_file_sets_the_class_order(tmp_path):
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n02000000 second thing\nn01000000 first thing, alias\nn03000000 third\n")
    synsets = read_synset_mapping(mapping)
    assert class_indices(["n01000000", "n03000000"], 3, synsets=synsets) == {
        "n01000000": 1,
        "n03000000": 2,
    }


def test_named_folders_match_class_names_and_synonyms():
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    got = class_indices(["Tench", "carassius_auratus", "great_white_shark"], 3, names)
    assert got == {"Tench": 0, "carassius_auratus": 1, "great_white_shark": 2}
    with pytest.raises(ValueError, match=r"\['zebra', 'unicorn'\]"):
        class_indices(["tench", "zebra", "unicorn"], 3, names)
    # without class names, integer folder names are indices
    assert class_indices(["0", "2"], 3) == {"0": 0, "2": 2}
    with pytest.raises(ValueError, match="no class names"):
        class_indices(["cat"], 3)


def test_folder_errors_name_the_problem(tmp_path, bundled, digits):
    pre = resolve_preprocessing(bundled.model, "paper")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder_dataset(tmp_path / "nope", bundled.model, pre)
    Image.fromarray(digits.raw[0]).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match=r"no class subfolders \(1 images lie directly in it\)"):
        image_folder_dataset(tmp_path, bundled.model, pre)
    write_digit_folder(tmp_path, digits)
    (tmp_path / "7" / "notes.txt").write_text("x")
    (tmp_path / "3x").mkdir()
    with pytest.raises(ValueError, match=r"\['3x'\]"):  # unmatched class folder
        image_folder_dataset(tmp_path, bundled.model, pre)
    (tmp_path / "3x").rmdir()
    for p in (tmp_path / "4").iterdir():
        p.unlink()
    with pytest.raises(ValueError, match=r"have no images .*\['4'\]"):
        image_folder_dataset(tmp_path, bundled.model, pre)


def test_unreadable_images_are_skipped_with_a_reason(tmp_path, bundled, digits):
    root = write_digit_folder(tmp_path, digits)
    bad = root / "5" / "img000_broken.png"
    bad.write_bytes(b"not a png at all")
    truncated = root / "6" / "img000_truncated.png"
    data = (root / "6").iterdir().__next__().read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    pre = resolve_preprocessing(bundled.model, "paper")
    ds = image_folder_dataset(root, bundled.model, pre)
    items = [ds[i] for i in range(len(ds))]
    skipped = [s for s in items if isinstance(s, SkippedImage)]
    assert {s.image_id for s in skipped} == {"5/img000_broken.png", "6/img000_truncated.png"}
    assert all("cannot read the image" in s.reason for s in skipped)
    assert len(items) - len(skipped) == len(digits.labels)
    strict = image_folder_dataset(root, bundled.model, pre, on_error="raise")
    with pytest.raises(UnusableImageError, match="img000_broken.png"):
        strict[strict.image_ids.index("5/img000_broken.png")]


def _coordinate_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w), dtype=np.uint8)


@pytest.mark.parametrize(
    "crop_mode,crop_pct", [("center", 0.875), ("squash", 1.0), ("border", 0.9), ("center", 1.0)]
)
@pytest.mark.parametrize("size", [(40, 60), (75, 50), (32, 32)])
def test_masks_follow_the_image_geometry_exactly(crop_mode, crop_pct, size):
    """With nearest interpolation for the image too, image and mask must pick the same source
    pixels."""
    pixels = _coordinate_image(*size)
    pre = Preprocessing("timm", (1, 32, 32), "nearest", (0.0,), (1.0,), crop_pct, crop_mode)
    image = pre.image_transform()(Image.fromarray(pixels))[0]  # (x/255 - 0) / 1
    mask = np.asarray(pre.mask_transform()(Image.fromarray(pixels)))
    assert image.shape == (32, 32) and mask.shape == (32, 32)
    if crop_mode != "border":
        assert np.array_equal(np.round(image.numpy() * 255).astype(np.uint8), mask)
    else:  # padding differs on purpose: the image pads with the mean colour, the mask with 0
        inside = mask != 0
        assert np.array_equal(np.round(image.numpy() * 255).astype(np.uint8)[inside], mask[inside])


def test_paper_preprocessing_resizes_without_crop():
    pre = Preprocessing("paper", (1, 32, 32), "bilinear", (0.5,), (0.5,), 1.0, "squash")
    labels = np.zeros((60, 90), dtype=np.uint8)
    labels[:30, :] = 255  # top half
    mask = np.asarray(pre.mask_transform()(Image.fromarray(labels))) > 127
    assert mask[:16].all() and not mask[16:].any()  # the whole image, squashed: rows split in half
    model_like = type("M", (), {"cfg": type("C", (), {"in_chans": 3, "image_size": (48, 40)})()})()
    paper = resolve_preprocessing(model_like, "paper")
    assert paper.input_size == (3, 48, 40) and paper.mean == paper.std == (0.5, 0.5, 0.5)
    assert paper.interpolation == "bilinear" and paper.crop_pct == 1.0


def test_timm_preprocessing_uses_the_models_own_input_size():
    from timm.data import resolve_data_config

    from vit_embedding_lens.testing import create_timm_vit

    timm_model = create_timm_vit("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8)
    model = HookedViT.from_timm(timm_model)
    pre = resolve_preprocessing(model, "timm", resolve_data_config(model=timm_model))
    assert pre.input_size == (3, 32, 32)  # the pretrained config says 224
    assert pre.mean == (0.5, 0.5, 0.5) and pre.interpolation == "bicubic" and pre.crop_pct == 0.9
    with pytest.raises(ValueError, match="one value per input channel"):
        Preprocessing(
            "timm", (1, 28, 28), "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0, "center"
        )
    with pytest.raises(ValueError, match="preprocess must be one of"):
        resolve_preprocessing(model, "imagenet")


def test_records_with_masks_need_a_layout_and_matching_sizes(tmp_path, bundled):
    pre = resolve_preprocessing(bundled.model, "paper")
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    small = tmp_path / "m.png"
    Image.fromarray(np.ones((20, 28), np.uint8)).save(small)
    record = ImageRecord(img, 3, "a.png", mask_path=small, mask_label=1)
    with pytest.raises(ValueError, match="layout"):
        ImageDataset([record], pre)
    item = ImageDataset([record], pre, bundled.model.layout)[0]
    assert isinstance(item, SkippedImage)
    assert "28x20" in item.reason and "28x28" in item.reason
