"""Interventions on images: token removal, attention knockout, ablation and activation patching.

- token removal: ``model(images, keep_mask=keep)``; :func:`remove_tokens`, :func:`remove_context`,
  :func:`kept_positions`, :func:`to_layout_order`
- attention knockout: :func:`knockout` (``"self_only"``, ``"no_cls"``, any query/key sets;
  ``pre_softmax`` on the fused path, or ``post_softmax`` as the reference code)
- ablation: :func:`ablate`, :func:`ablation_hooks` (zero, mean, resample)
- activation patching: ``get_act_patch_*`` (batched sweeps), :func:`sweep`, :func:`run_patching`
- class-space metrics: :class:`ClassSpaceMetric`, :func:`logit_diff`, :func:`probability`,
  :func:`identifiability`
"""

from vit_embedding_lens.interventions.ablation import ablate, ablation_hooks
from vit_embedding_lens.interventions.knockout import AttentionKnockout, knockout, knockout_mask
from vit_embedding_lens.interventions.metrics import (
    ClassSpaceMetric,
    class_rank,
    identifiability,
    logit_diff,
    probability,
)
from vit_embedding_lens.interventions.patching import (
    PatchingResult,
    get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_pattern_by_query_pos,
    get_act_patch_attn_head_q_all_pos,
    get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_result_all_pos,
    get_act_patch_attn_head_result_by_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_v_by_pos,
    get_act_patch_attn_out,
    get_act_patch_block_every,
    get_act_patch_mlp_out,
    get_act_patch_resid_mid,
    get_act_patch_resid_post,
    get_act_patch_resid_pre,
    run_patching,
    sweep,
)
from vit_embedding_lens.interventions.selection import grid_region, grid_tiles, token_mask
from vit_embedding_lens.interventions.token_removal import (
    RemovalRun,
    keep_class_tokens,
    keep_context_tokens,
    kept_positions,
    remove_context,
    remove_object,
    remove_tokens,
    to_layout_order,
)

__all__ = [
    "AttentionKnockout",
    "ClassSpaceMetric",
    "PatchingResult",
    "RemovalRun",
    "ablate",
    "ablation_hooks",
    "class_rank",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_query_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_result_all_pos",
    "get_act_patch_attn_head_result_by_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_out",
    "get_act_patch_block_every",
    "get_act_patch_mlp_out",
    "get_act_patch_resid_mid",
    "get_act_patch_resid_post",
    "get_act_patch_resid_pre",
    "grid_region",
    "grid_tiles",
    "identifiability",
    "keep_class_tokens",
    "keep_context_tokens",
    "kept_positions",
    "knockout",
    "knockout_mask",
    "logit_diff",
    "probability",
    "remove_context",
    "remove_object",
    "remove_tokens",
    "run_patching",
    "sweep",
    "to_layout_order",
    "token_mask",
]
