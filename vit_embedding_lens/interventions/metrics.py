"""Metrics in class space for interventions: logit difference, probability, identifiability.

A :class:`ClassSpaceMetric` reads class logits at a *readout* - the model's logits, its pooled
readout at a block, the CLS token, any token, or all image tokens - through the class projection
``E · ln_final(v) + b`` (:class:`~vit_embedding_lens.lens.ClassProjection`), and turns them into one
number per image (or per image token), averaged over the batch by default. Patching sweeps call it
on the activation named by ``hook_name`` (``None`` = the logits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, Union

from torch import Tensor

from vit_embedding_lens.lens.projection import ClassProjection, pooled_readout
from vit_embedding_lens.lens.ranks import class_rank
from vit_embedding_lens.model.hook_names import LOGITS, act_name
from vit_embedding_lens.model.indices import resolve_block
from vit_embedding_lens.model.targets import class_targets

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT

Kind = Literal[
    "logit", "logit_diff", "probability", "log_probability", "identifiability", "rank", "rank0"
]
Readout = Union[Literal["logits", "pooled", "cls", "image"], int]
KINDS = (
    "logit",
    "logit_diff",
    "probability",
    "log_probability",
    "identifiability",
    "rank",
    "rank0",
)


class ClassSpaceMetric:
    """``kind`` of the ``target`` class at a ``readout``, reduced over images.

    kinds: ``"logit"``; ``"logit_diff"`` (target minus ``other``, or minus the largest other class
    when ``other`` is None); ``"probability"``/``"log_probability"`` (softmax over classes);
    ``"identifiability"`` (score ``1 - rank / C``); ``"rank"``; ``"rank0"`` (1.0 when the target is
    the top class: the token is class-identifiable).

    readouts: ``"logits"`` (the model's output; ``hook_name`` is ``hook_logits``), ``"pooled"`` (the
    model's own pooled readout of ``resid_post`` at ``block``: equals the logits at the last block),
    ``"cls"`` or a token index (that token's ``resid_post`` at ``block`` projected), ``"image"``
    (every image token projected; the value is averaged over image tokens). ``target`` / ``other``:
    a class index or a per-image ``[batch]`` tensor (e.g. the labels). ``reduce``: ``"mean"`` over
    images (a scalar) or ``"none"`` (``[batch]``).
    """

    def __init__(
        self,
        model: HookedViT,
        kind: Kind,
        target: Union[int, Tensor],
        *,
        other: Optional[Union[int, Tensor]] = None,
        readout: Readout = "logits",
        block: int = -1,
        reduce: Literal["mean", "none"] = "mean",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown metric kind {kind!r}; use one of {KINDS}")
        if reduce not in ("mean", "none"):
            raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")
        if other is not None and kind != "logit_diff":
            raise ValueError("other= is only used by kind='logit_diff'")
        layout = model.layout
        if readout == "cls" and layout.cls_index is None:
            raise ValueError(
                f"{model.cfg.model_name} has no CLS token; use readout='pooled' or 'image'"
            )
        if isinstance(readout, int) and not 0 <= readout < layout.n_tokens:
            raise IndexError(
                f"readout token {readout} is out of range for {layout.n_tokens} tokens"
            )
        if not isinstance(readout, int) and readout not in ("logits", "pooled", "cls", "image"):
            raise ValueError(
                "readout must be 'logits', 'pooled', 'cls', 'image' or a token index, got "
                f"{readout!r}"
            )
        self.model, self.kind, self.readout, self.reduce = model, kind, readout, reduce
        self.block = resolve_block(model, block)
        self.target, self.other = target, other
        self.n_classes = model.cfg.n_classes
        self._projection = ClassProjection(model) if readout not in ("logits", "pooled") else None

    @property
    def hook_name(self) -> str:
        """The activation this metric reads: ``hook_logits`` or
        ``blocks.{block}.hook_resid_post``."""
        return LOGITS if self.readout == "logits" else act_name("resid_post", self.block)

    def class_logits(self, activation: Tensor) -> Tensor:
        """Class logits ``[batch, C]`` (``[batch, n_image_tokens, C]`` for the image readout)."""
        if self.readout == "logits":
            return activation
        if self.readout == "pooled":
            return pooled_readout(self.model, activation)
        projection = self._projection
        if projection is None:  # built in __init__ for every readout but "logits" and "pooled"
            raise RuntimeError(f"no class projection for readout {self.readout!r}")
        layout = self.model.layout
        if self.readout == "image":
            return projection(layout.patch_tokens(activation, dim=1))
        index = layout.cls_index if self.readout == "cls" else self.readout
        return projection(activation[:, index])

    def __call__(self, activation: Tensor) -> Tensor:
        """The metric of the activation at ``hook_name`` (logits for the ``"logits"`` readout)."""
        logits = self.class_logits(activation)
        per_image = logits.ndim == 2
        target = self._per_row(self.target, logits)
        if self.kind == "logit":
            value = logits.gather(-1, target[..., None])[..., 0]
        elif self.kind == "logit_diff":
            own = logits.gather(-1, target[..., None])[..., 0]
            if self.other is None:
                rest = logits.scatter(-1, target[..., None], float("-inf"))
                value = own - rest.amax(-1)
            else:
                value = (
                    own - logits.gather(-1, self._per_row(self.other, logits)[..., None])[..., 0]
                )
        elif self.kind in ("probability", "log_probability"):
            logp = logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
            value = logp if self.kind == "log_probability" else logp.exp()
        else:
            rank = class_rank(logits, target)
            if self.kind == "rank":
                value = rank.to(logits.dtype)
            elif self.kind == "rank0":
                value = (rank == 0).to(logits.dtype)
            else:
                value = 1.0 - rank.to(logits.dtype) / self.n_classes
        if not per_image:
            value = value.mean(-1)  # over image tokens
        return value.mean() if self.reduce == "mean" else value

    def from_cache(self, cache) -> Tensor:
        """The metric of a cached run (the cache must hold ``hook_name``)."""
        return self(cache[self.hook_name])

    def _per_row(self, target, logits: Tensor) -> Tensor:
        """Target class ids broadcast to the logits' leading dimensions."""
        batch = logits.shape[0]
        t = class_targets(
            self.model, target, batch, what="target", broadcast=True, device=logits.device
        )
        if logits.ndim == 3:
            t = t[:, None].expand(batch, logits.shape[1])
        return t

    def __repr__(self) -> str:
        return f"ClassSpaceMetric({self.kind!r}, readout={self.readout!r}, block={self.block})"


def logit_diff(model: HookedViT, target, other=None, **kwargs) -> ClassSpaceMetric:
    """Target logit minus ``other``'s (or minus the best other class's) at a readout."""
    return ClassSpaceMetric(model, "logit_diff", target, other=other, **kwargs)


def probability(model: HookedViT, target, **kwargs) -> ClassSpaceMetric:
    """Softmax probability of the target class at a readout."""
    return ClassSpaceMetric(model, "probability", target, **kwargs)


def identifiability(model: HookedViT, target, *, top1: bool = False, **kwargs) -> ClassSpaceMetric:
    """Identifiability score ``1 - rank / C`` of the target class (``top1=True``: rank-0
    indicator)."""
    return ClassSpaceMetric(model, "rank0" if top1 else "identifiability", target, **kwargs)
