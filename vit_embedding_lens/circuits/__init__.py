"""Circuits on images: counterfactual pairs, attribution patching of nodes and edges, running a
circuit with the other edges ablated, faithfulness curves and circuit discovery.

- pairs: :class:`ImagePairs`, :func:`class_pairs`, :func:`patch_pairs`, :func:`corrupt_patches`,
  :func:`ablation_reference` (mean / resample ablation over a data set)
- the graph: :class:`CircuitGraph` (senders ``"embed"``, ``"a{l}.h{h}"``, ``"m{l}"``; receivers
  ``"a{l}.h{h}"``, ``"m{l}"``, ``"logits"``), :func:`graph_forward`, :func:`token_groups`
- nodes: :func:`node_attribution` (AtP, integrated gradients, GradDrop), :func:`exact_node_effects`
- edges: :func:`edge_attribution` (EAP, EAP-IG)
- circuits: :class:`Circuit`, :func:`run_circuit`, :func:`run_circuits`,
  :func:`faithfulness_curve`, :func:`discover_circuit`, :func:`prune_dangling`,
  :func:`random_circuit`
"""

from vit_embedding_lens.circuits.circuit import (
    CURVE_COLUMNS,
    Circuit,
    discover_circuit,
    edge_mask,
    faithfulness,
    faithfulness_curve,
    prune_dangling,
    random_circuit,
    run_circuit,
    run_circuits,
)
from vit_embedding_lens.circuits.edges import EDGE_COLUMNS, edge_attribution
from vit_embedding_lens.circuits.graph import (
    AblationReference,
    CircuitGraph,
    ablation_reference,
    graph_forward,
    head_name,
    mlp_name,
    node_with_group,
    resid_name,
    sender_activations,
)
from vit_embedding_lens.circuits.groups import token_groups
from vit_embedding_lens.circuits.nodes import (
    NODE_COLUMNS,
    exact_node_effects,
    node_attribution,
    spearman,
)
from vit_embedding_lens.circuits.pairs import (
    ImagePairs,
    class_pairs,
    corrupt_patches,
    patch_pairs,
)

__all__ = [
    "CURVE_COLUMNS",
    "EDGE_COLUMNS",
    "NODE_COLUMNS",
    "AblationReference",
    "Circuit",
    "CircuitGraph",
    "ImagePairs",
    "ablation_reference",
    "class_pairs",
    "corrupt_patches",
    "discover_circuit",
    "edge_attribution",
    "edge_mask",
    "exact_node_effects",
    "faithfulness",
    "faithfulness_curve",
    "graph_forward",
    "head_name",
    "mlp_name",
    "node_attribution",
    "node_with_group",
    "patch_pairs",
    "prune_dangling",
    "random_circuit",
    "resid_name",
    "run_circuit",
    "run_circuits",
    "sender_activations",
    "spearman",
    "token_groups",
]
