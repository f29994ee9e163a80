"""The class-embedding lens vs a plain timm forward (ViT-B/16 shape, CPU, fp32), as a ratio.

    .venv/bin/python benchmarks/bench_lens.py [--batch 8] [--repeats 3]

Measures the full per-image analysis (every block; resid, resid_mid, attn and mlp readings; every
token; ranks among all 1,000 classes; change flags and composition) against ``timm_model(images)``
on the same batch, interleaved, best of ``repeats``. Target: at most 1.5x.
"""

from __future__ import annotations

import argparse
import time

import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.lens.streaming import LensRecorder, lens_batch
from vit_embedding_lens.testing import create_timm_vit


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    timm_model = create_timm_vit(args.model)
    model = HookedViT.from_timm(timm_model)
    images = torch.randn(args.batch, 3, *model.cfg.image_size)
    labels = torch.randint(0, model.cfg.n_classes, (args.batch,))
    recorder = LensRecorder(model)
    model.validate_inputs = False
    with torch.no_grad():
        timm_model(images), lens_batch(model, images, labels, recorder=recorder)  # warm-up
        t_timm = t_lens = float("inf")
        for _ in range(args.repeats):  # interleaved so drift hits both
            t_timm = min(t_timm, best_time(lambda: timm_model(images), 1))
            t_lens = min(
                t_lens, best_time(lambda: lens_batch(model, images, labels, recorder=recorder), 1)
            )
    print(f"{args.model}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"timm forward      {t_timm * 1e3:8.1f} ms")
    print(
        f"lens (full)       {t_lens * 1e3:8.1f} ms   ratio {t_lens / t_timm:.2f}x  (target <= 1.5x)"
    )


if __name__ == "__main__":
    main()
