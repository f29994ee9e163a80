"""Per-token class-space readings of every block, computed inside the forward pass (METHODS §1–§3).

For each block ``l`` and every token, the correct class's rank among all classes is measured at
three places: the attention write-in (``attn``), the MLP write-in (``mlp``) and the residual after
the block (``resid``, i.e. ``resid_post``); the residual after attention (``resid_mid``) is read for
the correct class only, for the MLP-vs-``resid_mid`` change. Alongside, whether the
correct-class logit rose (block change, attention and MLP change vs the block input, MLP change vs
``resid_mid``) and how the top-1 class of ``resid_post`` relates to those of its parts
(composition).

Everything is reduced inside hooks, batch by batch: a run over a data set keeps only these per-token
integers and flags, never an activation or a ``[pos, class]`` logit table beyond the current
batch. The residual streams are projected through linearity
(``q(resid_post) = q(resid_mid) + q(mlp_out)``, see
:class:`~vit_embedding_lens.lens.projection.ClassProjection`), one matmul per sublayer; heads that
are not linear after the norm (attention pool, cosine head) apply the rest of their readout to the
summed ``q`` (``ClassProjection.from_parts``), which is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sized, Tuple, cast

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.lens.ranks import rank_and_logit, rank_dtype
from vit_embedding_lens.lens.tuned import LensChoice, TunedClassLens, resolve_lens
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.model.layout import TokenLayout
from vit_embedding_lens.model.targets import class_targets

if TYPE_CHECKING:
    from transformer_lens import ActivationCache

    from vit_embedding_lens.model.hooked_vit import HookedViT

#: where ranks are read, per block: attention write-in, MLP write-in, residual after the block
KINDS = ("attn", "mlp", "resid")
#: whether the correct-class logit rose: block (resid_post vs resid_pre), attention and MLP write-in
#: vs resid_pre (the paper's comparison), and MLP write-in vs resid_mid (named variant)
CHANGES = ("block", "attn", "mlp", "mlp_vs_resid_mid")
#: composition bits: resid_post's top-1 equals the top-1 of attn_out / mlp_out / resid_pre
COMPOSITION_BITS = {"attn": 1, "mlp": 2, "resid_pre": 4}


@dataclass
class LensResult:
    """Per-image, per-token class-space readings (concatenated over batches).

    ``rank[kind]`` is ``[batch, block, pos]`` (0 = the label is top-1); ``rose[change]`` is a
    bool ``[batch, block, pos]``; ``composition`` an integer bit mask
    ``[batch, block, pos]`` (:data:`COMPOSITION_BITS`); ``token_mask`` marks "class" tokens (on
    the object), when given.
    """

    rank: Dict[str, Int[Tensor, "batch block pos"]]
    rose: Dict[str, Bool[Tensor, "batch block pos"]]
    composition: Int[Tensor, "batch block pos"]
    labels: Int[Tensor, " batch"]
    n_classes: int
    layout: TokenLayout
    token_mask: Optional[Bool[Tensor, "batch pos"]] = None
    class_names: Optional[List[str]] = field(default=None, repr=False)

    @property
    def n_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.composition.shape[1])

    @staticmethod
    def concat(parts: List["LensResult"]) -> "LensResult":
        """One result from per-batch results (same model and layout). The parts' per-token tensors
        are released as they are copied (the parts are consumed)."""
        if not parts:
            raise ValueError("no batches to concatenate: the data set was empty")
        first = parts[0]
        masks = [p.token_mask for p in parts]
        if any(m is None for m in masks) and not all(m is None for m in masks):
            raise ValueError("some batches have token masks and others do not")

        def take(get) -> Tensor:
            return torch.cat([get(p) for p in parts])

        # one field at a time, each part's copy released right after: never the results twice over
        rank, rose = {}, {}
        for k in first.rank:
            rank[k] = take(lambda p: p.rank[k])
            for p in parts:
                cast(Dict[str, Optional[Tensor]], p.rank)[k] = None  # released: the part is spent
        for k in first.rose:
            rose[k] = take(lambda p: p.rose[k])
            for p in parts:
                cast(Dict[str, Optional[Tensor]], p.rose)[k] = None
        return LensResult(
            rank=rank,
            rose=rose,
            composition=take(lambda p: p.composition),
            labels=take(lambda p: p.labels),
            n_classes=first.n_classes,
            layout=first.layout,
            token_mask=None if masks[0] is None else torch.cat([m for m in masks if m is not None]),
            class_names=first.class_names,
        )


def _rank_rows() -> List[str]:
    return [f"rank:{k}" for k in KINDS]


def _rose_rows() -> List[str]:
    return [f"rose:{k}" for k in CHANGES]


class _Reading:
    """The class-space reading of one set of vectors: unnormalized projection, rank and logit of the
    target class, and the top-1 class."""

    def __init__(self, proj: ClassProjection, q: Tensor, scale: Tensor, target: Tensor) -> None:
        self.q = q
        # a linear head: bias + q / scale (one fused op); otherwise the rest of the readout too
        logits = torch.addcdiv(proj.bias, q, scale) if proj.linear else proj.from_parts(q, scale)
        self.rank, self.correct = rank_and_logit(logits, target)
        self.top1 = logits.argmax(-1)


class LensRecorder:
    """Hooks that read every block in class space while the model runs, for one batch at a time.

    ``with recorder.recording(labels): model(images)`` fills ``recorder.result`` (a
    :class:`LensResult` for that batch). The projection runs in float32 (float64 for float64
    models).

    ``lens``: ``"plain"``/None reads every block through the final norm and head; a
    :class:`~vit_embedding_lens.lens.tuned.TunedClassLens` reads block ``l`` in its translator's
    coordinates: the block input and the residuals through ``T_l`` (``h M_l + c_l``), the
    write-ins through ``M_l``, so the change flags compare a block's input and output in the same
    coordinates. Identity translators read exactly as the plain lens.
    """

    def __init__(self, model: "HookedViT", lens: LensChoice = None) -> None:
        self.model = model
        self.lens: Optional[TunedClassLens] = resolve_lens(model, lens)
        param = next(model.parameters())
        self.work_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.proj = ClassProjection(model).to(device=param.device, dtype=self.work_dtype)
        self._rank_dtype = rank_dtype(model.cfg.n_classes)
        #: the token layout of the recorded inputs (differs from ``model.layout`` only for other
        #: input sizes of ``dynamic_img_size`` models)
        self.layout = model.layout
        # hook names are built once here, not on every recorded batch
        self._hooks: List[Tuple[str, Callable]] = [(act_name("resid_pre", 0), self._on_input)]
        if self.lens is not None:
            self._hooks = self._tuned_hooks(self.lens)
        for layer in range(model.cfg.n_layers if self.lens is None else 0):
            self._hooks += [
                (act_name("attn_out", layer), self._on_attn_out),
                (act_name("resid_mid", layer), self._on_resid_mid),
                (act_name("mlp_out", layer), self._on_mlp_out),
                (act_name("resid_post", layer), self._on_resid_post),
            ]
        self._reset(None)

    def _reset(self, target: Optional[Tensor]) -> None:
        self.target = target
        self.prev: Optional[_Reading] = None
        self.attn: Optional[_Reading] = None
        self.mid_correct: Optional[Tensor] = None
        self.mlp: Optional[_Reading] = None
        self.rows: Dict[str, List[Tensor]] = {
            k: [] for k in (*_rank_rows(), *_rose_rows(), "composition")
        }

    def hooks(self) -> List[Tuple[str, Callable]]:
        """``(hook name, function)`` pairs for ``model.hooks(fwd_hooks=...)`` /
        ``run_with_hooks``."""
        return list(self._hooks)

    def start(self, target: Int[Tensor, " batch"]) -> None:
        """Prepare to record one forward pass through :meth:`hooks`, reading class ``target[i]``
        for image ``i`` (for attaching the hooks yourself, e.g. to a forward shared with others)."""
        self._reset(torch.as_tensor(target, device=self.proj.weight.device).long())

    def recording(self, target: Int[Tensor, " batch"]):
        """Context manager: record the next forward pass, reading class ``target[i]`` for image
        ``i``."""
        self.start(target)
        return self.model.hooks(fwd_hooks=[(name, fn) for name, fn in self.hooks()])

    # The readings, in the order the hooks fire within a block.
    def _centered_and_scale(self, vectors: Tensor) -> Tuple[Tensor, Tensor]:
        centered = vectors.detach().to(self.work_dtype)
        centered = centered - centered.mean(-1, keepdim=True)
        d = centered.shape[-1]
        scale = (
            torch.linalg.vector_norm(centered, dim=-1, keepdim=True).square() / d + self.proj.eps
        ).sqrt()
        return centered, scale

    def _read(self, vectors: Tensor, q: Optional[Tensor] = None) -> _Reading:
        centered, scale = self._centered_and_scale(vectors)
        if q is None:
            q = centered @ self.proj.weight
        assert self.target is not None  # set by start(); _on_input refuses to run without it
        target = self.target[:, None].expand(vectors.shape[:2])
        return _Reading(self.proj, q, scale, target)

    def _on_input(self, resid_pre: Tensor, hook) -> None:
        self._check_target(resid_pre)
        self.prev = self._read(resid_pre)

    def _check_target(self, resid_pre: Tensor) -> None:
        if self.target is None:
            raise RuntimeError("LensRecorder hooks ran outside recording(target)")
        if self.target.shape[0] != resid_pre.shape[0]:
            raise ValueError(
                f"{self.target.shape[0]} labels for a batch of {resid_pre.shape[0]} images"
            )

    def _on_attn_out(self, attn_out: Tensor, hook) -> None:
        self.attn = self._read(attn_out)

    def _on_resid_mid(self, resid_mid: Tensor, hook) -> None:
        # only the target class is needed here: gather it from the parts, no [pos, class] work
        _, scale = self._centered_and_scale(resid_mid)
        assert self.target is not None and self.prev is not None and self.attn is not None
        idx = self.target[:, None, None].expand(*resid_mid.shape[:2], 1)
        if not self.proj.linear:  # the readout after the norm is not linear: read the sum whole
            logits = self.proj.from_parts(self.prev.q + self.attn.q, scale)
            self.mid_correct = logits.gather(-1, idx).squeeze(-1)
            return
        q_target = (self.prev.q.gather(-1, idx) + self.attn.q.gather(-1, idx)).squeeze(-1)
        self.mid_correct = q_target / scale.squeeze(-1) + self.proj.bias[self.target][:, None]

    def _on_mlp_out(self, mlp_out: Tensor, hook) -> None:
        self.mlp = self._read(mlp_out)

    def _on_resid_post(self, resid_post: Tensor, hook) -> None:
        prev, attn, mlp = self.prev, self.attn, self.mlp
        assert (
            prev is not None and attn is not None and mlp is not None
        )  # earlier hooks of the block
        assert self.mid_correct is not None
        # (prev + attn) + mlp, as written out, with one [batch, pos, class] buffer instead of two
        post = self._read(resid_post, torch.add(prev.q, attn.q).add_(mlp.q))
        self._record(prev, attn, mlp, post)

    def _record(self, prev: _Reading, attn: _Reading, mlp: _Reading, post: _Reading) -> None:
        """Keep one block's ranks, change flags and composition bits."""
        assert self.mid_correct is not None
        rows = self.rows
        for kind, reading in zip(KINDS, (attn, mlp, post)):
            rows[f"rank:{kind}"].append(reading.rank.to(self._rank_dtype))
        rose = {
            "block": post.correct > prev.correct,
            "attn": attn.correct > prev.correct,
            "mlp": mlp.correct > prev.correct,
            "mlp_vs_resid_mid": mlp.correct > self.mid_correct,
        }
        for name in CHANGES:
            rows[f"rose:{name}"].append(rose[name])
        bits = COMPOSITION_BITS
        composition = (
            (post.top1 == attn.top1).to(torch.uint8) * bits["attn"]
            + (post.top1 == mlp.top1).to(torch.uint8) * bits["mlp"]
            + (post.top1 == prev.top1).to(torch.uint8) * bits["resid_pre"]
        )
        rows["composition"].append(composition)
        self.prev = post

    # The tuned lens: block l read in its translator's coordinates (see the class docstring).
    def _tuned_hooks(self, lens: TunedClassLens) -> List[Tuple[str, Callable]]:
        """Hooks of the tuned reading. A block whose translator equals the previous block's reads
        its input as the previous block's output (as the plain lens does), so ``resid_pre`` is
        hooked only where the coordinates change. Where ``A_l`` is zero the residuals are
        translated from the hooked tensors (an addition); elsewhere from the sum of the translated
        parts (``T(resid_mid) = T(resid_pre) + M attn_out``), which saves a ``d_model x
        d_model`` product per residual."""
        device, dtype = self.proj.weight.device, self.work_dtype
        n = self.model.cfg.n_layers
        self._matrix: List[Optional[Tensor]] = []
        self._bias: List[Optional[Tensor]] = []
        for layer in range(n):
            linear, bias = lens.linear[layer], lens.bias[layer]
            matrix = lens.matrix(layer).to(device=device, dtype=dtype) if linear.any() else None
            self._matrix.append(matrix)
            self._bias.append(bias.to(device=device, dtype=dtype) if bias.any() else None)
        hooks: List[Tuple[str, Callable]] = []
        for layer in range(n):
            same = layer > 0 and bool(
                torch.equal(lens.linear[layer], lens.linear[layer - 1])
                and torch.equal(lens.bias[layer], lens.bias[layer - 1])
            )
            if not same:
                hooks.append((act_name("resid_pre", layer), self._tuned(self._t_input, layer)))
            hooks += [
                (act_name("attn_out", layer), self._tuned(self._t_attn_out, layer)),
                (act_name("resid_mid", layer), self._tuned(self._t_resid_mid, layer)),
                (act_name("mlp_out", layer), self._tuned(self._t_mlp_out, layer)),
                (act_name("resid_post", layer), self._tuned(self._t_resid_post, layer)),
            ]
        return hooks

    @staticmethod
    def _tuned(method: Callable, layer: int) -> Callable:
        def hook(tensor: Tensor, hook: Any) -> None:
            method(tensor, layer)

        return hook

    def _translate(self, vectors: Tensor, layer: int, bias: bool) -> Tensor:
        out = vectors.detach().to(self.work_dtype)
        matrix, shift = self._matrix[layer], self._bias[layer]
        if matrix is not None:
            out = out @ matrix
        if bias and shift is not None:
            out = out + shift
        return out

    def _t_input(self, resid_pre: Tensor, layer: int) -> None:
        if layer == 0:
            self._check_target(resid_pre)
        self._prev_vec = self._translate(resid_pre, layer, True)
        self.prev = self._read(self._prev_vec)

    def _t_attn_out(self, attn_out: Tensor, layer: int) -> None:
        self._attn_vec = self._translate(attn_out, layer, False)
        self.attn = self._read(self._attn_vec)

    def _t_resid_mid(self, resid_mid: Tensor, layer: int) -> None:
        if self._matrix[layer] is None:
            self._mid_vec = self._translate(resid_mid, layer, True)
        else:
            self._mid_vec = self._prev_vec + self._attn_vec
        self._on_resid_mid(self._mid_vec, None)

    def _t_mlp_out(self, mlp_out: Tensor, layer: int) -> None:
        self._mlp_vec = self._translate(mlp_out, layer, False)
        self.mlp = self._read(self._mlp_vec)

    def _t_resid_post(self, resid_post: Tensor, layer: int) -> None:
        if self._matrix[layer] is None:
            post_vec = self._translate(resid_post, layer, True)
        else:
            post_vec = self._mid_vec + self._mlp_vec
        self._on_resid_post(post_vec, None)
        self._prev_vec = post_vec

    @property
    def result(self) -> LensResult:
        """The recorded batch as a :class:`LensResult` (on the CPU)."""
        rows = self.rows
        if len(rows["composition"]) != self.model.cfg.n_layers:
            raise RuntimeError(
                f"the recorded forward pass covered {len(rows['composition'])} of "
                f"{self.model.cfg.n_layers} blocks (stop_at_layer, or an exception mid-forward?)"
            )

        assert self.target is not None  # n_layers blocks were recorded

        def stack(name: str) -> Tensor:
            return torch.stack(rows[name], dim=1).cpu()

        return LensResult(
            rank={k: stack(f"rank:{k}") for k in KINDS},
            rose={k: stack(f"rose:{k}") for k in CHANGES},
            composition=stack("composition"),
            labels=self.target.cpu(),
            n_classes=self.model.cfg.n_classes,
            layout=self.layout,
            class_names=self.model.class_names,
        )


