"""Which image parts matter for a class: attributions, the token-removal benchmark, linear probes.

- :func:`class_space_attribution`: the paper's gradient of class-space losses w.r.t. attention.
- Baselines: :func:`chefer_relevance`, :func:`attention_rollout`, :func:`raw_attention`,
  :func:`random_attribution`, and probe scores (:class:`ProbeAttribution`).
- :func:`perturbation_benchmark`: accuracy as tokens are removed by importance, with AUCs.
- :func:`probe_comparison`: ridge probes vs the class-space projection per block, layer and token.

Definitions: ``METHODS.md`` §6.
"""

from vit_embedding_lens.attribution.chefer import chefer_relevance
from vit_embedding_lens.attribution.class_space import class_space_attribution, class_space_loss
from vit_embedding_lens.attribution.methods import ATTRIBUTION_METHODS, get_attribution_method
from vit_embedding_lens.attribution.overlay import colorize, image_to_rgb, overlay, upsample_map
from vit_embedding_lens.attribution.perturbation import (
    PerturbationResult,
    importance_rank,
    keep_masks,
    perturbation_auc,
    perturbation_benchmark,
)
from vit_embedding_lens.attribution.probes import (
    LinearProbes,
    ProbeAttribution,
    ProbeComparison,
    collect_token_activations,
    fit_linear_probes,
    probe_accuracy_table,
    probe_comparison,
    sample_per_class,
)
from vit_embedding_lens.attribution.random_map import random_attribution
from vit_embedding_lens.attribution.raw_attention import raw_attention
from vit_embedding_lens.attribution.readout import readout_positions, resolve_classes
from vit_embedding_lens.attribution.result import AttributionMap
from vit_embedding_lens.attribution.ridge import RidgeFit, fit_ridge, one_vs_all_targets
from vit_embedding_lens.attribution.rollout import attention_rollout
from vit_embedding_lens.viz.attribution import (  # figures: their home is viz/
    plot_attribution_maps,
    plot_perturbation_curves,
    plot_probe_comparison,
)

__all__ = [
    "ATTRIBUTION_METHODS",
    "AttributionMap",
    "LinearProbes",
    "PerturbationResult",
    "ProbeAttribution",
    "ProbeComparison",
    "RidgeFit",
    "attention_rollout",
    "chefer_relevance",
    "class_space_attribution",
    "class_space_loss",
    "collect_token_activations",
    "colorize",
    "fit_linear_probes",
    "fit_ridge",
    "get_attribution_method",
    "image_to_rgb",
    "importance_rank",
    "keep_masks",
    "one_vs_all_targets",
    "overlay",
    "perturbation_auc",
    "perturbation_benchmark",
    "plot_attribution_maps",
    "plot_perturbation_curves",
    "plot_probe_comparison",
    "probe_accuracy_table",
    "probe_comparison",
    "random_attribution",
    "raw_attention",
    "readout_positions",
    "resolve_classes",
    "sample_per_class",
    "upsample_map",
]
