"""ViTActivationCache: TransformerLens's ActivationCache, aware of the ViT token layout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities import get_act_name

from vit_embedding_lens.model.layout import TokenLayout

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


class ViTActivationCache(ActivationCache):
    """An ``ActivationCache`` whose model is a HookedViT.

    Every TransformerLens method (``accumulated_resid``, ``decompose_resid``,
    ``stack_head_results``, ``apply_ln_to_stack``, ``logit_attrs``, ...) works unchanged; this
    class adds access by token group through the model's :class:`TokenLayout`.
    """

    @property
    def layout(self) -> TokenLayout:
        return cast("HookedViT", self.model).layout

    def patch_tokens(self, key: Any) -> Tensor:
        """The image-patch tokens of a cached ``[..., pos, d]`` activation."""
        return self.layout.patch_tokens(self[key], dim=self._pos_dim(key))

    def prefix_tokens(self, key: Any) -> Tensor:
        """The prefix tokens (CLS, distillation, registers) of a cached activation."""
        return self.layout.prefix_tokens(self[key], dim=self._pos_dim(key))

    def _pos_dim(self, key: Any) -> int:
        """Token axis of a cached activation: -3 for per-head tensors, -2 otherwise."""
        name = key if isinstance(key, str) and key in self.cache_dict else _full_name(key)
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            raise ValueError(
                f"{name} has a query and a key token axis; index it with model.layout directly"
            )
        return -3 if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")) else -2


def _full_name(key: Any) -> str:
    """TransformerLens's short keys ("resid_post", ("z", 3), ...) as full hook names."""
    return get_act_name(key) if isinstance(key, str) else get_act_name(*key)
