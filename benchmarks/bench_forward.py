"""Forward-pass overhead of HookedViT against timm, and the memory of a full activation cache.

ViT-B/16 shape (``vit_base_patch16_224``, ``pretrained=False``: timing does not depend on the weight
values), CPU, fp32, ``torch.inference_mode()``. Four variants are timed interleaved - every round
runs each once, in a rotating order - after a warm-up, and the medians are compared as ratios to
timm within this one run:

    timm            timm_model(x)
    hooked          model(x)                                    (no hooks attached)
    cache_resid     model.run_with_cache(x, names_filter=<names ending in hook_resid_post>)
    cache_full      model.run_with_cache(x)

Targets (reported, never asserted): hooked <= 1.05x timm, cache_resid <= 1.2x timm.

Memory of a full cache, per image: the bytes of the distinct tensor storages it keeps alive (the
exact number; the plain sum over cached tensors is shown too), and, in a fresh child process after
warm-up forwards, the rise of resident memory during one full ``run_with_cache`` (peak, with the
kernel's peak-RSS mark reset first on Linux) and while the cache is held (allocator effects
included).

    python benchmarks/bench_forward.py --batch 8 [--rounds 7] [--warmup 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.testing import create_timm_vit  # noqa: E402

TARGETS = {"hooked": 1.05, "cache_resid": 1.2}


def resid_post_filter(name: str) -> bool:
    return name.endswith("hook_resid_post")


def build(model_name: str, img_size: int) -> tuple[torch.nn.Module, HookedViT]:
    # realistic random weights: timm's init zeroes the head, which would make the sanity check
    # vacuous
    timm_model = create_timm_vit(model_name, img_size=img_size)
    return timm_model, HookedViT.from_timm(timm_model)


def cache_nbytes(cache) -> int:
    """Sum of the cached tensors' bytes (a tensor cached under two names counts twice)."""
    return sum(t.numel() * t.element_size() for t in cache.values() if isinstance(t, torch.Tensor))


def cache_storage_nbytes(cache, read_all: bool = False) -> int:
    """Bytes of the distinct storages the cache keeps alive (shared tensors and views counted
    once). Entries kept as recipes until read (``mlp.hook_post``) hold nothing until then;
    ``read_all`` counts them as read (computed and kept)."""
    store = cache.cache_dict
    held = store.held_tensors() if hasattr(store, "held_tensors") and not read_all else store
    storages = {}
    for t in held.values():
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM; Linux >= 4.0). False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_probe(args: argparse.Namespace) -> None:
    """Child process: RSS growth caused by one full run_with_cache, after warm-up forwards.

    On Linux the peak-RSS mark is reset right before the call, so the peak measured is that of the
    call alone; elsewhere it falls back to ``ru_maxrss`` (a lifetime peak: conversion transients
    can mask the cache, so that number is a lower bound)."""
    torch.manual_seed(0)
    timm_model, model = build(args.model, args.img_size)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        exact = _reset_peak_rss() and _proc_status_kib("VmHWM") is not None
        if exact:
            before = _proc_status_kib("VmRSS") * 1024
        else:
            before = _maxrss_bytes()
        _, cache = model.run_with_cache(x)
        if exact:
            peak = _proc_status_kib("VmHWM") * 1024
            held = _proc_status_kib("VmRSS") * 1024
        else:
            peak = _maxrss_bytes()
            held = None
        nbytes = cache_storage_nbytes(cache)
    print(
        json.dumps(
            {
                "method": "VmHWM reset" if exact else "ru_maxrss",
                "rss_before": before,
                "peak_rss": peak,
                "rss_held": held,
                "cache_storage_bytes": nbytes,
            }
        )
    )


