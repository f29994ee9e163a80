"""Forward-pass and full-cache overhead of HookedViT against OpenCLIP's ViT-B-16 image tower.

The same measures as ``bench_forward.py`` for timm: ``open_clip.create_model("ViT-B-16",
pretrained=None)`` with realistic random weights (timing does not depend on the values), CPU, fp32,
``torch.inference_mode()``, batch 8. Three variants are timed interleaved - every round runs each
once, in a rotating order - after a warm-up; medians are compared as ratios to OpenCLIP within
this one run:

    open_clip    clip.encode_image(x)          (the image tower with its projection)
    open_clip_blocks  the same, every block's output kept by forward hooks (OpenCLIP's own cache)
    hooked       model(x)                      (HookedViT.from_open_clip(clip), no hooks)
    cache_full   model.run_with_cache(x)       (every hook point)

The outputs are checked equal first (1e-5 relative to their scale). On shared cores the numbers
are noisy; report them with the machine's load.

    python benchmarks/bench_open_clip.py [--batch 8] [--rounds 7] [--warmup 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.testing import assert_close_scaled, randomize_vit_weights_  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = open_clip.create_model(args.arch, pretrained=None).eval()
    randomize_vit_weights_(clip.visual, seed=0)
    model = HookedViT.from_open_clip(clip)
    size = model.cfg.image_size
    x = torch.randn(args.batch, 3, *size)
    kept: list = []

    def with_blocks():
        hooks = [
            b.register_forward_hook(lambda m, i, o: kept.append(o))
            for b in clip.visual.transformer.resblocks
        ]
        try:
            return clip.encode_image(x)
        finally:
            for h in hooks:
                h.remove()
            kept.clear()

    variants = {
        "open_clip": lambda: clip.encode_image(x),
        "hooked": lambda: model(x),
        "cache_full": lambda: model.run_with_cache(x),
    }
    if hasattr(clip.visual, "transformer"):  # OpenCLIP's own ViT (not a timm SigLIP tower)
        variants["open_clip_blocks"] = with_blocks
    with torch.inference_mode():
        assert_close_scaled(model(x), clip.encode_image(x), msg="HookedViT vs OpenCLIP")
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        times: dict = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                out = variants[k]()
                times[k].append(time.perf_counter() - start)
                del out
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "arch": args.arch,
        "batch": args.batch,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "median_s": {k: round(v, 4) for k, v in medians.items()},
        "ratio_to_open_clip": {k: round(v / medians["open_clip"], 3) for k, v in medians.items()},
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
