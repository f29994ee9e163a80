"""The image representation as an exact sum of direct contributions (METHODS §8; Gandelsman,
Efros, Steinhardt, "Interpreting CLIP's Image Representation via Text-Based Decomposition", ICLR
2024), and the attention pool's output as per-token terms.

The representation is what the head reads before its L2 normalization: the projected features
(``hook_image_embed``) of a tower with a projection, else the pooled vector (``hook_pooled``). With
the final norm's statistics frozen at their actual values (the scale of the pooled token, or of
each pooled token), everything between the residual stream and the representation is linear, so
the residual's parts map to parts of the representation that sum to it exactly: the embeddings,
every block's attention (per head, and per source token through the attention weights for CLS
models) and MLP, the biases, and for SigLIP's attention pool its MLP's output as one term.

:func:`pool_decomposition` splits the pool's attention output into per-token terms through the
probe's attention weights. :func:`mean_ablation` replaces the direct contributions of all but the
last ``k`` blocks by their data-set means and reports the accuracy kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, cast

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.model.components import CosineHead
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.model.targets import class_targets

if TYPE_CHECKING:
    from vit_embedding_lens.model.components import TransformerBlock
    from vit_embedding_lens.model.hooked_vit import HookedViT

__all__ = [
    "PoolDecomposition",
    "RepresentationDecomposition",
    "decompose_representation",
    "mean_ablation",
    "pool_decomposition",
]


# -------------------------------------------------------------------------------------------------
# The attention pool's output as per-token terms
# -------------------------------------------------------------------------------------------------
@dataclass
class PoolDecomposition:
    """The attention pool's output ``pooled = sum_j token_terms[:, j] + bias + mlp``.

    ``token_terms`` ``[batch, pos, head, d_model]``: what pooled token ``j`` writes through head
    ``h`` (``p[h, j] (ln(x_j) W_V[h] + b_V[h]) W_O[h]``, ``p`` the probe's attention), in layout
    order (tokens the pool does not read are zero); ``bias`` ``[d_model]`` is ``b_O``; ``mlp``
    ``[batch, d_model]`` the pool MLP's output (one nonlinear term, ``mlp(ln(attn_out))``);
    ``pooled`` the pool's actual output.
    """

    token_terms: Float[Tensor, "batch pos head d_model"]
    bias: Float[Tensor, " d_model"]
    mlp: Float[Tensor, "batch d_model"]
    pooled: Float[Tensor, "batch d_model"]

    @property
    def attn_out(self) -> Float[Tensor, "batch d_model"]:
        """The pool's attention output: the token terms and ``b_O``."""
        return self.token_terms.sum((1, 2)) + self.bias

    def total(self) -> Float[Tensor, "batch d_model"]:
        """The sum of every term: equals ``pooled``."""
        return self.attn_out + self.mlp

    def per_token(self) -> Float[Tensor, "batch pos d_model"]:
        """Each token's term summed over the pool's heads."""
        return self.token_terms.sum(2)


def pool_decomposition(model: "HookedViT", images: Tensor) -> PoolDecomposition:
    """Split an attention-pool (MAP, SigLIP) model's pooled vector into per-token, per-head terms
    through the probe's attention weights (one forward pass)."""
    cfg = model.cfg
    if cfg.global_pool != "map":
        raise ValueError(
            f"{cfg.model_name} pools with global_pool={cfg.global_pool!r}, not an attention pool"
        )
    names = ["attn_pool.hook_pattern", "attn_pool.hook_v", "attn_pool.hook_mlp_out", "hook_pooled"]
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=names)
    pool = model.attn_pool
    v, pattern = cache["attn_pool.hook_v"], cache["attn_pool.hook_pattern"][:, :, 0]  # [B,n,H,e]
    terms = torch.einsum("bhn,bnhe,hed->bnhd", pattern, v, pool.W_O.detach())
    start = 0 if cfg.pool_include_prefix else model.layout.n_prefix
    full = terms.new_zeros(terms.shape[0], start + terms.shape[1], *terms.shape[2:])
    full[:, start:] = terms
    return PoolDecomposition(
        token_terms=full,
        bias=pool.b_O.detach().clone(),
        mlp=cache["attn_pool.hook_mlp_out"],
        pooled=cache["hook_pooled"],
    )


