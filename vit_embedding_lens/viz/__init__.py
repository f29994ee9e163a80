"""Figures and interactive views of the analyses.

Static figures are matplotlib Figures built without pyplot (headless-safe); each has a ``*_table``
companion returning the tidy data it draws. Interactive views wrap circuitsvis (attention, classes)
or plotly (circuit graphs, laid out by networkx), carry their JavaScript inline (offline), and fall
back to the static figure where JavaScript is unavailable. Token labels always come from
``model.layout``.
"""

from vit_embedding_lens.viz._figures import figure_to_png
from vit_embedding_lens.viz.attention import attention_table, plot_attention
from vit_embedding_lens.viz.attribution import (
    plot_attribution_maps,
    plot_perturbation_curves,
    plot_probe_comparison,
)
from vit_embedding_lens.viz.change_rates import change_rates_table, plot_change_rates
from vit_embedding_lens.viz.circuit import (
    circuit_graph,
    circuit_layout_table,
    circuit_view,
    plot_circuit,
    plot_faithfulness_curve,
)
from vit_embedding_lens.viz.heatmaps import heatmap_grid_table, plot_heatmap_grid
from vit_embedding_lens.viz.identifiability import (
    identifiability_evolution_table,
    plot_identifiability_evolution,
    plot_lens_comparison,
)
from vit_embedding_lens.viz.interactive import (
    InteractiveView,
    attention_view,
    class_probability_view,
    topk_tokens_view,
)
from vit_embedding_lens.viz.kv_agreement import kv_agreement_table, plot_kv_agreement
from vit_embedding_lens.viz.overlay import plot_overlay
from vit_embedding_lens.viz.predictions import (
    TokenClassPredictions,
    token_class_predictions,
    token_types,
)
from vit_embedding_lens.viz.token_grid import plot_token_grid, token_grid_table

__all__ = [
    "InteractiveView",
    "TokenClassPredictions",
    "attention_table",
    "attention_view",
    "change_rates_table",
    "circuit_graph",
    "circuit_layout_table",
    "circuit_view",
    "class_probability_view",
    "figure_to_png",
    "heatmap_grid_table",
    "identifiability_evolution_table",
    "kv_agreement_table",
    "plot_attention",
    "plot_attribution_maps",
    "plot_change_rates",
    "plot_circuit",
    "plot_faithfulness_curve",
    "plot_heatmap_grid",
    "plot_identifiability_evolution",
    "plot_lens_comparison",
    "plot_kv_agreement",
    "plot_overlay",
    "plot_perturbation_curves",
    "plot_probe_comparison",
    "plot_token_grid",
    "token_class_predictions",
    "token_grid_table",
    "token_types",
    "topk_tokens_view",
]
