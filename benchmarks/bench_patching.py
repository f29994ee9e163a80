"""Batched activation patching against one forward pass per cell.

Sweep: ``--point`` (``resid_pre`` by default; ``attn_out``, ``resid_mid``, ``mlp_out`` or
``resid_post``) of every block × every token (``get_act_patch_<point>``), metric: logit
difference of the clean and the corrupted class. Four ways, timed in the same process:

    batched     get_act_patch_<point>(...)     k cells per forward (the corrupted batch repeated k
                                               times), blocks before the patched one not recomputed,
                                               the patched block by its plan (below), the last
                                               block for the CLS row only
    whole last  the same with the last block run for every token (the shortcut switched off)
    unplanned   the same with the patched block run whole: for resid_pre, every token's queries,
                keys and values computed (batched shares the unchanged tokens' with the corrupted
                run); for the token-by-token points, block l whole and no sharing in block l + 1
                (batched computes block l's patched rows alone, then shares block l + 1's q/k/v)
    per cell    a plain loop: model.run_with_hooks(corrupted, fwd_hooks=[(name, copy clean token)])
                per (block, token), as a TransformerLens-style generic patching loop does

Models: the bundled MNIST ViT (6 blocks, 50 tokens: 300 cells) and a ViT-B/16-shaped model with
random weights (12 blocks, 197 tokens; ``--vitb-tokens`` evenly spaced tokens, all 12 blocks, so
that the per-cell loop finishes in minutes on a CPU). Both ways are checked to give the same values.
The ratio per-cell / batched is printed (the target of the first patching issue was >= 5x), with
the bound block skipping allows: patching ``resid_pre`` of block ``l`` changes every token from
block ``l`` on (attention mixes the patched token into all of them), so a cell must run blocks
``l..L-2`` in full and the last block for the readout's rows, and block ``l`` itself can take
the unchanged tokens' queries, keys and values from the corrupted run: ``(L - 1) / 2 -
(L - 1) psi / L + phi`` blocks per cell on average, ``phi`` the measured cost of the last block for
the CLS row and ``psi`` the measured saving of the shared queries, keys and values, both over the
whole block. A token-by-token point of block ``l`` changes only the patched tokens' rows of block
``l``'s output, so a cell runs block ``l + 1`` with shared q/k/v, blocks ``l+2..L-2`` in full and
the last block for the readout's rows: ``((L - 2)(L - 1) / 2 - (L - 2) psi + (L - 1) phi) / L``
blocks per cell (the patched rows' own work left out).

    python benchmarks/bench_patching.py [--point resid_pre] [--batch 8] [--vitb-batch 2]
        [--vitb-tokens 16] [--skip-vitb] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.interventions import logit_diff, patching  # noqa: E402
from vit_embedding_lens.testing import create_timm_vit  # noqa: E402

TARGET = 5.0


def per_cell_loop(model: HookedViT, corrupted, clean_cache, metric, tokens, point="resid_pre"):
    """One forward per (block, token): the hook copies the clean token into the corrupted run."""
    values = torch.empty(model.cfg.n_layers, len(tokens))
    with torch.no_grad():
        for l in range(model.cfg.n_layers):
            name = f"blocks.{l}.hook_{point}"
            for j, t in enumerate(tokens):

                def hook(act, hook, t=t):
                    act = act.clone()
                    act[:, t] = clean_cache[hook.name][:, t]
                    return act

                values[l, j] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, hook)]))
    return values


def bench(
    label, model: HookedViT, clean, corrupted, metric, tokens=None, max_batch=256, point="resid_pre"
):
    get_act_patch = getattr(patching, f"get_act_patch_{point}")
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(f"hook_{point}"))
    token_list = list(range(model.layout.n_tokens)) if tokens is None else tokens
    groups = None if tokens is None else {f"t{t}": [t] for t in tokens}
    n_cells = model.cfg.n_layers * len(token_list)
    # warm-up
    get_act_patch(model, corrupted, cache, metric, tokens={"t0": [0]}, progress=False, layers=[0])

    def sweep():
        return get_act_patch(
            model, corrupted, cache, metric, tokens=groups, max_batch=max_batch, progress=False
        )

    t_batched, batched = timed(sweep)
    t_whole, whole = timed(sweep, "_reads_prefix_rows")  # the last block run for every token
    t_unplanned, unplanned = timed(sweep, "_plan")  # the patched block run whole
    t_loop, loop = timed(lambda: per_cell_loop(model, corrupted, cache, metric, token_list, point))
    diffs = {
        name: (result.values.reshape(loop.shape) - loop).abs().max().item()
        for name, result in (("batched", batched), ("whole", whole), ("unplanned", unplanned))
    }
    ratio = t_loop / t_batched
    phi = last_block_rows_fraction(model, corrupted)
    psi = shared_qkv_saving(model, corrupted)
    L = model.cfg.n_layers
    if point == "resid_pre":  # blocks per cell: l (less the shared q/k/v) .. L-2, the last at phi
        bound = L / ((L - 1) / 2 - (L - 1) * psi / L + phi)
    else:  # l + 1 (less the shared q/k/v) .. L-2, the last at phi (none after the last block)
        bound = L / (((L - 2) * (L - 1) / 2 - (L - 2) * psi + (L - 1) * phi) / L)
    print(
        f"{label}, {point}: {n_cells} cells, batch {clean.shape[0]} images | batched "
        f"{t_batched:.2f} s "
        f"({1e3 * t_batched / n_cells:.1f} ms/cell) | last block whole {t_whole:.2f} s | "
        f"patched block whole {t_unplanned:.2f} s | per cell {t_loop:.2f} s "
        f"({1e3 * t_loop / n_cells:.1f} ms/cell) | speed-up {ratio:.1f}x "
        f"({t_loop / t_whole:.1f}x with the whole last block, {t_loop / t_unplanned:.1f}x "
        f"with the patched block whole; bound {bound:.2f}x, the last block for the readout rows "
        f"costing {phi:.2f} of a block, the shared q/k/v saving {psi:.2f} of one) | max |diff| "
        + ", ".join(f"{name} {d:.1e}" for name, d in diffs.items())
    )
    return dict(
        model=label,
        point=point,
        cells=n_cells,
        batch=clean.shape[0],
        batched_s=t_batched,
        batched_whole_last_block_s=t_whole,
        batched_patched_block_whole_s=t_unplanned,
        per_cell_s=t_loop,
        speedup=ratio,
        speedup_whole_last_block=t_loop / t_whole,
        speedup_patched_block_whole=t_loop / t_unplanned,
        last_block_rows_fraction=phi,
        shared_qkv_saving=psi,
        block_skipping_bound=bound,
        max_abs_diff=diffs["batched"],
        max_abs_diff_whole_last_block=diffs["whole"],
        max_abs_diff_patched_block_whole=diffs["unplanned"],
    )


def timed(fn, shortcut_off: Optional[str] = None):
    """Seconds and result of ``fn()``; with ``shortcut_off`` (the name of one of ``patching``'s
    shortcut tests) answering False meanwhile, so the sweep runs without that shortcut."""
    original = getattr(patching, shortcut_off) if shortcut_off else None
    if shortcut_off:
        setattr(patching, shortcut_off, lambda *args: False)
    try:
        t0 = time.perf_counter()
        result = fn()
        return time.perf_counter() - t0, result
    finally:
        if shortcut_off:
            setattr(patching, shortcut_off, original)


def last_block_rows_fraction(model: HookedViT, images, repeats: int = 5) -> float:
    """Time of the last block for the readout's rows over the whole block (median of
    ``repeats``)."""
    block = model.blocks[-1]
    rows = slice(0, max(1, model.layout.n_prefix))
    with torch.no_grad():
        resid = model(images, stop_at_layer=model.cfg.n_layers - 1)
        return block_time_fraction(lambda: block.rows(resid, rows), lambda: block(resid), repeats)


def shared_qkv_saving(model: HookedViT, images, repeats: int = 5, rows: int = 3200) -> float:
    """One minus the time of a middle block whose input differs from the corrupted run at one
    token per image (``with_shared_qkv``) over the whole block (median of ``repeats``), with the
    images repeated as a chunk of cells repeats them, to about ``rows`` token rows."""
    layer = model.cfg.n_layers // 2
    block = model.blocks[layer]
    copies = max(1, round(rows / (images.shape[0] * model.layout.n_tokens)))
    with torch.no_grad():
        corrupted = model(images, stop_at_layer=layer)
        shared = block.shared_qkv(corrupted)
        resid = corrupted.repeat(copies, 1, 1)
        changed = torch.zeros(resid.shape[:2], dtype=torch.bool, device=resid.device)
        changed[torch.arange(resid.shape[0]), torch.arange(resid.shape[0]) % resid.shape[1]] = True
        fraction = block_time_fraction(
            lambda: block.with_shared_qkv(resid, changed, shared), lambda: block(resid), repeats
        )
    return 1 - fraction


def block_time_fraction(part, whole, repeats: int) -> float:
    """Median time of ``part()`` over that of ``whole()``, interleaved."""
    times: dict = {"part": [], "whole": []}
    for _ in range(repeats):
        for name, fn in (("whole", whole), ("part", part)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["part"]) / statistics.median(times["whole"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="image pairs for the bundled model")
    parser.add_argument(
        "--vitb-batch", type=int, default=2, help="image pairs for the ViT-B/16-shaped model"
    )
    parser.add_argument(
        "--vitb-tokens", type=int, default=16, help="tokens patched per block on ViT-B/16"
    )
    parser.add_argument(
        "--point",
        default="resid_pre",
        choices=["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"],
        help="the activation patched per block and token",
    )
    parser.add_argument("--skip-vitb", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    results = []

    from vit_embedding_lens.zoo.bundled import load_mnist_eval

    model = HookedViT.from_bundled(device=args.device)
    data = load_mnist_eval()
    clean = data.images[data.labels == 3][: args.batch].to(args.device)
    corrupted = data.images[data.labels == 8][: args.batch].to(args.device)
    metric = logit_diff(model, 3, 8)
    results.append(bench("bundled mnist-vit", model, clean, corrupted, metric, point=args.point))

    if not args.skip_vitb:
        vitb = HookedViT.from_timm(create_timm_vit("vit_base_patch16_224"), device=args.device)
        gen = torch.Generator().manual_seed(0)
        clean = torch.randn(args.vitb_batch, 3, 224, 224, generator=gen).to(args.device)
        corrupted = torch.randn(args.vitb_batch, 3, 224, 224, generator=gen).to(args.device)
        target = vitb(clean).argmax(-1)
        n = vitb.layout.n_tokens
        tokens = sorted(
            {round(i * (n - 1) / (args.vitb_tokens - 1)) for i in range(args.vitb_tokens)}
        )
        results.append(
            bench(
                "vit_base_patch16_224 (random)",
                vitb,
                clean,
                corrupted,
                logit_diff(vitb, target),
                tokens=tokens,
                max_batch=64,
                point=args.point,
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