# -------------------------------------------------------------------------------------------------
# The representation as a sum of direct contributions
# -------------------------------------------------------------------------------------------------
@dataclass
class RepresentationDecomposition:
    """``representation = terms.sum(1)`` (up to float rounding), one row of ``labels`` per term.

    ``terms`` ``[batch, term, d]``; ``labels`` (a DataFrame, one row per term): ``kind``
    (``"embed"``, ``"attn"``, ``"attn_bias"``, ``"mlp"``, ``"pool_mlp"``, ``"bias"``), ``block``,
    ``head`` and ``token`` (-1 where they do not apply). ``representation`` ``[batch, d]``: the
    model's own (``hook_image_embed``, else ``hook_pooled``).
    """

    terms: Float[Tensor, "batch term d"]
    labels: pd.DataFrame
    representation: Float[Tensor, "batch d"]
    model: "HookedViT"

    def total(self) -> Float[Tensor, "batch d"]:
        return self.terms.sum(1)

    def direct_logits(self) -> Float[Tensor, "batch term class"]:
        """Each term read in the class space: ``logit_scale * term / |representation| @ E.T`` for a
        cosine (zero-shot, text-defined) head, ``term @ W_head`` for a linear head. They sum to the
        logits minus the head's bias (:meth:`head_bias`)."""
        head = self.model.classifier_head()
        W = head.W_head.detach().to(self.terms.dtype)
        if self.model.cfg.head_type == "cosine":
            norm = self.representation.norm(dim=-1)[:, None, None]
            return head.logit_scale.to(self.terms.dtype) * (self.terms / norm) @ W
        return self.terms @ W

    def head_bias(self) -> Float[Tensor, " class"]:
        """What the head adds to every logit besides the terms (``logit_bias``, or ``b_head``; a
        projection's bias is already a term)."""
        head = self.model.classifier_head()
        bias: Tensor = head.logit_bias if isinstance(head, CosineHead) else head.b_head
        return bias.detach().expand(self.model.cfg.n_classes)

    def frame(self, reduce: str = "norm", classes: Optional[Tensor] = None) -> pd.DataFrame:
        """One row per image and term, with ``labels``' columns and the term's size:
        ``reduce="norm"`` its L2 norm (column ``norm``); ``reduce="logit"`` its direct logit
        (:meth:`direct_logits`) for one class per image (column ``logit``, and ``class``):
        ``classes`` ``[batch]``, default the model's prediction."""
        if reduce == "norm":
            sizes = self.terms.norm(dim=-1).cpu().numpy()
            frames = [self.labels.assign(image=i, norm=sizes[i]) for i in range(sizes.shape[0])]
            return pd.concat(frames, ignore_index=True)
        if reduce != "logit":
            raise ValueError(f"reduce must be 'norm' or 'logit', got {reduce!r}")
        direct = self.direct_logits()  # [batch, term, class]
        if classes is None:
            classes = (direct.sum(1) + self.head_bias()).argmax(-1)
        classes = class_targets(self.model, classes, direct.shape[0], broadcast=True)
        picked = direct.gather(
            -1, classes.to(direct.device)[:, None, None].expand(-1, direct.shape[1], 1)
        )
        values = picked[..., 0].cpu().numpy()
        ids = classes.tolist()
        frames = [
            self.labels.assign(image=i, **{"class": ids[i]}, logit=values[i])
            for i in range(values.shape[0])
        ]
        return pd.concat(frames, ignore_index=True)


