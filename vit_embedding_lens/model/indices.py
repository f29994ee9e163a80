"""Block, head and neuron indices as users give them: one resolver for every analysis.

An index may be negative (``-1`` is the last); ``None`` means all. A bad index gets an
:class:`IndexOutOfRangeError` that names the valid range; it is both an ``IndexError`` and a
``ValueError``, so callers written against either keep catching it.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Iterable, List, Union

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

Indices = Union[None, int, Iterable[int]]


class IndexOutOfRangeError(IndexError, ValueError):
    """A block, head or neuron index outside ``-size .. size - 1``."""


def resolve_index(index: int, size: int, what: str = "index") -> int:
    """``index`` as a non-negative int below ``size`` (negative counts from the end)."""
    if isinstance(index, bool):
        raise TypeError(f"{what} must be an int, got a bool ({index})")
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(index).__name__}") from None
    if not -size <= i < size:
        raise IndexOutOfRangeError(
            f"{what} {i} is out of range: the model has {size} {what}s "
            f"(0..{size - 1}, or -{size}..-1 from the end)"
        )
    return i % size


def resolve_indices(
    indices: Indices,
    size: int,
    what: str = "index",
    *,
    distinct: bool = False,
    allow_empty: bool = False,
) -> List[int]:
    """Non-negative indices from one index, several, or None (all of ``range(size)``).

    ``distinct``: sorted without repeats (for masks); otherwise the given order is kept.
    ``allow_empty``: an empty selection is returned as ``[]`` instead of refused.
    """
    if indices is None:
        return list(range(size))
    items = [indices] if isinstance(indices, int) else list(indices)
    out = [resolve_index(i, size, what) for i in items]
    if not out and not allow_empty:
        raise ValueError(f"{what}s is empty; give at least one {what} index (or None for all)")
    return sorted(set(out)) if distinct else out


def _size(model_or_size: Union["HookedViT", int], attr: str) -> int:
    return model_or_size if isinstance(model_or_size, int) else getattr(model_or_size.cfg, attr)


def resolve_block(model_or_n_layers: Union["HookedViT", int], block: int) -> int:
    """One block index (negative counts from the end) of a model or of ``n_layers`` blocks."""
    return resolve_index(block, _size(model_or_n_layers, "n_layers"), "block")


def resolve_blocks(
    model_or_n_layers: Union["HookedViT", int], blocks: Indices = None, **options: bool
) -> List[int]:
    """Block indices of a model (or of ``n_layers`` blocks); all blocks when None. ``options``:
    ``distinct``, ``allow_empty`` of :func:`resolve_indices` (both False by default)."""
    return resolve_indices(blocks, _size(model_or_n_layers, "n_layers"), "block", **options)


def resolve_heads(
    model_or_n_heads: Union["HookedViT", int], heads: Indices = None, **options: bool
) -> List[int]:
    """Head indices, sorted and distinct unless ``distinct=False``; all heads when None."""
    options = {"distinct": True, **options}
    return resolve_indices(heads, _size(model_or_n_heads, "n_heads"), "head", **options)
