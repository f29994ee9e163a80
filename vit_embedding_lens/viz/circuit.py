"""Circuits drawn as graphs over blocks, and their faithfulness curves.

A circuit's edges (a table with ``sender``, ``receiver``, ``score``, optionally ``group``) become a
:mod:`networkx` directed graph whose nodes are named as in
:mod:`vit_embedding_lens.circuits`: ``"embed"``, ``"a{l}.h{h}"`` (head ``h`` of block ``l``),
``"m{l}"`` (the MLP of block ``l``), ``"logits"``, each with an optional token-group suffix
(``"a3.h5@cls"``). Nodes sit in columns by computation order (embed, then per block its heads and
its MLP, then the logits: networkx's layered ``multipartite_layout``), heads of a block stacked in
order. The same graph and positions feed two drawings:

- :func:`plot_circuit`: a static matplotlib figure (papers, the report's PNG);
- :func:`circuit_view`: an interactive plotly graph (hover for scores) in an
  :class:`~vit_embedding_lens.viz.interactive.InteractiveView`. Its HTML carries plotly.js inline
  (about 4.8 MB), so it renders offline, with no CDN; the static figure is its fallback.

Encoding, in both: node fill is the sublayer
(:func:`~vit_embedding_lens.viz.palette.sublayer_color`: attention blue, MLP red, embeddings grey,
logits black); edge width is ``|score|``, solid for a
positive score and dashed for a negative one (EAP scores ``(corrupt − clean) · gradient``: an
edge whose ablation lowers the metric scores negative); edge colour is the
edge's token group (:func:`~vit_embedding_lens.viz.palette.token_group_color`), taken from the
``group`` column or else the sender's suffix (no group: dark grey, "all tokens").
:func:`plot_faithfulness_curve` draws the faithfulness of the top-``n`` circuits against ``n``
with random circuits of the same sizes, the target share and the minimal circuit marked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pandas as pd

from vit_embedding_lens.viz._figures import figure_and_axes, legend_outside
from vit_embedding_lens.viz.palette import (
    CIRCUIT_COLORS,
    REFERENCE_COLOR,
    method_color,
    sublayer_color,
    token_group_color,
)

if TYPE_CHECKING:
    import networkx as nx

    from vit_embedding_lens.viz.interactive import InteractiveView

_NODE = re.compile(r"^(?:(embed)|(logits)|a(\d+)\.h(\d+)|m(\d+))(?:@([^@\s]+))?$")
#: node kinds in drawing order (legend order)
NODE_KINDS = ("embed", "attn", "mlp", "logits")
_KIND_LABELS = {"embed": "embeddings", "attn": "attention head", "mlp": "MLP", "logits": "logits"}
#: the colour of edges without a token group
NO_GROUP = "all"


@dataclass(frozen=True)
class CircuitNode:
    """A node name read: ``kind`` (embed, attn, mlp, logits), ``block`` and ``head`` (None where
    they do not apply) and the token ``group`` suffix (None without one)."""

    name: str
    kind: str
    block: Optional[int]
    head: Optional[int]
    group: Optional[str]

    def column(self, n_layers: int) -> int:
        """The node's column in computation order: embed 0, block ``l``'s heads ``2l + 1``, its
        MLP ``2l + 2``, the logits ``2 n_layers + 1``."""
        if self.kind == "embed":
            return 0
        if self.kind == "logits":
            return 2 * n_layers + 1
        assert self.block is not None
        return 2 * self.block + (1 if self.kind == "attn" else 2)


def parse_node(name: str) -> CircuitNode:
    """Read a node name (``"embed"``, ``"a3.h5"``, ``"m2"``, ``"logits"``, with an optional
    ``"@group"``); an unknown spelling raises ValueError naming it."""
    match = _NODE.match(str(name))
    if match is None:
        raise ValueError(
            f"unknown circuit node {name!r}: nodes are 'embed', 'a{{block}}.h{{head}}', "
            "'m{block}' or 'logits', with an optional '@group' suffix (e.g. 'a3.h5@cls')"
        )
    embed, logits, a_block, a_head, m_block, group = match.groups()
    if embed:
        return CircuitNode(name, "embed", None, None, group)
    if logits:
        return CircuitNode(name, "logits", None, None, group)
    if a_block is not None:
        return CircuitNode(name, "attn", int(a_block), int(a_head), group)
    return CircuitNode(name, "mlp", int(m_block), None, group)


def _column_label(column: int, n_layers: int) -> str:
    if column == 0:
        return "embed"
    if column == 2 * n_layers + 1:
        return "logits"
    block, kind = divmod(column - 1, 2)
    return f"{'A' if kind == 0 else 'M'}{block}"


def circuit_edges(circuit: Any) -> pd.DataFrame:
    """The edge table of ``circuit``: a DataFrame with ``sender``, ``receiver``, ``score``, or an
    object (a :class:`~vit_embedding_lens.circuits.Circuit`) whose ``edges`` is one. Rows are
    copied, with ``abs_score`` added when missing."""
    edges = circuit if isinstance(circuit, pd.DataFrame) else getattr(circuit, "edges", None)
    if not isinstance(edges, pd.DataFrame):
        raise TypeError(
            "a circuit is drawn from a DataFrame of edges (sender, receiver, score) or an object "
            f"whose .edges is one; got {type(circuit).__name__}"
        )
    missing = [c for c in ("sender", "receiver", "score") if c not in edges.columns]
    if missing:
        raise ValueError(
            f"the edge table lacks the columns {missing}; it has {list(edges.columns)}"
        )
    edges = edges.reset_index(drop=True).copy()
    if "abs_score" not in edges.columns:
        edges["abs_score"] = edges["score"].abs()
    return edges


def _edge_group(row: Any, sender: CircuitNode, receiver: CircuitNode) -> str:
    group = row.get("group") if hasattr(row, "get") else None
    if group is not None and not (isinstance(group, float) and np.isnan(group)) and group != "":
        return str(group)
    return sender.group or receiver.group or NO_GROUP


def circuit_graph(
    circuit: Any, n_layers: Optional[int] = None, n_heads: Optional[int] = None
) -> nx.MultiDiGraph:
    """The circuit as a networkx ``MultiDiGraph`` (one graph edge per table row, keyed by its row
    number, so two token groups between the same nodes stay two edges).

    Node attributes: ``kind``, ``block``, ``head``, ``group``, ``column`` (computation order) and
    ``in_circuit``; edge attributes: ``score``, ``abs_score``, ``group``. With ``n_layers`` and
    ``n_heads`` every component of the model is a node (the skeleton the circuit sits in); those
    outside the circuit have ``in_circuit=False``. ``graph.graph["n_layers"]`` holds the depth
    used for the logits column (the deepest block of the circuit + 1 without ``n_layers``).
    """
    import networkx as nx

    edges = circuit_edges(circuit)
    names = list(dict.fromkeys([*edges["sender"], *edges["receiver"]]))
    parsed = {name: parse_node(name) for name in names}
    deepest = max((p.block for p in parsed.values() if p.block is not None), default=-1)
    if n_layers is None:
        n_layers = deepest + 1
    elif deepest >= n_layers:
        raise ValueError(f"the circuit has a node in block {deepest}, but n_layers={n_layers}")
    if n_heads is not None:
        widest = max((p.head for p in parsed.values() if p.head is not None), default=-1)
        if widest >= n_heads:
            raise ValueError(f"the circuit has head {widest}, but n_heads={n_heads}")
    nodes = dict(parsed)
    if n_heads is not None and n_layers > 0:
        skeleton = ["embed", "logits"] + [f"m{b}" for b in range(n_layers)]
        skeleton += [f"a{b}.h{h}" for b in range(n_layers) for h in range(n_heads)]
        for name in skeleton:
            if not any(_same_component(name, p) for p in parsed.values()):
                nodes[name] = parse_node(name)

    def order(p: CircuitNode) -> Tuple[int, int, str]:
        return (p.column(n_layers), -1 if p.head is None else p.head, p.group or "")

    graph = nx.MultiDiGraph(n_layers=n_layers)
    for p in sorted(nodes.values(), key=order):  # layers keep insertion order in the layout
        graph.add_node(
            p.name,
            kind=p.kind,
            block=p.block,
            head=p.head,
            group=p.group,
            column=p.column(n_layers),
            in_circuit=p.name in parsed,
        )
    for i, row in edges.iterrows():
        sender, receiver = parsed[row["sender"]], parsed[row["receiver"]]
        if sender.column(n_layers) >= receiver.column(n_layers):
            raise ValueError(
                f"edge {sender.name} -> {receiver.name} does not go forward: a sender must be "
                "computed before its receiver"
            )
        graph.add_edge(
            sender.name,
            receiver.name,
            key=int(i),
            score=float(row["score"]),
            abs_score=float(row["abs_score"]),
            group=_edge_group(row, sender, receiver),
        )
    return graph


def _same_component(name: str, node: CircuitNode) -> bool:
    return node.name.split("@")[0] == name


def circuit_layout(graph: nx.MultiDiGraph) -> Dict[str, np.ndarray]:
    """Node positions: columns left to right in computation order, the nodes of a column top to
    bottom (heads in order), from networkx's ``multipartite_layout``."""
    import networkx as nx

    if graph.number_of_nodes() == 0:
        return {}
    columns: Dict[int, List[str]] = {}
    for node, column in graph.nodes(data="column"):  # lists keep the nodes' order (sets do not)
        columns.setdefault(column, []).append(node)
    pos = nx.multipartite_layout(graph, subset_key=columns, align="vertical")
    return {node: np.array([xy[0], -xy[1]]) for node, xy in pos.items()}  # first node on top


