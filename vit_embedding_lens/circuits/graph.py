"""The computational graph of a pre-norm ViT as senders and receivers, and a forward pass over it.

Every component writes into the residual stream (a *sender*) and reads from it (a *receiver*):

- senders: ``"embed"`` (the residual stream entering block 0: patch, prefix and position
  embeddings), ``"a{l}.h{h}"`` (head ``h`` of block ``l``: its result ``z · W_O``, without
  ``b_O``), ``"m{l}"`` (the MLP output of block ``l``);
- receivers: ``"a{l}.h{h}"`` (the head's input, the residual stream its q, k and v are read from,
  all three together), ``"m{l}"`` (the MLP's input, ``resid_mid``), ``"logits"`` (the residual
  stream the readout reads: final norm, pooling, classifier).

An edge ``u → v`` exists when ``u`` writes before ``v`` reads (heads of a block read before the
block's MLP writes; the MLP reads after its heads write). The input of a receiver is the sum of
its senders' outputs plus the biases, which are constant. :func:`graph_forward` runs the model with
each receiver's input built from its senders, so that an edge can be *ablated*: the receiver sees
the sender's ablated (corrupt, mean or resampled) output instead of the one of this run, while
every other receiver still sees it. Keeping every edge is the model's forward pass; keeping none
is the forward pass of the ablated activations (the corrupt run).

Edges may be split by token groups: edge ``(u, v, g)`` is ``u``'s output at the tokens of group
``g`` as read by ``v`` (the residual stream is per token, so this is a partition of the edge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from vit_embedding_lens.errors import UnsupportedArchitectureError
from vit_embedding_lens.model.hook_names import LOGITS, act_name
from vit_embedding_lens.model.readout import readout_logits

if TYPE_CHECKING:
    from vit_embedding_lens.model.components import TransformerBlock
    from vit_embedding_lens.model.hooked_vit import HookedViT

Metric = Callable[[Tensor], Tensor]
AblationMethod = Literal["corrupt", "mean", "resample"]


# -------------------------------------------------------------------------------------------------
# Names
# -------------------------------------------------------------------------------------------------
def head_name(block: int, head: int) -> str:
    """``"a{block}.h{head}"``: a head, as a sender (its result) or a receiver (its input)."""
    return f"a{block}.h{head}"


def mlp_name(block: int) -> str:
    """``"m{block}"``: an MLP, as a sender (its output) or a receiver (its input)."""
    return f"m{block}"


def resid_name(block: int) -> str:
    """``"r{block}"``: the residual stream entering ``block`` (a node of node attribution)."""
    return f"r{block}"


def node_with_group(node: str, group: Optional[str]) -> str:
    """``"a3.h5@cls"``: a node restricted to a token group (the node itself when ``group`` is
    None or ``"all"``)."""
    return node if group in (None, "all") else f"{node}@{group}"


class CircuitGraph:
    """Senders, receivers and the edges between them for one model (see the module docstring).

    Indices: sender 0 is ``"embed"``, then block by block the heads and the MLP; receivers are
    block by block the heads and the MLP, then ``"logits"``. ``valid[s, r]`` is True where sender
    ``s`` writes before receiver ``r`` reads.
    """

    def __init__(self, model: HookedViT) -> None:
        check_graph_model(model)
        cfg = model.cfg
        self.model = model
        self.n_blocks, self.n_heads = L, H = cfg.n_layers, cfg.n_heads
        senders, s_block, s_kind = ["embed"], [-1], ["embed"]
        receivers: List[str] = []
        r_block: List[int] = []
        r_kind: List[str] = []
        for l in range(L):
            for h in range(H):
                senders.append(head_name(l, h))
                receivers.append(head_name(l, h))
                s_block.append(l)
                r_block.append(l)
                s_kind.append("head")
                r_kind.append("head")
            senders.append(mlp_name(l))
            receivers.append(mlp_name(l))
            s_block.append(l)
            r_block.append(l)
            s_kind.append("mlp")
            r_kind.append("mlp")
        receivers.append("logits")
        r_block.append(L)
        r_kind.append("logits")
        self.senders, self.receivers = senders, receivers
        self.sender_block, self.sender_kind = s_block, s_kind
        self.receiver_block, self.receiver_kind = r_block, r_kind
        self._sender_index = {n: i for i, n in enumerate(senders)}
        self._receiver_index = {n: i for i, n in enumerate(receivers)}
        n_before = torch.tensor([self.senders_before(r) for r in range(len(receivers))])
        self.valid: Bool[Tensor, "sender receiver"] = (
            torch.arange(len(senders))[:, None] < n_before[None, :]
        )

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    @property
    def n_edges(self) -> int:
        """Edges without token groups."""
        return int(self.valid.sum())

    def senders_before(self, receiver: int) -> int:
        """How many senders (a prefix of the sender order) write before ``receiver`` reads."""
        H = self.n_heads
        if receiver == self.n_receivers - 1:  # logits
            return self.n_senders
        block, within = divmod(receiver, H + 1)
        return 1 + block * (H + 1) + (H if within == H else 0)

    def sender_index(self, name: str) -> int:
        if name not in self._sender_index:
            raise ValueError(
                f"unknown sender {name!r}; senders are 'embed', 'a{{l}}.h{{h}}' and 'm{{l}}' for "
                f"blocks 0..{self.n_blocks - 1} and heads 0..{self.n_heads - 1}"
            )
        return self._sender_index[name]

    def receiver_index(self, name: str) -> int:
        if name not in self._receiver_index:
            raise ValueError(
                f"unknown receiver {name!r}; receivers are 'a{{l}}.h{{h}}', 'm{{l}}' and 'logits' "
                f"for blocks 0..{self.n_blocks - 1} and heads 0..{self.n_heads - 1}"
            )
        return self._receiver_index[name]

    def head_receivers(self, block: int) -> slice:
        start = block * (self.n_heads + 1)
        return slice(start, start + self.n_heads)

    def mlp_receiver(self, block: int) -> int:
        return block * (self.n_heads + 1) + self.n_heads

    def __repr__(self) -> str:
        return (
            f"CircuitGraph({self.n_senders} senders, {self.n_receivers} receivers, "
            f"{self.n_edges} edges)"
        )


def check_graph_model(model: HookedViT) -> None:
    """The graph needs pre-norm blocks (post-norm blocks normalize the sum of the heads, which
    then do not add into the residual stream one by one) and a classifier head."""
    cfg = model.cfg
    if cfg.block_norm != "pre":
        raise UnsupportedArchitectureError(
            f"{cfg.model_name} uses post-norm blocks: its heads do not write into the residual "
            "stream one by one, so there is no edge graph; circuits need pre-norm blocks",
            model=cfg.model_name,
            feature="post-norm blocks (circuits)",
        )
    if not cfg.n_classes:
        raise ValueError(
            f"{cfg.model_name} has no classifier head: circuits read a class metric from the "
            "logits; load a model with a head"
        )


def check_logit_metric(metric: Metric) -> None:
    """Circuits read their metric from the logits (the ``"logits"`` receiver)."""
    hook = getattr(metric, "hook_name", None)
    if hook is not None and hook != LOGITS:
        raise ValueError(
            f"circuits need a metric of the logits, not of {hook!r}; build the metric with "
            "readout='logits' (the default)"
        )


def scalar_metric(metric: Metric, logits: Tensor) -> Tensor:
    """The metric of ``logits`` as a scalar (a per-image metric is averaged over images)."""
    value = torch.as_tensor(metric(logits))
    return value.mean() if value.ndim else value


def differentiable_metric(metric: Metric, logits: Tensor) -> Tensor:
    """:func:`scalar_metric` for attribution patching, which needs the metric's gradient: a clear
    error for a metric without one (a rank is piecewise constant)."""
    value = scalar_metric(metric, logits)
    if not value.requires_grad:
        kind = getattr(metric, "kind", None)
        name = f"the {kind!r} metric" if kind else "this metric"
        raise ValueError(
            f"{name} has no gradient, so attribution patching cannot score with it; score with "
            "'logit_diff', 'probability' or 'log_probability', and use it to run circuits "
            "(run_circuit, faithfulness_curve, discover_circuit)"
        )
    return value


# -------------------------------------------------------------------------------------------------
# Sender activations and the ablation reference
# -------------------------------------------------------------------------------------------------
def sender_hook_names(model: HookedViT) -> List[str]:
    L = model.cfg.n_layers
    names = [act_name("hook_resid_pre", 0)]
    for l in range(L):
        names += [act_name("attn.hook_z", l), act_name("hook_mlp_out", l)]
    return names


def senders_from_cache(model: HookedViT, cache: Mapping[str, Tensor]) -> Tensor:
    """Stack the senders' outputs ``[sender, batch, pos, d_model]`` from cached activations
    (``blocks.0.hook_resid_pre``, every ``attn.hook_z`` and ``hook_mlp_out``)."""
    out = [cache[act_name("hook_resid_pre", 0)]]
    for l, block in enumerate(_blocks(model)):
        z = cache[act_name("attn.hook_z", l)]
        result = torch.einsum("bnhe,hed->bnhd", z, block.attn.W_O)  # the model's hook_result
        out += list(result.unbind(2))
        out.append(cache[act_name("hook_mlp_out", l)])
    return torch.stack(out)


def sender_activations(
    model: HookedViT, images: Float[Tensor, "batch chan height width"]
) -> Float[Tensor, "sender batch pos d_model"]:
    """Every sender's output for ``images``, from one forward pass of the model (no gradient)."""
    CircuitGraph(model)  # checks the architecture
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=sender_hook_names(model))
    return senders_from_cache(model, cache)


