"""Linear probes vs the class-space projection (METHODS §6), and probe-based token importance.

One ridge probe (alpha 1, intercept, ``±1`` one-vs-all targets) per block, per layer type
(``resid_post``, ``attn_out``, ``mlp_out``) and per token position, trained on ``k`` images per
class; its top-1 accuracy on held-out images is compared with the top-1 accuracy of the projection
onto the class space (§1) of the same tokens. The projection needs no training at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import einops
import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.attribution.readout import (
    ClassSpec,
    batch_slices,
    image_layout,
    resolve_blocks,
    resolve_classes,
)
from vit_embedding_lens.attribution.result import AttributionMap
from vit_embedding_lens.attribution.ridge import fit_ridge, one_vs_all_targets
from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.model.layout import TokenLayout
from vit_embedding_lens.model.targets import class_targets

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

LAYERS: Tuple[str, ...] = ("resid_post", "attn_out", "mlp_out")
#: float64 bytes of one batch of ridge systems solved at once (bounds the memory of large models)
_SOLVE_BYTES = 256 * 2**20


def collect_token_activations(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    layers: Sequence[str] = LAYERS,
    blocks: Optional[Sequence[int]] = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> Float[Tensor, "batch n_layer_types block pos d_model"]:
    """Every token's ``blocks.{l}.hook_{layer}`` activation, stacked
    ``[batch, layer, block, pos, d_model]``."""
    layers = _check_layers(layers)
    blocks = resolve_blocks(model, blocks)
    names = [act_name(layer, l) for layer in layers for l in blocks]
    out = []
    for sl in tqdm(
        batch_slices(images.shape[0], batch_size), desc="activations", disable=not progress
    ):
        with torch.no_grad():
            _, cache = model.run_with_cache(images[sl], names_filter=names)
        acts = torch.stack([cache[n] for n in names], dim=1)
        out.append(einops.rearrange(acts, "b (k l) n d -> b k l n d", k=len(layers)))
    return torch.cat(out)


@dataclass
class LinearProbes:
    """Ridge probes ``scores = x W + b`` for every (layer type, block, token position)."""

    weight: Float[Tensor, "n_layer_types block pos d_model class"]
    bias: Float[Tensor, "n_layer_types block pos class"]
    layers: Tuple[str, ...]
    blocks: Tuple[int, ...]
    layout: TokenLayout
    alpha: float

    def scores(
        self, acts: Float[Tensor, "batch n_layer_types block pos d_model"]
    ) -> Float[Tensor, "batch n_layer_types block pos class"]:
        """Class scores of activations laid out as :func:`collect_token_activations` returns
        them."""
        if tuple(acts.shape[1:4]) != tuple(self.weight.shape[:3]):
            raise ValueError(
                f"activations {tuple(acts.shape)} do not match the probes' [layers, blocks, "
                f"tokens] {tuple(self.weight.shape[:3])}; collect them with the same layers and "
                "blocks"
            )
        return (
            einops.einsum(acts, self.weight.to(acts.dtype), "b k l n d, k l n d c -> b k l n c")
            + self.bias
        )

    def index(self, layer: str, block: int) -> Tuple[int, int]:
        """Positions of a layer type and a block in the probe tensors (a negative ``block`` counts
        from the last trained block)."""
        if layer not in self.layers:
            raise ValueError(f"no probes for layer {layer!r}; trained layers: {self.layers}")
        if -len(self.blocks) <= block < 0:
            block = self.blocks[block]
        if block not in self.blocks:
            raise ValueError(f"no probes for block {block}; trained blocks: {self.blocks}")
        return self.layers.index(layer), self.blocks.index(block)


def fit_linear_probes(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    labels: Int[Tensor, " batch"],
    *,
    layers: Sequence[str] = LAYERS,
    blocks: Optional[Sequence[int]] = None,
    alpha: float = 1.0,
    acts: Optional[Tensor] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> LinearProbes:
    """Train one ridge probe per (layer type, block, token position) on all the given images.
    ``acts`` (from :func:`collect_token_activations`, same layers and blocks) skips the forward."""
    layers, blocks = _check_layers(layers), resolve_blocks(model, blocks)
    labels = class_targets(model, labels, images.shape[0], what="labels")
    if acts is None:
        acts = collect_token_activations(
            model, images, layers, blocks, batch_size=batch_size, progress=progress
        )
    n, k, l, t, d = acts.shape
    targets = one_vs_all_targets(labels.cpu(), model.cfg.n_classes).to(
        device=acts.device, dtype=acts.dtype
    )
    problems = einops.rearrange(acts, "b k l n d -> (k l n) b d")
    per_chunk = max(1, _SOLVE_BYTES // (8 * min(n, d) ** 2 + 8 * n * d))
    weights, biases = [], []
    for start in tqdm(
        range(0, problems.shape[0], per_chunk), desc="ridge probes", disable=not progress
    ):
        x = problems[start : start + per_chunk]
        fit = fit_ridge(x, targets.expand(x.shape[0], -1, -1), alpha)
        weights.append(fit.weight)
        biases.append(fit.bias)
    shape = dict(k=k, l=l, n=t)
    return LinearProbes(
        weight=einops.rearrange(torch.cat(weights), "(k l n) d c -> k l n d c", **shape),
        bias=einops.rearrange(torch.cat(biases), "(k l n) c -> k l n c", **shape),
        layers=tuple(layers),
        blocks=tuple(blocks),
        layout=image_layout(model, images),
        alpha=float(alpha),
    )


def sample_per_class(labels: Int[Tensor, " batch"], k: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``(train, test)`` indices: ``k`` random images of every class for training, the rest held
    out."""
    if k < 1:
        raise ValueError(f"k (images per class) must be >= 1, got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    labels = labels.cpu()
    picks = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) <= k:
            raise ValueError(
                f"class {int(c)} has {len(idx)} images; k={k} per class leaves none held out"
            )
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    train = torch.sort(torch.cat(picks)).values
    test_mask = torch.ones(len(labels), dtype=torch.bool)
    test_mask[train] = False
    return train, torch.nonzero(test_mask).flatten()


