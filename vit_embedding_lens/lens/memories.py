"""Key-value memories: the sublayers' value vectors read in the class embedding space (METHODS §4).

After Geva et al., a sublayer's output is a weighted sum of fixed *value* vectors, one per memory,
weighted by per-token *coefficients*:

- MLP (block ``l``): memory ``i`` is neuron ``i``; its key is ``W_in[:, i]``, its value
  ``W_out[i, :]`` (timm's ``fc2.weight[:, i]``), its coefficient the pre-activation
  ``mlp.hook_pre[..., i]``.
- Attention: memory ``(h, e)`` is entry ``e`` of head ``h``; its value is ``W_O[h, e, :]`` (timm's
  ``proj.weight[:, h * d_head + e]``), its coefficient the head output ``attn.hook_z[..., h, e]``.
  Memories are numbered ``h * d_head + e``, the order of timm's concatenated heads.

LayerScale is already folded into ``W_O``/``W_out``, so a value is what the memory writes into the
residual stream. Output biases (``b_O``, ``b_out``) belong to no memory and are left out.

Residual post-norm blocks (``x + norm(f(x))``, timm's ``ResPostBlock``) write
``norm(Σ c_i v_i + b)``. The norm centres, divides by one positive per-token scale ``σ`` and adds
its bias, so memory ``i`` writes exactly ``c_i / σ · w ⊙ (v_i - mean(v_i))`` (``c_i`` the
post-activation for the MLP); for those blocks the value is that write-in direction
``w ⊙ (v_i - mean(v_i))`` (the block norm's weight times the centred raw value), not the raw
``W_out`` row. The norm's bias, like the output bias, belongs to no memory. (Top memories and
classes are unaffected by ``1/σ``, which is the same for every memory.)

The value projection ``P = E · Vᵀ`` (``[class, n_memories]``) reads every value with the class
embeddings ``E`` (the classifier head's weight as the model holds it, after any weight processing):
no final norm, no bias, as the paper defines it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union, cast

import einops
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from vit_embedding_lens.lens.projection import HeadChoice, classifier_head
from vit_embedding_lens.lens.stats import wilcoxon_greater
from vit_embedding_lens.model.hook_names import act_name
from vit_embedding_lens.model.indices import resolve_block
from vit_embedding_lens.model.targets import class_names_or_ids

if TYPE_CHECKING:
    from vit_embedding_lens.model.components import TransformerBlock
    from vit_embedding_lens.model.hooked_vit import HookedViT

SublayerKind = Literal["attn", "mlp"]
#: the two kinds of sublayer with key-value memories, in the order every result uses
SUBLAYER_KINDS: Tuple[str, str] = ("attn", "mlp")


# -- what a memory is -----------------------------------------------------------------------------
def check_kind(kind: str) -> SublayerKind:
    """``kind`` if it names a sublayer with memories, else a ValueError that says which do."""
    if kind not in SUBLAYER_KINDS:
        raise ValueError(
            f"kind must be 'attn' or 'mlp' (the sublayers with key-value memories), got {kind!r}"
        )
    return cast(SublayerKind, kind)


def check_kinds(kinds: Union[str, Sequence[str]]) -> Tuple[SublayerKind, ...]:
    """A tuple of distinct sublayer kinds (a single string is one kind)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"kinds must be a non-empty selection of distinct 'attn'/'mlp', got {kinds!r}"
        )
    return tuple(check_kind(k) for k in kinds)


def n_memories(model: "HookedViT", kind: SublayerKind) -> int:
    """Memories per block: ``d_mlp`` neurons, or ``n_heads * d_head`` attention value rows."""
    cfg = model.cfg
    return cfg.d_mlp if check_kind(kind) == "mlp" else cfg.n_heads * cfg.d_head


def coefficient_hook_name(block: int, kind: SublayerKind) -> str:
    """The hook point whose activation holds the memory coefficients of a sublayer."""
    return act_name("pre" if check_kind(kind) == "mlp" else "z", block)


