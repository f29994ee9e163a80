"""Peak memory of a whole-data-set lens run: 100 vs 1,000 images must peak the same.

    .venv/bin/python benchmarks/bench_lens_memory.py [--model vit_small_patch16_224] [--batch 16]

Each size runs in a fresh subprocess (peak RSS is per process). Images are generated batch by batch,
so the only thing that grows with the data set is the per-image result (a few small integers per
token), which is reported next to the peaks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def run_one(model_name: str, n_images: int, batch: int) -> dict:
    import torch

    from vit_embedding_lens import HookedViT
    from vit_embedding_lens.lens import lens_dataset
    from vit_embedding_lens.testing import create_timm_vit

    torch.manual_seed(0)
    model = HookedViT.from_timm(create_timm_vit(model_name))
    model.validate_inputs = False

    def batches():
        gen = torch.Generator().manual_seed(1)
        for start in range(0, n_images, batch):
            n = min(batch, n_images - start)
            yield (
                torch.randn(n, 3, *model.cfg.image_size, generator=gen),
                torch.randint(0, model.cfg.n_classes, (n,), generator=gen),
            )

    result = lens_dataset(model, batches(), progress=False)
    result_bytes = sum(
        t.numel() * t.element_size()
        for t in [*result.rank.values(), *result.rose.values(), result.composition]
    )
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(
        n_images=n_images, peak_mib=round(peak_mib, 1), result_mib=round(result_bytes / 2**20, 2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.model, args.child, args.batch)))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--child",
                str(n),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    first, last = rows[0], rows[-1]
    growth = last["peak_mib"] - first["peak_mib"]
    print(
        f"peak {first['peak_mib']} MiB ({first['n_images']} images) vs {last['peak_mib']} MiB "
        f"({last['n_images']} images): {growth:+.1f} MiB, of which per-image results "
        f"{last['result_mib'] - first['result_mib']:+.2f} MiB"
    )


if __name__ == "__main__":
    main()