@dataclass
class AblationReference:
    """What an ablated sender outputs, from a reference data set (mean or resample ablation).

    ``senders`` holds every sender's output on the reference images ``[sender, n_ref, pos,
    d_model]`` (``n_ref = 1`` for the mean). :meth:`for_batch` gives the ablated outputs for a
    batch: the mean (broadcast over images), or, per image, the outputs of one reference image
    drawn with ``seed``.
    """

    senders: Float[Tensor, "sender n_ref pos d_model"]
    method: Literal["mean", "resample"]
    seed: int = 0

    def for_batch(self, batch: int) -> Tensor:
        if self.method == "mean":
            return self.senders
        gen = torch.Generator().manual_seed(self.seed)
        idx = torch.randint(self.senders.shape[1], (batch,), generator=gen)
        return self.senders[:, idx.to(self.senders.device)]


def ablation_reference(
    model: HookedViT,
    images: Float[Tensor, "batch chan height width"],
    method: Literal["mean", "resample"] = "mean",
    *,
    seed: int = 0,
    batch_size: int = 256,
) -> AblationReference:
    """Mean or resample ablation over a data set, the alternative to a counterfactual image: pass
    it as ``corrupt=`` to the attribution and circuit functions. The reference images are run in
    batches of ``batch_size``."""
    if method not in ("mean", "resample"):
        raise ValueError(f"method must be 'mean' or 'resample', got {method!r}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(
            f"reference images must be a non-empty batch [batch, chan, height, width], got "
            f"{tuple(images.shape)}"
        )
    parts = [sender_activations(model, chunk) for chunk in images.split(batch_size)]
    if method == "mean":
        total = sum(p.sum(1, keepdim=True) for p in parts)
        senders = torch.as_tensor(total) / images.shape[0]
    else:
        senders = torch.cat(parts, dim=1)
    return AblationReference(senders=senders, method=method, seed=seed)