def lens_batch(
    model: "HookedViT",
    images: Tensor,
    labels,
    token_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    recorder: Optional[LensRecorder] = None,
    lens: LensChoice = None,
) -> LensResult:
    """Read every block of one batch in class space (one forward pass, no activation kept).
    ``lens``: ``"plain"`` (default) or a :class:`~vit_embedding_lens.lens.tuned.TunedClassLens`
    (a given ``recorder`` reads with its own lens)."""
    if recorder is not None and resolve_lens(model, lens) not in (None, recorder.lens):
        raise ValueError("lens_batch: the recorder reads with another lens than `lens`")
    recorder = recorder or LensRecorder(model, lens=lens)
    recorder.layout = (
        model.layout_for(images.shape[-2:]) if model.cfg.dynamic_img_size else model.layout
    )
    target = class_targets(model, labels, images.shape[0], what="labels")
    with torch.no_grad(), recorder.recording(target):
        model(images)
    return _with_mask(recorder.result, token_mask)


def lens_from_cache(
    model: "HookedViT",
    cache: "ActivationCache",
    labels,
    token_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    lens: LensChoice = None,
) -> LensResult:
    """The same readings from a ``run_with_cache`` cache (needs ``resid_pre`` of block 0 and every
    block's ``attn_out``, ``resid_mid``, ``mlp_out`` and ``resid_post``; a tuned ``lens`` also
    ``resid_pre`` of the blocks whose translator differs from the previous one)."""
    recorder = LensRecorder(model, lens=lens)
    first = cache[act_name("resid_pre", 0)]
    recorder.start(class_targets(model, labels, first.shape[0], what="labels"))
    for name, fn in recorder.hooks():
        if name not in cache.cache_dict:
            raise KeyError(
                f"the cache has no {name!r}; run_with_cache without a names_filter that drops it"
            )
        fn(cache[name].to(recorder.proj.weight.device), None)
    return _with_mask(recorder.result, token_mask)


