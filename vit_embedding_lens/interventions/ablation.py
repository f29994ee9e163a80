"""Zero, mean and resample ablation of heads, attention layers, MLPs, neurons and token groups.

    with ablate(model, "head", blocks=3, heads=[0, 2], method="mean", reference=ref_images):
        logits = model(images)
    hooks = ablation_hooks(model, "neuron", blocks=5, neurons=[7, 11], tokens="image")

``component`` names what is ablated (TransformerLens's short names work): ``"head"``/``"z"``
(per-head outputs ``attn.hook_z``), ``"result"``, ``"q"``/``"k"``/``"v"``, ``"pattern"``,
``"attn"``/``"attn_out"`` (the attention write-in), ``"mlp"``/``"mlp_out"``, ``"neuron"``/
``"mlp_post"`` (MLP activations), ``"mlp_pre"``, ``"resid_pre"``/``"resid_mid"``/``"resid_post"``.
``tokens`` restricts any of them to a token group (a layout group, indices, or a per-token /
per-image bool mask). Replacement values:

- ``"zero"``: 0;
- ``"mean"``: the mean over a ``reference`` batch (images, or a cache holding the hook), per
  position;
- ``"resample"``: the activation of a random ``reference`` image, drawn per ablated image with
  ``seed`` (the same draw on every forward of the same batch size).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Tuple,
    Union,
)

import torch
from torch import Tensor

from vit_embedding_lens.interventions.selection import TokenSpec, selection_mask
from vit_embedding_lens.model.hook_names import block_hook_names
from vit_embedding_lens.model.indices import resolve_blocks

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

Method = Literal["zero", "mean", "resample"]
COMPONENTS: Dict[str, str] = {
    "head": "attn.hook_z",
    "z": "attn.hook_z",
    "result": "attn.hook_result",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
    "attn": "hook_attn_out",
    "attn_out": "hook_attn_out",
    "mlp": "hook_mlp_out",
    "mlp_out": "hook_mlp_out",
    "neuron": "mlp.hook_post",
    "mlp_post": "mlp.hook_post",
    "post": "mlp.hook_post",
    "mlp_pre": "mlp.hook_pre",
    "pre": "mlp.hook_pre",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
}


def component_hook_names(model: HookedViT, component: str, blocks=None) -> List[str]:
    """Full hook names of ``component`` in the chosen blocks (None = all)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; use one of {sorted(COMPONENTS)}")
    suffix = COMPONENTS[component]
    if suffix == "attn.hook_result" and not model.cfg.use_attn_result:
        raise ValueError(
            "per-head results are not computed; call model.set_use_attn_result(True) first"
        )
    return block_hook_names(suffix, resolve_blocks(model, blocks, distinct=True, allow_empty=True))


def ablation_hooks(
    model: HookedViT,
    component: str,
    *,
    blocks=None,
    heads=None,
    neurons=None,
    tokens: Optional[TokenSpec] = None,
    method: Method = "zero",
    reference: Optional[Union[Tensor, Mapping[str, Tensor]]] = None,
    seed: int = 0,
) -> List[Tuple[str, Callable]]:
    """``(hook name, hook)`` pairs that ablate ``component`` (see the module docstring)."""
    if method not in ("zero", "mean", "resample"):
        raise ValueError(f"method must be 'zero', 'mean' or 'resample', got {method!r}")
    names = component_hook_names(model, component, blocks)
    if neurons is not None and not names[0].endswith(("mlp.hook_post", "mlp.hook_pre")):
        raise ValueError("neurons= applies to the 'neuron' / 'mlp_pre' components")
    if heads is not None and names[0].split(".")[-1] not in (
        "hook_z",
        "hook_result",
        "hook_q",
        "hook_k",
        "hook_v",
        "hook_pattern",
    ):
        raise ValueError(
            "heads= applies to per-head components (head, result, q, k, v, pattern), not "
            f"{component!r}"
        )
    device = model.embed.W_E.device
    masks = {
        name: selection_mask(
            name,
            model.layout,
            model.cfg.n_heads,
            tokens=tokens,
            heads=heads,
            units=neurons,
            n_units=model.cfg.d_mlp,
            device=device,
        )
        for name in names
    }
    refs: Dict[str, Tensor] = {}
    if method != "zero":
        refs = _reference_activations(model, names, reference)
        if method == "mean":
            refs = {name: act.mean(0, keepdim=True) for name, act in refs.items()}

    def hook(act: Tensor, hook) -> Tensor:
        mask = masks[hook.name]
        if method == "zero":
            return act.masked_fill(mask, 0.0)
        ref = refs[hook.name].to(act.device, act.dtype)
        if ref.shape[1:] != act.shape[1:]:
            raise ValueError(
                f"{hook.name}: the reference activation has shape {tuple(ref.shape[1:])} per image "
                f"but the ablated run has {tuple(act.shape[1:])}; use reference images of the same "
                "size (and no token removal)"
            )
        if method == "resample":
            gen = torch.Generator().manual_seed(seed)
            ref = ref[torch.randint(ref.shape[0], (act.shape[0],), generator=gen).to(ref.device)]
        if mask.shape[0] not in (1, act.shape[0]):
            raise ValueError(
                f"a per-image token mask has {mask.shape[0]} rows for a batch of {act.shape[0]}"
            )
        return torch.where(mask, ref, act)

    return [(name, hook) for name in names]


def _reference_activations(model: HookedViT, names: List[str], reference) -> Dict[str, Tensor]:
    if reference is None:
        raise ValueError("mean and resample ablation need reference= images (or a cache of them)")
    if isinstance(reference, Tensor):
        with torch.no_grad():
            _, cache = model.run_with_cache(reference, names_filter=names)
        return {name: cache[name] for name in names}
    missing = [name for name in names if name not in reference]
    if missing:
        raise ValueError(
            f"the reference cache lacks {missing}; run model.run_with_cache(reference_images, "
            f"names_filter={names}) or pass the reference images"
        )
    return {name: reference[name] for name in names}


@contextmanager
def ablate(model: HookedViT, component: str, **kwargs) -> Iterator[None]:
    """Context manager form of :func:`ablation_hooks`: the model runs ablated inside the block."""
    with model.hooks(fwd_hooks=list(ablation_hooks(model, component, **kwargs))):
        yield