def measure_rss_in_child(args: argparse.Namespace) -> dict | None:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--rss-probe",
        "--batch",
        str(args.batch),
        "--model",
        args.model,
        "--img-size",
        str(args.img_size),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"   (RSS probe failed: {proc.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--rounds", type=int, default=7, help="timed rounds (each runs every variant once)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child process")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe(args)
        return

    rss = None if args.no_rss else measure_rss_in_child(args)  # first, while this process is small
    torch.manual_seed(0)
    timm_model, model = build(args.model, args.img_size)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    env = {
        "model": args.model,
        "batch": args.batch,
        "img_size": args.img_size,
        "dtype": "float32",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rounds": args.rounds,
        "warmup": args.warmup,
    }
    print("bench_forward: " + ", ".join(f"{k}={v}" for k, v in env.items()))

    variants = {
        "timm": lambda: timm_model(x),
        "hooked": lambda: model(x),
        "cache_resid": lambda: model.run_with_cache(x, names_filter=resid_post_filter),
        "cache_full": lambda: model.run_with_cache(x),
    }
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}

    with torch.inference_mode():
        max_diff = (model(x) - timm_model(x)).abs().max().item()
        print(f"   sanity: max |HookedViT - timm| logits = {max_diff:.3e}")
        for r in range(args.warmup + args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate to spread drift
            for n in order:
                t0 = time.perf_counter()
                out = variants[n]()
                dt = time.perf_counter() - t0
                del out
                if r >= args.warmup:
                    times[n].append(dt)

        _, cache = model.run_with_cache(x)
        full_bytes = cache_nbytes(cache)
        full_storage_bytes = cache_storage_nbytes(cache)
        n_hooks = len(cache)
        del cache
        _, cache = model.run_with_cache(x, names_filter=resid_post_filter)
        resid_bytes = cache_nbytes(cache)
        del cache

    med = {n: statistics.median(v) for n, v in times.items()}
    best = {n: min(v) for n, v in times.items()}
    ratio = {n: med[n] / med["timm"] for n in names}
    ratio_min = {n: best[n] / best["timm"] for n in names}
    print(
        f"\n   {'variant':<12} {'median s':>9} {'ms/image':>9} {'x timm':>7} {'min s':>7} "
        f"{'x timm':>7}  target (on medians)"
    )
    for n in names:
        target = TARGETS.get(n)
        verdict = (
            "" if target is None else f"<= {target:.2f}  {'ok' if ratio[n] <= target else 'OVER'}"
        )
        print(
            f"   {n:<12} {med[n]:9.3f} {1e3 * med[n] / args.batch:9.1f} {ratio[n]:7.3f} "
            f"{best[n]:7.3f} {ratio_min[n]:7.3f}  {verdict}"
        )
    spread = max(max(v) / min(v) for v in times.values())
    if spread > 1.5:
        print(
            f"   note: times within a variant vary up to {spread:.1f}x - the machine is busy; "
            "the ratios are unreliable, rerun on a quiet machine"
        )

    mib = 1024**2
    memory = {
        "full_cache_hooks": n_hooks,
        "full_cache_bytes_per_image": full_bytes / args.batch,
        "full_cache_storage_bytes_per_image": full_storage_bytes / args.batch,
        "resid_post_cache_bytes_per_image": resid_bytes / args.batch,
    }
    print(
        f"\n   full cache, per image: {full_bytes / args.batch / mib:.1f} MiB summed over its "
        f"{n_hooks} tensors, {full_storage_bytes / args.batch / mib:.1f} MiB of distinct storage "
        "held"
    )
    print(f"   resid_post-only cache, per image: {resid_bytes / args.batch / mib:.2f} MiB")
    if rss is not None:
        peak = (rss["peak_rss"] - rss["rss_before"]) / args.batch
        memory["full_cache_peak_rss_rise_per_image"] = peak
        memory["rss_method"] = rss["method"]
        line = f"   full cache, per image: peak RSS rise during run_with_cache {peak / mib:.1f} MiB"
        if rss["rss_held"] is not None:
            held = (rss["rss_held"] - rss["rss_before"]) / args.batch
            memory["full_cache_rss_held_per_image"] = held
            line += f", RSS still held with the cache alive {held / mib:.1f} MiB"
        print(line + f" (fresh process, {rss['method']})")

    if args.json:
        result = {
            "env": env,
            "logits_max_abs_diff": max_diff,
            "times_s": times,
            "median_s": med,
            "min_s": best,
            "ratio_vs_timm": ratio,
            "ratio_vs_timm_min": ratio_min,
            "targets": TARGETS,
            "memory": memory,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\n   wrote {args.json}")


if __name__ == "__main__":
    main()
