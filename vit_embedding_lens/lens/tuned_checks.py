"""Plain vs tuned class lens, measured: KL to the model's final output per block at the readout,
identifiability side by side, and the causal check of the directions each lens relies on.

The causal check is Belrose et al.'s causal-basis idea, in short: for each block, the ``k``
residual directions a lens's readout relies on most (the top singular vectors of its linear map
from the block's ``resid_post`` to centred class logits) are projected out of the residual stream
in a real forward pass, and the change of the model's real output (mean KL from the clean output)
is compared with projecting out ``k`` random orthonormal directions (seeded, averaged over draws).
A lens whose directions matter no more than random ones fits the output without reading what the
model uses: it is reported as not causal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from vit_embedding_lens.lens.metrics import identifiability_table
from vit_embedding_lens.lens.projection import ClassProjection, classifier_head
from vit_embedding_lens.lens.streaming import LensResult
from vit_embedding_lens.lens.tuned import TunedClassLens, kl_divergence, resolve_lens
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.model.indices import resolve_blocks
from vit_embedding_lens.model.readout import readout_vector

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: a lens's directions are called causal when they move the output this many times more than
#: random directions
CAUSAL_MARGIN = 2.0

__all__ = [
    "CAUSAL_MARGIN",
    "ReadoutKLReader",
    "causal_check",
    "identifiability_comparison",
    "kl_table",
    "lens_directions",
    "readout_kl",
]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` over the last axis (float64)."""
    return kl_divergence(log_p.double(), log_q.double())


class ReadoutKLReader:
    """Hooks that read every block's pooled readout vector through each lens during a forward
    pass and, at the end, its KL divergence from the model's real output (``hook_logits``).

    ``lenses`` maps a name (``"plain"``, ``"tuned"``) to a lens. After the forward, :attr:`result`
    maps each name to ``[batch, block]`` KL values (float64, CPU). The readout vector is the mean of
    ``resid_post`` over :func:`~vit_embedding_lens.model.readout.readout_positions` (the CLS token
    for CLS models), read through the final norm and head. An attention pool has no readout vector:
    there every token of the block is translated and the model's whole readout (the pool over all
    tokens) reads them, which is the model's output at the last block.
    """

    def __init__(self, model: "HookedViT", lenses: Mapping[str, Any]) -> None:
        self.model = model
        self.lenses = {name: resolve_lens(model, lens) for name, lens in lenses.items()}
        param = next(model.parameters())
        self.dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.proj = ClassProjection(model).to(device=param.device, dtype=self.dtype)
        self.layout = model.layout
        self._logp: Dict[str, List[Tensor]] = {}
        self._final: Optional[Tensor] = None

    def hooks(self) -> List[Tuple[str, Callable[..., Any]]]:
        hooks: List[Tuple[str, Callable[..., Any]]] = []
        for layer in range(self.model.cfg.n_layers):
            hooks.append((act_name("resid_post", layer), self._block_hook(layer)))
        hooks.append(("hook_logits", self._on_logits))
        return hooks

    def start(self, layout: Any = None) -> None:
        """Prepare for one forward pass (``layout`` for other input sizes)."""
        self.layout = self.model.layout if layout is None else layout
        self._logp = {name: [] for name in self.lenses}
        self._final = None

    def _block_hook(self, layer: int) -> Callable[..., Any]:
        def hook(resid: Tensor, hook: Any) -> None:
            if self.model.cfg.global_pool == "map":  # the whole readout, the pool over all tokens
                stream = resid.detach().to(self.dtype)
                for name, lens in self.lenses.items():
                    v = stream if lens is None else lens.translate(layer, stream)
                    logits = self.model.readout(v.to(resid.dtype), fire_hooks=False)
                    self._logp[name].append(torch.log_softmax(logits.to(self.dtype), -1))
                return
            pooled = readout_vector(self.model, resid.detach(), self.layout, self.dtype)
            for name, lens in self.lenses.items():
                v = pooled if lens is None else lens.translate(layer, pooled)
                self._logp[name].append(torch.log_softmax(self.proj(v), -1))

        return hook

    def _on_logits(self, logits: Tensor, hook: Any) -> None:
        self._final = torch.log_softmax(logits.detach().to(self.dtype), -1)

    @property
    def result(self) -> Dict[str, Float[Tensor, "batch block"]]:
        if self._final is None:
            raise RuntimeError("ReadoutKLReader: no forward pass recorded (call start, then run)")
        final = self._final[:, None]
        return {name: _kl(final, torch.stack(parts, 1)).cpu() for name, parts in self._logp.items()}


def readout_kl(
    model: "HookedViT", images: Tensor, lenses: Mapping[str, Any]
) -> Dict[str, Float[Tensor, "batch block"]]:
    """Per image and block, ``KL(model output || lens reading of the pooled readout vector)`` for
    each named lens (one forward pass)."""
    reader = ReadoutKLReader(model, lenses)
    layout = model.layout_for(images.shape[-2:]) if model.cfg.dynamic_img_size else None
    reader.start(layout)
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, f) for n, f in reader.hooks()]):
        model(images)
    return reader.result


