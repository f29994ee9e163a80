"""Plain vs tuned class lens on both bundled models: the numbers of docs/concepts/tuned-lens.md.

    .venv/bin/python benchmarks/tuned_lens_bundled.py [--threads 2]

Per bundled model: translators fitted (default options, seed 0) on the even-numbered eval images
(250), measured on the odd-numbered ones (250, never seen in fitting): KL of the readout from the
model's output per block, % identifiable residual-stream tokens (CLS and image tokens) per block,
and the causal check on 64 of the held-out images. Prints markdown tables.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.lens.streaming import lens_batch
from vit_embedding_lens.lens.tuned import TunedClassLens
from vit_embedding_lens.lens.tuned_checks import (
    causal_check,
    identifiability_comparison,
    kl_table,
    readout_kl,
)
from vit_embedding_lens.zoo.bundled import load_bundled_eval


def markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + " --- |" * len(cols)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("mnist-vit", "fashion-vit"):
        model = HookedViT.from_bundled(name)
        data = load_bundled_eval(name)
        fit_images = data.images[0::2]
        images, labels = data.images[1::2], data.labels[1::2]
        batches = [fit_images[i : i + 50] for i in range(0, len(fit_images), 50)]
        lens = TunedClassLens.fit(model, batches, progress=False, data=f"{name} eval, even")
        card = lens.card
        print(f"\n## {name}: fitted in {card['epochs']} epochs, {card['n_vectors']} vectors\n")
        kl = kl_table(readout_kl(model, images, {"plain": "plain", "tuned": lens}))
        wide = kl.pivot(index="block", columns="lens", values="kl_mean").reset_index()
        wide.columns = ["block", "KL plain", "KL tuned"]
        results = {
            "plain": lens_batch(model, images, labels),
            "tuned": lens_batch(model, images, labels, lens=lens),
        }
        ident = identifiability_comparison(results)
        ident = ident[(ident["layer_type"] == "resid") & (ident["metric"] == "identifiable_pct")]
        for group in ("cls", "image"):
            rows = ident[ident["token_group"] == group]
            for lens_name in ("plain", "tuned"):
                values = rows[rows["lens"] == lens_name].sort_values("block")["value"].to_numpy()
                wide[f"% {group} {lens_name}"] = values.round(1)
        print(markdown(wide))
        causal = causal_check(model, images[:64], lens)
        causal = causal[
            ["block", "lens", "k", "kl_lens_directions", "kl_random_directions", "ratio", "causal"]
        ]
        print()
        print(markdown(causal))


if __name__ == "__main__":
    main()
