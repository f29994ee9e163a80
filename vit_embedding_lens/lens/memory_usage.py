"""Which memories the tokens use: key-value agreement and compositionality, streamed (METHODS §4).

For every token, block and sublayer, its *most activated* memories are the ``k`` (default 5) with
the largest coefficients (``mlp.hook_pre`` values, or the concatenated head outputs ``hook_z``).
"Largest" means the largest signed values, not the largest magnitudes: a memory with a large
positive coefficient writes its value, one with a negative coefficient writes the value's opposite.

- **Key-value agreement**: a token of an image of class ``c`` agrees when one of its most activated
  memories is among class ``c``'s top memories (the ``k`` largest ``P[c, :]``, see
  :mod:`~vit_embedding_lens.lens.memories`). Rate per class (tokens of that class's images), then
  the mean over the classes seen. The **random-class baseline** repeats this with a class drawn
  uniformly at random for each image in place of its label (seeded; several draws, averaged).
- **Compositionality**: a token *matches* when the top-1 class of the sublayer's own write-in
  (``attn_out``/``mlp_out`` read with :class:`ClassProjection`) is the top class (argmax of
  ``P[:, i]``) of one of its most activated memories. Match rate = share of tokens that match; a low
  rate means the sublayer's prediction is composed from many memories rather than copied from one.

Both are counted per token group (``cls``; ``prefix`` for the other prefix tokens: distillation and
registers; ``image``) and per class, so batches add up. The hooks reduce in place: only the
top-``k`` memory indices of each token survive the forward pass, never a ``n_memories``-wide tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Sized,
    Tuple,
    Union,
    cast,
)

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.lens.memories import (
    SUBLAYER_KINDS,
    SublayerKind,
    check_k,
    check_kinds,
    class_top_memories,
    coefficient_hook_name,
    memory_classes,
    memory_coefficients,
    n_memories,
    value_projection,
    write_in_hook_name,
)
from vit_embedding_lens.lens.projection import ClassProjection, HeadChoice
from vit_embedding_lens.model.targets import class_names_or_ids, class_targets

if TYPE_CHECKING:
    from vit_embedding_lens.model.hooked_vit import HookedViT
    from vit_embedding_lens.model.layout import TokenLayout

#: token groups, in the order every result uses (only those a layout has are reported)
TOKEN_GROUPS: Tuple[str, str, str] = ("cls", "prefix", "image")


def token_group_ids(layout: "TokenLayout") -> Int[Tensor, " pos"]:
    """Per sequence position, its token group as an index into :data:`TOKEN_GROUPS`."""
    ids = torch.full((layout.n_tokens,), TOKEN_GROUPS.index("image"), dtype=torch.long)
    ids[list(layout.prefix_indices)] = TOKEN_GROUPS.index("prefix")
    if layout.cls_index is not None:
        ids[layout.cls_index] = TOKEN_GROUPS.index("cls")
    return ids


def random_classes(
    generator: torch.Generator, n_draws: int, batch: int, n_classes: int
) -> Int[Tensor, "n_draws batch"]:
    """The random-class baseline's classes: one uniform draw per image and draw, from
    ``generator``."""
    return torch.randint(n_classes, (n_draws, batch), generator=generator, device=generator.device)


@dataclass
class MemoryTables:
    """What the streaming needs from the weights, per sublayer kind: ``[block, ...]`` tensors.

    ``class_top[kind][l, c]``: class ``c``'s top memories by ``P[c, :]``;
    ``memory_class[kind][l, i]``: the argmax class of memory ``i``'s value.
    """

    kinds: Tuple[str, ...]
    class_top: Dict[str, Int[Tensor, "block class top_memories"]]
    memory_class: Dict[str, Int[Tensor, "block n_memories"]]

    @classmethod
    def from_model(
        cls,
        model: "HookedViT",
        kinds: Union[str, Sequence[str]] = SUBLAYER_KINDS,
        top_memories: int = 5,
        head: HeadChoice = "mean",
    ) -> "MemoryTables":
        kinds = check_kinds(kinds)
        class_top: Dict[str, Tensor] = {}
        memory_class: Dict[str, Tensor] = {}
        for kind in kinds:
            projections = [
                value_projection(model, b, kind, head) for b in range(model.cfg.n_layers)
            ]
            class_top[kind] = torch.stack(
                [class_top_memories(p, top_memories) for p in projections]
            )
            memory_class[kind] = torch.stack([memory_classes(p) for p in projections])
        return cls(kinds, class_top, memory_class)


@dataclass
class MemoryUsage:
    """Counts of key-value agreement and compositional matches, per class and token group.

    Axes: ``n_kinds`` (:attr:`kinds`), ``block``, ``n_groups`` (:data:`TOKEN_GROUPS`), ``class``
    and, for the random-class baseline, ``n_draws``. Counts add over batches (``+``); rates come
    from the methods.
    """

    kinds: Tuple[str, ...]
    #: ``[n_groups, class]``: tokens seen, by the image's label
    tokens: Int[Tensor, "n_groups class"]
    #: ``[n_kinds, block, n_groups, class]``: tokens that agree with their image's label
    agree: Int[Tensor, "n_kinds block n_groups class"]
    #: ``[n_kinds, block, n_groups, class]``: tokens whose write-in's top class is a top memory's
    #: class
    match: Int[Tensor, "n_kinds block n_groups class"]
    #: ``[n_draws, n_groups, class]``: tokens seen, by the randomly drawn class
    random_tokens: Int[Tensor, "n_draws n_groups class"]
    #: ``[n_draws, n_kinds, block, n_groups, class]``: tokens that agree with the randomly drawn
    #: class
    random_agree: Int[Tensor, "n_draws n_kinds block n_groups class"]
    n_images: int = 0
    class_names: Optional[List[str]] = field(default=None, repr=False)

    @classmethod
    def zeros(
        cls, kinds: Sequence[str], n_layers: int, n_classes: int, n_draws: int, class_names=None
    ) -> "MemoryUsage":
        """Empty counts for a model of ``n_layers`` blocks and ``n_classes`` classes."""
        g, k = len(TOKEN_GROUPS), len(kinds)

        def z(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.long)

        return cls(
            tuple(kinds),
            z(g, n_classes),
            z(k, n_layers, g, n_classes),
            z(k, n_layers, g, n_classes),
            z(n_draws, g, n_classes),
            z(n_draws, k, n_layers, g, n_classes),
            0,
            list(class_names) if class_names is not None else None,
        )

    def __add__(self, other: "MemoryUsage") -> "MemoryUsage":
        same = (
            self.agree.shape == other.agree.shape
            and self.random_agree.shape == other.random_agree.shape
        )
        if self.kinds != other.kinds or not same:
            raise ValueError(
                "can only add MemoryUsage counts of the same model, sublayer kinds and number of "
                "draws"
            )
        return MemoryUsage(
            self.kinds,
            self.tokens + other.tokens,
            self.agree + other.agree,
            self.match + other.match,
            self.random_tokens + other.random_tokens,
            self.random_agree + other.random_agree,
            self.n_images + other.n_images,
            self.class_names,
        )

    # -- rates ------------------------------------------------------------------------------------
    @property
    def groups(self) -> Tuple[str, ...]:
        """The token groups that have tokens (e.g. no ``cls`` for average-pooling models)."""
        return tuple(g for i, g in enumerate(TOKEN_GROUPS) if self.tokens[i].sum() > 0)

    def agreement_per_class(self) -> Float[Tensor, "n_kinds block n_groups class"]:
        """Share of a class's tokens that agree (NaN for classes with no tokens in the group)."""
        return _ratio(self.agree, self.tokens)

    def agreement_rate(self) -> Float[Tensor, "n_kinds block n_groups"]:
        """Key-value agreement: the mean over the classes seen of the per-class rate."""
        return self.agreement_per_class().nanmean(dim=-1)

    def random_agreement_rate(self) -> Float[Tensor, "n_kinds block n_groups"]:
        """The random-class baseline: the same rate with drawn classes, averaged over draws."""
        per_class = _ratio(self.random_agree, self.random_tokens[:, None, None])
        return per_class.nanmean(dim=-1).mean(dim=0)

    def match_rate(self) -> Float[Tensor, "n_kinds block n_groups"]:
        """Compositionality: the share of all tokens of a group whose write-in matches a top
        memory."""
        return _ratio(self.match.sum(-1), self.tokens.sum(-1))

    # -- tables -----------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """Tidy rows ``block, sublayer, token_group, metric, value, n_tokens``; metrics are
        ``kv_agreement``, ``kv_agreement_random`` and ``composition_match``."""
        metrics = {
            "kv_agreement": self.agreement_rate(),
            "kv_agreement_random": self.random_agreement_rate(),
            "composition_match": self.match_rate(),
        }
        rows = []
        for k, kind in enumerate(self.kinds):
            for block in range(self.agree.shape[1]):
                for group in self.groups:
                    g = TOKEN_GROUPS.index(group)
                    for metric, values in metrics.items():
                        rows.append(
                            (
                                block,
                                kind,
                                group,
                                metric,
                                float(values[k, block, g]),
                                int(self.tokens[g].sum()),
                            )
                        )
        return pd.DataFrame(
            rows, columns=["block", "sublayer", "token_group", "metric", "value", "n_tokens"]
        )

    def per_class_frame(self) -> pd.DataFrame:
        """Tidy rows ``block, sublayer, token_group, class, class_name, metric, value, n_tokens``
        for the per-class agreement (``kv_agreement``) and match rates (``composition_match``)."""
        n_classes = self.tokens.shape[-1]
        names = class_names_or_ids(self.class_names, n_classes)
        metrics = {
            "kv_agreement": self.agreement_per_class(),
            "composition_match": _ratio(self.match, self.tokens),
        }
        rows = []
        for k, kind in enumerate(self.kinds):
            for block in range(self.agree.shape[1]):
                for group in self.groups:
                    g = TOKEN_GROUPS.index(group)
                    for c in range(n_classes):
                        for metric, values in metrics.items():
                            value = float(values[k, block, g, c])
                            rows.append(
                                (
                                    block,
                                    kind,
                                    group,
                                    c,
                                    names[c],
                                    metric,
                                    value,
                                    int(self.tokens[g, c]),
                                )
                            )
        columns = [
            "block",
            "sublayer",
            "token_group",
            "class",
            "class_name",
            "metric",
            "value",
            "n_tokens",
        ]
        return pd.DataFrame(rows, columns=columns)


def _ratio(count: Tensor, total: Tensor) -> Tensor:
    total = total.double()
    return torch.where(
        total > 0, count.double() / total.clamp(min=1), torch.full_like(total, float("nan"))
    )


# -- streaming ------------------------------------------------------------------------------------
def memory_usage_batch(
    model: "HookedViT",
    images: Float[Tensor, "batch chan height width"],
    labels: Int[Tensor, " batch"],
    *,
    k: int = 5,
    top_memories: int = 5,
    kinds: Union[str, Sequence[str]] = SUBLAYER_KINDS,
    n_random_draws: int = 3,
    generator: Optional[torch.Generator] = None,
    tables: Optional[MemoryTables] = None,
    head: HeadChoice = "mean",
) -> MemoryUsage:
    """Key-value agreement and compositional-match counts of one batch (one forward pass).

    ``k``: most activated memories per token; ``top_memories``: top memories per class (both 5 in
    the paper). The random-class baseline draws ``n_random_draws`` classes per image from
    ``generator`` (default: seeded with 0). ``tables`` (from :meth:`MemoryTables.from_model`) saves
    recomputing the value projections batch after batch; it must match ``kinds``, ``top_memories``
    and ``head``. ``n_random_draws=0`` skips the baseline (its rate is then NaN).
    """
    per_image = memory_usage_per_image(
        model,
        images,
        labels,
        k=k,
        top_memories=top_memories,
        kinds=kinds,
        n_random_draws=n_random_draws,
        generator=generator,
        tables=tables,
        head=head,
    )
    return per_image.usage(model.cfg.n_classes, model.class_names)


def _checked_inputs(
    model: "HookedViT",
    images: Tensor,
    labels,
    k: int,
    top_memories: int,
    kinds: Union[str, Sequence[str]],
    n_random_draws: int,
    generator: Optional[torch.Generator],
    tables: Optional[MemoryTables],
    head: HeadChoice,
) -> Tuple[Tuple[SublayerKind, ...], Tensor, MemoryTables, torch.Generator]:
    """Validate the arguments shared by the batch functions; build the tables and generator if
    missing."""
    kinds = check_kinds(kinds)
    labels = _check_labels(model, images, labels)
    for kind in kinds:
        check_k(k, n_memories(model, kind), f"k (most activated {kind} memories per token)")
    if not isinstance(n_random_draws, int) or n_random_draws < 0:
        raise ValueError(f"n_random_draws must be a non-negative int, got {n_random_draws!r}")
    if tables is None:
        tables = MemoryTables.from_model(model, kinds, top_memories, head)
    elif tables.kinds != kinds or any(
        t.shape[-1] != top_memories for t in tables.class_top.values()
    ):
        raise ValueError(
            f"tables were built for kinds {tables.kinds} and "
            f"{next(iter(tables.class_top.values())).shape[-1]} top memories per class, not "
            f"{kinds} and {top_memories}; rebuild them with MemoryTables.from_model"
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return kinds, labels, tables, generator


@dataclass
class PerImageMemoryCounts:
    """The counts of :class:`MemoryUsage`, kept per image instead of per class.

    Axes: ``batch`` (images), ``n_draws``, ``n_kinds`` (:attr:`kinds`), ``block``, ``n_groups``
    (:data:`TOKEN_GROUPS`). :meth:`usage` folds them by the images' labels (and drawn classes) into
    the same :class:`MemoryUsage` that :func:`memory_usage_batch` gives, so any subset of images can
    be summed.
    """

    kinds: Tuple[str, ...]
    #: ``[batch]``: the image's class
    labels: Int[Tensor, " batch"]
    #: ``[batch, n_groups]``: tokens of each group in the image
    tokens: Int[Tensor, "batch n_groups"]
    #: ``[batch, n_kinds, block, n_groups]``: tokens that agree with the image's label
    agree: Int[Tensor, "batch n_kinds block n_groups"]
    #: ``[batch, n_kinds, block, n_groups]``: tokens whose write-in's top class is a top memory's
    #: class
    match: Int[Tensor, "batch n_kinds block n_groups"]
    #: ``[batch, n_draws]``: the randomly drawn class of each draw
    drawn: Int[Tensor, "batch n_draws"]
    #: ``[batch, n_draws, n_kinds, block, n_groups]``: tokens that agree with the drawn class
    random_agree: Int[Tensor, "batch n_draws n_kinds block n_groups"]

    def usage(self, n_classes: int, class_names: Optional[Sequence[str]] = None) -> MemoryUsage:
        """The per-class :class:`MemoryUsage` of these images (sums over images by class)."""
        n_draws = self.drawn.shape[1]
        n_layers = self.agree.shape[2]
        out = MemoryUsage.zeros(self.kinds, n_layers, n_classes, n_draws, class_names)
        out.n_images = int(self.labels.shape[0])
        labels = self.labels.long().cpu()
        out.tokens.index_add_(1, labels, self.tokens.long().cpu().T)
        # [kind, block, group, class] += per image, by label
        out.agree.index_add_(3, labels, self.agree.long().cpu().permute(1, 2, 3, 0))
        out.match.index_add_(3, labels, self.match.long().cpu().permute(1, 2, 3, 0))
        for d in range(n_draws):
            drawn = self.drawn[:, d].long().cpu()
            out.random_tokens[d].index_add_(1, drawn, self.tokens.long().cpu().T)
            out.random_agree[d].index_add_(
                3, drawn, self.random_agree[:, d].long().cpu().permute(1, 2, 3, 0)
            )
        return out


def memory_usage_per_image(
    model: "HookedViT",
    images: Float[Tensor, "batch chan height width"],
    labels: Int[Tensor, " batch"],
    *,
    k: int = 5,
    top_memories: int = 5,
    kinds: Union[str, Sequence[str]] = SUBLAYER_KINDS,
    n_random_draws: int = 3,
    generator: Optional[torch.Generator] = None,
    tables: Optional[MemoryTables] = None,
    head: HeadChoice = "mean",
    drawn: Optional[Int[Tensor, "n_draws batch"]] = None,
) -> PerImageMemoryCounts:
    """:func:`memory_usage_batch`'s counts per image (one forward pass; same arguments, same draws
    from ``generator``): ``memory_usage_per_image(...).usage(C)`` equals
    ``memory_usage_batch(...)``. ``drawn`` gives the random classes instead of ``generator`` (the
    runner draws them per image, so they do not depend on how images are batched)."""
    kinds, labels, tables, generator = _checked_inputs(
        model, images, labels, k, top_memories, kinds, n_random_draws, generator, tables, head
    )
    cfg = model.cfg
    active, write_class = _run_reduced(model, images, kinds, k, ClassProjection(model, head=head))
    device = images.device
    groups = token_group_ids(model.layout_for(images.shape[-2:])).to(device)  # [N]
    one_hot = torch.nn.functional.one_hot(groups, len(TOKEN_GROUPS)).long()  # [N, G]
    if drawn is None:
        drawn = random_classes(generator, n_random_draws, labels.shape[0], cfg.n_classes)
    elif tuple(drawn.shape) != (n_random_draws, labels.shape[0]):
        raise ValueError(
            f"drawn must be [n_random_draws, batch] = [{n_random_draws}, {labels.shape[0]}], got "
            f"{tuple(drawn.shape)}"
        )
    drawn = drawn.long().to(device)  # [D, B]

    def per_group(flags: Tensor) -> Tensor:  # [B, N] bool -> [B, G] counts
        return flags.long() @ one_hot

    B, K, L, G, D = labels.shape[0], len(kinds), cfg.n_layers, len(TOKEN_GROUPS), n_random_draws
    agree = torch.zeros(B, K, L, G, dtype=torch.long, device=device)
    match = torch.zeros_like(agree)
    random_agree = torch.zeros(B, D, K, L, G, dtype=torch.long, device=device)
    for ki, kind in enumerate(kinds):
        class_top = tables.class_top[kind].to(device)
        memory_class = tables.memory_class[kind].to(device)
        n_mem = memory_class.shape[-1]
        for block in range(L):
            top = active[kind][block]  # [B, N, k]
            agree[:, ki, block] = per_group(_agrees(top, class_top[block][labels], n_mem))
            for d in range(D):
                random_agree[:, d, ki, block] = per_group(
                    _agrees(top, class_top[block][drawn[d]], n_mem)
                )
            matched = (memory_class[block][top] == write_class[kind][block][..., None]).any(-1)
            match[:, ki, block] = per_group(matched)
    return PerImageMemoryCounts(
        kinds=kinds,
        labels=labels.cpu(),
        tokens=one_hot.sum(0).expand(B, G).cpu().clone(),
        agree=agree.cpu(),
        match=match.cpu(),
        drawn=drawn.T.cpu().clone(),
        random_agree=random_agree.cpu(),
    )


def memory_usage(
    model: "HookedViT",
    batches: Iterable,
    *,
    k: int = 5,
    top_memories: int = 5,
    kinds: Union[str, Sequence[str]] = SUBLAYER_KINDS,
    n_random_draws: int = 3,
    seed: int = 0,
    head: HeadChoice = "mean",
    progress: bool = True,
    total: Optional[int] = None,
) -> MemoryUsage:
    """:func:`memory_usage_batch` over an iterable of ``(images, labels)`` batches (a DataLoader),
    summing the counts. Images go to the model's device. The random-class draws come from one
    generator seeded with ``seed``, so a rerun over the same batches repeats them."""
    kinds = check_kinds(kinds)
    tables = MemoryTables.from_model(model, kinds, top_memories, head)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if total is None and hasattr(batches, "__len__"):
        total = len(cast(Sized, batches))
    result: Optional[MemoryUsage] = None
    for item in tqdm(batches, total=total, disable=not progress, desc="key-value memories"):
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise TypeError(
                f"each batch must be an (images, labels) pair, got {type(item).__name__}; wrap the "
                f"data in a DataLoader over a dataset that returns (image, label)"
            )
        images, labels = item[0], item[1]
        part = memory_usage_batch(
            model,
            images.to(device),
            torch.as_tensor(labels).to(device),
            k=k,
            top_memories=top_memories,
            kinds=kinds,
            n_random_draws=n_random_draws,
            generator=generator,
            tables=tables,
            head=head,
        )
        result = part if result is None else result + part
    if result is None:
        raise ValueError("batches was empty: give at least one (images, labels) batch")
    return result


def _run_reduced(
    model: "HookedViT",
    images: Tensor,
    kinds: Tuple[SublayerKind, ...],
    k: int,
    projection: ClassProjection,
):
    """One forward pass whose hooks keep, per block and kind, only the top-``k`` memory indices of
    each token ``[B, N, k]`` and the top-1 class of the sublayer's write-in ``[B, N]``."""
    n_layers = model.cfg.n_layers
    active: Dict[str, List[Optional[Tensor]]] = {kind: [None] * n_layers for kind in kinds}
    write_class: Dict[str, List[Optional[Tensor]]] = {kind: [None] * n_layers for kind in kinds}
    param = next(model.parameters())
    projection = projection.to(device=param.device, dtype=param.dtype)

    def keep_top(kind: SublayerKind, block: int):
        def hook(act: Tensor, hook) -> None:
            active[kind][block] = memory_coefficients(act, kind).topk(k, dim=-1).indices

        return hook

    def keep_class(kind: SublayerKind, block: int):
        def hook(act: Tensor, hook) -> None:
            write_class[kind][block] = projection(act).argmax(dim=-1)

        return hook

    hooks: List[Tuple[Union[str, Callable], Callable]] = []
    for kind in kinds:
        for block in range(n_layers):
            hooks.append((coefficient_hook_name(block, kind), keep_top(kind, block)))
            hooks.append((write_in_hook_name(block, kind), keep_class(kind, block)))
    with torch.no_grad():
        model.run_with_hooks(images, fwd_hooks=hooks)
    return active, write_class


def _agrees(
    top: Int[Tensor, "batch pos k"], class_top: Int[Tensor, "batch top_memories"], n_memories: int
) -> Tensor:
    """Per token: is any of its top memories among its image's class's top memories?"""
    member = torch.zeros(top.shape[0], n_memories, dtype=torch.bool, device=top.device)
    member.scatter_(1, class_top, True)  # [B, n_memories]: one row per image, not per token
    return member.gather(1, top.flatten(1)).view(top.shape).any(-1)


def _check_labels(model: "HookedViT", images: Tensor, labels) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = getattr(images, "shape", type(images).__name__)
        raise TypeError(f"images must be a tensor [batch, chan, height, width], got {got}")
    return class_targets(model, labels, images.shape[0], what="labels", device=images.device)
