"""Per-token class predictions across blocks: the input of the logit-lens views.

The computation lives in :mod:`vit_embedding_lens.lens.readings` (the logit lens: every token of a
cached residual stream read as class logits, ``E · ln_final(v) + b``, METHODS §1); the views here
show its :class:`TokenClassPredictions` on the patch grid (:func:`~.token_grid.plot_token_grid`)
and in the interactive views. The names stay importable from here.
"""

from vit_embedding_lens.lens.readings import (
    SUBLAYER_HOOKS,
    TokenClassPredictions,
    token_class_predictions,
    token_types,
)

__all__ = ["SUBLAYER_HOOKS", "TokenClassPredictions", "token_class_predictions", "token_types"]
