"""Attribution methods by name, for the perturbation benchmark and the command line.

Every method is called as ``method(model, images, classes, progress=...) -> AttributionMap``;
a :class:`~vit_embedding_lens.attribution.probes.ProbeAttribution` fits the same call.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Dict

from vit_embedding_lens.attribution.chefer import chefer_relevance
from vit_embedding_lens.attribution.class_space import class_space_attribution
from vit_embedding_lens.attribution.random_map import random_attribution
from vit_embedding_lens.attribution.raw_attention import raw_attention
from vit_embedding_lens.attribution.rollout import attention_rollout

if TYPE_CHECKING:
    from vit_embedding_lens.attribution.result import AttributionMap

AttributionMethod = Callable[..., "AttributionMap"]

ATTRIBUTION_METHODS: Dict[str, AttributionMethod] = {
    "class_space": class_space_attribution,
    "class_space_double_softmax": partial(class_space_attribution, loss="double_softmax"),
    "chefer": chefer_relevance,
    "rollout": attention_rollout,
    "raw_attention": raw_attention,
    "random": random_attribution,
}


def get_attribution_method(name: str) -> AttributionMethod:
    """The attribution function registered under ``name``."""
    if name not in ATTRIBUTION_METHODS:
        raise ValueError(
            f"unknown attribution method {name!r}; known: {sorted(ATTRIBUTION_METHODS)} "
            f"(or pass a callable, an AttributionMap or a [batch, n_patches] score tensor)"
        )
    return ATTRIBUTION_METHODS[name]
