"""Every figure of issue 18 in one run: forward, full cache, lens and analyze as ratios to timm.

    python benchmarks/bench_issue18.py [--batch 8] [--rounds 5] [--device cpu] [--dtype float32]
        [--images 32] [--skip-analyze] [--skip-patching] [--patching-vitb-tokens 0]
        [--json out.json]

One process, one model pair (``vit_base_patch16_224`` with realistic random weights, and its
HookedViT), one batch. Every round runs every variant once, in a rotating order (so that drift and
the other processes on a shared machine hit them alike), after ``--warmup`` untimed rounds; the
medians are compared as ratios to timm's forward **within this run**:

    timm              timm_model(x)
    hooked            model(x), no hooks
    cache_full        model.run_with_cache(x)                  target <= 1.2x (GPU bf16: 1.3x)
    lens              lens.lens_batch(model, x, labels)        target <= 1.2x
    lens_floor        model(x) with only the lens's class projections in hooks (no ranks): the
                      matrix products an exact fp32 lens cannot skip, so the lens's floor

then ``analyze[accuracy]`` and ``analyze[accuracy,lens]`` (``run_analyses``, the command's
runner, over ``--images`` preprocessed images held in memory, against a timm forward over the same
DataLoader; target <= 1.25x), the full cache's memory per image (distinct storages, as
bench_forward.py counts it; target <= 150 MiB), and the batched patching speed-up
(bench_patching.py's bundled-model sweep, plus ViT-B when ``--patching-vitb-tokens`` > 0: slow on a
CPU).

``--device cuda --dtype bfloat16`` runs the same on a GPU (gpu_check.py calls it so). Nothing is
asserted: these are measurements for the notes; on a busy machine read the spread it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark scripts

import torch  # noqa: E402
from bench_forward import cache_storage_nbytes  # noqa: E402

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.lens.streaming import LensRecorder, lens_batch  # noqa: E402
from vit_embedding_lens.model.hook_names import act_name  # noqa: E402
from vit_embedding_lens.testing import create_timm_vit  # noqa: E402

TARGETS = {"cache_full": 1.2, "lens": 1.2, "analyze[accuracy,lens]": 1.25}
GPU_BF16_TARGETS = {"hooked": 1.03, "cache_full": 1.3, "lens": 1.2}
MIB = 1024**2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    variants: Dict[str, Callable[[], object]], rounds: int, warmup: int, device: torch.device
) -> Dict[str, List[float]]:
    """Seconds per call of every variant, rounds interleaved in a rotating order."""
    names = list(variants)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            out = variants[n]()
            sync(device)
            dt = time.perf_counter() - t0
            del out
            if r >= warmup:
                times[n].append(dt)
    return times


def projection_hooks(model: HookedViT, recorder: LensRecorder) -> List:
    """Hooks that make the lens's class projections and nothing else: one ``[tokens, d_model] x
    [d_model, classes]`` product for the first block's input and for every attention and MLP
    write-in (the residual streams are their running sums), results dropped."""
    weight = recorder.proj.weight

    def project(act: torch.Tensor, hook) -> None:
        act.detach().reshape(-1, act.shape[-1]).to(weight.dtype) @ weight

    names = [act_name("resid_pre", 0)]
    for layer in range(model.cfg.n_layers):
        names += [act_name("attn_out", layer), act_name("mlp_out", layer)]
    return [(name, project) for name in names]


def model_timings(args, device: torch.device, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    timm_model = create_timm_vit(args.model).to(device=device, dtype=dtype).eval()
    model = HookedViT.from_timm(timm_model)
    model.validate_inputs = False  # as a tight loop would; timm checks nothing either
    x = torch.randn(args.batch, 3, *model.cfg.image_size, device=device, dtype=dtype)
    labels = torch.randint(0, model.cfg.n_classes, (args.batch,))
    recorder = LensRecorder(model)
    floor_hooks = projection_hooks(model, recorder)
    variants = {
        "timm": lambda: timm_model(x),
        "hooked": lambda: model(x),
        "cache_full": lambda: model.run_with_cache(x),
        "lens": lambda: lens_batch(model, x, labels, recorder=recorder),
        "lens_floor": lambda: model.run_with_hooks(x, fwd_hooks=floor_hooks),
    }
    with torch.inference_mode():
        max_diff = (model(x).float() - timm_model(x).float()).abs().max().item()
        times = interleaved(variants, args.rounds, args.warmup, device)
        _, cache = model.run_with_cache(x)
        storage = cache_storage_nbytes(cache)
        storage_read = cache_storage_nbytes(cache, read_all=True)
        summed = sum(t.numel() * t.element_size() for t in cache.values())
        del cache
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "logits_max_abs_diff": max_diff,
        "seconds": times,
        "median_s": med,
        "ratio_vs_timm": {n: med[n] / med["timm"] for n in med},
        "spread": {n: max(v) / min(v) for n, v in times.items()},
        "full_cache_storage_mib_per_image": storage / args.batch / MIB,
        "full_cache_storage_mib_per_image_every_entry_read": storage_read / args.batch / MIB,
        "full_cache_summed_mib_per_image": summed / args.batch / MIB,
    }


def analyze_timings(args, device: torch.device, dtype: torch.dtype) -> dict:
    import bench_analyze  # the sibling script: the same runner calls and baseline

    from vit_embedding_lens.data.samples import InMemoryDataset

    torch.manual_seed(0)
    timm_model = create_timm_vit(args.model).to(device=device, dtype=dtype).eval()
    model = HookedViT.from_timm(timm_model)
    model.validate_inputs = True  # as the command line runs it
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, *model.cfg.image_size, generator=gen)
    labels = torch.randint(0, model.cfg.n_classes, (args.images,), generator=gen)
    dataset = InMemoryDataset(images, labels, source={"layout": "bench_issue18"})
    opts = argparse.Namespace(
        batch=args.analyze_batch, workers=0, rounds=args.rounds, warmup=1, images=args.images
    )

    class Cast(torch.nn.Module):  # the baseline gets its images in the model's dtype, as analyze
        def forward(self, x):
            return timm_model(x.to(dtype))

    with tempfile.TemporaryDirectory() as tmp:
        rows = bench_analyze.bench(
            Cast(),
            model,
            dataset,
            opts,
            device,
            Path(tmp),
            "analyze (preprocessed in memory)",
            targets={"analyze[accuracy,lens]": TARGETS["analyze[accuracy,lens]"]},
        )
    return rows


def patching_speedup(args, device: torch.device) -> list:
    import bench_patching

    from vit_embedding_lens.interventions import logit_diff
    from vit_embedding_lens.zoo.bundled import load_mnist_eval

    results = []
    model = HookedViT.from_bundled(device=device)
    data = load_mnist_eval()
    clean = data.images[data.labels == 3][:8].to(device)
    corrupted = data.images[data.labels == 8][:8].to(device)
    results.append(
        bench_patching.bench("bundled mnist-vit", model, clean, corrupted, logit_diff(model, 3, 8))
    )
    if args.patching_vitb_tokens:
        vitb = HookedViT.from_timm(create_timm_vit(args.model), device=device)
        gen = torch.Generator().manual_seed(0)
        clean = torch.randn(2, 3, 224, 224, generator=gen).to(device)
        corrupted = torch.randn(2, 3, 224, 224, generator=gen).to(device)
        n, k = vitb.layout.n_tokens, args.patching_vitb_tokens
        tokens = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
        metric = logit_diff(vitb, vitb(clean).argmax(-1))
        results.append(
            bench_patching.bench(
                f"{args.model} (random)", vitb, clean, corrupted, metric, tokens, max_batch=64
            )
        )
    return results


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--images", type=int, default=32, help="images for the analyze comparison")
    p.add_argument("--analyze-batch", type=int, default=None, help="default: --batch")
    p.add_argument("--skip-analyze", action="store_true")
    p.add_argument("--skip-patching", action="store_true")
    p.add_argument(
        "--patching-vitb-tokens",
        type=int,
        default=0,
        help="also patch this many tokens per block of ViT-B (one forward per cell: slow on a CPU)",
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    args.analyze_batch = args.analyze_batch or args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = {
        "model": args.model,
        "batch": args.batch,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print("bench_issue18: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    targets = dict(TARGETS)
    if device.type == "cuda" and dtype != torch.float32:
        targets.update(GPU_BF16_TARGETS)

    result: dict = {"env": env, "targets": targets}
    timings = model_timings(args, device, dtype)
    result["model"] = timings
    print(f"\n   max |HookedViT - timm| logits: {timings['logits_max_abs_diff']:.2e}")
    print(f"   {'variant':<16} {'median s':>9} {'x timm':>7} {'spread':>7}  target")
    for n, med in timings["median_s"].items():
        ratio = timings["ratio_vs_timm"][n]
        t = targets.get(n)
        verdict = "" if t is None else f"<= {t:.2f} {'ok' if ratio <= t else 'OVER'}"
        print(f"   {n:<16} {med:9.3f} {ratio:7.3f} {timings['spread'][n]:7.2f}  {verdict}")
    mib = timings["full_cache_storage_mib_per_image"]
    print(
        f"   full cache per image: {mib:.1f} MiB of distinct storage (target <= 150); "
        f"{timings['full_cache_storage_mib_per_image_every_entry_read']:.1f} MiB once every "
        f"entry is read (mlp.hook_post computed), "
        f"{timings['full_cache_summed_mib_per_image']:.1f} MiB summed over its tensors"
    )

    if not args.skip_analyze:
        result["analyze"] = analyze_timings(args, device, dtype)
    if not args.skip_patching:
        result["patching"] = patching_speedup(args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"\n   wrote {args.json}")


if __name__ == "__main__":
    main()
