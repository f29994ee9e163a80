"""The class-embedding lens: projections onto the class space and the metrics built on them."""

from vit_embedding_lens.lens.projection import ClassProjection, pooled_readout, project

__all__ = ["ClassProjection", "pooled_readout", "project"]
