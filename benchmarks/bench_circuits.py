"""Node attribution patching against exact activation patching, on the same cells and batch.

Cells: every head × every token (``attn.hook_z`` of one head at one token, patched from the corrupt
run into the clean one). Two ways, timed in the same process (``--threads`` CPU threads for both,
default 1 on a shared machine; AtP: the median of ``--repeat`` runs, exact patching: one run):

    AtP     node_attribution(..., kinds=["head"], tokens=None): one corrupt forward, one clean
            forward and one backward pass for all cells
    exact   exact_node_effects(...): the batched patching sweep of interventions/patching.py
            (k cells per forward, blocks before the patched one not recomputed)

Both give ``m(clean with the cell corrupted) − m(clean)`` (AtP to first order); the Spearman rank
correlation of the two over all cells is printed with the speed ratio (target >= 20x). Also
reported: the same for token groups (CLS, object, context) and for the integrated-gradient
variant; for queries and keys (plain AtP and AtP*'s fix) and residual streams (AtP and IG) per
token group; and the time of EAP and of running circuits (faithfulness curve).

    python benchmarks/bench_circuits.py [--model mnist-vit] [--pairs 3,8] [--n 16] [--json out]
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

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.circuits import (  # noqa: E402
    class_pairs,
    edge_attribution,
    exact_node_effects,
    faithfulness_curve,
    node_attribution,
    spearman,
)
from vit_embedding_lens.zoo import load_bundled_eval  # noqa: E402

TARGET = 20.0


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-vit")
    parser.add_argument("--pairs", default="3,8", help="target,other classes")
    parser.add_argument("--n", type=int, default=16, help="image pairs in the batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (both methods)")
    parser.add_argument("--repeat", type=int, default=5, help="AtP runs (median); exact: one")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    a, b = (int(x) for x in args.pairs.split(","))
    model = HookedViT.from_bundled(args.model).to(args.device)
    data = load_bundled_eval(args.model)
    pairs = class_pairs(
        data.images, data.labels, a, b, n=args.n, object_masks=data.class_token_mask(model.layout)
    ).to(args.device)
    metric = pairs.metric(model)
    clean, corrupt = pairs.clean, pairs.corrupt
    cfg = model.cfg
    n_cells = cfg.n_layers * cfg.n_heads * model.layout.n_tokens

    # warm-up (first-call overheads)
    node_attribution(model, clean, corrupt, metric, kinds=["head"], tokens="cls")
    exact_node_effects(model, clean[:2], corrupt[:2], metric, tokens="cls")

    runs = [
        timed(lambda: node_attribution(model, clean, corrupt, metric, kinds=["head"], tokens=None))
        for _ in range(max(1, args.repeat))
    ]
    atp, t_atp = runs[0][0], statistics.median(t for _, t in runs)
    exact, t_exact = timed(lambda: exact_node_effects(model, clean, corrupt, metric, tokens=None))
    assert list(atp.node) == list(exact.node)
    ratio = t_exact / t_atp
    rho_tokens = spearman(atp.score, exact.score)
    groups = dict(tokens=["cls", "object", "context"], object_mask=pairs.object_mask)
    atp_g = node_attribution(model, clean, corrupt, metric, kinds=["head"], **groups)
    ig_g = node_attribution(model, clean, corrupt, metric, kinds=["head"], method="ig", **groups)
    exact_g = exact_node_effects(model, clean, corrupt, metric, **groups)
    ig_t = node_attribution(model, clean, corrupt, metric, kinds=["head"], method="ig")
    rho = {
        "atp_tokens": rho_tokens,
        "ig_tokens": spearman(ig_t.score, exact.score),
        "atp_groups": spearman(atp_g.score, exact_g.score),
        "ig_groups": spearman(ig_g.score, exact_g.score),
        "atp_groups_abs": spearman(atp_g.abs_score, exact_g.abs_score),
    }
    # where plain AtP is known to fail: keys and queries (saturated attention; AtP*'s fix) and
    # residual streams (a large patch; integrated gradients)
    more = exact_node_effects(model, clean, corrupt, metric, kinds=["q", "k", "resid"], **groups)
    qk_fix = node_attribution(model, clean, corrupt, metric, kinds=["q", "k"], **groups)
    qk_plain = node_attribution(
        model, clean, corrupt, metric, kinds=["q", "k"], qk_fix=False, **groups
    )
    resid_atp = node_attribution(model, clean, corrupt, metric, kinds=["resid"], **groups)
    resid_ig = node_attribution(
        model, clean, corrupt, metric, kinds=["resid"], method="ig", **groups
    )
    for kind, label, frame in [
        ("q", "q_atp_groups", qk_plain), ("q", "q_atp*_groups", qk_fix),
        ("k", "k_atp_groups", qk_plain), ("k", "k_atp*_groups", qk_fix),
        ("resid", "resid_atp_groups", resid_atp), ("resid", "resid_ig_groups", resid_ig),
    ]:  # fmt: skip
        ours, ref = frame[frame.kind == kind], more[more.kind == kind]
        assert list(ours.node) == list(ref.node)
        rho[label] = spearman(ours.score, ref.score)
    top = exact.abs_score >= exact.abs_score.quantile(0.9)
    rho["atp_tokens_top10pct"] = spearman(atp.score[top], exact.score[top])
    edges, t_eap = timed(lambda: edge_attribution(model, clean, corrupt, metric))
    curve, t_curve = timed(
        lambda: faithfulness_curve(model, clean, corrupt, metric, edges, n_random=1)
    )
    result = {
        "model": args.model,
        "classes": [a, b],
        "batch": args.n,
        "cells": n_cells,
        "atp_s": t_atp,
        "exact_s": t_exact,
        "speedup": ratio,
        "spearman": rho,
        "eap_s": t_eap,
        "curve_s": t_curve,
        "curve_circuits": len(curve),
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "atp_repeats": len(runs),
        "machine": platform.processor() or platform.machine(),
    }
    print(
        f"{args.model} {a} vs {b}, {args.n} pairs, {n_cells} head x token cells | AtP "
        f"{t_atp:.2f} s | exact patching {t_exact:.2f} s | speed-up {ratio:.1f}x (target >= "
        f"{TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'})"
    )
    print("Spearman vs exact: " + ", ".join(f"{k} {v:.3f}" for k, v in rho.items()))
    print(f"EAP {t_eap:.2f} s; faithfulness curve ({len(curve)} circuits run) {t_curve:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
