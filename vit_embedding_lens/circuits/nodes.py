"""Node attribution patching: which heads, MLPs and residual streams carry a class decision.

``score(n) = (a_n(corrupt) − a_n(clean)) · ∂m/∂a_n(clean)``: the first-order estimate of the
change of the metric ``m`` when node ``n`` alone is patched from the corrupt run into the clean
one (Nanda 2023; Kramár et al. 2024), summed over the tokens of a token group and averaged over
images. One forward and one backward pass of the clean images give every node at every token.

Nodes: ``"a{l}.h{h}"`` (a head's result ``z · W_O``, what it adds to the residual stream),
``"m{l}"`` (an MLP's output), ``"r{l}"`` (the residual stream entering block ``l``; ``"r0"`` is the
embedding). Variants (``method=``):

- ``"atp"``: the gradient at the clean run;
- ``"ig"``: the gradient averaged over ``steps`` points on the straight path from the clean to the
  corrupt embeddings (midpoint rule; the "inputs" variant of EAP-IG, Hanna et al. 2024), which
  fixes AtP where the metric saturates (a probability near 0 or 1, a softmax whose gradient
  vanishes at the clean point);
- ``"graddrop"``: AtP*'s GradDrop (Kramár et al. 2024): for each block ``l`` the gradient is taken
  with block ``l``'s attention and MLP passing no gradient back to their inputs, and the score is
  the mean over blocks of the absolute values (unsigned: it fights the cancellation of paths that
  hides a node from plain AtP).

Queries and keys (``kinds=["q", "k"]``, nodes ``"a{l}.h{h}.q"`` / ``"a{l}.h{h}.k"``): AtP fails
for them where the attention saturates (a softmax far from linear); AtP*'s fix (``qk_fix``,
method ``"atp*"``) recomputes the attention pattern exactly and keeps only the pattern's effect on
the metric linear.

:func:`exact_node_effects` measures the same quantity by activation patching
(:mod:`vit_embedding_lens.interventions.patching`), the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.circuits.graph import (
    Corrupt,
    Metric,
    ablated_senders,
    check_logit_metric,
    check_pair,
    differentiable_metric,
    head_name,
    mlp_name,
    node_with_group,
    resid_name,
    scalar_metric,
    sender_hook_names,
    senders_from_cache,
    tokens_by_group,
)
from vit_embedding_lens.circuits.groups import Groups, token_groups
from vit_embedding_lens.interventions.patching import sweep
from vit_embedding_lens.model.hook_names import act_name

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

NodeMethod = Literal["atp", "ig", "graddrop"]
NodeKind = Literal["head", "mlp", "resid", "q", "k"]
NODE_KINDS: Tuple[NodeKind, ...] = ("head", "mlp", "resid")
#: every node kind: also the heads' queries and keys (``"a{l}.h{h}.q"``, ``"a{l}.h{h}.k"``)
ALL_NODE_KINDS: Tuple[NodeKind, ...] = ("head", "mlp", "resid", "q", "k")
#: columns of the node score table
NODE_COLUMNS = (
    "node", "component", "kind", "block", "head", "group", "score", "abs_score", "method",
)  # fmt: skip


def node_attribution(
    model: HookedViT,
    clean: Tensor,
    corrupt: Corrupt,
    metric: Metric,
    *,
    tokens: Groups = None,
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    kinds: Sequence[NodeKind] = NODE_KINDS,
    method: NodeMethod = "atp",
    steps: int = 5,
    qk_fix: bool = True,
    progress: bool = False,
) -> pd.DataFrame:
    """Node attribution scores of every head, MLP and residual stream (and, if asked, every
    head's query and key) per token group.

    ``clean``: images ``[batch, chan, height, width]``; ``corrupt``: their counterfactual images
    (same shape) or an :class:`~vit_embedding_lens.circuits.graph.AblationReference` (mean or
    resample ablation). ``metric``: a function of the logits, e.g.
    :func:`~vit_embedding_lens.interventions.logit_diff` (averaged over images). ``tokens``: token
    groups (:func:`~vit_embedding_lens.circuits.groups.token_groups`; None = every token).

    Returns one row per node and group, columns :data:`NODE_COLUMNS`: ``node`` (``"a3.h1@cls"``,
    the component with the group; no suffix for the group ``"all"``), ``component`` (``"a3.h1"``,
    ``"m2"``, ``"r0"``), ``kind`` (``"head"``, ``"mlp"``, ``"resid"``), ``block``, ``head`` (-1 for
    MLPs and residual streams), ``group``, ``score`` (estimated change of the metric), its absolute
    value, and ``method``.

    ``kinds`` may add ``"q"`` and ``"k"``: each head's query (key) at a token, nodes
    ``"a{l}.h{h}.q"`` / ``"a{l}.h{h}.k"`` (method ``"atp"`` and corrupt images only). With
    ``qk_fix`` (AtP*'s fix for attention saturation, Kramár et al. 2024; the rows' ``method`` is
    then ``"atp*"``) their effect on the attention pattern is computed exactly (the softmax
    recomputed with the one query, or the one key, corrupted) and only the pattern's effect on the
    metric is linear: ``Σ (A' − A) · ∂m/∂A``; without it, plain ``Δq · ∂m/∂q``. A group's score is
    the sum of its tokens' scores.
    """
    check_logit_metric(metric)
    for kind in kinds:
        if kind not in ALL_NODE_KINDS:
            raise ValueError(f"unknown node kind {kind!r}; use {ALL_NODE_KINDS}")
    qk_kinds = [k for k in kinds if k in ("q", "k")]
    if qk_kinds and (method != "atp" or not isinstance(corrupt, Tensor)):
        raise ValueError(
            "query and key nodes need method='atp' and corrupt images (not an ablation reference)"
        )
    if method not in ("atp", "ig", "graddrop"):
        raise ValueError(f"method must be 'atp', 'ig' or 'graddrop', got {method!r}")
    if method == "ig" and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    groups = token_groups(model.layout, tokens, object_mask=object_mask)
    ablated = ablated_senders(model, clean, corrupt)
    L = model.cfg.n_layers
    if method == "atp":
        plans: List[Tuple[Optional[float], Optional[int]]] = [(None, None)]
    elif method == "ig":
        plans = [((i + 0.5) / steps, None) for i in range(steps)]
    else:
        plans = [(None, l) for l in range(L)]
    if len(qk_kinds) == len(kinds):  # queries and keys only: no pass for the other nodes
        plans = []
    grad_mask = tokens_by_group(groups, clean.device, clean.dtype)
    total: Optional[Dict[str, Tensor]] = None
    clean_senders: Optional[Tensor] = None
    for alpha, drop in tqdm(plans, desc=f"node {method}", disable=not progress):
        senders, grads = _clean_gradients(model, clean, ablated, metric, alpha, drop)
        if clean_senders is None and alpha is None:
            clean_senders = senders
        if clean_senders is None:
            clean_senders = _clean_senders(model, clean)
        per_token = _per_token_scores(model, ablated - clean_senders, grads)
        scores = {k: torch.einsum("bn...,gbn->g...", v, grad_mask.expand(-1, v.shape[0], -1))
                  for k, v in per_token.items()}  # fmt: skip
        if method == "graddrop":
            scores = {k: v.abs() for k, v in scores.items()}
        total = scores if total is None else {k: total[k] + v for k, v in scores.items()}
    total = {} if total is None else {k: v / len(plans) for k, v in total.items()}
    if qk_kinds:
        assert isinstance(corrupt, Tensor)
        per_token = _qk_per_token(model, clean, corrupt, metric, qk_fix)
        for k in qk_kinds:
            v = per_token[k]
            total[k] = torch.einsum("bn...,gbn->g...", v, grad_mask.expand(-1, v.shape[0], -1))
    frame = _node_frame(list(groups), total, kinds, method)
    if qk_kinds and qk_fix:
        frame.loc[frame.kind.isin(["q", "k"]), "method"] = "atp*"
    return frame


def _qk_per_token(
    model: HookedViT, clean: Tensor, corrupt: Tensor, metric: Metric, qk_fix: bool
) -> Dict[str, Tensor]:
    """Query and key node scores per image, token, block and head ``[batch, pos, block, head]``
    (see :func:`node_attribution`)."""
    L = model.cfg.n_layers
    names = [act_name(s, l) for l in range(L) for s in ("attn.hook_q", "attn.hook_k")]
    patterns = [act_name("attn.hook_pattern", l) for l in range(L)]
    scores = [act_name("attn.hook_attn_scores", l) for l in range(L)]
    with torch.no_grad():
        _, corrupt_cache = model.run_with_cache(corrupt, names_filter=names)
    captured: Dict[str, Tensor] = {}

    def capture(act: Tensor, hook) -> None:
        captured[hook.name] = act

    wanted = names + patterns
    with torch.enable_grad():
        hooks: List[Tuple[Any, Any]] = [(n, capture) for n in wanted + scores]
        value = differentiable_metric(metric, model.run_with_hooks(clean, fwd_hooks=hooks))
        grads = dict(zip(wanted, torch.autograd.grad(value, [captured[n] for n in wanted])))
    q_scores, k_scores = [], []
    for l in range(L):
        qn, kn, pn = names[2 * l], names[2 * l + 1], patterns[l]
        q, k = captured[qn].detach(), captured[kn].detach()  # [B, N, H, dh]
        dq, dk = corrupt_cache[qn] - q, corrupt_cache[kn] - k
        if not qk_fix:
            q_scores.append((dq * grads[qn]).sum(-1))
            k_scores.append((dk * grads[kn]).sum(-1))
            continue
        A, gA = captured[pn].detach(), grads[pn]  # [B, H, query, key]
        S = captured[scores[l]].detach()  # masked scores are -inf and stay so
        scale = float(model.blocks[l].attn.scale)  # type: ignore[union-attr,arg-type]
        # one query corrupted: its row of the pattern recomputed
        rows = (S + torch.einsum("bthe,bshe->bhts", dq, k) * scale).softmax(-1)
        q_scores.append(((rows - A) * gA).sum(-1).transpose(1, 2))
        # one key corrupted: its column's scores move by delta; every row renormalizes
        delta = torch.einsum("bthe,bshe->bhts", q, dk) * scale
        new = torch.sigmoid(torch.log(A) + delta - torch.log1p(-A))  # A'[t, s] at the key
        ratio = torch.where(A < 1, (1 - new) / (1 - A).clamp_min(1e-30), torch.ones_like(A))
        row_total = (A * gA).sum(-1, keepdim=True)
        change = (ratio - 1) * (row_total - A * gA) + (new - A) * gA
        k_scores.append(change.sum(2).transpose(1, 2))  # over queries: [B, key, H]
    return {"q": torch.stack(q_scores, 2), "k": torch.stack(k_scores, 2)}


def _clean_senders(model: HookedViT, clean: Tensor) -> Tensor:
    from vit_embedding_lens.circuits.graph import sender_activations

    return sender_activations(model, clean)


def _clean_gradients(
    model: HookedViT,
    clean: Tensor,
    ablated: Tensor,
    metric: Metric,
    alpha: Optional[float],
    drop: Optional[int],
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One forward and backward pass: the senders' outputs (at ``alpha=None``: the clean run) and
    the metric's gradient at every ``hook_attn_out``, ``hook_mlp_out`` and ``hook_resid_pre``."""
    L = model.cfg.n_layers
    captured: Dict[str, Tensor] = {}
    wanted = set(sender_hook_names(model))
    grad_names = [act_name(s, l) for l in range(L) for s in ("hook_resid_pre", "hook_attn_out")]
    grad_names += [act_name("hook_mlp_out", l) for l in range(L)]
    resid0 = act_name("hook_resid_pre", 0)

    def capture(act: Tensor, hook) -> Tensor:
        if hook.name == resid0 and alpha is not None:
            act = act + alpha * (ablated[0].to(act.dtype) - act)
        captured[hook.name] = act
        return act

    def stop_grad(act: Tensor, hook) -> Tensor:
        return act.detach()

    hooks: List[Tuple[Any, Any]] = [(name, capture) for name in sorted(wanted | set(grad_names))]
    if drop is not None:
        hooks += [
            (act_name(s, drop), stop_grad)
            for s in ("attn.hook_q", "attn.hook_k", "attn.hook_v", "mlp.hook_pre")
        ]
    validate = model.validate_inputs
    try:
        model.validate_inputs = False
        with torch.enable_grad():
            logits = model.run_with_hooks(clean, fwd_hooks=hooks)
            value = differentiable_metric(metric, logits)
            inputs = [captured[n] for n in grad_names]
            grads = torch.autograd.grad(value, inputs, allow_unused=True)
    finally:
        model.validate_inputs = validate
    out = {
        n: (g if g is not None else torch.zeros_like(captured[n]))
        for n, g in zip(grad_names, grads)
    }
    senders = senders_from_cache(model, {k: v.detach() for k, v in captured.items()})
    return senders, out


def _per_token_scores(
    model: HookedViT, delta: Tensor, grads: Dict[str, Tensor]
) -> Dict[str, Tensor]:
    """``delta · grad`` per token and image: heads ``[batch, pos, block, head]``, MLPs and
    residual streams ``[batch, pos, block]``."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    heads, mlps, resids = [], [], []
    resid_delta = delta[0]
    for l in range(L):
        resids.append((resid_delta * grads[act_name("hook_resid_pre", l)]).sum(-1))
        s0 = 1 + l * (H + 1)
        dh = delta[s0 : s0 + H]  # [H, B, N, d]
        heads.append(torch.einsum("hbnd,bnd->bnh", dh, grads[act_name("hook_attn_out", l)]))
        dm = delta[s0 + H]
        mlps.append((dm * grads[act_name("hook_mlp_out", l)]).sum(-1))
        resid_delta = resid_delta + dh.sum(0) + dm
    return {
        "head": torch.stack(heads, 2),
        "mlp": torch.stack(mlps, 2),
        "resid": torch.stack(resids, 2),
    }


def _node_frame(
    group_names: List[str], scores: Dict[str, Tensor], kinds: Sequence[str], method: str
) -> pd.DataFrame:
    """Tidy rows from ``{kind: [group, block(, head)]}``."""
    rows: Dict[str, list] = {c: [] for c in NODE_COLUMNS}
    for kind in ALL_NODE_KINDS:
        if kind not in kinds:
            continue
        values = scores[kind].detach().double().cpu().numpy()
        G = values.shape[0]
        L = values.shape[1]
        per_head = kind in ("head", "q", "k")
        H = values.shape[2] if per_head else 1
        for l in range(L):
            for h in range(H):
                if per_head:
                    comp = head_name(l, h) + ("" if kind == "head" else f".{kind}")
                else:
                    comp = mlp_name(l) if kind == "mlp" else resid_name(l)
                for g in range(G):
                    v = float(values[g, l, h] if per_head else values[g, l])
                    rows["node"].append(node_with_group(comp, group_names[g]))
                    rows["component"].append(comp)
                    rows["kind"].append(kind)
                    rows["block"].append(l)
                    rows["head"].append(h if per_head else -1)
                    rows["group"].append(group_names[g])
                    rows["score"].append(v)
                    rows["abs_score"].append(abs(v))
                    rows["method"].append(method)
    return pd.DataFrame(rows)


def exact_node_effects(
    model: HookedViT,
    clean: Tensor,
    corrupt: Tensor,
    metric: Metric,
    *,
    tokens: Groups = None,
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    kinds: Sequence[NodeKind] = ("head",),
    progress: bool = False,
    **options,
) -> pd.DataFrame:
    """The exact effect of patching each node (per token group) from the corrupt run into the
    clean one: ``m(clean with n corrupted) − m(clean)``, by the batched activation patching sweeps
    of :mod:`vit_embedding_lens.interventions.patching` (heads: ``attn.hook_z``; MLPs:
    ``hook_mlp_out``; residual streams: ``hook_resid_pre``). Same table as
    :func:`node_attribution` (``method = "exact"``). ``options`` go to
    :func:`~vit_embedding_lens.interventions.run_patching` (``max_batch`` ...)."""
    check_logit_metric(metric)
    if not isinstance(corrupt, Tensor):
        raise TypeError("exact patching needs corrupt images (a counterfactual), not a reference")
    check_pair(clean, corrupt)
    groups = token_groups(model.layout, tokens, object_mask=object_mask)
    specs = {name: (m if m.shape[0] > 1 else m[0]) for name, m in groups.items()}
    with torch.no_grad():
        base = scalar_metric(metric, model(clean))
        _, cache = model.run_with_cache(corrupt)
    suffix = {
        "head": "attn.hook_z", "mlp": "hook_mlp_out", "resid": "hook_resid_pre",
        "q": "attn.hook_q", "k": "attn.hook_k",
    }  # fmt: skip
    scores: Dict[str, Tensor] = {}
    for kind in kinds:
        per = ("layer", "token", "head") if kind in ("head", "q", "k") else ("layer", "token")
        result = sweep(
            model, clean, cache, metric, suffix[kind], per, tokens=specs, progress=progress,
            **options,
        )  # fmt: skip
        values = result.values - base  # [block, group(, head)]
        scores[kind] = values.transpose(0, 1)  # [group, block(, head)]
    return _node_frame(list(groups), scores, kinds, "exact")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties; scipy's ``spearmanr``)."""
    return float(stats.spearmanr(np.asarray(a, dtype=float), np.asarray(b, dtype=float))[0])