def decompose_representation(
    model: "HookedViT",
    images: Tensor,
    *,
    per_head: bool = True,
    per_token: bool = False,
) -> RepresentationDecomposition:
    """The representation of ``images`` as the exact sum of direct contributions (one forward).

    Terms: ``embed`` (the first block's input: patch, prefix and position embeddings, after
    ``ln_pre``), per block ``attn`` (per head with ``per_head``; per head and token with
    ``per_token``) and ``attn_bias`` (``b_O``), ``mlp``; the attention pool's MLP output
    (``pool_mlp``) for MAP models; ``bias`` (the final norm's bias, the pool's value biases and
    ``b_O``, ``b_proj``, through the rest). The final norm's statistics are frozen at their actual
    values. Residual post-norm blocks are refused (their write-ins are not sums over heads).

    ``token`` with ``per_token``: for CLS models the *source* token the CLS token attends to
    (through the block's attention pattern, as Gandelsman et al.); for pooling models (average or
    attention pool) the pooled *position* whose residual the head writes into, read through the
    pool (the probe's attention weights for MAP). Either way the terms sum to the per-head terms.
    """
    cfg = model.cfg
    if cfg.block_norm != "pre":
        raise ValueError(
            f"{cfg.model_name} has residual post-norm blocks: their write-ins pass a norm, so the "
            "representation is not a sum of per-block terms"
        )
    if cfg.global_pool not in ("token", "avg", "map"):
        raise ValueError(f"{cfg.model_name}: global_pool={cfg.global_pool!r} is not linear")
    if cfg.has_dist_token:
        raise ValueError(f"{cfg.model_name} is distilled (two pooled tokens): not supported")
    L = cfg.n_layers
    names = [act_name("resid_pre", 0), "ln_final.hook_scale", "hook_pooled"]
    if cfg.d_embed:
        names.append("hook_image_embed")
    if cfg.global_pool == "map":
        names += ["attn_pool.hook_pattern", "attn_pool.hook_mlp_out"]
    for l in range(L):
        names += [act_name("attn_out", l), act_name("mlp_out", l)]
        if per_head or per_token:
            names.append(act_name("z", l))
        if per_token and cfg.global_pool == "token":
            names += [act_name("pattern", l), act_name("v", l)]
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=names)
        phi, constant = _frozen_readout(model, cache)
        pool_start = 0 if cfg.pool_include_prefix else model.layout.n_prefix
        terms: List[Tensor] = []
        rows: List[Tuple[str, int, int, int]] = []

        def add(term: Tensor, kind: str, block: int = -1, head: int = -1, token: int = -1) -> None:
            terms.append(term)
            rows.append((kind, block, head, token))

        add(phi(cache[act_name("resid_pre", 0)]), "embed")
        for l in range(L):
            attn = cast("TransformerBlock", model.blocks[l]).attn
            W_O, b_O = attn.W_O.detach(), attn.b_O.detach()
            if per_token and cfg.global_pool == "token":
                cls = model.layout.cls_index
                p = cache[act_name("pattern", l)][:, :, cls]  # [B, H, src]
                written = torch.einsum("bshe,hed->bhsd", cache[act_name("v", l)], W_O)
                at_cls = p[..., None] * written  # [B, H, src, d] at the CLS position
                read = phi(at_cls.transpose(1, 2)[:, None], at=0)  # [B, src, H, d_r]
                for h in range(cfg.n_heads):
                    for s in range(read.shape[1]):
                        add(read[:, s, h], "attn", l, h, s)
            elif per_token:  # pooled positions, read through the pool
                per = torch.einsum("bnhe,hed->bnhd", cache[act_name("z", l)], W_O)
                read = phi(per, by_position=True)  # [B, n, H, d_r]
                for h in range(cfg.n_heads):
                    for j in range(read.shape[1]):
                        add(read[:, j, h], "attn", l, h, pool_start + j)
            elif per_head:
                per = torch.einsum("bnhe,hed->bnhd", cache[act_name("z", l)], W_O)
                read = phi(per)  # [B, H, d_r]
                for h in range(cfg.n_heads):
                    add(read[:, h], "attn", l, h)
            else:
                attn_out = cache[act_name("attn_out", l)]
                add(phi(attn_out - b_O), "attn", l)
            add(phi(b_O.expand_as(cache[act_name("attn_out", l)])), "attn_bias", l)
            add(phi(cache[act_name("mlp_out", l)]), "mlp", l)
        if cfg.global_pool == "map":
            add(_to_features(model, cache["attn_pool.hook_mlp_out"]), "pool_mlp")
        add(constant, "bias")
    labels = pd.DataFrame(rows, columns=["kind", "block", "head", "token"])
    representation = cache["hook_image_embed"] if cfg.d_embed else cache["hook_pooled"]
    return RepresentationDecomposition(torch.stack(terms, 1), labels, representation, model)


