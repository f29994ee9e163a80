"""Throughput of ``vit-lens analyze`` against a plain timm forward over the same images.

Both sides read the same JPEG folder through the same preprocessing (the model's timm data config,
timm's ``create_transform``), the same DataLoader settings and batch size; the baseline then runs
``timm_model(images)`` under ``torch.inference_mode()``, ``analyze`` runs the library's runner
(``run_analyses``: HookedViT forward with the analyses' hooks, the analyses, one crash-safe batch
file per batch with fsync, the manifest, the final merge), from a fresh output folder each time.
A second pass repeats both on preprocessed tensors held in memory, which isolates model and
analysis cost from JPEG decoding.

Variants are timed interleaved (every round runs each once, in a rotating order) after a warm-up,
and medians are compared as ratios to timm within this one run. Target: analyze with ``accuracy``
<= 1.5x the cost of timm, with ``accuracy`` alone and with the full lens (its random-init twin,
a second model's forward, left out).

    python benchmarks/bench_analyze.py [--model vit_small_patch16_224] [--images 64] [--batch 16]
        [--device cpu|cuda] [--workers 0] [--rounds 3] [--sources files,memory]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import ImageNetInfo, resolve_data_config  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.data.images import InMemoryDataset, image_folder_dataset  # noqa: E402
from vit_embedding_lens.data.transforms import resolve_preprocessing  # noqa: E402
from vit_embedding_lens.runner import collate, run_analyses  # noqa: E402
from vit_embedding_lens.runner.analyses.lens import LensAnalysis  # noqa: E402
from vit_embedding_lens.testing import create_timm_vit  # noqa: E402

TARGET = 1.5
VARIANTS = {
    "analyze[accuracy]": lambda: ["accuracy"],
    # the full per-image lens (every block; attn, mlp and resid ranks among all classes; change
    # flags; composition) read by hooks during the one shared forward; the random-init twin is a
    # second model's forward by definition, so it is left out here
    "analyze[accuracy,lens]": lambda: ["accuracy", LensAnalysis(random_twin=False)],
}


def make_jpeg_folder(root: Path, n_images: int, n_classes: int = 8, seed: int = 0) -> Path:
    """Smooth random photos-to-be (320x256 JPEGs) in ImageNet synset folders."""
    rng = np.random.default_rng(seed)
    synsets = ImageNetInfo().label_names()[:: 1000 // n_classes][:n_classes]
    for i in range(n_images):
        folder = root / synsets[i % n_classes]
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 256), Image.BILINEAR).save(
            folder / f"{i:05d}.JPEG", quality=90
        )
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_timm(timm_model, dataset, batch: int, workers: int, device: torch.device) -> float:
    loader = DataLoader(
        dataset,
        batch_size=batch,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in loader:
            timm_model(b.images.to(device, non_blocking=True))
    sync(device)
    return time.perf_counter() - start


def time_analyze(
    model: HookedViT, dataset, analyses, batch: int, workers: int, out: Path, device: torch.device
) -> float:
    sync(device)
    start = time.perf_counter()
    run_analyses(
        model,
        dataset,
        analyses,
        out,
        batch_size=batch,
        progress=False,
        num_workers=workers,
        overwrite=True,
    )
    sync(device)
    return time.perf_counter() - start


def bench(
    timm_model, model: HookedViT, dataset, args, device, workdir: Path, label: str, targets=None
) -> dict:
    """Median seconds per variant over the data set, and the cost ratios to timm's forward.
    ``targets`` (variant -> ratio) replaces the default target where given."""
    targets = {name: TARGET for name in VARIANTS} | (targets or {})
    runs = {"timm": lambda: time_timm(timm_model, dataset, args.batch, args.workers, device)}
    for name, analyses in VARIANTS.items():
        runs[name] = lambda a=analyses, n=name: time_analyze(
            model, dataset, a(), args.batch, args.workers, workdir / n, device
        )
    names = list(runs)
    for _ in range(args.warmup):
        for n in names:
            runs[n]()
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(runs[n]())
    median = {n: statistics.median(t) for n, t in times.items()}
    n = len(dataset)
    print(
        f"\n{label}: {n} images, batch {args.batch}, {args.workers} loader workers, median of "
        f"{args.rounds}"
    )
    print(f"{'variant':42s} {'img/s':>9s} {'cost vs timm':>13s}")
    rows = {}
    for name in names:
        ratio = median[name] / median["timm"]
        target = targets.get(name)
        flag = "" if target is None else ("  ok" if ratio <= target else f"  > {target}x target")
        print(f"{name:42s} {n / median[name]:9.1f} {ratio:12.2f}x{flag}")
        rows[name] = {
            "seconds": median[name],
            "images_per_second": n / median[name],
            "cost_ratio": ratio,
            "all_seconds": times[name],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--sources", default="files,memory", help="files (JPEG folder), memory (tensors), or both"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)

    timm_model = create_timm_vit(args.model).to(device).eval()
    model = HookedViT.from_timm(timm_model)
    model.validate_inputs = True  # as the command line runs it
    pre = resolve_preprocessing(model, "timm", resolve_data_config(model=timm_model))
    results = {
        "model": args.model,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "preprocessing": pre.as_dict(),
        "target_cost_ratio": TARGET,
    }
    print(
        f"{model!r} on {device} ({results['gpu'] or results['cpu']}, {results['threads']} threads)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = args.sources.split(",")
        files = image_folder_dataset(make_jpeg_folder(tmp / "images", args.images), model, pre)
        if "files" in sources:
            label = "JPEG files -> timm transform"
            results["from_files"] = bench(
                timm_model, model, files, args, device, tmp / "runs", label
            )
        if "memory" in sources:
            images = torch.stack([files[i].image for i in range(len(files))])
            memory = InMemoryDataset(images, torch.tensor(files.labels), source={"layout": "bench"})
            label = "preprocessed tensors in memory"
            results["in_memory"] = bench(
                timm_model, model, memory, args, device, tmp / "runs_mem", label
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
