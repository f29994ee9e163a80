"""Edge attribution patching (EAP, EAP-IG): a score for every edge of the model's graph.

The edge ``u → v`` (per token group ``g``) scores ``(a_u(corrupt) − a_u(clean)) · ∂m/∂(input of
v)``, summed over the tokens of ``g`` and averaged over images (Syed et al. 2023): the first-order
change of the metric when ``v`` alone sees ``u``'s corrupt output. One forward and one backward pass
of :func:`~vit_embedding_lens.circuits.graph.graph_forward` give the gradient at every receiver's
input (a head's input is its own: q, k and v are read from it together); the scores are one
einsum. EAP-IG (Hanna et al. 2024) averages the gradient over ``steps`` points on the straight path
from the clean to the corrupt embeddings (midpoint rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.circuits.graph import (
    CircuitGraph,
    Corrupt,
    Metric,
    ablated_senders,
    check_logit_metric,
    differentiable_metric,
    embeddings,
    graph_forward,
    receiver_gradients,
    tokens_by_group,
)
from vit_embedding_lens.circuits.groups import Groups, token_groups

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

EdgeMethod = Literal["eap", "eap-ig"]
#: columns of the edge score table
EDGE_COLUMNS = (
    "sender", "receiver", "group", "score", "abs_score", "sender_block", "receiver_block",
    "sender_kind", "receiver_kind", "method",
)  # fmt: skip


def edge_attribution(
    model: HookedViT,
    clean: Tensor,
    corrupt: Corrupt,
    metric: Metric,
    *,
    tokens: Groups = "all",
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    method: EdgeMethod = "eap",
    steps: int = 5,
    progress: bool = False,
) -> pd.DataFrame:
    """EAP or EAP-IG scores of every edge (per token group).

    ``clean``/``corrupt``/``metric`` as in
    :func:`~vit_embedding_lens.circuits.nodes.node_attribution`. ``tokens``: token groups that
    split every edge (default ``"all"``: one group, edges not split); groups must not overlap and
    the tokens they leave out form the group ``"rest"``.

    Returns one row per edge and group, columns :data:`EDGE_COLUMNS`: ``sender`` (``"embed"``,
    ``"a{l}.h{h}"``, ``"m{l}"``), ``receiver`` (``"a{l}.h{h}"``, ``"m{l}"``, ``"logits"``),
    ``group``, ``score``, ``abs_score``, ``sender_block`` (-1 for the embedding),
    ``receiver_block`` (``n_layers`` for the logits), ``sender_kind`` (``"embed"``, ``"head"``,
    ``"mlp"``), ``receiver_kind`` (``"head"``, ``"mlp"``, ``"logits"``), ``method``.
    """
    check_logit_metric(metric)
    if method not in ("eap", "eap-ig"):
        raise ValueError(f"method must be 'eap' or 'eap-ig', got {method!r}")
    if method == "eap-ig" and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    graph = CircuitGraph(model)
    groups = token_groups(model.layout, tokens, object_mask=object_mask, partition=True)
    ablated = ablated_senders(model, clean, corrupt)
    resid0 = embeddings(model, clean)
    alphas = [None] if method == "eap" else [(i + 0.5) / steps for i in range(steps)]
    grads: Optional[Tensor] = None
    clean_senders: Optional[Tensor] = None
    for alpha in tqdm(alphas, desc=method, disable=not progress):
        start = resid0 if alpha is None else resid0 + alpha * (ablated[0] - resid0)
        with torch.enable_grad():
            run = graph_forward(graph, start.detach().requires_grad_(True))
            value = differentiable_metric(metric, run.logits)
            g = receiver_gradients(run, value)
        if alpha is None:
            clean_senders = torch.stack([s.detach() for s in run.senders])
        grads = g if grads is None else grads + g
    assert grads is not None
    grads = grads / len(alphas)
    if clean_senders is None:
        with torch.no_grad():
            run = graph_forward(graph, resid0)
        clean_senders = torch.stack(run.senders)
    scores = edge_scores(graph, ablated - clean_senders, grads, groups)
    return edge_frame(graph, list(groups), scores, method)


def edge_scores(
    graph: CircuitGraph,
    delta: Tensor,
    grads: Tensor,
    groups,
) -> Tensor:
    """``[sender, receiver, group]`` scores from the senders' changes ``[sender, batch|1, pos,
    d_model]`` and the receivers' gradients ``[receiver, batch, pos, d_model]``; invalid edges
    (a sender that writes after the receiver reads) are 0."""
    B, N = grads.shape[1], grads.shape[2]
    gm = tokens_by_group(groups, grads.device, grads.dtype).expand(-1, B, N)
    delta = delta.to(grads.dtype).expand(-1, B, N, -1)
    per_token = torch.einsum("sbnd,rbnd->srbn", delta, grads)
    scores = torch.einsum("srbn,gbn->srg", per_token, gm)
    return scores * graph.valid.to(scores.device, scores.dtype)[..., None]


def edge_frame(graph: CircuitGraph, group_names, scores: Tensor, method: str) -> pd.DataFrame:
    """Tidy rows of the valid edges (receiver by receiver, then sender, then group)."""
    valid = graph.valid.numpy()
    s_idx, r_idx = np.nonzero(valid)
    order = np.lexsort((s_idx, r_idx))
    s_idx, r_idx = s_idx[order], r_idx[order]
    G = len(group_names)
    values = scores.detach().double().cpu().numpy()[s_idx, r_idx]  # [E, G]
    senders = np.asarray(graph.senders, dtype=object)
    receivers = np.asarray(graph.receivers, dtype=object)
    frame = pd.DataFrame(
        {
            "sender": np.repeat(senders[s_idx], G),
            "receiver": np.repeat(receivers[r_idx], G),
            "group": np.tile(np.asarray(group_names, dtype=object), len(s_idx)),
            "score": values.reshape(-1),
        }
    )
    frame["abs_score"] = frame["score"].abs()
    frame["sender_block"] = np.repeat(np.asarray(graph.sender_block)[s_idx], G)
    frame["receiver_block"] = np.repeat(np.asarray(graph.receiver_block)[r_idx], G)
    frame["sender_kind"] = np.repeat(np.asarray(graph.sender_kind, dtype=object)[s_idx], G)
    frame["receiver_kind"] = np.repeat(np.asarray(graph.receiver_kind, dtype=object)[r_idx], G)
    frame["method"] = method
    return frame
