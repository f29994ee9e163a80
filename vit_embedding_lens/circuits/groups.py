"""Token groups for circuits: named sets of tokens that nodes and edges are split by.

A group is one of the layout groups of :mod:`vit_embedding_lens.interventions.selection`
(``"cls"``, ``"dist"``, ``"registers"``, ``"prefix"``, ``"image"``, ``"all"``), ``"object"`` /
``"context"`` (the image tokens on / off the object, from a per-image token mask such as
:meth:`vit_embedding_lens.zoo.BundledEvalSet.class_token_mask`), ``"tiles"`` / ``"tiles:N"``
(the patch grid cut into regions of ``N × N`` patches by
:func:`~vit_embedding_lens.interventions.selection.grid_tiles`, named ``"r0:2,c0:2"`` ...), or any
``{name: spec}`` with a spec that :func:`~vit_embedding_lens.interventions.selection.token_mask`
reads (indices, a ``[pos]`` or per-image ``[batch, pos]`` bool mask).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from vit_embedding_lens.interventions.selection import GROUPS, TokenSpec, grid_tiles, token_mask
from vit_embedding_lens.model.layout import TokenLayout

Groups = Union[None, str, Sequence[str], Mapping[str, TokenSpec]]
#: group names :func:`token_groups` knows, besides ``{name: spec}`` mappings
GROUP_NAMES = (*GROUPS, "object", "context", "tiles", "tiles:N")


def token_groups(
    layout: TokenLayout,
    tokens: Groups,
    *,
    object_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    partition: bool = False,
) -> Dict[str, Bool[Tensor, "batch_or_1 pos"]]:
    """Named token groups as bool masks ``[1 or batch, pos]``.

    ``tokens``: None (every token on its own, named by ``layout.token_labels()``: ``"CLS"``,
    ``"P0,3"`` ...), a group name, a list of names, or ``{name: spec}``. ``object_mask`` (bool
    ``[batch, pos]`` or ``[pos]``) defines ``"object"`` and ``"context"``. With ``partition`` (edges
    and circuits) groups must not overlap, and the tokens no group covers form one more group,
    ``"rest"``.
    """
    N = layout.n_tokens
    if tokens is None:
        groups = {
            label: _row(token_mask(layout, [i])) for i, label in enumerate(layout.token_labels())
        }
    elif isinstance(tokens, Mapping):
        groups = {str(name): _row(token_mask(layout, spec)) for name, spec in tokens.items()}
    else:
        names = [tokens] if isinstance(tokens, str) else list(tokens)
        if not names:
            raise ValueError("no token groups given; use a group name, a list or a dict")
        groups = {}
        for name in names:
            if not isinstance(name, str):
                raise TypeError(
                    f"token groups are named by strings (or give {{name: spec}}), got {name!r}"
                )
            groups.update(_named(layout, name, object_mask))
    if not groups:
        raise ValueError("no token groups")
    if partition:
        groups = _partition(groups, N)
    return groups


def _row(mask: Tensor) -> Tensor:
    return mask if mask.ndim == 2 else mask[None]


def _named(layout: TokenLayout, name: str, object_mask: Optional[Tensor]) -> Dict[str, Tensor]:
    key = name.lower()
    if key in ("object", "context"):
        if object_mask is None:
            raise ValueError(
                f"token group {name!r} needs object_mask= (bool [batch, pos], True at image "
                "tokens on the object), e.g. BundledEvalSet.class_token_mask(model.layout)"
            )
        obj = _row(token_mask(layout, object_mask.bool()))
        image = _row(token_mask(layout, "image")).to(obj.device)
        return {key: obj & image if key == "object" else image & ~obj}
    if key == "tiles" or key.startswith("tiles:"):
        size = key.partition(":")[2] or "2"
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"tiles:N needs a positive tile size N, got {name!r}")
        return {k: v[None] for k, v in grid_tiles(layout, int(size)).items()}
    if key not in GROUPS and key not in ("patches", "distillation", "register"):
        raise ValueError(
            f"unknown token group {name!r}; use one of {GROUP_NAMES}, or {{name: spec}} with "
            "token indices or a bool mask"
        )
    return {key: _row(token_mask(layout, key))}


def _partition(groups: Dict[str, Tensor], n_tokens: int) -> Dict[str, Tensor]:
    rows = max(m.shape[0] for m in groups.values())
    device = next(iter(groups.values())).device
    count = torch.zeros(rows, n_tokens, dtype=torch.long, device=device)
    for m in groups.values():
        count = count + m.to(device).long()
    if bool((count > 1).any()):
        raise ValueError(
            f"token groups {list(groups)} overlap; edges need groups that do not share a token "
            "(e.g. 'cls', 'object', 'context')"
        )
    if bool((count == 0).any()):
        if "rest" in groups:
            raise ValueError("a group is named 'rest' but does not cover the remaining tokens")
        groups = {**groups, "rest": count == 0}
    return groups
