"""Does the paper's class-space attribution beat random token order on small trained ViTs?

Trains (or loads) small timm ViTs on real 28x28 grey images and runs the token-removal benchmark
(METHODS §6) on held-out images for the paper's method (cross-entropy and double softmax), Chefer
relevance, rollout, raw attention and random order (several seeds). Prints one AUC table per model
and writes them all to ``--json``. Meant for a GPU (``--device cuda``: a few minutes); on a CPU use
``--quick``. Nothing is asserted: the test suite asserts directions on the bundled models only.

    python benchmarks/attribution_small_models.py --device cuda --json attribution_small_models.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.attribution import perturbation_benchmark
from vit_embedding_lens.zoo.bundled import (
    GREY28_ARCH,
    load_bundled_timm,
    preprocess_grey28,
)
from vit_embedding_lens.zoo.train import SPLITS, accuracy, stratified_pick, train_vit

METHODS = [
    "class_space",
    "class_space_double_softmax",
    "chefer",
    "rollout",
    "raw_attention",
    "random",
]
#: name -> (data, architecture overrides, epochs, seed); "bundled:NAME" loads the shipped weights
VARIANTS = {
    "bundled:mnist-vit": ("mnist-vit", {}, 0, 0),
    "bundled:fashion-vit": ("fashion-vit", {}, 0, 0),
    "fashion p4 seed1": ("fashion-vit", {}, 30, 1),
    "fashion p2 (196 tokens)": ("fashion-vit", {"patch_size": 2}, 15, 0),
    "fashion wide d8 w192": ("fashion-vit", {"embed_dim": 192, "depth": 8, "num_heads": 6}, 12, 0),
}


def build(name: str, overrides: dict, epochs: int, seed: int, split, device, quick: bool):
    from timm.models.vision_transformer import VisionTransformer

    if name.startswith("bundled:"):
        return load_bundled_timm(name.split(":", 1)[1]).to(device), {}
    torch.manual_seed(seed)
    model = VisionTransformer(**{**GREY28_ARCH, **overrides}).to(device)
    x = preprocess_grey28(split.train_images).to(device)
    y = torch.from_numpy(split.train_labels).to(device)
    if quick:
        x, y, epochs = x[:2000], y[:2000], 1
    start = time.time()
    history = train_vit(
        model,
        x,
        y,
        x[:500],
        y[:500],
        epochs=epochs,
        batch=128,
        lr=2e-3,
        weight_decay=0.05,
        label_smoothing=0.1,
        shift=2,
        seed=seed,
        log=lambda line: None,
    )
    return model, {
        "epochs": epochs,
        "train_seconds": round(time.time() - start, 1),
        "final_train_acc": history[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS"
    )
    parser.add_argument(
        "--per-class", type=int, default=100, help="held-out images per class in the benchmark"
    )
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    parser.add_argument(
        "--quick", action="store_true", help="tiny training and benchmark, to check the script"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    results = []
    splits = {}
    for name in args.variants.split(","):
        data, overrides, epochs, seed = VARIANTS[name]
        if data not in splits:
            splits[data] = SPLITS[data](0, args.data_dir)
        split = splits[data]
        timm_model, info = build(name, overrides, epochs, seed, split, device, args.quick)
        test_x = split.test_images if split.test_images is not None else split.eval_images
        test_y = split.test_labels if split.test_labels is not None else split.eval_labels
        pick = stratified_pick(test_y, 10 if args.quick else args.per_class, None)
        x = preprocess_grey28(test_x[pick]).to(device)
        y = torch.from_numpy(test_y[pick]).to(device)
        model = HookedViT.from_timm(timm_model.eval())
        n_patches = model.layout.n_patches
        step = 1 if n_patches <= 64 else 4
        n_keep = list(range(1, n_patches, step if not args.quick else 12))
        start = time.time()
        result = perturbation_benchmark(
            model,
            x,
            y,
            METHODS,
            n_keep=n_keep,
            seeds=(0, 1, 2),
            batch_size=4096 if device.type == "cuda" else 256,
            progress=False,
        )
        auc = result.auc.groupby(["method", "order"]).auc.mean().unstack("order")
        row = {
            "model": name,
            **info,
            "n_patches": n_patches,
            "n_images": len(pick),
            "accuracy": round(accuracy(timm_model, x, y), 4),
            "bench_seconds": round(time.time() - start, 1),
            "auc": {m: {o: round(float(v), 4) for o, v in auc.loc[m].items()} for m in auc.index},
        }
        row["class_space_beats_random"] = {
            "positive": row["auc"]["class_space"]["positive"] < row["auc"]["random"]["positive"],
            "negative": row["auc"]["class_space"]["negative"] > row["auc"]["random"]["negative"],
        }
        results.append(row)
        print(f"\n== {name}: {n_patches} tokens, accuracy {row['accuracy']}, {info}", flush=True)
        print(auc.round(3).to_string(), flush=True)
        print("class_space beats random:", row["class_space_beats_random"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "torch": torch.__version__, "results": results}, f, indent=1
            )


if __name__ == "__main__":
    main()