def probe_accuracy_table(
    model: HookedViT,
    probes: LinearProbes,
    images: Float[Tensor, "batch chan height width"],
    labels: Int[Tensor, " batch"],
    *,
    acts: Optional[Tensor] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Top-1 accuracy of the probes and of the class-space projection on the same tokens.

    One row per (layer, block, token position, readout): columns ``layer, block, token, label,
    kind, readout`` (``"probe"`` or ``"projection"``), ``accuracy``, ``n_images``.
    """
    labels = class_targets(model, labels, images.shape[0], what="labels")
    if acts is None:
        acts = collect_token_activations(
            model, images, probes.layers, probes.blocks, batch_size=batch_size, progress=progress
        )
    target = labels.to(acts.device)[:, None, None, None]
    probe_hit = (probes.scores(acts).argmax(-1) == target).float().mean(0)
    projection_hit = (ClassProjection(model)(acts).argmax(-1) == target).float().mean(0)
    layout = probes.layout
    k, l, t = probe_hit.shape
    names, kinds = layout.token_labels(), layout.token_kinds()
    frames = []
    for readout, hit in (("probe", probe_hit), ("projection", projection_hit)):
        grid = np.stack(
            np.meshgrid(np.arange(k), np.arange(l), np.arange(t), indexing="ij"), -1
        ).reshape(-1, 3)
        frames.append(
            pd.DataFrame(
                {
                    "layer": [probes.layers[i] for i in grid[:, 0]],
                    "block": [probes.blocks[i] for i in grid[:, 1]],
                    "token": grid[:, 2],
                    "label": [names[i] for i in grid[:, 2]],
                    "kind": [kinds[i] for i in grid[:, 2]],
                    "readout": readout,
                    "accuracy": hit.cpu().reshape(-1).numpy(),
                    "n_images": len(labels),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@dataclass
class ProbeComparison:
    """Probes trained on ``train_indices`` and the accuracy table on ``test_indices``."""

    probes: LinearProbes
    table: pd.DataFrame
    train_indices: Tensor
    test_indices: Tensor

    def summary(self) -> pd.DataFrame:
        """Mean accuracy per layer, block, token kind and readout (image tokens averaged)."""
        return (
            self.table.groupby(["layer", "block", "kind", "readout"], sort=False)["accuracy"]
            .mean()
            .reset_index()
        )


def probe_comparison(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    labels: Int[Tensor, " batch"],
    *,
    k_per_class: int = 5,
    layers: Sequence[str] = LAYERS,
    blocks: Optional[Sequence[int]] = None,
    alpha: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> ProbeComparison:
    """Train probes on ``k_per_class`` images per class (seeded choice) and compare them with the
    projection on all the other images."""
    layers, blocks = _check_layers(layers), resolve_blocks(model, blocks)
    labels = class_targets(model, labels, images.shape[0], what="labels")
    train, test = sample_per_class(labels, k_per_class, seed)
    acts = collect_token_activations(
        model, images, layers, blocks, batch_size=batch_size, progress=progress
    )
    train_d, test_d = train.to(acts.device), test.to(acts.device)
    probes = fit_linear_probes(
        model,
        images[train_d],
        labels[train],
        layers=layers,
        blocks=blocks,
        alpha=alpha,
        acts=acts[train_d],
        progress=progress,
    )
    table = probe_accuracy_table(
        model, probes, images[test_d], labels[test], acts=acts[test_d], progress=progress
    )
    return ProbeComparison(probes=probes, table=table, train_indices=train, test_indices=test)


class ProbeAttribution:
    """Token importance from probes: the probe's score of the class of interest for every image
    token at one block and layer type (each token read by the probe trained at its position).

    Call it like the other attribution functions:
    ``ProbeAttribution(probes)(model, images, classes)``.
    """

    def __init__(self, probes: LinearProbes, block: int = -1, layer: str = "resid_post") -> None:
        self.probes = probes
        self.layer_index, self.block_index = probes.index(layer, block)
        self.layer, self.block = layer, probes.blocks[self.block_index]

    def __call__(
        self,
        model: HookedViT,
        images: Float[Tensor, "batch chan height width"],
        classes: ClassSpec = None,
        *,
        batch_size: int = 64,
        progress: bool = True,
    ) -> AttributionMap:
        layout = image_layout(model, images)
        if layout != self.probes.layout:
            raise ValueError(
                f"these images give a {layout.grid_size} grid with {layout.n_prefix} prefix "
                f"tokens; the probes were trained on {self.probes.layout.grid_size} with "
                f"{self.probes.layout.n_prefix}"
            )
        classes = resolve_classes(model, images, classes)
        acts = collect_token_activations(
            model, images, [self.layer], [self.block], batch_size=batch_size, progress=progress
        )[:, 0, 0]
        weight = self.probes.weight[self.layer_index, self.block_index].to(acts.dtype)  # [N, d, C]
        bias = self.probes.bias[self.layer_index, self.block_index]
        scores = einops.einsum(acts, weight, "b n d, n d c -> b n c") + bias
        chosen = scores.gather(-1, classes[:, None, None].expand(-1, scores.shape[1], 1))[..., 0]
        return AttributionMap(
            scores=chosen[:, layout.n_prefix :], layout=layout, classes=classes, method="probe"
        )


def _check_layers(layers: Sequence[str]) -> List[str]:
    if isinstance(layers, str):
        layers = [layers]
    bad = [x for x in layers if x not in LAYERS]
    if bad or not layers:
        raise ValueError(f"layer types must be among {LAYERS}, got {list(layers)}")
    return list(layers)
