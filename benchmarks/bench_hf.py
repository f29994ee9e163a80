"""Forward-pass overhead of HookedViT against a Hugging Face transformers ViT-B/16.

``ViTForImageClassification`` with a ViT-B/16 config (768 wide, 12 blocks, 12 heads, 224 pixels,
1000 classes), weights randomized (``vit_embedding_lens.testing_hf``; timing does not depend on
their values), CPU, fp32, ``torch.inference_mode()``. The HF module uses its default attention
(``sdpa``); HookedViT is converted from it with ``HookedViT.from_hf``. Variants are timed
interleaved - every round runs each once, in a rotating order - after a warm-up, and medians are
compared as ratios to HF within this one run:

    hf              hf_model(pixel_values=x).logits
    hf_hidden       hf_model(pixel_values=x, output_hidden_states=True)   (HF's own block outputs)
    hooked          model(x)                                              (no hooks attached)
    cache_full      model.run_with_cache(x)                               (every hook point)

The logits of HookedViT and HF are checked to agree (max |diff| printed) before timing.

    python benchmarks/bench_hf.py --batch 8 [--rounds 7] [--warmup 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.testing_hf import randomize_hf_weights_  # noqa: E402


def build(attn: str) -> tuple[torch.nn.Module, HookedViT]:
    config = transformers.ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        num_labels=1000,
        attn_implementation=attn,
    )
    hf = randomize_hf_weights_(transformers.ViTForImageClassification(config))
    return hf, HookedViT.from_hf(hf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    hf, model = build(args.attn)
    x = torch.randn(args.batch, 3, 224, 224)
    variants = {
        "hf": lambda: hf(pixel_values=x).logits,
        "hf_hidden": lambda: hf(pixel_values=x, output_hidden_states=True).logits,
        "hooked": lambda: model(x),
        "cache_full": lambda: model.run_with_cache(x)[0],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        diff = (model(x) - hf(pixel_values=x).logits).abs().max().item()
        print(f"max |HookedViT - HF| logits: {diff:.2e}")
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        names = list(variants)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["hf"])
    print(
        f"ViT-B/16 (transformers {transformers.__version__}, attn={args.attn}), batch "
        f"{args.batch}, fp32 CPU, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    results = {}
    for name, values in times.items():
        med = statistics.median(values)
        results[name] = {"median_s": med, "ratio_to_hf": med / base}
        print(f"  {name:<11} {med:8.3f} s   {med / base:5.2f}x HF")
    if args.json:
        meta = {"platform": platform.platform(), "batch": args.batch, "max_abs_diff": diff}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
