"""The model's hook point names, spelled as TransformerLens spells them, built in one place.

Per-block names are ``blocks.{l}.`` followed by a suffix (:data:`BLOCK_HOOKS`); the rest sit
before or after the blocks (:data:`EMBED_HOOKS`, :data:`READOUT_HOOKS`). :func:`act_name` takes a
suffix (``"hook_resid_post"``, ``"attn.hook_z"``) or one of TransformerLens's short names
(``"resid_post"``, ``"z"``, ``"pattern"``; :func:`transformer_lens.utilities.get_act_name`).
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional

from transformer_lens.utilities import get_act_name

#: hook points of every block, as suffixes of ``blocks.{l}.`` (``ln1``/``ln2`` for LayerNorm models)
BLOCK_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
#: hook points before the blocks (``ln_pre`` models add ``ln_pre.hook_scale``/``hook_normalized``)
EMBED_HOOKS = ("hook_embed", "hook_pos_embed")
#: hook points of the attention pool (``global_pool="map"`` models, SigLIP), as suffixes of
#: ``attn_pool.``
POOL_HOOKS = (
    "hook_q",
    "hook_k",
    "hook_v",
    "hook_attn_scores",
    "hook_pattern",
    "hook_z",
    "hook_attn_out",
    "ln.hook_scale",
    "ln.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
)
#: hook points after the blocks, in the order they fire (``attn_pool.*`` only for attention-pool
#: models, ``hook_pooled_dist`` only for distilled models, ``hook_image_embed`` only for models
#: with a projection to a joint image-text space, ``hook_logits`` only with a head)
READOUT_HOOKS = (
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
    *(f"attn_pool.{name}" for name in POOL_HOOKS),
    "hook_pooled",
    "hook_pooled_dist",
    "hook_image_embed",
    "hook_logits",
)
POOLED = "hook_pooled"
IMAGE_EMBED = "hook_image_embed"
LOGITS = "hook_logits"


def pool_hook_name(name: str) -> str:
    """The full name of an attention-pool hook: ``"pattern"`` or ``"hook_pattern"`` ->
    ``"attn_pool.hook_pattern"`` (``"ln.hook_scale"``, ``"mlp.hook_pre"`` too)."""
    suffix = name if name.startswith("hook_") or "." in name else f"hook_{name}"
    if suffix not in POOL_HOOKS:
        raise ValueError(f"{name!r} is not an attention-pool hook; choose from {list(POOL_HOOKS)}")
    return f"attn_pool.{suffix}"


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def act_name(name: str, block: Optional[int] = None, layer_type: Optional[str] = None) -> str:
    """The full hook name of ``name`` in ``block``.

    ``name`` is a hook suffix (``"hook_resid_post"``, ``"attn.hook_z"``: joined to
    ``blocks.{block}.``, or returned as is without a block) or a TransformerLens short name
    (``"resid_post"``, ``"z"``, ``"pattern"``; ``"scale"`` with ``layer_type="ln1"`` ...), which
    ``get_act_name`` expands.
    """
    if name.startswith("hook_") or "." in name:
        return name if block is None else f"blocks.{int(block)}.{name}"
    return get_act_name(name, block, layer_type)


def block_hook_names(name: str, blocks: Iterable[int]) -> List[str]:
    """:func:`act_name` of ``name`` for each block, in order."""
    return [act_name(name, b) for b in blocks]


def hook_block(name: str) -> Optional[int]:
    """Block index of a hook name (``blocks.3.attn.hook_z`` -> 3); None outside the blocks."""
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) if match else None
