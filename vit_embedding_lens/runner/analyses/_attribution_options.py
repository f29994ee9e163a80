"""The attribution analysis's options that separate the library from the reference code: which
``n`` the token-removal curve is evaluated at, and the class-space map's loss."""

from __future__ import annotations

from functools import partial
from typing import Callable

#: ``"full"``: every ``n`` in ``1 .. N-1`` (the exact curve the paper sums); ``"grid"``: powers of
#: two below ``N-1`` plus ``N-1`` (cheaper; the AUC is interpolated between them)
N_KEEP = ("full", "grid")
#: the class-space map's loss: cross-entropy on the projected logits (the library's) or on their
#: softmax (``"double_softmax"``, the reference code's)
LOSSES = ("cross_entropy", "double_softmax")


def method_with_loss(compute: Callable, name: str, loss: str) -> Callable:
    """``compute`` with the class-space ``loss`` bound when ``name`` is the class-space map."""
    if name == "class_space" and loss != "cross_entropy":
        return partial(compute, loss=loss)
    return compute
