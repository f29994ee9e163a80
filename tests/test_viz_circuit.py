"""Circuit figures: the graph and its layered layout, the static and interactive drawings (one
drawn edge per circuit edge, offline HTML), the faithfulness curve, and the report embedding a
circuit view offline."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from vit_embedding_lens.viz.circuit import (
    circuit_graph,
    circuit_layout_table,
    circuit_view,
    minimal_circuit_size,
    parse_node,
    plot_circuit,
    plot_faithfulness_curve,
)
from vit_embedding_lens.viz.palette import CIRCUIT_COLORS, sublayer_color, token_group_color

N_LAYERS, N_HEADS = 3, 4


@pytest.fixture
def edges() -> pd.DataFrame:
    """A hand-made circuit over 3 blocks; two edges join the same nodes for two token groups."""
    rows = [
        ("embed", "a0.h2", 0.8, "cls"),
        ("embed", "a0.h2", 0.3, "image"),
        ("a0.h2", "m0", -0.4, None),
        ("m0", "a1.h0@cls", 0.5, None),
        ("a0.h2", "a2.h3", 0.2, None),
        ("a1.h0@cls", "m2", 0.6, None),
        ("m2", "logits", 1.0, None),
        ("a2.h3", "logits", -0.1, None),
    ]
    return pd.DataFrame(rows, columns=["sender", "receiver", "score", "group"])


class _Circuit:
    """A stand-in for circuits.Circuit: the drawings read its ``edges``."""

    def __init__(self, edges: pd.DataFrame) -> None:
        self.edges = edges


def test_parse_node_reads_every_kind_and_refuses_others():
    assert parse_node("embed").kind == "embed"
    head = parse_node("a3.h5@cls")
    assert (head.kind, head.block, head.head, head.group) == ("attn", 3, 5, "cls")
    assert (parse_node("m2").kind, parse_node("m2").block) == ("mlp", 2)
    assert parse_node("logits").column(4) == 9
    for bad in ("a3", "h5", "mlp2", "a1.h2@", "resid"):
        with pytest.raises(ValueError, match="unknown circuit node"):
            parse_node(bad)


def test_graph_keeps_every_edge_and_positions_follow_block_order(edges):
    graph = circuit_graph(edges, N_LAYERS, N_HEADS)
    assert graph.number_of_edges() == len(edges)  # the two embed -> a0.h2 edges stay two
    table = circuit_layout_table(edges, N_LAYERS, N_HEADS)
    assert len(table) == 2 + N_LAYERS * (N_HEADS + 1)  # skeleton: every head and MLP once
    assert table["in_circuit"].sum() == len(set(edges.sender) | set(edges.receiver))
    x = table.set_index("node")["x"]
    y = table.set_index("node")["y"]
    order = ["embed"]
    for block in range(N_LAYERS):
        heads = [h for h in x.index if h.startswith(f"a{block}.")]
        assert x[heads].nunique() == 1  # one column per block's heads
        assert list(y[heads].sort_values(ascending=False).index) == sorted(
            heads, key=lambda n: parse_node(n).head
        )  # head 0 on top
        order += [heads[0], f"m{block}"]
    order.append("logits")
    assert np.all(np.diff(x[order].to_numpy()) > 0)  # embed < A0 < M0 < A1 < ... < logits
    for sender, receiver in zip(edges.sender, edges.receiver):
        assert x[sender] < x[receiver]


def test_graph_edges_carry_the_table_scores_and_nodes_their_place(edges):
    graph = circuit_graph(edges, N_LAYERS, N_HEADS)
    drawn = sorted((u, v, k, d["score"]) for u, v, k, d in graph.edges(keys=True, data=True))
    table = sorted(zip(edges.sender, edges.receiver, edges.index, edges.score))
    assert drawn == table  # one graph edge per row, keyed by the row, weighted by its score
    for u, v, k, d in graph.edges(keys=True, data=True):
        assert d["abs_score"] == pytest.approx(abs(d["score"]))
    assert graph.edges["embed", "a0.h2", 0]["group"] == "cls"
    in_circuit = {n for n, d in graph.nodes(data=True) if d["in_circuit"]}
    assert in_circuit == set(edges.sender) | set(edges.receiver)
    # every component once: a1.h0@cls stands for a1.h0, no bare a1.h0 is added
    assert graph.number_of_nodes() == 2 + N_LAYERS * (N_HEADS + 1)
    assert "a1.h0" not in graph
    head = graph.nodes["a1.h0@cls"]
    assert (head["kind"], head["block"], head["head"], head["group"]) == ("attn", 1, 0, "cls")
    assert graph.nodes["m2"]["column"] == 6 and graph.nodes["logits"]["column"] == 7


def test_a_circuit_found_on_the_bundled_model_is_drawn_edge_for_edge():
    """The drawings read a real :class:`~vit_embedding_lens.circuits.Circuit` (its edge table,
    token groups included) from the circuits package."""
    import torch

    from vit_embedding_lens import HookedViT, circuits
    from vit_embedding_lens.zoo import load_bundled_eval

    torch.manual_seed(0)
    model = HookedViT.from_bundled()
    digits = load_bundled_eval("mnist-vit")
    pairs = circuits.class_pairs(digits.images, digits.labels, 3, 8, n=2)
    metric = pairs.metric(model)
    groups = dict(tokens=["cls"])
    scores = circuits.edge_attribution(
        model, pairs.clean, pairs.corrupt, metric, method="eap", **groups
    )
    found = circuits.discover_circuit(
        model, pairs.clean, pairs.corrupt, metric, scores, target=0.5, **groups
    )
    cfg = model.cfg
    graph = circuit_graph(found, cfg.n_layers, cfg.n_heads)
    assert graph.number_of_edges() == found.n_edges == len(found.edges)
    by_row = {k: d["score"] for _, _, k, d in graph.edges(keys=True, data=True)}
    np.testing.assert_allclose([by_row[i] for i in found.edges.index], found.edges["score"])
    assert {d["group"] for *_, d in graph.edges(keys=True, data=True)} <= {"cls", "rest"}
    view = circuit_view(found, n_layers=cfg.n_layers, n_heads=cfg.n_heads)
    assert sum(t.meta == "edge" for t in view.plotly.data) == found.n_edges
    fig = plot_circuit(found, n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_edges=10)
    assert sum(str(p.get_gid()).startswith("edge:") for p in fig.axes[0].patches) == min(
        10, found.n_edges
    )


def test_static_figure_draws_one_arrow_per_edge_with_the_palette(edges):
    fig = plot_circuit(_Circuit(edges), n_layers=N_LAYERS, n_heads=N_HEADS)
    ax = fig.axes[0]
    arrows = [p for p in ax.patches if str(p.get_gid()).startswith("edge:")]
    assert len(arrows) == len(edges)
    by_gid = {p.get_gid(): p for p in arrows}
    cls_edge = by_gid["edge:embed->a0.h2:0"]
    assert to_hex(cls_edge.get_edgecolor()) == token_group_color("cls")
    assert to_hex(by_gid["edge:embed->a0.h2:1"].get_edgecolor()) == token_group_color("image")
    # the group suffix of the sender colours an edge without a group column value
    assert to_hex(by_gid["edge:a1.h0@cls->m2:5"].get_edgecolor()) == token_group_color("cls")
    # the strongest edge is the widest; a negative score is dashed
    widths = {gid: p.get_linewidth() for gid, p in by_gid.items()}
    assert max(widths, key=widths.get) == "edge:m2->logits:6"
    assert by_gid["edge:a0.h2->m0:2"].get_linestyle() != cls_edge.get_linestyle()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"attention head", "MLP", "logits", "tokens: cls", "score < 0"} <= set(labels)
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["embed", "A0", "M0", "A1", "M1", "A2", "M2", "logits"]
    colors = {to_hex(c.get_facecolor()[0]) for c in ax.collections if len(c.get_facecolor())}
    assert {sublayer_color("attn"), sublayer_color("mlp"), sublayer_color("logits")} <= colors


def test_a_circuit_without_skeleton_draws_only_its_nodes(edges):
    fig = plot_circuit(edges.iloc[:3])
    table = circuit_layout_table(edges.iloc[:3])
    assert set(table["node"]) == {"embed", "a0.h2", "m0"}
    assert sum(str(p.get_gid()).startswith("edge:") for p in fig.axes[0].patches) == 3


def test_bad_circuits_are_refused_with_the_reason(edges):
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_circuit(edges.drop(columns="score"))
    with pytest.raises(TypeError, match="DataFrame of edges"):
        plot_circuit([("embed", "m0", 1.0)])
    backwards = pd.DataFrame({"sender": ["m1"], "receiver": ["a0.h0"], "score": [1.0]})
    with pytest.raises(ValueError, match="does not go forward"):
        circuit_graph(backwards)
    with pytest.raises(ValueError, match="n_layers=2"):
        circuit_graph(edges, n_layers=2)
    with pytest.raises(ValueError, match="n_heads=3"):
        circuit_graph(edges, n_layers=3, n_heads=3)


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.external, self.inline_sizes = [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if tag in ("script", "link", "img", "iframe") and value.startswith(("http:", "https:")):
                self.external.append((tag, value))
            if tag in ("script", "link", "iframe") and value.startswith("//"):
                self.external.append((tag, value))
        if tag == "script":
            self._in_script = True
            self.inline_sizes.append(0)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.inline_sizes[-1] += len(data)


def _scripts(text: str) -> _Scripts:
    parser = _Scripts()
    parser.feed(text)
    return parser


def test_interactive_view_is_offline_and_draws_every_edge(edges, tmp_path):
    view = circuit_view(_Circuit(edges), n_layers=N_LAYERS, n_heads=N_HEADS, title="digits 3 vs 8")
    traces = view.plotly.data
    assert sum(t.meta == "edge" for t in traces) == len(edges)
    hover = " ".join(t.text[0] for t in traces if t.meta == "edge")
    assert "m2 → logits" in hover and "score -0.4" in hover
    nodes = [name for t in traces if t.meta == "node" for name in t.text]
    assert sorted(nodes) == sorted(set(edges.sender) | set(edges.receiver))
    for text in (
        view._repr_html_(),
        view.offline_html(),
        view.save(tmp_path / "c.html").read_text(),
    ):
        parsed = _scripts(text)
        assert parsed.external == []
        assert max(parsed.inline_sizes) > 1_000_000  # plotly.js itself is inlined
    assert "cdn.plot.ly" in circuit_view(edges, source="cdn").html()
    assert view.png().startswith(b"\x89PNG")
    assert set(view.data.loc[view.data["in_circuit"], "node"]) == set(nodes)


def _curve() -> pd.DataFrame:
    top = [0.1, 0.4, 0.75, 0.82, 0.95, 1.0]
    sizes = [1, 2, 4, 8, 16, 32]
    rows = [dict(n_edges=n, faithfulness=f, kind="top") for n, f in zip(sizes, top)]
    for seed in range(3):
        rows += [
            dict(n_edges=n, faithfulness=0.02 * (i + seed), kind="random", seed=seed)
            for i, n in enumerate(sizes)
        ]
    return pd.DataFrame(rows)


def test_minimal_circuit_is_the_fewest_edges_reaching_the_target():
    curve = _curve()
    assert minimal_circuit_size(curve, 0.8) == 8
    assert minimal_circuit_size(curve, 0.75) == 4
    assert minimal_circuit_size(curve, 1.0) == 32
    assert minimal_circuit_size(curve, 1.01) is None
    with pytest.raises(ValueError, match="lacks the columns"):
        minimal_circuit_size(curve.drop(columns="kind"), 0.5)


def test_faithfulness_figure_marks_target_minimal_and_random_band():
    curve = _curve()
    fig = plot_faithfulness_curve(curve, target=0.8)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    star = lines["minimal circuit: 8 edges"]
    assert list(star.get_xdata()) == [8] and list(star.get_ydata()) == [0.82]
    assert to_hex(star.get_color()) == CIRCUIT_COLORS["minimal"]
    assert list(lines["target 80%"].get_ydata()) == [0.8, 0.8]
    random = lines["random edges"]
    expected = curve[curve.kind == "random"].groupby("n_edges")["faithfulness"].mean()
    np.testing.assert_allclose(random.get_ydata(), expected.to_numpy())
    assert len(ax.collections) == 1  # the random circuits' min-max band
    assert ax.get_xscale() == "symlog"  # sizes span 32x
    with pytest.raises(ValueError, match="empty"):
        plot_faithfulness_curve(curve.iloc[:0])


def test_report_embeds_a_circuit_view_offline(edges, tmp_path):
    from vit_embedding_lens.report import write_report

    view = circuit_view(edges, n_layers=N_LAYERS, n_heads=N_HEADS)
    curve_fig = plot_faithfulness_curve(_curve(), target=0.8)
    page = write_report(
        tmp_path,
        {"circuits": {"edges": edges}},
        {"circuits": {"graph": view, "faithfulness": curve_fig}},
    )
    text = page.read_text()
    assert (tmp_path / "figures" / "circuits__graph.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "figures" / "circuits__faithfulness.png").exists()
    parsed = _scripts(text)
    assert parsed.external == []
    assert max(parsed.inline_sizes) > 1_000_000
    assert text.count('<div class="view">') == 1  # the curve stays a PNG
    assert '<noscript><img src="figures/circuits__graph.png"' in text
