"""The random-init twin, for the lens's trained-vs-untrained comparisons (METHODS §2, §4).

It is built by the loading floor from the model's own config:
:func:`vit_embedding_lens.loading.random_init_twin`; this name stays importable from here.
"""

from vit_embedding_lens.loading.twin import random_init_twin

__all__ = ["random_init_twin"]