def kl_table(kl: Mapping[str, Float[Tensor, "batch block"]]) -> pd.DataFrame:
    """Tidy table of per-image KL values (from :func:`readout_kl` or the runner): one row per
    block and lens with ``kl_mean``, ``kl_median`` and ``n_images``."""
    rows = []
    for name, values in kl.items():
        values = torch.as_tensor(values, dtype=torch.float64)
        for block in range(values.shape[1]):
            column = values[:, block]
            rows.append(
                dict(
                    block=block,
                    lens=name,
                    kl_mean=float(column.mean()),
                    kl_median=float(column.median()),
                    n_images=int(values.shape[0]),
                )
            )
    return pd.DataFrame(rows)


def identifiability_comparison(results: Mapping[str, LensResult]) -> pd.DataFrame:
    """:func:`~vit_embedding_lens.lens.metrics.identifiability_table` of each lens's result, with
    a ``lens`` column, stacked (plain and tuned side by side)."""
    frames = [identifiability_table(r).assign(lens=name) for name, r in results.items()]
    return pd.concat(frames, ignore_index=True)


def lens_directions(
    model: "HookedViT", lens: Any, block: int, k: int
) -> Float[Tensor, "d_model k"]:
    """The ``k`` orthonormal residual directions a lens's readout of ``block`` relies on most:
    the top left singular vectors of the linear map ``M_l C W C'`` from ``resid_post`` to class
    logits (``C``: centring over ``d_model``, ``W``: the folded head, ``C'``: centring over
    classes). For the plain lens ``M_l = I``. Heads that are not linear after the norm use their
    linear class map (:func:`~vit_embedding_lens.lens.projection.classifier_head`: a cosine head's
    without the per-image normalization, which only rescales; an attention pool's direct path)."""
    tuned = resolve_lens(model, lens)
    proj = ClassProjection(model).to(dtype=torch.float64, device=torch.device("cpu"))
    weight = proj.weight
    if not proj.linear:  # the linear class map (a cosine head without its per-image norm; a
        # pool's direct path), with the final norm's scale folded in as ClassProjection does
        with torch.no_grad():
            weight, _ = classifier_head(model)
            ln = model.ln_final
            weight = weight.detach().double().cpu()
            if ln.affine:
                weight = ln.w.detach().double().cpu()[:, None] * weight
    weight = weight - weight.mean(0, keepdim=True)  # C W (centring the input)
    weight = weight - weight.mean(1, keepdim=True)  # ... C' (centred logits)
    if tuned is not None:
        weight = tuned.matrix(block).double() @ weight
    rank = min(weight.shape)
    if not 1 <= k <= rank:
        raise ValueError(f"k must lie in [1, {rank}] (the readout map's size), got {k}")
    u, _, _ = torch.linalg.svd(weight, full_matrices=False)
    return u[:, :k]


def _ablated_kl(
    model: "HookedViT", images: Tensor, clean: Tensor, block: int, directions: Tensor
) -> float:
    """Mean ``KL(clean || output with ``directions`` projected out of resid_post block)``."""
    param = next(model.parameters())
    u = directions.to(device=param.device, dtype=param.dtype)

    def ablate(resid: Tensor, hook: Any) -> Tensor:
        return resid - (resid @ u) @ u.T

    with torch.no_grad():
        logits = model.run_with_hooks(images, fwd_hooks=[(act_name("resid_post", block), ablate)])
    return float(_kl(clean, torch.log_softmax(logits.double(), -1)).mean())


def causal_check(
    model: "HookedViT",
    images: Tensor,
    lens: TunedClassLens,
    *,
    blocks: Optional[Sequence[int]] = None,
    k: Optional[int] = None,
    n_random: int = 3,
    seed: int = 0,
    margin: float = CAUSAL_MARGIN,
) -> pd.DataFrame:
    """For each block and each lens (plain and ``lens``): the mean KL of the model's output when the
    lens's top-``k`` directions (:func:`lens_directions`) are projected out of ``resid_post``, vs
    ``k`` random orthonormal directions (``n_random`` seeded draws, averaged).

    Columns: block, lens, k, kl_lens_directions, kl_random_directions, ratio, causal (ratio >
    ``margin``), n_images, n_random. ``k`` defaults to ``min(n_classes - 1, 10)``."""
    tuned = resolve_lens(model, lens)
    if tuned is None:
        raise ValueError("causal_check needs a TunedClassLens (the plain lens is read beside it)")
    if n_random < 1:
        raise ValueError(f"n_random must be at least 1, got {n_random}")
    cfg = model.cfg
    k = min(cfg.n_classes - 1, 10) if k is None else k
    blocks = resolve_blocks(model, None if blocks is None else list(blocks))
    with torch.no_grad():
        clean = torch.log_softmax(model(images).double(), -1)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for block in blocks:
        randoms = []
        for _ in range(n_random):
            q, _ = torch.linalg.qr(torch.randn(cfg.d_model, k, generator=gen, dtype=torch.float64))
            randoms.append(_ablated_kl(model, images, clean, block, q))
        kl_random = sum(randoms) / n_random
        for name, which in (("plain", None), ("tuned", tuned)):
            kl_lens = _ablated_kl(
                model, images, clean, block, lens_directions(model, which, block, k)
            )
            ratio = kl_lens / kl_random if kl_random > 0 else float("inf")
            rows.append(
                dict(
                    block=block,
                    lens=name,
                    k=k,
                    kl_lens_directions=kl_lens,
                    kl_random_directions=kl_random,
                    ratio=ratio,
                    causal=bool(ratio > margin),
                    n_images=int(images.shape[0]),
                    n_random=n_random,
                )
            )
    return pd.DataFrame(rows)