Corrupt = Union[Tensor, AblationReference]


def ablated_senders(
    model: HookedViT, clean: Tensor, corrupt: Corrupt
) -> Float[Tensor, "sender batch pos d_model"]:
    """The ablated output of every sender for a batch of clean images: the corrupt images'
    (a counterfactual pair), or the reference's (mean: broadcast over the batch)."""
    if isinstance(corrupt, AblationReference):
        ref = corrupt.for_batch(clean.shape[0]).to(clean.device, clean.dtype)
        if ref.shape[2] != model.layout.n_tokens:
            raise ValueError(
                f"the ablation reference has {ref.shape[2]} tokens per image, the model "
                f"{model.layout.n_tokens}; use reference images of the model's input size"
            )
        return ref
    check_pair(clean, corrupt)
    return sender_activations(model, corrupt)


def check_pair(clean: Tensor, corrupt: Tensor) -> None:
    """Clean and corrupt images are pairs: same number, same size."""
    if not isinstance(corrupt, Tensor):
        raise TypeError(
            "corrupt= takes corrupt images (a tensor) or an AblationReference "
            f"(ablation_reference(...)), got {type(corrupt).__name__}"
        )
    if clean.shape != corrupt.shape:
        raise ValueError(
            f"clean and corrupt images must be pairs of the same shape, got {tuple(clean.shape)} "
            f"and {tuple(corrupt.shape)}; resize the images to one size and pair them one to one"
        )