def circuit_layout_table(
    circuit: Any, n_layers: Optional[int] = None, n_heads: Optional[int] = None
) -> pd.DataFrame:
    """One row per drawn node: ``node``, ``kind``, ``block``, ``head``, ``group``, ``column``,
    ``in_circuit``, ``x``, ``y``, and ``weight`` (the sum of ``|score|`` over its edges), the data
    :func:`plot_circuit` and :func:`circuit_view` draw."""
    graph = circuit_graph(circuit, n_layers, n_heads)
    return _node_table(graph, circuit_layout(graph))


def _node_table(graph: nx.MultiDiGraph, pos: Dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for node, data in graph.nodes(data=True):
        weight = sum(d["abs_score"] for *_, d in graph.in_edges(node, data=True))
        weight += sum(d["abs_score"] for *_, d in graph.out_edges(node, data=True))
        rows.append(
            {
                "node": node,
                **data,
                "x": float(pos[node][0]),
                "y": float(pos[node][1]),
                "weight": weight,
            }
        )
    columns = ["node", "kind", "block", "head", "group", "column", "in_circuit", "x", "y", "weight"]
    return pd.DataFrame(rows, columns=columns)


def _circuit_nodes_by_kind(
    nodes: pd.DataFrame,
) -> Iterator[Tuple[str, pd.DataFrame, pd.Series]]:
    """The circuit's nodes kind by kind (kinds without nodes skipped), each with its weight
    relative to the heaviest node of the circuit (what both drawings size markers by)."""
    inside = nodes[nodes["in_circuit"]]
    top = inside["weight"].max() if len(inside) else 1.0
    for kind in NODE_KINDS:
        part = inside[inside["kind"] == kind]
        if len(part):
            yield kind, part, part["weight"] / (top or 1.0)


def _node_color(kind: str) -> str:
    return sublayer_color(kind)


def _edge_styles(graph: nx.MultiDiGraph) -> List[Dict[str, Any]]:
    """Per graph edge: its ends, score, width, colour, dash and group (one list for both
    drawings)."""
    largest = max((d["abs_score"] for *_, d in graph.edges(data=True)), default=0.0) or 1.0
    groups = list(dict.fromkeys(d["group"] for *_, d in graph.edges(data=True)))
    styles = []
    for u, v, key, d in graph.edges(keys=True, data=True):
        styles.append(
            {
                "sender": u,
                "receiver": v,
                "key": key,
                "score": d["score"],
                "group": d["group"],
                "width": 0.6 + 3.4 * d["abs_score"] / largest,
                "color": token_group_color(d["group"], groups.index(d["group"])),
                "positive": d["score"] >= 0,
            }
        )
    return styles


def _column_ticks(
    graph: nx.MultiDiGraph, pos: Dict[str, np.ndarray]
) -> Tuple[List[float], List[str]]:
    n_layers = graph.graph["n_layers"]
    by_column: Dict[int, float] = {}
    for node, column in graph.nodes(data="column"):
        by_column.setdefault(column, float(pos[node][0]))
    columns = sorted(by_column)
    return [by_column[c] for c in columns], [_column_label(c, n_layers) for c in columns]


def plot_circuit(
    circuit: Any,
    *,
    n_layers: Optional[int] = None,
    n_heads: Optional[int] = None,
    labels: bool = True,
    max_edges: Optional[int] = None,
    title: Optional[str] = None,
    ax: Any = None,
    figsize: Optional[Tuple[float, float]] = None,
):
    """The circuit as a static graph over blocks (see the module docstring for the encoding).

    ``circuit``: an edge table or a :class:`~vit_embedding_lens.circuits.Circuit`. With ``n_layers``
    and ``n_heads`` (e.g. ``model.cfg.n_layers``, ``model.cfg.n_heads``) every component is drawn,
    those outside the circuit as small hollow dots, so the circuit's place in the model shows.
    Each edge is one arrow (its ``gid`` is ``"edge:<sender>-><receiver>:<row>"``). ``max_edges``
    draws only the strongest edges by ``|score|`` (the title says how many of how many), for
    circuits too dense to read.
    """
    import networkx as nx
    from matplotlib.lines import Line2D

    edges = circuit_edges(circuit)
    n_all = len(edges)
    if max_edges is not None:
        if max_edges < 1:
            raise ValueError(f"max_edges must be at least 1, got {max_edges}")
        edges = edges.sort_values("abs_score", ascending=False, kind="stable").head(max_edges)
    graph = circuit_graph(edges, n_layers, n_heads)
    pos = circuit_layout(graph)
    nodes = _node_table(graph, pos)
    if figsize is None:
        n_columns = max(int(nodes["column"].nunique()), 2)
        tallest = int(nodes.groupby("column").size().max()) if len(nodes) else 1
        figsize = (min(2.0 + 0.75 * n_columns, 18.0), min(2.2 + 0.32 * tallest, 14.0))
    fig, ax = figure_and_axes(ax, figsize=figsize)
    xy = {k: tuple(v) for k, v in pos.items()}
    for style in _edge_styles(graph):
        patches = nx.draw_networkx_edges(
            graph,
            xy,
            edgelist=[(style["sender"], style["receiver"], style["key"])],
            ax=ax,
            width=style["width"],
            edge_color=style["color"],
            style="solid" if style["positive"] else (0, (4, 2)),
            arrows=True,
            arrowsize=8,
            connectionstyle="arc3,rad=0.08",
            node_size=160,
            alpha=0.85,
        )
        for patch in patches:
            patch.set_gid(f"edge:{style['sender']}->{style['receiver']}:{style['key']}")
    outside = nodes[~nodes["in_circuit"]]
    if len(outside):
        ax.scatter(
            outside["x"], outside["y"], s=12, facecolors="none", edgecolors="0.75", linewidths=0.6
        )
    drawn = []
    for kind, part, relative in _circuit_nodes_by_kind(nodes):
        drawn.append(kind)
        ax.scatter(
            part["x"],
            part["y"],
            s=60 + 140 * relative,
            color=_node_color(kind),
            edgecolors="white",
            linewidths=0.8,
            zorder=3,
        )
        if labels:
            for _, row in part.iterrows():
                ax.annotate(
                    row["node"],
                    (row["x"], row["y"]),
                    xytext=(0, 7),
                    textcoords="offset points",
                    ha="center",
                    fontsize=6.5,
                    zorder=4,
                )
    ticks, names = _column_ticks(graph, pos)
    ax.set_xticks(ticks)
    ax.set_xticklabels(names, fontsize=7, rotation=90 if len(ticks) > 14 else 0)
    ax.set_yticks([])
    ax.tick_params(axis="x", bottom=True, labelbottom=True)  # networkx's drawing hides them
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.margins(x=0.06, y=0.1)
    handles = [
        Line2D([], [], ls="", marker="o", color=_node_color(k), label=_KIND_LABELS[k])
        for k in drawn
    ]
    groups = list(dict.fromkeys(d["group"] for *_, d in graph.edges(data=True)))
    handles += [
        Line2D([], [], color=token_group_color(g, i), label=_group_label(g))
        for i, g in enumerate(groups)
    ]
    scores = [d["score"] for *_, d in graph.edges(data=True)]
    if any(s < 0 for s in scores):
        handles += [
            Line2D([], [], color="0.3", label="score > 0"),
            Line2D([], [], color="0.3", ls=(0, (4, 2)), label="score < 0"),
        ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        frameon=False,
        title="edge width: |score|",
        title_fontsize=7,
    )
    n_edges = graph.number_of_edges()
    default = f"circuit: {n_edges} edge{'s' if n_edges != 1 else ''}"
    if n_edges < n_all:
        default = f"circuit: the strongest {n_edges} of {n_all} edges"
    ax.set_title(title or default, fontsize=9)
    return fig


def _group_label(group: str) -> str:
    return "all tokens" if group == NO_GROUP else f"tokens: {group}"


def circuit_figure_plotly(
    circuit: Any,
    *,
    n_layers: Optional[int] = None,
    n_heads: Optional[int] = None,
    title: Optional[str] = None,
):
    """The circuit as a plotly Figure: one line trace per edge (``meta="edge"``, hover: sender,
    receiver, score, group), one marker trace per node kind (hover: the node, its blocks and
    summed ``|score|``), the skeleton (with ``n_layers``, ``n_heads``) as faint dots."""
    import plotly.graph_objects as go

    graph = circuit_graph(circuit, n_layers, n_heads)
    pos = circuit_layout(graph)
    nodes = _node_table(graph, pos)
    fig = go.Figure()
    shown: set = set()
    for style in _edge_styles(graph):
        (x0, y0), (x1, y1) = pos[style["sender"]], pos[style["receiver"]]
        text = (
            f"{style['sender']} → {style['receiver']}<br>score {style['score']:.4g}"
            f"<br>{_group_label(style['group'])}"
        )
        legend = _group_label(style["group"])
        fig.add_trace(
            go.Scatter(
                x=[x0, (x0 + x1) / 2, x1],
                y=[y0, (y0 + y1) / 2, y1],
                mode="lines",
                line=dict(
                    width=style["width"],
                    color=style["color"],
                    dash="solid" if style["positive"] else "dash",
                ),
                opacity=0.8,
                hoverinfo="text",
                text=[text] * 3,
                name=legend,
                legendgroup=legend,
                showlegend=legend not in shown,
                meta="edge",
            )
        )
        shown.add(legend)
    outside = nodes[~nodes["in_circuit"]]
    if len(outside):
        fig.add_trace(
            go.Scatter(
                x=outside["x"],
                y=outside["y"],
                mode="markers",
                marker=dict(size=5, color="rgba(0,0,0,0)", line=dict(color="#bfbfbf", width=1)),
                hoverinfo="text",
                text=outside["node"],
                name="not in the circuit",
                meta="skeleton",
            )
        )
    for kind, part, relative in _circuit_nodes_by_kind(nodes):
        hover = [
            f"<b>{r.node}</b><br>{_KIND_LABELS[kind]}"
            + (f", block {r.block}" if r.block is not None and not pd.isna(r.block) else "")
            + f"<br>summed |score| {r.weight:.4g}"
            for r in part.itertuples()
        ]
        fig.add_trace(
            go.Scatter(
                x=part["x"],
                y=part["y"],
                mode="markers+text",
                marker=dict(
                    size=(9 + 12 * relative).tolist(),
                    color=_node_color(kind),
                    line=dict(color="white", width=1),
                ),
                text=part["node"],
                textposition="top center",
                textfont=dict(size=9),
                hovertext=hover,
                hoverinfo="text",
                name=_KIND_LABELS[kind],
                meta="node",
            )
        )
    ticks, names = _column_ticks(graph, pos)
    n_edges = graph.number_of_edges()
    fig.update_layout(
        title=title or f"circuit: {n_edges} edge{'s' if n_edges != 1 else ''}",
        xaxis=dict(tickvals=ticks, ticktext=names, showgrid=False, zeroline=False),
        yaxis=dict(visible=False),
        plot_bgcolor="white",
        hovermode="closest",
        legend=dict(title="edge width: |score|, dashed: score < 0"),
        margin=dict(l=20, r=20, t=50, b=40),
        height=int(min(300 + 18 * int(nodes.groupby("column").size().max() or 1), 900)),
    )
    return fig


class _PlotlyRendered:
    """A plotly Figure in the shape :class:`InteractiveView` renders: ``local_src`` (plotly.js
    inline: offline) and ``cdn_src``."""

    def __init__(self, figure: Any) -> None:
        self.figure = figure

    def _html(self, include: Any) -> str:
        config = {"displaylogo": False, "responsive": True}
        return self.figure.to_html(full_html=False, include_plotlyjs=include, config=config)

    @property
    def local_src(self) -> str:
        return self._html(True)

    @property
    def cdn_src(self) -> str:
        return self._html("cdn")


def circuit_view(
    circuit: Any,
    *,
    n_layers: Optional[int] = None,
    n_heads: Optional[int] = None,
    title: Optional[str] = None,
    source: str = "local",
) -> InteractiveView:
    """The circuit as an interactive graph for Jupyter (hover an edge for its score, zoom, toggle
    token groups in the legend), with :func:`plot_circuit` as its static figure and
    :func:`circuit_layout_table` as its data. ``source="local"`` (default) inlines plotly.js, so
    the view works offline and in the saved ``.html``; ``"cdn"`` loads it from the web instead.
    ``.plotly`` is the plotly Figure."""
    from vit_embedding_lens.viz.interactive import InteractiveView

    figure = circuit_figure_plotly(circuit, n_layers=n_layers, n_heads=n_heads, title=title)
    view = InteractiveView(
        _PlotlyRendered(figure),
        lambda: plot_circuit(circuit, n_layers=n_layers, n_heads=n_heads, title=title),
        title or "circuit",
        data=circuit_layout_table(circuit, n_layers, n_heads),
        source=source,  # type: ignore[arg-type]
    )
    view.plotly = figure  # type: ignore[attr-defined]
    return view


# -------------------------------------------------------------------------------------------------
# Faithfulness curves
# -------------------------------------------------------------------------------------------------
def minimal_circuit_size(curve: pd.DataFrame, target: float, kind: str = "top") -> Optional[int]:
    """The fewest edges whose ``kind`` circuit reaches ``target`` faithfulness (the mean over
    rows of the same size), or None when no size does."""
    _check_curve(curve)
    part = curve[curve["kind"] == kind].groupby("n_edges")["faithfulness"].mean()
    reached = part[part >= target]
    return None if reached.empty else int(reached.index.min())


def _check_curve(curve: Any) -> None:
    if not isinstance(curve, pd.DataFrame):
        raise TypeError(f"a faithfulness curve is a DataFrame, got {type(curve).__name__}")
    missing = [c for c in ("n_edges", "faithfulness", "kind") if c not in curve.columns]
    if missing:
        raise ValueError(
            f"the faithfulness curve lacks the columns {missing}; it has {list(curve.columns)}"
        )


def plot_faithfulness_curve(
    curve: pd.DataFrame,
    *,
    target: Optional[float] = None,
    minimal: Optional[int] = None,
    minimal_faithfulness: Optional[float] = None,
    log_x: Optional[bool] = None,
    title: Optional[str] = None,
    ax: Any = None,
    figsize: Tuple[float, float] = (6.5, 3.6),
):
    """Faithfulness against circuit size: the top-scored circuits (``kind="top"``), random
    circuits of the same sizes (``kind="random"``: their mean over repeats with a min-max band),
    the ``target`` share as a dashed line, and the minimal circuit (``minimal`` edges, else the
    fewest top edges reaching ``target``) marked at ``minimal_faithfulness`` (default: the top
    curve's value at that size). 1 is the full model's metric, 0 the fully ablated one.
    ``log_x`` (default: when sizes span more than 20×) puts sizes on a symlog axis."""
    _check_curve(curve)
    if curve.empty:
        raise ValueError("the faithfulness curve is empty: nothing to draw")
    fig, ax = figure_and_axes(ax, figsize=figsize)
    kinds = list(dict.fromkeys(curve["kind"]))
    for i, kind in enumerate(kinds):
        rows = curve[curve["kind"] == kind].groupby("n_edges")["faithfulness"]
        mean, lo, hi = rows.mean(), rows.min(), rows.max()
        color = CIRCUIT_COLORS["top"] if kind == "top" else method_color(str(kind), i)
        label = {"top": "top-scored edges", "random": "random edges"}.get(str(kind), str(kind))
        ax.plot(mean.index, mean.values, marker="o", ms=3, color=color, label=label)
        if (hi > lo).any():
            ax.fill_between(mean.index, lo.values, hi.values, color=color, alpha=0.2, lw=0)
    ax.axhline(1.0, color=REFERENCE_COLOR, lw=0.8, ls=":")
    ax.axhline(0.0, color=REFERENCE_COLOR, lw=0.8, ls=":")
    if target is not None:
        ax.axhline(target, color=REFERENCE_COLOR, lw=1.0, ls="--", label=f"target {target:.0%}")
        if minimal is None and "top" in kinds:
            minimal = minimal_circuit_size(curve, target)
    if minimal is not None:
        top = curve[(curve["kind"] == "top") & (curve["n_edges"] == minimal)]["faithfulness"]
        y = float(top.mean()) if len(top) else (target if target is not None else 1.0)
        if minimal_faithfulness is not None:
            y = float(minimal_faithfulness)
        ax.axvline(minimal, color=CIRCUIT_COLORS["minimal"], lw=1.0, ls="-.")
        ax.plot(
            [minimal],
            [y],
            marker="*",
            ms=12,
            color=CIRCUIT_COLORS["minimal"],
            ls="",
            label=f"minimal circuit: {minimal} edges",
        )
    sizes = curve["n_edges"].to_numpy(dtype=float)
    positive = sizes[sizes > 0]
    if log_x is None:
        log_x = len(positive) > 0 and positive.max() / positive.min() > 20
    if log_x:
        from matplotlib.ticker import ScalarFormatter

        ax.set_xscale("symlog", linthresh=1.0)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("edges kept in the circuit")
    ax.set_ylabel("faithfulness (share of the metric)")
    ax.set_title(title or "Faithfulness of the circuit, by size", fontsize=9)
    legend_outside(ax)
    return fig


__all__ = [
    "CircuitNode",
    "circuit_edges",
    "circuit_figure_plotly",
    "circuit_graph",
    "circuit_layout",
    "circuit_layout_table",
    "circuit_view",
    "minimal_circuit_size",
    "parse_node",
    "plot_circuit",
    "plot_faithfulness_curve",
]