def write_in_hook_name(block: int, kind: SublayerKind) -> str:
    """The hook point of what the sublayer writes into the residual stream
    (``attn_out``/``mlp_out``)."""
    return act_name(f"{check_kind(kind)}_out", block)


def memory_coefficients(
    activation: Union[Float[Tensor, "batch pos d_mlp"], Float[Tensor, "batch pos head d_head"]],
    kind: SublayerKind,
) -> Float[Tensor, "batch pos n_memories"]:
    """Coefficients from the activation at :func:`coefficient_hook_name`: ``hook_z`` heads
    concatenated."""
    if check_kind(kind) == "mlp":
        return activation
    return einops.rearrange(activation, "... pos head d_head -> ... pos (head d_head)")


def memory_values(
    model: "HookedViT", block: int, kind: SublayerKind
) -> Float[Tensor, "n_memories d_model"]:
    """The value vectors of a sublayer, one row per memory (what each memory writes; see module
    doc)."""
    block = resolve_block(model, block)
    layer = cast("TransformerBlock", model.blocks[block])
    values: Tensor
    if check_kind(kind) == "mlp":
        values = layer.mlp.W_out
    else:
        values = einops.rearrange(layer.attn.W_O, "head d_head d_model -> (head d_head) d_model")
    if model.cfg.block_norm == "post":  # the write-in passes through the block's own norm
        norm = layer.ln2 if kind == "mlp" else layer.ln1
        values = values - values.mean(-1, keepdim=True)
        if norm.affine:
            values = values * norm.w
    return values


def memory_keys(model: "HookedViT", block: int) -> Float[Tensor, "d_mlp d_model"]:
    """The MLP's key vectors ``W_in[:, i]``, one row per neuron (attention memories have no key
    row)."""
    return cast("TransformerBlock", model.blocks[resolve_block(model, block)]).mlp.W_in.T


# -- reading values in the class space ------------------------------------------------------------
def class_embeddings(
    model: "HookedViT", head: HeadChoice = "mean"
) -> Float[Tensor, "class d_model"]:
    """``E``: one row per class, the classifier head's weight as the model holds it.

    Distilled models have two heads; ``head`` picks them as :class:`ClassProjection` does:
    ``"mean"`` (the average of both, as timm averages their logits), ``"cls"`` or ``"dist"``.
    """
    weight, _ = classifier_head(model, head)
    return weight.T


def value_projection(
    model: "HookedViT", block: int, kind: SublayerKind, head: HeadChoice = "mean"
) -> Float[Tensor, "class n_memories"]:
    """``P = E · Vᵀ``: the class logit each memory's value writes (no norm, no bias)."""
    with torch.no_grad():
        return class_embeddings(model, head) @ memory_values(model, block, kind).T


def class_top_memories(
    projection: Float[Tensor, "class n_memories"], k: int = 5
) -> Int[Tensor, "class k"]:
    """Per class, the ``k`` memories whose values write the largest logit for it (by
    ``P[c, :]``)."""
    check_k(k, projection.shape[-1], "memories per class")
    return projection.topk(k, dim=-1).indices


def memory_classes(projection: Float[Tensor, "class n_memories"]) -> Int[Tensor, " n_memories"]:
    """Per memory, the class its value promotes most (argmax over ``P[:, i]``)."""
    return projection.argmax(dim=0)