# -------------------------------------------------------------------------------------------------
# The forward pass over the graph
# -------------------------------------------------------------------------------------------------
@dataclass
class GraphRun:
    """What :func:`graph_forward` returns: logits, every sender's output, and every receiver's
    input (heads: ``[batch, pos, head, d_model]`` per block; MLPs and logits: ``[batch, pos,
    d_model]``), in the run's own graph (for gradients)."""

    logits: Float[Tensor, "batch class"]
    senders: List[Tensor]
    head_inputs: List[Tensor]
    mlp_inputs: List[Tensor]
    final_input: Tensor


def _blocks(model: HookedViT) -> Sequence[TransformerBlock]:
    return list(model.blocks)  # type: ignore[arg-type]


def graph_forward(
    graph: CircuitGraph,
    resid0: Float[Tensor, "batch pos d_model"],
    *,
    ablated: Optional[Tensor] = None,
    absent: Optional[Tensor] = None,
    groups: Optional[Tensor] = None,
) -> GraphRun:
    """Run the model from the embeddings ``resid0`` with every receiver's input built from its
    senders.

    Without ``absent`` this is the model's forward pass (heads computed one by one from their own
    input). ``absent`` (``[copies, receiver, sender, group]``, 1 = the edge is ablated, values in
    between scale the ablation) with ``ablated`` (``[sender, batch|1, pos, d_model]``, the ablated
    outputs) and ``groups`` (``[group, batch|1, pos]`` 0/1 token groups) runs ``copies`` circuits
    at once: ``resid0`` is then the ``copies`` repeats of the batch, stacked. Each receiver's input
    is the run's residual stream minus, for every ablated edge ``(u, g)``, ``u``'s output in this
    run minus its ablated output, at the tokens of ``g``.
    """
    model = graph.model
    H = graph.n_heads
    BK, N, d = resid0.shape
    run_ablation = absent is not None
    K = absent.shape[0] if absent is not None else 1
    B = BK // K
    if absent is not None:
        if ablated is None or groups is None:
            raise ValueError("absent= needs ablated= and groups=")
        diffs = torch.empty(graph.n_senders, K, B, N, d, device=resid0.device, dtype=resid0.dtype)
        abl = ablated.to(resid0.dtype).unsqueeze(1)  # [S, 1, B|1, N, d]
        grp = groups.to(resid0.dtype).expand(groups.shape[0], B, N)
        absent_f = absent.to(resid0.dtype)

    def add_sender(index: int, out: Tensor) -> None:
        if run_ablation:
            diffs[index] = out.reshape(K, B, N, d) - abl[index]

    def correction(receivers: Union[int, slice], n_senders: int) -> Tensor:
        mask = absent_f[:, receivers, :n_senders]
        D = diffs[:n_senders]
        if isinstance(receivers, slice):  # heads: [K, H, S, G] -> [K*B, N, H, d]
            out = torch.einsum("khsg,gbn,skbnd->kbnhd", mask, grp, D)
            return out.reshape(BK, N, out.shape[3], d)
        return torch.einsum("ksg,gbn,skbnd->kbnd", mask, grp, D).reshape(BK, N, d)

    senders: List[Tensor] = [resid0]
    add_sender(0, resid0)
    head_inputs: List[Tensor] = []
    mlp_inputs: List[Tensor] = []
    resid = resid0
    for l, block in enumerate(_blocks(model)):
        attn = block.attn
        x = resid.unsqueeze(2).expand(BK, N, H, d)
        if run_ablation:
            x = x - correction(graph.head_receivers(l), graph.senders_before(l * (H + 1)))
        head_inputs.append(x)
        xn = block.ln1.normalize(x)
        q = torch.einsum("bnhd,hde->bhne", xn, attn.W_Q) + attn.b_Q[:, None]
        k = torch.einsum("bnhd,hde->bhne", xn, attn.W_K) + attn.b_K[:, None]
        v = torch.einsum("bnhd,hde->bhne", xn, attn.W_V) + attn.b_V[:, None]
        if model.cfg.qk_norm:
            q, k = attn.q_norm.normalize(q), attn.k_norm.normalize(k)
        mask = attn.combined_mask(None, None, N)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, dh]
        result = torch.einsum("bhne,hed->bnhd", z, attn.W_O)
        for h in range(H):
            senders.append(result[:, :, h])
            add_sender(len(senders) - 1, result[:, :, h])
        resid = resid + result.sum(2) + attn.b_O
        m_in = resid.view_as(resid)  # its own autograd node: only the MLP reads it
        if run_ablation:
            m_in = m_in - correction(graph.mlp_receiver(l), graph.senders_before(l * (H + 1) + H))
        mlp_inputs.append(m_in)
        mlp_out = block.mlp(block.ln2.normalize(m_in))
        senders.append(mlp_out)
        add_sender(len(senders) - 1, mlp_out)
        resid = resid + mlp_out
    final = resid
    if run_ablation:
        final = final - correction(graph.n_receivers - 1, graph.n_senders)
    logits = readout_logits(model, final)
    return GraphRun(logits, senders, head_inputs, mlp_inputs, final)