def lens_dataset(
    model: "HookedViT",
    batches: Iterable,
    *,
    progress: bool = True,
    total: Optional[int] = None,
    lens: LensChoice = None,
) -> LensResult:
    """Stream a data set through the lens. ``batches`` yields ``(images, labels)`` or ``(images,
    labels, token_mask)`` (a DataLoader works); images are moved to the model's device. Memory stays
    flat: only the per-token integer readings of each image are kept. ``lens``: ``"plain"``
    (default) or a :class:`~vit_embedding_lens.lens.tuned.TunedClassLens`."""
    recorder = LensRecorder(model, lens=lens)
    param = next(model.parameters())
    parts = []
    if total is None and hasattr(batches, "__len__"):
        total = len(cast(Sized, batches))
    for batch in tqdm(
        batches, total=total, disable=not progress, desc="class-embedding lens", unit="batch"
    ):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError("each batch must be (images, labels) or (images, labels, token_mask)")
        images, labels = batch[0].to(device=param.device, dtype=param.dtype), batch[1]
        mask = batch[2] if len(batch) == 3 else None
        parts.append(lens_batch(model, images, labels, mask, recorder))
    return LensResult.concat(parts)


def _with_mask(result: LensResult, token_mask: Optional[Tensor]) -> LensResult:
    if token_mask is not None:
        token_mask = torch.as_tensor(token_mask).bool().cpu()
        expected = (result.n_images, result.layout.n_tokens)
        if tuple(token_mask.shape) != expected:
            raise ValueError(
                f"token_mask must be [images, tokens] = {list(expected)} (True = class token), "
                f"got {list(token_mask.shape)}"
            )
        if token_mask[:, list(result.layout.prefix_indices)].any():
            raise ValueError(
                "token_mask marks a prefix token (CLS/distillation/register) as a class token"
            )
        result.token_mask = token_mask
    return result
