"""The tuned class lens vs the plain lens (ViT-B/16 shape, random weights, CPU, fp32), as ratios.

    .venv/bin/python benchmarks/bench_tuned_lens.py [--batch 8] [--repeats 3] [--threads 2]

1. Reading: the full per-token lens (every block; attention, MLP and residual readings; ranks
   among all 1,000 classes; change flags) with a tuned lens whose translators all differ (the
   costly case: every block input is read in its own coordinates) vs the plain lens, on the same
   batch, interleaved, best of ``repeats``. Target: at most 1.15x.
2. Training: seconds per 1,000 images for ``TunedClassLens.fit`` (collecting the vectors, one
   hooked forward per batch, then ``epochs`` passes of Adam over 32 vectors per image), and the
   collection alone, on ``threads`` cores.
"""

from __future__ import annotations

import argparse
import time

import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.lens.streaming import LensRecorder, lens_batch
from vit_embedding_lens.lens.tuned import TunedClassLens
from vit_embedding_lens.testing import create_timm_vit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HookedViT.from_timm(create_timm_vit(args.model))
    model.validate_inputs = False
    cfg = model.cfg
    images = torch.randn(args.batch, 3, *cfg.image_size)
    labels = torch.randint(0, cfg.n_classes, (args.batch,))
    gen = torch.Generator().manual_seed(0)
    tuned = TunedClassLens(
        model,
        0.02 * torch.randn(cfg.n_layers, cfg.d_model, cfg.d_model, generator=gen),
        0.02 * torch.randn(cfg.n_layers, cfg.d_model, generator=gen),
    )
    plain_rec, tuned_rec = LensRecorder(model), LensRecorder(model, lens=tuned)

    def plain() -> None:
        lens_batch(model, images, labels, recorder=plain_rec)

    def with_tuned() -> None:
        lens_batch(model, images, labels, recorder=tuned_rec)

    with torch.no_grad():
        plain(), with_tuned()  # warm-up
        t_plain = t_tuned = float("inf")
        for _ in range(args.repeats):  # interleaved so drift hits both
            for fn, which in ((plain, "plain"), (with_tuned, "tuned")):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if which == "plain":
                    t_plain = min(t_plain, dt)
                else:
                    t_tuned = min(t_tuned, dt)
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"plain lens        {t_plain * 1e3:8.1f} ms")
    print(
        f"tuned lens        {t_tuned * 1e3:8.1f} ms   ratio {t_tuned / t_plain:.2f}x "
        "(target <= 1.15x)"
    )

    n = args.train_images
    train = torch.randn(n, 3, *cfg.image_size, generator=gen)
    batches = [train[i : i + args.batch] for i in range(0, n, args.batch)]
    from vit_embedding_lens.lens import tuned as tuned_module

    t0 = time.perf_counter()
    features, _ = tuned_module._collect(
        model, batches, "all", 32, torch.Generator().manual_seed(0), 2**40, progress=False
    )
    t_collect = time.perf_counter() - t0
    t0 = time.perf_counter()
    fitted = TunedClassLens.fit(
        model, batches, epochs=args.epochs, patience=args.epochs, progress=False
    )
    t_fit = time.perf_counter() - t0  # collection (again) + training
    scale = 1000 / n
    print(
        f"training, per 1,000 images ({n} measured, 32 vectors each, "
        f"{fitted.card['epochs']} epochs): fit {t_fit * scale:.0f} s in all, of which collecting "
        f"the vectors (one forward per image) about {t_collect * scale:.0f} s "
        f"({features.shape[0]} vectors)"
    )


if __name__ == "__main__":
    main()