def check_k(k: int, n: int, what: str) -> None:
    """``k`` as an int in ``1..n``, or a ValueError that names ``what`` it counts."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"{what} must be an int in 1..{n}, got {k!r}")


# -- class-value agreement -----------------------------------------------------------------------
def class_value_agreement(
    model: "HookedViT", kinds: Union[str, Sequence[str]] = SUBLAYER_KINDS, head: HeadChoice = "mean"
) -> Float[Tensor, "n_kinds block class"]:
    """Per class, the largest cosine between its class embedding and any value vector of a sublayer.

    ``result[kind, block, c] = max_i cos(E[c], V_i)`` over the memories of that block's sublayer.
    """
    kinds = check_kinds(kinds)
    with torch.no_grad():
        embeddings = F.normalize(class_embeddings(model, head), dim=-1)
        per_kind = []
        for kind in kinds:
            rows = []
            for block in range(model.cfg.n_layers):
                values = F.normalize(memory_values(model, block, kind), dim=-1)
                rows.append((embeddings @ values.T).max(dim=-1).values)
            per_kind.append(torch.stack(rows))
        return torch.stack(per_kind)


def class_value_agreement_frame(
    agreement: Float[Tensor, "n_kinds block class"],
    kinds: Sequence[str] = SUBLAYER_KINDS,
    class_names: Optional[Sequence[str]] = None,
    model_label: str = "trained",
) -> pd.DataFrame:
    """Tidy rows ``block, sublayer, class, class_name, model, max_cosine`` (one per class)."""
    kinds = check_kinds(kinds)
    n_kinds, n_layers, n_classes = agreement.shape
    if n_kinds != len(kinds):
        raise ValueError(
            f"agreement has {n_kinds} sublayer kinds but {len(kinds)} names were given: {kinds}"
        )
    names = class_names_or_ids(class_names, n_classes)
    values = agreement.detach().cpu().double()
    rows = [
        (block, kind, c, names[c], model_label, float(values[k, block, c]))
        for k, kind in enumerate(kinds)
        for block in range(n_layers)
        for c in range(n_classes)
    ]
    return pd.DataFrame(
        rows, columns=["block", "sublayer", "class", "class_name", "model", "max_cosine"]
    )


class ClassValueComparison(NamedTuple):
    """Class-value agreement of a model and its random-init twin (unpacks as
    ``tests, classes, ...``)."""

    #: one row per block and sublayer: ``block, sublayer, trained, random, effect, statistic,
    #: p_value,
    #: stars`` (means over classes; one-sided paired Wilcoxon over classes, trained > random)
    tests: pd.DataFrame
    #: per-class values of both models, tidy (as :func:`class_value_agreement_frame`)
    classes: pd.DataFrame
    #: ``[n_kinds, block, class]`` max cosines of the model and of the twin
    trained: Tensor
    random: Tensor


def compare_class_value_agreement(
    model: "HookedViT",
    twin: Optional["HookedViT"] = None,
    seed: int = 0,
    kinds: Union[str, Sequence[str]] = SUBLAYER_KINDS,
    head: HeadChoice = "mean",
) -> ClassValueComparison:
    """Class-value agreement of ``model`` against its random-init twin, per block and sublayer.

    ``twin`` defaults to :func:`random_init_twin` ``(model, seed)``. The test pairs the two models
    class by class: is a class's best-aligned value closer to its embedding after training?
    """
    kinds = check_kinds(kinds)
    if twin is None:
        from vit_embedding_lens.lens.baseline import random_init_twin

        twin = random_init_twin(model, seed=seed)
    trained = class_value_agreement(model, kinds, head)
    random = class_value_agreement(twin, kinds, head)
    if trained.shape != random.shape:
        raise ValueError(
            f"the twin's agreement has shape {tuple(random.shape)}, the model's "
            f"{tuple(trained.shape)}: pass a twin of the same architecture (same blocks, classes "
            "and widths)"
        )
    rows = []
    for k, kind in enumerate(kinds):
        for block in range(trained.shape[1]):
            a, b = trained[k, block].cpu().numpy(), random[k, block].cpu().numpy()
            test = wilcoxon_greater(a, b, paired=True)
            rows.append(
                (
                    block,
                    kind,
                    float(a.mean()),
                    float(b.mean()),
                    test.effect,
                    test.statistic,
                    test.p_value,
                    test.stars,
                )
            )
    tests = pd.DataFrame(
        rows,
        columns=[
            "block",
            "sublayer",
            "trained",
            "random",
            "effect",
            "statistic",
            "p_value",
            "stars",
        ],
    )
    classes = pd.concat(
        [
            class_value_agreement_frame(trained, kinds, model.class_names, "trained"),
            class_value_agreement_frame(random, kinds, model.class_names, "random"),
        ],
        ignore_index=True,
    )
    return ClassValueComparison(tests, classes, trained, random)


# -- human-readable values -----------------------------------------------------------------------
def value_topk(
    model: "HookedViT",
    block: Optional[int] = None,
    kind: SublayerKind = "mlp",
    index: Union[int, Sequence[int], None] = None,
    k: int = 5,
    vector: Optional[Float[Tensor, "... d_model"]] = None,
    head: HeadChoice = "mean",
) -> pd.DataFrame:
    """The ``k`` classes each value vector promotes most, with their names and ``E · v`` scores.

    Give a memory by ``block``, ``kind`` and ``index`` (one index or several; attention memories are
    numbered ``head * d_head + e``), or any residual-space ``vector`` (``[d_model]`` or
    ``[n, d_model]``). Rows: ``memory, rank, class, class_name, score`` (plus ``block, sublayer``
    for memories, and ``head, d_head_index`` for attention memories).
    """
    embeddings = class_embeddings(model, head)
    check_k(k, embeddings.shape[0], "k (classes per value)")
    names = class_names_or_ids(model.class_names, embeddings.shape[0])
    if (vector is None) == (index is None):
        raise ValueError(
            "give either a memory (block=, kind=, index=) or a vector=, not both and not neither"
        )
    if vector is not None:
        if (
            not isinstance(vector, Tensor)
            or vector.ndim not in (1, 2)
            or vector.shape[-1] != model.cfg.d_model
        ):
            shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
            raise ValueError(
                "vector must be a tensor [d_model] or [n, d_model] with "
                f"d_model={model.cfg.d_model}, got {shape}"
            )
        vectors = vector.reshape(-1, model.cfg.d_model).to(embeddings)
        indices = list(range(vectors.shape[0]))
        labels: List[dict] = [{"memory": i} for i in indices]
    else:
        if block is None:
            raise ValueError(
                "a memory index needs its block=; or pass vector= for any residual-space vector"
            )
        block = resolve_block(model, block)
        n = n_memories(model, kind)
        assert index is not None  # either a vector or an index, checked above
        indices = [index] if isinstance(index, int) else list(index)
        bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
        if bad or not indices:
            raise ValueError(
                f"memory indices must be ints in 0..{n - 1} for the {kind} of block {block}, got "
                f"{bad or indices}"
            )
        vectors = memory_values(model, block, kind)[indices]
        labels = [{"block": block, "sublayer": kind, "memory": i} for i in indices]
        if kind == "attn":
            for row in labels:
                row["head"], row["d_head_index"] = divmod(row["memory"], model.cfg.d_head)
    with torch.no_grad():
        scores = vectors @ embeddings.T  # [n, C]
        top = scores.topk(k, dim=-1)
    rows = []
    for r, label in enumerate(labels):
        for rank in range(k):
            c = int(top.indices[r, rank])
            score = float(top.values[r, rank])
            rows.append({**label, "rank": rank, "class": c, "class_name": names[c], "score": score})
    return pd.DataFrame(rows)


def top_memories(
    model: "HookedViT",
    block: int,
    kind: SublayerKind,
    class_id: Union[int, str],
    k: int = 5,
    head: HeadChoice = "mean",
) -> pd.DataFrame:
    """The ``k`` memories whose values write the largest logit for a class (an index or a name).

    Rows: ``block, sublayer, class, class_name, rank, memory, score`` (``score = P[c, memory]``),
    plus each memory's own top class (``memory_class``), the argmax over its column of ``P``.
    """
    block = resolve_block(model, block)
    c = model.to_single_token(class_id)
    projection = value_projection(model, block, kind, head)
    names = class_names_or_ids(model.class_names, projection.shape[0])
    top = class_top_memories(projection, k)[c]
    own = memory_classes(projection)
    rows = [
        {
            "block": block,
            "sublayer": kind,
            "class": c,
            "class_name": names[c],
            "rank": rank,
            "memory": int(m),
            "score": float(projection[c, m]),
            "memory_class": int(own[m]),
        }
        for rank, m in enumerate(top)
    ]
    return pd.DataFrame(rows)
