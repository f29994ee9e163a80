"""The attribution figures' old address: they live in :mod:`vit_embedding_lens.viz.attribution`
(matplotlib code belongs to viz/); these names stay importable from here."""

from vit_embedding_lens.viz.attribution import (
    plot_attribution_maps,
    plot_perturbation_curves,
    plot_probe_comparison,
)

__all__ = ["plot_attribution_maps", "plot_perturbation_curves", "plot_probe_comparison"]
