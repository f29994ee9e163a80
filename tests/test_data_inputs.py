"""What the data gives the model (issue 17, 2, 3 and 7): content fingerprints, 16-bit, float and
transparent images decoded right and recorded, unusable inputs skipped or refused clearly."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vit_embedding_lens.data.images import (
    ImageDataset,
    ImageRecord,
    UnusableImageError,
    image_folder_dataset,
    open_image,
)
from vit_embedding_lens.data.samples import InMemoryDataset, SkippedImage
from vit_embedding_lens.data.transforms import Preprocessing, resolve_preprocessing
from vit_embedding_lens.runner import ConfigMismatchError, UnusableImageWarning, run_analyses
from vit_embedding_lens.runner.manifest import read_manifest
from vit_embedding_lens.runner.models import load_model
from vit_embedding_lens.zoo import load_mnist_eval

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled:mnist-vit")


@pytest.fixture(scope="module")
def digits():
    data = load_mnist_eval()
    pick = [50 * c + k for c in range(10) for k in range(2)]
    return SimpleNamespace(raw=data.raw[pick], labels=data.labels[pick], images=data.images[pick])


def write_digit_folder(root, digits):
    for i, (raw, label) in enumerate(zip(digits.raw, digits.labels.tolist())):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw).save(folder / f"img{i:03d}.png")
    return root


def folder_run(bundled, root, out, **kw):
    pre = resolve_preprocessing(bundled.model, "paper")
    ds = image_folder_dataset(root, bundled.model, pre)
    return run_analyses(bundled.model, ds, ["accuracy"], out, batch_size=8, progress=False, **kw)


# -- 2: a changed image under the same name is never resumed from old batches --------------------
def test_changed_pixels_under_the_same_name_are_not_resumed(tmp_path, bundled, digits):
    root = write_digit_folder(tmp_path / "data", digits)
    out = tmp_path / "out"
    first = folder_run(bundled, root, out)
    path = root / "3" / "img006.png"
    stat = path.stat()
    raw = np.asarray(Image.open(path))
    Image.fromarray(np.ascontiguousarray(raw[::-1, ::-1])).save(path)  # same size and name
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even the same mtime
    with pytest.raises(ConfigMismatchError, match=r"computed on other inputs[\s\S]*--overwrite"):
        folder_run(bundled, root, out)
    again = folder_run(bundled, root, out, overwrite=True)
    fresh = folder_run(bundled, root, tmp_path / "fresh")
    row = list(again.image_ids).index("3/img006.png")
    assert again["accuracy"]["confidence"][row] == fresh["accuracy"]["confidence"][row]
    assert again["accuracy"]["confidence"][row] != first["accuracy"]["confidence"][row]


# -- 3: decoding -----------------------------------------------------------------------------------
def test_16_bit_gray_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    img, conversion = open_image(path, "RGB", with_conversion=True)
    arr = np.asarray(img)
    assert img.mode == "RGB" and conversion == "16-bit"
    expected = np.round(ramp / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], expected)
    gray, _ = open_image(path, "L", with_conversion=True)
    np.testing.assert_array_equal(np.asarray(gray), expected)


def test_float_images_are_scaled_from_0_1_and_nan_is_refused(tmp_path):
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    img, conversion = open_image(path, "L", with_conversion=True)
    assert conversion == "float"
    np.testing.assert_array_equal(np.asarray(img), np.round(values * 255).astype(np.uint8))
    values[3, 4] = np.nan
    Image.fromarray(values, mode="F").save(path)
    with pytest.raises(UnusableImageError, match="NaN"):
        open_image(path, "L")
    Image.fromarray(np.full((8, 8), 7.5, dtype=np.float32), mode="F").save(path)
    with pytest.raises(UnusableImageError, match=r"0\.\.1"):
        open_image(path, "L")


@pytest.mark.parametrize("background, fill", [("white", 255), ("black", 0)])
def test_transparent_pixels_show_the_background_not_the_hidden_rgb(tmp_path, background, fill):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # hidden red under alpha 0 in the left half
    rgba[:, 8:, :3] = (10, 20, 30)
    rgba[:, 8:, 3] = 255
    rgba[:, 12:, 3] = 128  # half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    img, conversion = open_image(path, "RGB", background=background, with_conversion=True)
    arr = np.asarray(img).astype(int)
    assert conversion == f"alpha on {background}"
    assert (arr[:, :8] == fill).all()  # no trace of the hidden red
    assert (arr[:, 8:12] == (10, 20, 30)).all()
    half = np.round(np.array([10, 20, 30]) * 128 / 255 + fill * (1 - 128 / 255))
    assert np.abs(arr[:, 12:] - half).max() <= 1
    # grey with alpha and palette transparency too
    la = Image.fromarray(rgba[..., [0, 3]], mode="LA")
    la.save(tmp_path / "la.png")
    assert (
        np.asarray(open_image(tmp_path / "la.png", "L", background=background))[:, :8] == fill
    ).all()
    pal = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.png", transparency=int(np.asarray(pal)[0, 0]))
    img, conversion = open_image(
        tmp_path / "p.png", "RGB", background=background, with_conversion=True
    )
    assert conversion == f"alpha on {background}" and (np.asarray(img)[:, :8] == fill).all()
    # a plain 8-bit image needs no conversion
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.png")
    assert open_image(tmp_path / "rgb.png", "RGB", with_conversion=True)[1] is None


def test_conversions_and_unusable_images_are_recorded_in_the_manifest(tmp_path, bundled, digits):
    root = write_digit_folder(tmp_path / "data", digits)
    wide = (digits.raw[0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(wide).save(root / "0" / "img000.png")  # 16-bit
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = digits.raw[1][..., None]
    rgba[..., 3] = 255
    rgba[:2, :2, 3] = 0  # a transparent corner
    Image.fromarray(rgba, mode="RGBA").save(root / "0" / "img001.png")
    nan = np.full((28, 28), np.nan, dtype=np.float32)
    Image.fromarray(nan, mode="F").save(root / "1" / "img002.tif")
    out = tmp_path / "out"
    with pytest.warns(UnusableImageWarning, match=r"img002\.tif.*NaN or inf"):
        results = folder_run(bundled, root, out)
    manifest = read_manifest(out)
    conversions = manifest["conversions"]
    assert conversions["counts"] == {"16-bit": 1, "alpha on white": 1}
    assert {(c["image_id"], c["conversion"]) for c in conversions["images"]} == {
        ("0/img000.png", "16-bit"),
        ("0/img001.png", "alpha on white"),
    }
    assert manifest["n_skipped"] == 1 and manifest["skipped"][0]["image_id"] == "1/img002.tif"
    assert "NaN" in manifest["skipped"][0]["reason"]
    # the 16-bit file scaled back gives the 8-bit digit's prediction exactly
    fresh = folder_run(bundled, write_digit_folder(tmp_path / "eight", digits), tmp_path / "o8")
    row = list(results.image_ids).index("0/img000.png")
    row8 = list(fresh.image_ids).index("0/img000.png")
    assert results["accuracy"]["confidence"][row] == fresh["accuracy"]["confidence"][row8]


def test_background_is_an_option_of_the_loader_and_part_of_the_fingerprint(tmp_path):
    pre = Preprocessing("paper", (1, 8, 8), "bilinear", (0.5,), (0.5,), 1.0, "squash")
    records = [ImageRecord(path=tmp_path / "a.png", label=0, image_id="a.png")]
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(records[0].path)
    black = ImageDataset(records, pre, background="black").fingerprint()
    white = ImageDataset(records, pre).fingerprint()
    assert white["background"] == "white" and black["background"] == "black"
    with pytest.raises(ValueError, match="background"):
        ImageDataset(records, pre, background="green")


# -- 7: data given to the runner -------------------------------------------------------------------
def test_uint8_images_are_refused_with_a_clear_error(bundled, tmp_path):
    images = (torch.rand(4, 1, 28, 28) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"uint8[\s\S]*float"):
        InMemoryDataset(images, torch.zeros(4, dtype=torch.long))
    dataset = InMemoryDataset(images.float(), torch.zeros(4, dtype=torch.long))
    dataset.images = images  # a data set of its own that hands out uint8 tensors
    with pytest.raises(TypeError, match=r"uint8"):
        run_analyses(bundled.model, dataset, ["accuracy"], tmp_path, progress=False)


def test_wrong_masks_and_labels_fail_at_input_naming_the_image(bundled, tmp_path):
    model = bundled.model
    images = load_mnist_eval().images[:4]
    masks = torch.zeros(4, model.layout.n_tokens + 3, dtype=torch.bool)
    ds = InMemoryDataset(images, torch.zeros(4, dtype=torch.long), ["a", "b", "c", "d"], masks)
    with pytest.raises(ValueError, match=r"'a'[\s\S]*token mask[\s\S]*%d" % model.layout.n_tokens):
        run_analyses(model, ds, ["accuracy"], tmp_path / "m", progress=False)
    labels = torch.tensor([0, 1, 10, 2])
    ds = InMemoryDataset(images, labels, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"'c'[\s\S]*label 10[\s\S]*10 classes"):
        run_analyses(model, ds, ["accuracy"], tmp_path / "l", progress=False)


def test_a_nan_image_in_memory_is_skipped_with_a_reason(bundled, tmp_path):
    images = load_mnist_eval().images[:4].clone()
    images[2, 0, 5, 5] = float("inf")
    ds = InMemoryDataset(images, torch.zeros(4, dtype=torch.long), ["a", "b", "c", "d"])
    assert isinstance(ds[2], SkippedImage) and "NaN or inf" in ds[2].reason
    with pytest.warns(UnusableImageWarning, match="skipped c: the image has NaN or inf"):
        results = run_analyses(bundled.model, ds, ["accuracy"], tmp_path, progress=False)
    assert list(results.image_ids) == ["a", "b", "d"]
    assert read_manifest(tmp_path)["skipped"][0]["image_id"] == "c"
