"""Attributions on the bundled MNIST ViT: time per method and the token-removal benchmark.

Trains ridge probes on ``--k`` digits per class of the bundled evaluation set, then, on the held-out
digits, times every attribution method and runs the perturbation benchmark (every ``n`` from 1 to
N-1, or every ``--stride``-th n plus N-1; random order over ``--seeds``). Prints the AUC table
(positive order: lower is better; negative: higher is better), the probe-vs-projection summary, and
writes the curves, AUCs and figures to ``--out`` when given.

    python benchmarks/bench_attribution.py [--stride 1] [--seeds 0 1 2] [--k 5] [--out results/]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.attribution import (  # noqa: E402
    ATTRIBUTION_METHODS,
    ProbeAttribution,
    perturbation_benchmark,
    plot_attribution_maps,
    plot_probe_comparison,
    probe_comparison,
)
from vit_embedding_lens.zoo.bundled import load_mnist_eval  # noqa: E402

METHODS = ["class_space", "class_space_double_softmax", "chefer", "rollout", "raw_attention"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stride", type=int, default=1, help="evaluate n = 1, 1+stride, ..., N-1 (default every n)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=5, help="training digits per class for the probes")
    parser.add_argument("--batch", type=int, default=1024, help="rows per forward in the benchmark")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = HookedViT.from_bundled()
    data = load_mnist_eval()
    t0 = time.perf_counter()
    comparison = probe_comparison(
        model, data.images, data.labels, k_per_class=args.k, progress=False
    )
    probe_time = time.perf_counter() - t0
    test = comparison.test_indices
    images, labels = data.images[test], data.labels[test]

    maps, seconds = {}, {}
    for name in METHODS:
        t0 = time.perf_counter()
        maps[name] = ATTRIBUTION_METHODS[name](model, images, labels, progress=False)
        seconds[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    maps["probe"] = ProbeAttribution(comparison.probes, block=-1)(
        model, images, labels, progress=False
    )
    seconds["probe"] = time.perf_counter() - t0

    last = model.layout.n_patches - 1  # always evaluated: the AUC divides by the curve's maximum
    n_keep = sorted(set(range(1, last + 1, args.stride)) | {last})
    t0 = time.perf_counter()
    result = perturbation_benchmark(
        model,
        images,
        labels,
        {**maps, "random": "random"},
        n_keep=n_keep,
        seeds=args.seeds,
        batch_size=args.batch,
        progress=True,
    )
    bench_time = time.perf_counter() - t0

    print(
        f"bundled MNIST ViT, {len(labels)} held-out digits, torch threads {torch.get_num_threads()}"
    )
    print(f"probe training + comparison: {probe_time:.1f} s")
    for name, s in seconds.items():
        print(f"  {name:28s} {1000 * s / len(labels):7.2f} ms/image")
    print(f"perturbation benchmark: {bench_time:.1f} s ({len(n_keep)} n values)\n")
    print(result.summary().to_string(index=False))
    print()
    pivot = comparison.summary().pivot_table(
        index=["layer", "block"], columns=["kind", "readout"], values="accuracy"
    )
    print(pivot.round(3).to_string())

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result.curves.to_csv(args.out / "perturbation_curves.csv", index=False)
        result.auc.to_csv(args.out / "perturbation_auc.csv", index=False)
        comparison.table.to_csv(args.out / "probe_table.csv", index=False)
        result.plot().savefig(args.out / "perturbation.png", dpi=120)
        plot_probe_comparison(comparison.table).savefig(args.out / "probes.png", dpi=120)
        plot_attribution_maps(
            images, maps, indices=range(0, len(labels), len(labels) // 6)
        ).savefig(args.out / "maps.png", dpi=120)
        timing = {k: 1000 * v / len(labels) for k, v in seconds.items()}
        (args.out / "timing.json").write_text(json.dumps({"ms_per_image": timing}))


if __name__ == "__main__":
    main()
