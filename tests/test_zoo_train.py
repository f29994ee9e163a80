"""The training script of the bundled models: IDX reading, the split, the shifts, one tiny run."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from vit_embedding_lens.model.convert import load_checkpoint_
from vit_embedding_lens.zoo.bundled import BUNDLED_MODELS, create_bundled_timm_model
from vit_embedding_lens.zoo.train import main, random_shift, read_idx, stratified_pick

pytestmark = pytest.mark.usefixtures("one_thread")


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzipped(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    (tmp_path / "a-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "a-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    for name in ("a-ubyte", "a-ubyte.gz"):
        got = read_idx(tmp_path / name)
        assert got.shape == (5, 28, 28) and np.array_equal(got, images) and got.flags.writeable
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(idx_bytes(images)[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


def test_stratified_pick_takes_the_first_or_random_members_of_each_class():
    labels = np.array([1, 0, 1, 0, 1, 0, 2, 2])
    assert stratified_pick(labels, 2, None).tolist() == [0, 1, 2, 3, 6, 7]
    random = stratified_pick(labels, 2, np.random.default_rng(0))
    assert np.bincount(labels[random]).tolist() == [2, 2, 2] and list(random) == sorted(random)


def test_random_shift_matches_a_per_image_crop():
    x = torch.randn(6, 1, 28, 28)
    out = random_shift(x, 2, torch.Generator().manual_seed(3))
    offsets = torch.randint(0, 5, (6, 2), generator=torch.Generator().manual_seed(3))
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), value=float(x.min()))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], pad[i, :, dy : dy + 28, dx : dx + 28])


def test_a_tiny_fashion_run_writes_weights_eval_set_and_card(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "fashion"
    data.mkdir()
    train_labels = np.arange(100) % 10
    test_labels = np.arange(600) % 10
    for name, array in {
        "train-images-idx3": rng.integers(0, 256, (100, 28, 28)),
        "train-labels-idx1": train_labels,
        "t10k-images-idx3": rng.integers(0, 256, (600, 28, 28)),
        "t10k-labels-idx1": test_labels,
    }.items():
        (data / f"{name}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.asarray(array))))
    out = tmp_path / "out"
    main(
        [
            "--model",
            "fashion-vit",
            "--epochs",
            "1",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            "--threads",
            "1",
        ]
    )
    spec = BUNDLED_MODELS["fashion-vit"]
    card = json.loads((out / spec.card).read_text())
    assert (
        card["name"] == "fashion-vit"
        and card["training"]["epochs"] == 1
        and card["device"] == "cpu"
    )
    assert len(card["held_out_accuracy_per_epoch"]) == 1 and "--epochs 1" in card["command"]
    shipped = np.load(out / spec.eval_file)
    assert (
        shipped["images"].shape == (500, 28, 28)
        and np.bincount(shipped["labels"]).tolist() == [50] * 10
    )
    assert shipped["source_index"][:3].tolist() == [
        0,
        1,
        2,
    ]  # the first 50 test images of each class
    assert np.array_equal(shipped["masks"], shipped["images"] > spec.foreground_threshold)
    model = create_bundled_timm_model("fashion-vit")
    load_checkpoint_(model, out / spec.weights)  # strict
    assert "held-out accuracy" in capsys.readouterr().out


def test_missing_fashion_files_say_how_to_get_them(tmp_path):
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        main(
            ["--model", "fashion-vit", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]
        )


@pytest.mark.parametrize(
    "flag, value", [("--epochs", "0"), ("--batch", "0"), ("--shift", "-1"), ("--threads", "0")]
)
def test_bad_settings_are_refused_naming_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit):
        main(["--model", "mnist-vit", flag, value, "--out", str(tmp_path)])
    assert f"{flag} must be at least" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything is written