def embeddings(
    model: HookedViT, images: Float[Tensor, "batch chan height width"]
) -> Float[Tensor, "batch pos d_model"]:
    """The residual stream entering block 0 (the ``"embed"`` sender)."""
    with torch.no_grad():
        return model(images, stop_at_layer=0)


def receiver_gradients(run: GraphRun, value: Tensor) -> Float[Tensor, "receiver batch pos d_model"]:
    """``∂value/∂(input of v)`` for every receiver, stacked in receiver order."""
    inputs = [*run.head_inputs, *run.mlp_inputs, run.final_input]
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    L = len(run.head_inputs)
    out: List[Tensor] = []
    for l in range(L):
        g = grads[l]
        g = torch.zeros_like(run.head_inputs[l]) if g is None else g
        out += list(g.unbind(2))
        gm = grads[L + l]
        out.append(torch.zeros_like(run.mlp_inputs[l]) if gm is None else gm)
    out.append(grads[-1] if grads[-1] is not None else torch.zeros_like(run.final_input))
    return torch.stack(out)


def tokens_by_group(groups: Dict[str, Tensor], device, dtype) -> Tensor:
    """Token groups ``{name: bool [batch|1, pos]}`` as a 0/1 tensor ``[group, batch|1, pos]``."""
    masks = list(groups.values())
    rows = max(m.shape[0] for m in masks)
    return torch.stack([m.expand(rows, m.shape[-1]) for m in masks]).to(device, dtype)