def _to_features(model: "HookedViT", x: Tensor) -> Tensor:
    """``x @ W_proj`` (no bias) for a tower with a projection, else ``x``."""
    return x @ model.proj.W_proj.detach() if model.cfg.d_embed else x


def _frozen_readout(
    model: "HookedViT", cache
) -> Tuple[Callable[..., Tensor], Float[Tensor, "batch d"]]:
    """``(phi, constant)``: ``phi(T)`` maps a residual-stream part ``T`` ``[batch, pos, *extra,
    d_model]`` linearly to the representation ``[batch, *extra, d]`` with the final norm's
    statistics frozen; ``constant`` is what the biases add. ``phi(T, at=0)`` reads position 0 of
    ``T`` as the CLS position (per-source-token terms); ``phi(T, by_position=True)`` (pooling
    models) keeps the pooled positions apart, ``[batch, n, *extra, d]``, summing to ``phi(T)``."""
    cfg, layout = model.cfg, model.layout
    ln = model.ln_final
    w = ln.w.detach() if ln.affine else None
    b = ln.b.detach() if ln.affine else None
    scale = cache["ln_final.hook_scale"]  # [B, pos, 1] (tokens) or [B, 1] (pooled)

    def affine(x: Tensor, sigma: Tensor) -> Tensor:
        """The frozen norm without its bias: centre, divide by the actual scale, weight."""
        x = (x - x.mean(-1, keepdim=True)) / sigma
        return x * w if w is not None else x

    def bias_of(x: Tensor) -> Tensor:
        return b if b is not None else x.new_zeros(x.shape[-1])

    def expand(sigma: Tensor, extra: int) -> Tensor:
        return sigma.reshape(sigma.shape + (1,) * extra)

    pool_start = 0 if cfg.pool_include_prefix else layout.n_prefix
    pooled = cache["hook_pooled"]
    if cfg.global_pool == "token":
        cls = layout.cls_index
        # the CLS token's own scale (final norm on the tokens) or the pooled vector's (fc_norm)
        sigma_cls = scale[:, cls] if cfg.final_norm == "tokens" else scale  # [B, 1]

        def phi(T: Tensor, at: Optional[int] = None, by_position: bool = False) -> Tensor:
            x = T[:, cls if at is None else at]
            return _to_features(model, affine(x, expand(sigma_cls, x.ndim - 2)))

        constant = _to_features(model, bias_of(pooled).expand_as(pooled))
    elif cfg.global_pool == "avg" and cfg.final_norm == "tokens":

        def phi(T: Tensor, at: Optional[int] = None, by_position: bool = False) -> Tensor:
            x = T[:, pool_start:]
            sigma = expand(scale[:, pool_start:], x.ndim - 3)
            normed = affine(x, sigma)
            return _to_features(model, normed / x.shape[1] if by_position else normed.mean(1))

        constant = _to_features(model, bias_of(pooled).expand_as(pooled))
    elif cfg.global_pool == "avg":  # fc_norm after the mean

        def phi(T: Tensor, at: Optional[int] = None, by_position: bool = False) -> Tensor:
            if by_position:
                x = T[:, pool_start:] / (T.shape[1] - pool_start)
                return _to_features(model, affine(x, expand(scale[:, None], x.ndim - 3)))
            x = T[:, pool_start:].mean(1)
            return _to_features(model, affine(x, expand(scale, x.ndim - 2)))

        constant = _to_features(model, bias_of(pooled).expand_as(pooled))
    else:  # the attention pool: per pooled token its own frozen scale, the probe's weights
        pool = model.attn_pool
        q = cache["attn_pool.hook_pattern"][:, :, 0]  # [B, H, n]
        W_V, W_O = pool.W_V.detach(), pool.W_O.detach()

        def phi(T: Tensor, at: Optional[int] = None, by_position: bool = False) -> Tensor:
            x = T[:, pool_start:]
            n = affine(x, expand(scale[:, pool_start:], x.ndim - 3))
            flat = n.reshape(n.shape[0], n.shape[1], -1, n.shape[-1])  # [B, n, E, d]
            v = torch.einsum("bned,hdf->bnehf", flat, W_V)
            if by_position:  # each pooled position's share, by the probe's weights
                out = torch.einsum("bhn,bnehf,hfd->bned", q, v, W_O)
                return _to_features(model, out.reshape(n.shape))
            z = torch.einsum("bhn,bnehf->behf", q, v)
            out = torch.einsum("behf,hfd->bed", z, W_O)
            return _to_features(model, out.reshape(n.shape[:1] + n.shape[2:]))

        b_vo = torch.einsum("hf,hfd->d", pool.b_V.detach(), W_O) + pool.b_O.detach()
        if b is not None:
            b_vo = b_vo + torch.einsum("d,hdf,hfe->e", b, W_V, W_O)
        constant = _to_features(model, b_vo.expand_as(pooled))
    if cfg.d_embed and cfg.proj_bias:
        constant = constant + model.proj.b_proj.detach()
    return phi, constant


