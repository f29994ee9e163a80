"""Running a circuit, its faithfulness, faithfulness curves and circuit discovery.

A circuit is a set of edges (``sender``, ``receiver``, ``group``) of the model's graph
(:class:`~vit_embedding_lens.circuits.graph.CircuitGraph`). Running it is a real forward pass in
which every edge outside the circuit is ablated: its receiver sees the sender's ablated output
(from the corrupt images, or a mean / resampled reference) and every kept edge carries the
sender's output of this run. Keeping every edge gives the clean forward pass, keeping none the
fully ablated one (with corrupt images: the corrupt forward pass). Faithfulness is
``(m(C) − m(∅)) / (m(full) − m(∅))``.

Discovery keeps the top edges by ``|score|`` until a target share of the metric is recovered,
measured by running the circuit; dangling edges (a sender with no kept path from the embedding, a
receiver with no kept path to the logits) are then pruned. With corrupt images pruning changes no
metric (a sender none of whose inputs is kept outputs its corrupt value; a receiver that reaches
no logit changes none); with a mean reference a sender cut from the embedding outputs the function
of the mean inputs rather than the mean output, so the metric may move slightly:
:func:`discover_circuit` re-runs the pruned circuit and reports its own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple, Union

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
    embeddings,
    graph_forward,
    scalar_metric,
    tokens_by_group,
)
from vit_embedding_lens.circuits.groups import Groups, token_groups

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

Edges = Union[pd.DataFrame, Iterable[Tuple[str, ...]]]
#: columns of a faithfulness curve
CURVE_COLUMNS = ("n_edges", "faithfulness", "metric", "kind", "seed")


@dataclass
class Circuit:
    """A circuit and how faithful it is.

    ``edges``: the kept edges (rows of the edge score table: ``sender``, ``receiver``, ``group``,
    ``score`` ...); ``nodes``: the components they touch (``"embed"``, ``"a3.h1"``, ``"m2"``,
    ``"logits"``), in graph order. ``metric_clean`` is ``m(full)`` (every edge kept: the clean
    run), ``metric_ablated`` ``m(∅)`` (every edge ablated), ``metric_circuit`` ``m(C)``.
    """

    edges: pd.DataFrame
    nodes: List[str]
    metric_clean: float
    metric_ablated: float
    metric_circuit: float
    faithfulness: float
    target: Optional[float] = None
    ablation: str = "corrupt"
    pruned: int = 0
    metadata: Dict[str, object] = field(default_factory=dict)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def summary(self) -> Dict[str, object]:
        """The numbers as one flat dict (a table row)."""
        return {
            "n_edges": self.n_edges,
            "n_nodes": len(self.nodes),
            "faithfulness": self.faithfulness,
            "metric_clean": self.metric_clean,
            "metric_ablated": self.metric_ablated,
            "metric_circuit": self.metric_circuit,
            "target": self.target,
            "ablation": self.ablation,
            "pruned": self.pruned,
        }

    def __repr__(self) -> str:
        return (
            f"Circuit({self.n_edges} edges, {len(self.nodes)} nodes, faithfulness "
            f"{self.faithfulness:.3f}: m(C)={self.metric_circuit:.4g}, m(full)="
            f"{self.metric_clean:.4g}, m(empty)={self.metric_ablated:.4g})"
        )


def faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float:
    """``(m(C) − m(∅)) / (m(full) − m(∅))``; NaN when the full and empty metrics are equal."""
    span = m_full - m_empty
    return float("nan") if span == 0 else (m_circuit - m_empty) / span


# -------------------------------------------------------------------------------------------------
# Edge sets as masks
# -------------------------------------------------------------------------------------------------
def edge_mask(
    graph: CircuitGraph, edges: Edges, group_names: Sequence[str]
) -> Bool[Tensor, "sender receiver group"]:
    """The kept edges as a mask ``[sender, receiver, group]``. ``edges``: a DataFrame with
    ``sender``, ``receiver`` (and ``group`` when there are several groups), or tuples
    ``(sender, receiver)`` / ``(sender, receiver, group)``."""
    mask = torch.zeros(graph.n_senders, graph.n_receivers, len(group_names), dtype=torch.bool)
    g_index = {g: i for i, g in enumerate(group_names)}
    if isinstance(edges, pd.DataFrame):
        if not {"sender", "receiver"} <= set(edges.columns):
            raise ValueError("an edge table needs the columns 'sender' and 'receiver'")
        groups = edges["group"] if "group" in edges.columns else [None] * len(edges)
        rows: Iterable[Tuple] = zip(edges["sender"], edges["receiver"], groups)
    else:
        rows = ((*e, None) if len(e) == 2 else tuple(e) for e in edges)
    for sender, receiver, group in rows:
        s, r = graph.sender_index(sender), graph.receiver_index(receiver)
        if not bool(graph.valid[s, r]):
            raise ValueError(f"there is no edge {sender} -> {receiver}: {sender} writes after it")
        if group is None:
            if len(group_names) != 1:
                raise ValueError(
                    f"the edges are split by token groups {list(group_names)}; give each edge's "
                    "group"
                )
            mask[s, r, 0] = True
        else:
            if group not in g_index:
                raise ValueError(f"unknown group {group!r}; the groups are {list(group_names)}")
            mask[s, r, g_index[group]] = True
    return mask


def edges_of_mask(
    graph: CircuitGraph, mask: Tensor, group_names: Sequence[str], scores: Optional[pd.DataFrame]
) -> pd.DataFrame:
    """The rows of ``scores`` (or a bare edge table) for the edges in ``mask``."""
    s, r, g = (t.tolist() for t in torch.nonzero(mask, as_tuple=True))
    keys = pd.DataFrame(
        {
            "sender": [graph.senders[i] for i in s],
            "receiver": [graph.receivers[i] for i in r],
            "group": [group_names[i] for i in g],
        }
    )
    if scores is None:
        return keys
    return keys.merge(scores, on=["sender", "receiver", "group"], how="left").sort_values(
        "abs_score", ascending=False, kind="stable", ignore_index=True
    )


def circuit_nodes(graph: CircuitGraph, mask: Tensor) -> List[str]:
    """Senders and receivers touched by the kept edges, in graph order (``"logits"`` last)."""
    kept = mask.any(-1)
    names: List[str] = []
    seen = set()
    s_used = kept.any(1).tolist()
    r_used = kept.any(0).tolist()
    for name, used in zip(graph.senders, s_used):
        if used and name not in seen:
            names.append(name)
            seen.add(name)
    for name, used in zip(graph.receivers, r_used):
        if used and name not in seen:
            names.append(name)
            seen.add(name)
    order = {n: i for i, n in enumerate(["embed", *graph.receivers])}
    return sorted(names, key=lambda n: order[n])


def prune_dangling(graph: CircuitGraph, mask: Tensor) -> Tensor:
    """Drop kept edges whose sender has no kept path from the embedding or whose receiver has no
    kept path to the logits (token groups are merged for the paths)."""
    kept = mask.any(-1)  # [S, R]
    as_sender = [graph.sender_index(n) if n != "logits" else -1 for n in graph.receivers]
    reach = torch.zeros(graph.n_senders, dtype=torch.bool)  # reached from the embedding
    reach[0] = True
    for r in range(graph.n_receivers - 1):  # graph order: a receiver's senders come first
        reach[as_sender[r]] = bool((kept[:, r] & reach).any())
    to_logits = torch.zeros(graph.n_receivers, dtype=torch.bool)  # input reaches the logits
    to_logits[-1] = True
    for s in range(graph.n_senders - 1, 0, -1):  # reverse order: later components settled first
        r = graph.receiver_index(graph.senders[s])
        to_logits[r] = bool((kept[s] & to_logits).any())
    good = reach[:, None] & to_logits[None, :]
    return mask & good[..., None]


# -------------------------------------------------------------------------------------------------
# Running circuits
# -------------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    graph: CircuitGraph
    group_names: List[str]
    groups: Tensor
    resid0: Tensor
    ablated: Tensor
    ablation: str


def _setup(model, clean, corrupt, metric, tokens, object_mask) -> _Setup:
    check_logit_metric(metric)
    graph = CircuitGraph(model)
    groups = token_groups(model.layout, tokens, object_mask=object_mask, partition=True)
    ablated = ablated_senders(model, clean, corrupt)
    ablation = corrupt.method if not isinstance(corrupt, Tensor) else "corrupt"
    return _Setup(
        graph,
        list(groups),
        tokens_by_group(groups, clean.device, clean.dtype),
        embeddings(model, clean),
        ablated,
        ablation,
    )


def _run_masks(
    setup: _Setup, metric: Metric, masks: Tensor, max_batch: int, progress: bool = False
) -> List[float]:
    """The metric of each circuit in ``masks`` (``[copies, sender, receiver, group]``; float
    values in between scale an edge's ablation)."""
    B = setup.resid0.shape[0]
    k = max(1, max_batch // B)
    values: List[float] = []
    absent_all = 1.0 - masks.to(setup.resid0.dtype)  # [K, S, R, G]
    validate = setup.graph.model.validate_inputs
    bar = tqdm(total=len(masks), desc="circuits", disable=not progress, unit="circuit")
    groups = setup.groups.expand(-1, B, -1)
    try:
        with torch.no_grad():
            for i in range(0, len(masks), k):
                absent = absent_all[i : i + k].transpose(1, 2).to(setup.resid0.device)
                n = absent.shape[0]
                run = graph_forward(
                    setup.graph,
                    setup.resid0.repeat(n, 1, 1),
                    ablated=setup.ablated,
                    absent=absent,
                    groups=groups,
                )
                logits = run.logits.reshape(n, B, -1)
                values += [float(scalar_metric(metric, logits[c])) for c in range(n)]
                bar.update(n)
    finally:
        setup.graph.model.validate_inputs = validate
        bar.close()
    return values


def run_circuits(
    model: HookedViT,
    clean: Tensor,
    corrupt: Corrupt,
    metric: Metric,
    circuits: Sequence[Edges],
    *,
    tokens: Groups = "all",
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    max_batch: int = 256,
    progress: bool = False,
) -> List[float]:
    """The metric of each circuit (each an edge set), every edge outside it ablated, in batched
    forward passes (``max_batch`` images per pass: copies of the clean batch, one per circuit)."""
    setup = _setup(model, clean, corrupt, metric, tokens, object_mask)
    masks = torch.stack([edge_mask(setup.graph, c, setup.group_names) for c in circuits])
    return _run_masks(setup, metric, masks, max_batch, progress)


def run_circuit(
    model: HookedViT,
    clean: Tensor,
    corrupt: Corrupt,
    metric: Metric,
    edges: Edges,
    *,
    tokens: Groups = "all",
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    scores: Optional[pd.DataFrame] = None,
) -> Circuit:
    """Run one circuit and measure its faithfulness (three runs: full, empty and the circuit).
    ``scores`` (the edge score table) fills the kept edges' rows."""
    setup = _setup(model, clean, corrupt, metric, tokens, object_mask)
    mask = edge_mask(setup.graph, edges, setup.group_names)
    return _circuit(setup, metric, mask, scores, None, 256)


def _full_and_empty(setup: _Setup, metric: Metric, max_batch: int) -> Tuple[float, float]:
    valid = setup.graph.valid[..., None].expand(-1, -1, len(setup.group_names))
    full, empty = _run_masks(
        setup, metric, torch.stack([valid, torch.zeros_like(valid)]), max_batch
    )
    return full, empty


def _circuit(setup, metric, mask, scores, target, max_batch, full_empty=None, pruned=0) -> Circuit:
    full, empty = full_empty or _full_and_empty(setup, metric, max_batch)
    (value,) = _run_masks(setup, metric, mask[None], max_batch)
    return Circuit(
        edges=edges_of_mask(setup.graph, mask, setup.group_names, scores),
        nodes=circuit_nodes(setup.graph, mask),
        metric_clean=full,
        metric_ablated=empty,
        metric_circuit=value,
        faithfulness=faithfulness(value, full, empty),
        target=target,
        ablation=setup.ablation,
        pruned=pruned,
    )


def _ranked_masks(setup: _Setup, scores: pd.DataFrame) -> Tuple[Tensor, Tensor]:
    """Edge indices ``[E, 3]`` (sender, receiver, group) sorted by ``|score|`` (descending), and
    the valid-edge mask."""
    for col in ("sender", "receiver", "score"):
        if col not in scores.columns:
            raise ValueError(f"the edge score table needs a {col!r} column (edge_attribution)")
    graph = setup.graph
    g_index = {g: i for i, g in enumerate(setup.group_names)}
    groups = scores["group"] if "group" in scores.columns else ["all"] * len(scores)
    unknown = set(groups) - set(g_index)
    if unknown:
        raise ValueError(
            f"the scores use token groups {sorted(map(str, unknown))} but the circuit is run with "
            f"{setup.group_names}; pass the same tokens= to both"
        )
    idx = np.stack(
        [
            [graph.sender_index(s) for s in scores["sender"]],
            [graph.receiver_index(r) for r in scores["receiver"]],
            [g_index[g] for g in groups],
        ],
        axis=1,
    )
    order = np.argsort(-np.abs(scores["score"].to_numpy(dtype=float)), kind="stable")
    return torch.as_tensor(idx[order]), graph.valid


def _top_mask(setup: _Setup, ranked: Tensor, k: int) -> Tensor:
    mask = torch.zeros(
        setup.graph.n_senders, setup.graph.n_receivers, len(setup.group_names), dtype=torch.bool
    )
    top = ranked[:k]
    mask[top[:, 0], top[:, 1], top[:, 2]] = True
    return mask


def default_sizes(n_edges: int, n_points: int = 16) -> List[int]:
    """Circuit sizes for a curve: 0, then about ``n_points`` sizes spaced geometrically up to all
    ``n_edges`` edges."""
    sizes = np.unique(np.round(np.geomspace(1, n_edges, n_points)).astype(int))
    return [0, *[int(s) for s in sizes]]


def faithfulness_curve(
    model: HookedViT,
    clean: Tensor,
    corrupt: Corrupt,
    metric: Metric,
    scores: pd.DataFrame,
    *,
    sizes: Optional[Sequence[int]] = None,
    n_random: int = 3,
    seed: int = 0,
    tokens: Groups = "all",
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    max_batch: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Faithfulness against circuit size, each circuit run for real: the top edges by ``|score|``
    (``kind="top"``, ``seed=-1``), and ``n_random`` random circuits of the same size per size
    (``kind="random"``, seeds ``seed, seed+1, ...``: each seed draws one random order of all edges
    and keeps its first ``k``, so a seed's random circuits are nested as the top ones are).

    Columns :data:`CURVE_COLUMNS`: ``n_edges``, ``faithfulness``, ``metric`` (``m(C)``),
    ``kind``, ``seed``; the frame's ``attrs`` hold ``metric_clean`` and ``metric_ablated``.
    """
    setup = _setup(model, clean, corrupt, metric, tokens, object_mask)
    ranked, _ = _ranked_masks(setup, scores)
    E = len(ranked)
    sizes = default_sizes(E) if sizes is None else [int(s) for s in sizes]
    bad = [s for s in sizes if not 0 <= s <= E]
    if bad:
        raise ValueError(f"circuit sizes must be between 0 and {E} (the scored edges), got {bad}")
    masks, rows = [], []
    for k in sizes:
        masks.append(_top_mask(setup, ranked, k))
        rows.append((k, "top", -1))
    for r in range(n_random):
        perm = torch.randperm(E, generator=torch.Generator().manual_seed(seed + r))
        for k in sizes:
            masks.append(_top_mask(setup, ranked[perm], k))
            rows.append((k, "random", seed + r))
    full, empty = _full_and_empty(setup, metric, max_batch)
    values = _run_masks(setup, metric, torch.stack(masks), max_batch, progress)
    frame = pd.DataFrame(
        {
            "n_edges": [k for k, _, _ in rows],
            "faithfulness": [faithfulness(v, full, empty) for v in values],
            "metric": values,
            "kind": [kind for _, kind, _ in rows],
            "seed": [s for _, _, s in rows],
        }
    )
    frame.attrs.update(metric_clean=full, metric_ablated=empty)
    return frame


def check_target(target: float) -> float:
    if not isinstance(target, (int, float)) or not 0 < float(target) <= 1:
        raise ValueError(f"the target share of the metric must be in (0, 1], got {target!r}")
    return float(target)


def discover_circuit(
    model: HookedViT,
    clean: Tensor,
    corrupt: Corrupt,
    metric: Metric,
    scores: pd.DataFrame,
    *,
    target: float = 0.8,
    tokens: Groups = "all",
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    prune: bool = True,
    max_batch: int = 256,
    progress: bool = False,
) -> Circuit:
    """The smallest top-``k`` circuit (edges by ``|score|``) whose faithfulness reaches
    ``target``, measured by running it.

    Sizes on a geometric grid are run first (batched); the smallest size that reaches the target
    is then narrowed down by bisection against the largest smaller size that does not (faithfulness
    is assumed monotone between the two). ``prune``: drop dangling edges afterwards (see the module
    docstring); the returned circuit is re-run and its ``metadata`` holds ``k`` (top edges before
    pruning) and the grid's faithfulness values.
    """
    target = check_target(target)
    setup = _setup(model, clean, corrupt, metric, tokens, object_mask)
    ranked, _ = _ranked_masks(setup, scores)
    E = len(ranked)
    full, empty = _full_and_empty(setup, metric, max_batch)
    sizes = default_sizes(E, 24)
    values = _run_masks(
        setup, metric, torch.stack([_top_mask(setup, ranked, k) for k in sizes]), max_batch,
        progress,
    )  # fmt: skip
    faith = [faithfulness(v, full, empty) for v in values]
    passing = [i for i, f in enumerate(faith) if f >= target]
    if not passing:  # the full graph always passes unless the span is 0
        raise ValueError(
            f"no circuit reaches {target:.0%} of the metric (m(full) = {full:.4g}, m(empty) = "
            f"{empty:.4g}); the metric does not separate the clean and corrupt runs"
        )
    hi = sizes[passing[0]]
    lo = sizes[passing[0] - 1] if passing[0] > 0 else -1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        (v,) = _run_masks(setup, metric, _top_mask(setup, ranked, mid)[None], max_batch)
        if faithfulness(v, full, empty) >= target:
            hi = mid
        else:
            lo = mid
    mask = _top_mask(setup, ranked, hi)
    kept = prune_dangling(setup.graph, mask) if prune else mask
    circuit = _circuit(
        setup, metric, kept, scores, target, max_batch, (full, empty),
        pruned=int(mask.sum() - kept.sum()),
    )  # fmt: skip
    circuit.metadata.update(k=hi, grid=dict(zip(sizes, faith)))
    return circuit


def random_circuit(
    model: HookedViT, n_edges: int, *, tokens: Groups = "all", seed: int = 0
) -> pd.DataFrame:
    """``n_edges`` edges drawn uniformly (seeded) from all edges (× groups): a baseline circuit of
    the same size as a discovered one."""
    graph = CircuitGraph(model)
    names = list(token_groups(model.layout, tokens, partition=True))
    s, r = torch.nonzero(graph.valid, as_tuple=True)
    E = len(s) * len(names)
    if not 0 <= n_edges <= E:
        raise ValueError(f"n_edges must be between 0 and {E}, got {n_edges}")
    pick = torch.randperm(E, generator=torch.Generator().manual_seed(seed))[:n_edges]
    e, g = pick // len(names), pick % len(names)
    return pd.DataFrame(
        {
            "sender": [graph.senders[i] for i in s[e].tolist()],
            "receiver": [graph.receivers[i] for i in r[e].tolist()],
            "group": [names[i] for i in g.tolist()],
        }
    )
