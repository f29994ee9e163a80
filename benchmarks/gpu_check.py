"""HookedViT vs timm on a GPU: agreement per dtype, and forward / cache time ratios.

Run on a machine with CUDA: ``python benchmarks/gpu_check.py [--json out.json]``. Prints, for
several timm families with randomized weights, the largest logit difference to timm in float32,
bfloat16 and float16 (relative to the logit scale), then, per dtype (float32, bfloat16), ViT-B/16
timings as ratios to timm's forward in one run: the forward, a ``resid_post`` cache, the full cache,
the full lens (``lens_batch``), and ``vit-lens analyze``'s runner (``analyze[accuracy]``,
``analyze[accuracy,lens]``) in images/s against a timm forward over the same DataLoader (issue 18's
GPU figures; ``bench_issue18.py`` does the measuring). Nothing here is asserted: these are
measurements for the notes and docs. ``--quick`` skips the agreement table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.testing import create_timm_vit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark scripts

FAMILIES = [
    ("vit_base_patch16_224", {}),
    ("vit_base_patch16_rpn_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("deit3_small_patch16_224", {}),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224, "num_classes": 1000}),
    ("vit_base_patch16_clip_quickgelu_224", {}),
    ("vit_little_patch16_reg4_gap_256", {}),
]


def agreement(device: str) -> list[dict]:
    rows = []
    for name, kwargs in FAMILIES:
        timm_model = create_timm_vit(name, **kwargs).to(device)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ref_model = timm_model.to(dtype)
            model = HookedViT.from_timm(ref_model)
            x = torch.randn(4, 3, *model.cfg.image_size, device=device, dtype=dtype)
            with torch.inference_mode():
                ref = ref_model(x).float()
                fast = model(x).float()
                cached, _ = model.run_with_cache(x)
            scale = ref.abs().max().item()
            rows.append(
                {
                    "model": name,
                    "dtype": str(dtype).replace("torch.", ""),
                    "logit_scale": scale,
                    "max_diff_forward": (fast - ref).abs().max().item(),
                    "max_diff_cache": (cached.float() - ref).abs().max().item(),
                    "top1_agree": (fast.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                }
            )
            print(rows[-1], flush=True)
        timm_model.float()
    return rows


def timed(fn, sync, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timings(device: str, batch: int, dtype: torch.dtype) -> dict:
    timm_model = create_timm_vit("vit_base_patch16_224").to(device=device, dtype=dtype)
    model = HookedViT.from_timm(timm_model)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    sync = torch.cuda.synchronize
    resid_post = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    runs = {
        "timm": lambda: timm_model(x),
        "hooked_forward": lambda: model(x),
        "cache_resid_post": lambda: model.run_with_cache(x, names_filter=resid_post),
        "cache_all": lambda: model.run_with_cache(x),
    }
    with torch.inference_mode():
        for fn in runs.values():
            for _ in range(3):
                fn()
        medians = {k: [] for k in runs}
        for _ in range(5):  # interleave rounds so drift hits every variant alike
            for k, fn in runs.items():
                medians[k].append(timed(fn, sync, 3))
    result = {k: statistics.median(v) for k, v in medians.items()}
    out = {"batch": batch, "dtype": str(dtype), "seconds": result}
    out["ratios_vs_timm"] = {k: v / result["timm"] for k, v in result.items()}
    print(out, flush=True)
    return out


def issue18(device: str, args: argparse.Namespace, dtype: str) -> dict:
    """Forward, full cache, lens and analyze ratios to timm in one run (bench_issue18.py)."""
    import bench_issue18

    opts = argparse.Namespace(
        model="vit_base_patch16_224",
        batch=args.batch,
        rounds=args.rounds,
        warmup=2,
        images=args.images,
        analyze_batch=args.batch,
    )
    torch_dtype = getattr(torch, dtype)
    out = {
        "dtype": dtype,
        "model": bench_issue18.model_timings(opts, torch.device(device), torch_dtype),
    }
    print({"dtype": dtype, "ratios_vs_timm": out["model"]["ratio_vs_timm"]}, flush=True)
    out["analyze"] = bench_issue18.analyze_timings(opts, torch.device(device), torch_dtype)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="images for the analyze figures")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip the agreement table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for GPU machines")
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    results: dict = {} if args.quick else {"agreement": agreement("cuda")}
    results["timings"] = [timings("cuda", args.batch, d) for d in (torch.float32, torch.bfloat16)]
    results["issue18"] = [issue18("cuda", args, d) for d in ("float32", "bfloat16")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