# -------------------------------------------------------------------------------------------------
# Mean-ablation of all but the last k blocks
# -------------------------------------------------------------------------------------------------
def mean_ablation(
    model: "HookedViT",
    images: Tensor,
    labels,
    *,
    ks: Optional[Sequence[int]] = None,
    batch_size: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """Accuracy kept when the direct contributions (attention, its bias, MLP) of all but the last
    ``k`` blocks are replaced by their means over ``images`` (Gandelsman et al.'s test of which
    layers write the representation directly).

    Returns one row per ``k`` (default ``0..n_layers``): ``k``, ``ablated_blocks``, ``accuracy``
    (top-1 of the head on the ablated representation against ``labels``) and ``agreement`` (with
    the model's own predictions). ``k = n_layers`` ablates nothing and keeps the model's accuracy
    exactly.
    """
    cfg = model.cfg
    if not cfg.n_classes:
        raise ValueError(f"{cfg.model_name} has no head (class space) to measure accuracy with")
    L = cfg.n_layers
    ks = list(range(L + 1)) if ks is None else [int(k) for k in ks]
    if not ks or any(not 0 <= k <= L for k in ks):
        raise ValueError(f"k must lie in [0, {L}] (blocks kept), got {ks}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not isinstance(images, Tensor) or images.ndim != 4:
        model.check_images(images)  # the model's own message for what it cannot take
    if images.shape[0] == 0:
        raise ValueError("mean_ablation needs at least one image (the means are over images)")
    target = class_targets(model, labels, images.shape[0], what="labels")
    param = next(model.parameters())
    parts: List[Tensor] = []
    reps: List[Tensor] = []
    labels_frame: Optional[pd.DataFrame] = None
    starts = range(0, images.shape[0], batch_size)
    for start in tqdm(starts, disable=not progress, desc="mean ablation", unit="batch"):
        chunk = images[start : start + batch_size].to(device=param.device, dtype=param.dtype)
        dec = decompose_representation(model, chunk, per_head=False)
        parts.append(dec.terms.cpu())
        reps.append(dec.representation.cpu())
        labels_frame = dec.labels
    assert labels_frame is not None
    terms, representation = torch.cat(parts), torch.cat(reps)
    means = terms.mean(0, keepdim=True)
    blocks = torch.tensor(labels_frame["block"].tolist())
    ablatable = torch.tensor(labels_frame["kind"].isin(["attn", "attn_bias", "mlp"]).tolist())
    head = model.classifier_head()
    with torch.no_grad():
        own = head(representation.to(param.device)).argmax(-1).cpu()
        rows: List[Dict[str, float]] = []
        for k in ks:
            ablate = ablatable & (blocks >= 0) & (blocks < L - k)
            shift = (terms[:, ablate] - means[:, ablate]).sum(1)
            ablated = representation - shift if bool(ablate.any()) else representation
            pred = head(ablated.to(param.device)).argmax(-1).cpu()
            rows.append(
                {
                    "k": k,
                    "ablated_blocks": L - k,
                    "accuracy": float((pred == target.cpu()).float().mean()),
                    "agreement": float((pred == own).float().mean()),
                }
            )
    return pd.DataFrame(rows)
