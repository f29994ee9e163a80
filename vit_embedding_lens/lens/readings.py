"""Class-space readings a notebook user asks for directly: the "logit lens" (top-k classes of
every token after every block, as tensors or as a table), and the projections of per-head
write-ins and of MLP neuron value vectors (METHODS §1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.lens.ranks import class_rank
from vit_embedding_lens.lens.tuned import LensChoice, resolve_lens
from vit_embedding_lens.model.hook_names import act_name, block_hook_names
from vit_embedding_lens.model.indices import resolve_blocks
from vit_embedding_lens.model.targets import class_names_or_ids, class_targets

if TYPE_CHECKING:
    from transformer_lens import ActivationCache

    from vit_embedding_lens.model.components import TransformerBlock
    from vit_embedding_lens.model.hooked_vit import HookedViT

#: layer type -> the hook read at each block (the names :func:`logit_lens` takes)
LAYER_HOOKS: Dict[str, str] = {
    "resid": "hook_resid_post",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "attn": "hook_attn_out",
    "mlp": "hook_mlp_out",
}
#: the hooks :func:`token_class_predictions` reads (sublayer write-ins are normalized on their own)
SUBLAYER_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)

#: the display name of each kind of position (:meth:`TokenLayout.token_kinds`)
_TYPE_NAMES = {"cls": "CLS", "dist": "DIST", "register": "REG", "image": "image"}


def token_types(layout: Any) -> List[str]:
    """``"CLS"``, ``"DIST"``, ``"REG"`` or ``"image"`` per sequence position."""
    return [_TYPE_NAMES[kind] for kind in layout.token_kinds()]


@dataclass
class TokenClassPredictions:
    """Top-k classes per image, block and token (from :func:`token_class_predictions`)."""

    topk_classes: Int[Tensor, "batch block pos k"]
    topk_probs: Float[Tensor, "batch block pos k"]
    blocks: List[int]
    layout: Any
    hook: str
    class_names: Optional[List[str]] = None
    targets: Optional[Int[Tensor, " batch"]] = None
    #: probability of each image's target class ``[batch, block, pos]`` (None without targets)
    target_probs: Optional[Float[Tensor, "batch block pos"]] = None
    #: 0-based rank of the target class (0 = top-1) ``[batch, block, pos]`` (None without targets)
    target_ranks: Optional[Int[Tensor, "batch block pos"]] = None
    #: the logits of the top-k classes ``[batch, block, pos, k]``
    topk_logits: Optional[Float[Tensor, "batch block pos k"]] = None

    @classmethod
    def from_model(
        cls,
        model: "HookedViT",
        cache: Union[Mapping[str, Tensor], Tensor],
        k: int = 5,
        *,
        targets: Optional[Union[int, Sequence[int], Tensor]] = None,
        hook: str = "hook_resid_post",
        blocks: Optional[Sequence[int]] = None,
        layout: Any = None,
        lens: LensChoice = None,
    ) -> "TokenClassPredictions":
        """Top-k classes of every token after every block, read through the class-embedding
        projection: the logit lens (also importable as ``token_class_predictions``).

        ``cache``: an activation cache holding ``blocks.{l}.{hook}`` for the requested blocks (e.g.
        from
        ``model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_resid_post"))``), or
        a batch of images, which is then run with exactly that filter. ``hook`` is one of
        ``hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out`` (sublayer write-ins are
        normalized on their own, METHODS §1). ``targets`` (one class per image, or one for all) adds
        the target probability and rank. ``blocks`` default to all (negative ones count from the
        end). ``layout`` defaults to ``model.layout``. Half-precision activations are read in
        float32; ranks are counted on the logits, not on rounded probabilities. ``lens``:
        ``"plain"`` (default) or a :class:`~vit_embedding_lens.lens.tuned.TunedClassLens`, which
        reads block ``l``'s residuals through ``T_l`` and its write-ins through ``M_l``.
        """
        tuned = resolve_lens(model, lens)
        blocks, names, cache = sublayer_cache(model, cache, hook, blocks)
        _check_k(model, k)
        layout = layout if layout is not None else model.layout
        projection = ClassProjection(model)
        parts: Dict[str, List[Tensor]] = {"c": [], "p": [], "l": [], "tp": [], "tr": []}
        target_ids = None
        for block, name in zip(blocks, names):
            activation = cache[name]
            if tuned is not None:
                stream = hook.startswith("hook_resid")  # write-ins: the linear part only
                activation = activation.detach()
                if activation.dtype in (torch.float16, torch.bfloat16):
                    activation = activation.float()
                activation = tuned.translate(block, activation, bias=stream)
            logits = token_logits(projection, activation, layout, name)  # [batch, pos, class]
            probs = logits.softmax(-1)
            top_logits, top_classes = logits.topk(k, dim=-1)
            parts["c"].append(top_classes)
            parts["l"].append(top_logits)
            parts["p"].append(probs.gather(-1, top_classes))
            if targets is not None:
                if target_ids is None:
                    target_ids = class_targets(
                        model,
                        targets,
                        logits.shape[0],
                        what="targets",
                        broadcast=True,
                        device=logits.device,
                    )
                index = target_ids[:, None].expand(-1, probs.shape[1])  # [batch, pos]
                parts["tp"].append(probs.gather(-1, index[..., None])[..., 0])
                parts["tr"].append(class_rank(logits, index))

        def stack(key: str) -> Optional[Tensor]:  # [batch, block, ...]
            return torch.stack(parts[key], dim=1) if parts[key] else None

        topk_classes, topk_probs = stack("c"), stack("p")
        assert topk_classes is not None and topk_probs is not None  # one row per block
        return cls(
            topk_classes=topk_classes,
            topk_probs=topk_probs,
            blocks=blocks,
            layout=layout,
            hook=hook,
            class_names=list(model.class_names) if model.class_names else None,
            targets=target_ids,
            target_probs=stack("tp"),
            target_ranks=stack("tr"),
            topk_logits=stack("l"),
        )

    @property
    def top1(self) -> Int[Tensor, "batch block pos"]:
        return self.topk_classes[..., 0]

    @property
    def token_labels(self) -> List[str]:
        return self.layout.token_labels()

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names is not None else str(index)

    def grid(self, what: str = "top1", image_index: int = 0) -> Tensor:
        """``[block, grid_h, grid_w]`` of ``"top1"``, ``"top1_prob"``, ``"target_prob"`` or
        ``"target_rank"`` for one image (image tokens only), ready for ``plot_token_grid``."""
        sources = {
            "top1": self.top1,
            "top1_prob": self.topk_probs[..., 0],
            "target_prob": self.target_probs,
            "target_rank": self.target_ranks,
        }
        if what not in sources:
            raise ValueError(f"what must be one of {sorted(sources)}, got {what!r}")
        values = sources[what]
        if values is None:
            raise ValueError(
                f"{what!r} needs targets: call token_class_predictions(..., targets=labels)"
            )
        if not 0 <= image_index < values.shape[0]:
            raise IndexError(
                f"image_index {image_index} out of range for a batch of {values.shape[0]}"
            )
        return self.layout.to_grid(values[image_index])

    def to_frame(self) -> pd.DataFrame:
        """Tidy table, one row per (image, block, token, k): ``image, block, position, token,
        token_type, k, class, class_name, prob`` (+ ``target, target_prob, target_rank``)."""
        b, n_blocks, n, k = self.topk_classes.shape
        idx = np.stack(
            np.meshgrid(
                np.arange(b), np.arange(n_blocks), np.arange(n), np.arange(k), indexing="ij"
            ),
            -1,
        )
        idx = idx.reshape(-1, 4)
        labels, types = np.asarray(self.token_labels), np.asarray(token_types(self.layout))
        classes = self.topk_classes.reshape(-1).cpu().numpy()
        frame = pd.DataFrame(
            {
                "image": idx[:, 0],
                "block": np.asarray(self.blocks)[idx[:, 1]],
                "position": idx[:, 2],
                "token": labels[idx[:, 2]],
                "token_type": types[idx[:, 2]],
                "k": idx[:, 3],
                "class": classes,
                "class_name": [self.class_name(int(c)) for c in classes],
                "prob": self.topk_probs.reshape(-1).cpu().double().numpy(),
            }
        )
        if self.targets is not None:
            # read together with the targets
            assert self.target_probs is not None and self.target_ranks is not None
            per_token = (idx[:, 0], idx[:, 1], idx[:, 2])
            frame["target"] = self.targets.cpu().numpy()[idx[:, 0]]
            frame["target_prob"] = self.target_probs.cpu().double().numpy()[per_token]
            frame["target_rank"] = self.target_ranks.cpu().numpy()[per_token]
        return frame


def sublayer_cache(
    model: "HookedViT",
    cache: Union[Mapping[str, Tensor], Tensor],
    hook: str = "hook_resid_post",
    blocks: Optional[Sequence[int]] = None,
    also: Sequence[str] = (),
) -> Tuple[List[int], List[str], Mapping[str, Tensor]]:
    """``(blocks, hook names, cache)`` for reading ``hook`` (one of :data:`SUBLAYER_HOOKS`) at
    ``blocks`` (default all): a given cache is checked to hold them; images are run with exactly
    those names (and the names in ``also``) cached."""
    if hook not in SUBLAYER_HOOKS:
        raise ValueError(f"hook must be one of {SUBLAYER_HOOKS}, got {hook!r}")
    blocks = resolve_blocks(model, blocks)
    names = block_hook_names(hook, blocks)
    if isinstance(cache, Tensor):
        with torch.no_grad():
            _, cache = model.run_with_cache(cache, names_filter=names + list(also))
    missing = [n for n in names if n not in cache]
    if missing:
        raise ValueError(
            f"the cache has no {missing[:3]}{'...' if len(missing) > 3 else ''}; run the model "
            f"with names_filter=lambda n: n.endswith({hook!r}) (or pass the images instead)"
        )
    return blocks, names, cast(Mapping[str, Tensor], cache)  # a cache now, not images


def token_logits(
    projection: ClassProjection, resid: Tensor, layout: Any, name: str = "the activation"
) -> Float[Tensor, "batch pos class"]:
    """Class logits of every token of a cached ``[batch, pos, d_model]`` activation (``[pos,
    d_model]`` from ``remove_batch_dim`` caches too); half precision is read in float32."""
    resid = resid[None] if resid.ndim == 2 else resid
    if resid.shape[1] != layout.n_tokens:
        raise ValueError(
            f"{name} has {resid.shape[1]} tokens, the layout {layout.n_tokens}; pass "
            f"layout=model.layout_for(image_size) for images of another size"
        )
    resid = resid.detach()
    if resid.dtype in (torch.float16, torch.bfloat16):
        resid = resid.float()
    with torch.no_grad():
        return projection(resid)


def _check_k(model: "HookedViT", k: int) -> None:
    n_classes = model.cfg.n_classes
    if not 1 <= k <= n_classes:
        raise ValueError(
            f"k must be between 1 and the number of classes: k must lie in [1, {n_classes}], "
            f"got {k}"
        )


token_class_predictions = TokenClassPredictions.from_model
"""The logit lens as :class:`TokenClassPredictions`: :meth:`TokenClassPredictions.from_model`
under the name the views and guides use, ``token_class_predictions(model, cache_or_images, k,
targets=..., hook=..., blocks=..., layout=...)``."""


def logit_lens(
    model: "HookedViT",
    images: Tensor,
    k: int = 5,
    layer_types: Sequence[str] = ("resid",),
    blocks: Optional[Iterable[int]] = None,
    tokens: Optional[Iterable[int]] = None,
    lens: LensChoice = None,
) -> pd.DataFrame:
    """Top-``k`` classes (with names and probabilities) of every token at every block, as a table.

    One row per image × block × layer type × token × rank: columns image, block, layer_type, token,
    token_label, rank, class_id, class_name, logit, probability. ``tokens`` are positions in
    ``model.layout`` order (default: all); ``blocks`` default to all. One forward pass; each layer
    type is read by :func:`token_class_predictions`. ``lens``: ``"plain"`` (default) or a
    :class:`~vit_embedding_lens.lens.tuned.TunedClassLens` (block ``l`` read through ``T_l``).
    """
    resolve_lens(model, lens)
    unknown = [t for t in layer_types if t not in LAYER_HOOKS]
    if unknown:
        raise ValueError(f"unknown layer types {unknown}; choose from {sorted(LAYER_HOOKS)}")
    blocks = resolve_blocks(model, None if blocks is None else list(blocks))
    _check_k(model, k)
    n_classes, layout = model.cfg.n_classes, model.layout
    tokens = np.arange(layout.n_tokens) if tokens is None else np.asarray([int(t) for t in tokens])
    names = [act_name(LAYER_HOOKS[t], b) for b in blocks for t in layer_types]
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=names)
    preds = {
        t: token_class_predictions(model, cache, k, hook=LAYER_HOOKS[t], blocks=blocks, lens=lens)
        for t in layer_types
    }
    labels = np.asarray(layout.token_labels(), dtype=object)
    class_names = np.asarray(class_names_or_ids(model.class_names, n_classes), object)
    image, token, rank = (
        a.ravel()
        for a in np.meshgrid(np.arange(images.shape[0]), tokens, np.arange(k), indexing="ij")
    )
    frames = []
    for b, block in enumerate(blocks):
        for layer_type in layer_types:
            pred = preds[layer_type]
            assert pred.topk_logits is not None  # token_class_predictions keeps them
            ids = pred.topk_classes[:, b, tokens].cpu().numpy().ravel()  # [batch, pos, k]
            frames.append(
                pd.DataFrame(
                    dict(
                        image=image,
                        block=block,
                        layer_type=layer_type,
                        token=token,
                        token_label=labels[token],
                        rank=rank,
                        class_id=ids,
                        class_name=class_names[ids],
                        logit=pred.topk_logits[:, b, tokens].cpu().double().numpy().ravel(),
                        probability=pred.topk_probs[:, b, tokens].cpu().double().numpy().ravel(),
                    )
                )
            )
    return pd.concat(frames, ignore_index=True)


def project_head_writes(
    model: "HookedViT", cache: Union[Mapping[str, Tensor], "ActivationCache"], block: int
) -> Float[Tensor, "batch pos head class"]:
    """Each head's write-in ``z_h · W_O[h]`` (without ``b_O``) read in class space, norm per vector.

    Needs ``blocks.{block}.attn.hook_z`` in the cache. Residual post-norm blocks write
    ``norm(sum of heads)``, which does not split into per-head write-ins: refused there.
    """
    if model.cfg.block_norm != "pre":
        raise ValueError(
            "per-head write-ins are not defined for residual post-norm blocks (the block's norm "
            "acts on the sum of the heads); read attn_out instead"
        )
    z = cache[act_name("z", block)]  # [batch, pos, head, d_head]
    w_o = cast("TransformerBlock", model.blocks[block]).attn.W_O  # [head, d_head, d_model]
    writes = torch.einsum("bphe,hed->bphd", z, w_o)
    return ClassProjection(model)(writes)


def project_neuron_values(model: "HookedViT", block: int) -> Float[Tensor, "d_mlp class"]:
    """Every MLP neuron's value vector (its row of ``W_out``, LayerScale included) read in class
    space with the norm recomputed per vector (METHODS §1). For the raw value projection
    ``E · W_out^T`` of the key-value memories see :mod:`vit_embedding_lens.lens.memories`."""
    mlp = cast("TransformerBlock", model.blocks[block]).mlp
    return ClassProjection(model)(mlp.W_out.detach())
