"""Run a model once and keep (a slice of) chosen activations, without caching everything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Tuple, Union

from torch import Tensor

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT


def capture(
    model: HookedViT,
    images: Tensor,
    keep: Mapping[str, Optional[Callable[[Tensor], Tensor]]],
    *,
    detach: bool = True,
) -> tuple:
    """``(output, {hook_name: kept})``: ``keep[name]`` maps the activation to what is stored
    (``None`` stores it whole), e.g. only the CLS query rows of an attention pattern.

    With ``detach=False`` the stored tensors stay in the autograd graph (run under grad mode).
    """
    store: Dict[str, Tensor] = {}

    def make_hook(fn):
        def hook(act: Tensor, hook) -> None:
            kept = act if fn is None else fn(act)
            store[hook.name] = kept.detach() if detach else kept

        return hook

    hooks: List[Tuple[Union[str, Callable], Callable]] = [
        (name, make_hook(fn)) for name, fn in keep.items()
    ]
    out = model.run_with_hooks(images, fwd_hooks=hooks)
    missing = [name for name in keep if name not in store]
    if missing:
        raise RuntimeError(f"hook points {missing} did not fire; check the model's block count")
    return out, store
