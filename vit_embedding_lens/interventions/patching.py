"""Activation patching between clean and corrupted images, batched over patch cells.

A *cell* is one patch: for each hook point it touches, a boolean mask (broadcastable to the
activation, batch axis first) of the entries to take from the clean run. A sweep runs the corrupted
images with each cell patched in and records a metric per cell. Cells are batched: the corrupted
batch is repeated ``k`` times along the batch axis and copy ``c`` patches cell ``c``, so one forward
pass evaluates ``k`` cells. Blocks before the earliest patched block are not recomputed (the run
starts from the corrupted residual stream there), blocks after the metric's readout are skipped,
a block whose input is patched takes the queries, keys and values of the tokens the patch leaves
unchanged from the corrupted run (they depend on the token's own row alone), a patch of a
token-by-token activation (``attn_out``, ``resid_mid``, ``mlp_out``, ``resid_post``) computes the
patched tokens' rows of its block alone and shares the rest's queries, keys and values in the next
block, and when the logits read only the prefix tokens (CLS, distillation) and nothing else hooks
the last block or the readout, the last block runs for those rows only (every token still a key
and a value).

The TransformerLens-like functions (``get_act_patch_resid_pre`` ...) take images, infer positions
from ``model.layout`` and return a :class:`PatchingResult`: the values as a tensor shaped like the
sweep (e.g. ``[block, pos]``), a tidy DataFrame, and patch-grid maps for per-token sweeps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
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
from torch import Tensor
from tqdm.auto import tqdm

from vit_embedding_lens.interventions.selection import TokenSpec, selection_mask
from vit_embedding_lens.model.hook_names import (
    LOGITS,
    READOUT_HOOKS,
    act_name,
    hook_block,
)
from vit_embedding_lens.model.indices import resolve_blocks
from vit_embedding_lens.model.layout import TokenLayout

if TYPE_CHECKING:
    from vit_embedding_lens.model.components import TransformerBlock
    from vit_embedding_lens.model.hooked_vit import HookedViT

Cell = Dict[str, Tensor]
Metric = Callable[[Tensor], Tensor]
Tokens = Union[None, TokenSpec, Mapping[str, TokenSpec], Sequence[TokenSpec]]


# -------------------------------------------------------------------------------------------------
# Results
# -------------------------------------------------------------------------------------------------
@dataclass
class PatchingResult:
    """Metric values of a patching sweep.

    ``values`` is shaped like the sweep (``dims``, e.g. ``("layer", "token")``) followed by the
    metric's own shape (none for a scalar metric). ``coords`` labels every sweep dimension.
    """

    values: Tensor
    dims: Tuple[str, ...]
    coords: Dict[str, List]
    layout: TokenLayout
    activation: str = ""
    metadata: Dict[str, object] = field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def _token_dim(self) -> int:
        if "token" not in self.dims:
            raise ValueError(f"this sweep has no per-token dimension (dims {self.dims})")
        return self.dims.index("token")

    @property
    def grid(self) -> Tensor:
        """Image-token values on the patch grid: the token dimension becomes ``grid_h, grid_w``
        (e.g. ``[block, grid_h, grid_w]``). Prefix tokens are in :attr:`prefix`."""
        dim = self._token_dim()
        return self.layout.patch_tokens(self.values, dim=dim).unflatten(dim, self.layout.grid_size)

    @property
    def prefix(self) -> Tensor:
        """Prefix-token values (CLS, distillation, registers), e.g. ``[block, n_prefix]``."""
        return self.layout.prefix_tokens(self.values, dim=self._token_dim())

    @property
    def frame(self) -> pd.DataFrame:
        return self.to_frame()

    def to_frame(self) -> pd.DataFrame:
        """One row per sweep cell (and per metric element): the coordinates and ``value``."""
        values = self.values.detach().float().cpu().numpy()
        extra = values.shape[len(self.dims) :]
        extra_names = ["image"] if len(extra) == 1 else [f"index_{i}" for i in range(len(extra))]
        grids = np.meshgrid(*[np.arange(s) for s in values.shape], indexing="ij")
        frame: Dict[str, np.ndarray] = {}
        labels = self.layout.token_labels()
        for axis, dim in enumerate(self.dims):
            pos = grids[axis].ravel()
            if dim == "token":
                frame["token"] = pos
                frame["token_label"] = np.asarray(labels, dtype=object)[pos]
                is_patch = pos >= self.layout.n_prefix
                rel = pos - self.layout.n_prefix
                frame["row"] = np.where(is_patch, rel // self.layout.grid_size[1], -1)
                frame["col"] = np.where(is_patch, rel % self.layout.grid_size[1], -1)
                frame["is_prefix"] = ~is_patch
            else:
                frame[dim] = np.asarray(self.coords[dim], dtype=object)[pos]
                if dim in ("layer", "head"):
                    frame[dim] = frame[dim].astype(int)
        for axis, name in enumerate(extra_names, start=len(self.dims)):
            frame[name] = grids[axis].ravel()
        frame["value"] = values.ravel()
        out = pd.DataFrame(frame)
        if self.activation:
            out.insert(0, "activation", self.activation)
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{d}={len(self.coords[d])}" for d in self.dims)
        return (
            f"PatchingResult({self.activation or 'patching'}: {sizes}, values "
            f"{tuple(self.values.shape)})"
        )


# -------------------------------------------------------------------------------------------------
# The engine
# -------------------------------------------------------------------------------------------------
def run_patching(
    model: HookedViT,
    corrupted_images: Tensor,
    clean_cache: Mapping[str, Tensor],
    metric: Metric,
    cells: Sequence[Cell],
    *,
    batch_cells: Optional[int] = None,
    max_batch: int = 256,
    skip_unpatched_layers: bool = True,
    progress: bool = True,
) -> Tensor:
    """The metric with each cell patched in: ``[n_cells, *metric_shape]``.

    ``metric`` gets the output of the model (logits), or, when it has a ``hook_name`` attribute
    (as :class:`~vit_embedding_lens.interventions.metrics.ClassSpaceMetric` does), the activation at
    that hook, for one copy of the corrupted batch at a time. ``batch_cells`` cells share a forward
    pass (default: as many as fit in ``max_batch`` images; with ``skip_unpatched_layers`` only
    cells that start at the same block share one, so none runs a block it does not need, and each
    starts from the corrupted run's activations there, reusing what the patch leaves unchanged:
    see the module docstring); ``batch_cells=1`` with ``skip_unpatched_layers=False`` is the plain
    one-forward-per-cell loop.
    """
    model.check_images(corrupted_images)
    B = corrupted_images.shape[0]
    if not cells:
        raise ValueError("no cells to patch")
    names = sorted({name for cell in cells for name in cell})
    clean = _clean_activations(model, clean_cache, names, B)
    k = batch_cells or max(1, max_batch // B)
    k = max(1, min(k, len(cells)))
    readout = getattr(metric, "hook_name", None)
    if readout is not None:
        model.check_hook_name(readout)
    readout_layer = hook_block(readout) if readout is not None else None
    stop = readout_layer + 1 if readout_layer is not None else None

    chunks, starts = _chunks(cells, k, readout_layer, skip_unpatched_layers)
    # per chunk: whether the last block may run for the prefix rows only (nothing in the chunk
    # patches inside it), and the shortcut its patched block may take
    reads_logits = readout in (None, LOGITS) and skip_unpatched_layers
    prefix_rows = [
        reads_logits
        and _reads_prefix_rows(model, sorted({name for c in chunk for name in cells[c]}))
        for chunk in chunks
    ]
    plans = [
        _plan(model, [cells[c] for c in chunk], start, readout_layer, rows)
        if skip_unpatched_layers
        else None
        for chunk, start, rows in zip(chunks, starts, prefix_rows)
    ]
    needed = {act_name("resid_pre", s) for s, plan in zip(starts, plans) if s > 0 and not plan}
    needed |= {name for plan in plans if plan for name in plan.corrupted}
    corrupted = _corrupted_acts(model, corrupted_images, sorted(needed))
    shared_qkv = {
        plan.qkv_block: _block(model, plan.qkv_block).shared_qkv(corrupted[plan.qkv_input])
        for plan in plans
        if plan and plan.qkv_block is not None
    }

    results: List[Optional[Tensor]] = [None] * len(cells)
    validate = model.validate_inputs
    bar = tqdm(total=len(cells), desc="patching", disable=not progress, unit="cell")
    try:
        model.validate_inputs = False
        with torch.no_grad():
            for chunk, start, plan, rows in zip(chunks, starts, plans, prefix_rows):
                hooks, captured = _chunk_hooks(cells, chunk, clean, B, readout)
                n = len(chunk)
                if plan:
                    out = _forward_planned(model, plan, corrupted, shared_qkv, n, stop, hooks, rows)
                else:
                    if start > 0:
                        x = corrupted[act_name("resid_pre", start)].repeat(n, 1, 1)
                    else:
                        x = corrupted_images.repeat(n, 1, 1, 1)
                    out = _forward_from(model, x, start, stop, hooks, rows)
                act = captured[0] if readout is not None else out
                act = act.reshape(n, B, *act.shape[1:])
                for c, cell in enumerate(chunk):
                    results[cell] = torch.as_tensor(metric(act[c]))
                bar.update(n)
    finally:
        model.validate_inputs = validate
        bar.close()
    return torch.stack(cast(List[Tensor], results))


def _reads_prefix_rows(model: HookedViT, names: Sequence[str]) -> bool:
    """True when the last block may run for the prefix tokens' rows only: the logits read the
    CLS (and distillation) token, and nothing but a patch of its input hooks the last block or
    the readout (no standing mask, no forced explicit attention either).

    Every other token's row of the last block's output is never read, so computing it is waste:
    about 80% of a block per forward (only the keys and values of every token are needed)."""
    cfg = model.cfg
    last = cfg.n_layers - 1
    if cfg.global_pool != "token" or last < 0:
        return False
    if not _plain_attention(model, last):
        return False
    last_input = act_name("resid_pre", last)
    for name, point in model.hook_dict.items():
        if hook_block(name) == last or name in READOUT_HOOKS:
            if point.has_hooks() or (name in names and name != last_input):
                return False
    return True


#: activations of a block from which everything up to its output is token by token: a patch of
#: them changes the block's output at the patched tokens only
ROW_LOCAL_POINTS = ("hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
#: the residual a write-in adds to (the rest of :data:`ROW_LOCAL_POINTS` need none)
_WRITE_IN_BASE = {"hook_attn_out": "hook_resid_pre", "hook_mlp_out": "hook_resid_mid"}


@dataclass(frozen=True)
class _Plan:
    """How a chunk of cells that all patch one activation of block ``block`` runs with less work.

    ``point`` is ``hook_resid_pre`` (the block runs with the unchanged tokens' queries, keys and
    values from the corrupted run) or one of :data:`ROW_LOCAL_POINTS` (the block's output is the
    corrupted run's but at the patched tokens, whose rows are computed alone; the next block then
    shares its unchanged tokens' queries, keys and values when ``qkv_block`` says so).
    ``base``: the residual a write-in adds to; ``corrupted``: the corrupted run's activations the
    plan needs."""

    block: int
    point: str
    qkv_block: Optional[int]
    base: Optional[str]
    corrupted: Tuple[str, ...]

    @property
    def name(self) -> str:
        return act_name(self.point, self.block)

    @property
    def qkv_input(self) -> str:
        """The corrupted activation entering ``qkv_block``."""
        assert self.qkv_block is not None
        return act_name("resid_pre", self.qkv_block)


def _plan(
    model: HookedViT,
    cells: Sequence[Cell],
    start: int,
    readout_layer: Optional[int],
    prefix_rows: bool,
) -> Optional[_Plan]:
    """The shortcut a chunk of cells starting at block ``start`` can take, or None.

    Every cell must patch the same one activation of block ``start``: its input (``resid_pre``)
    or a token-by-token point (:data:`ROW_LOCAL_POINTS`), with nothing else hooking the block and
    the metric reading after it. A token's queries, keys and values depend on its own row alone,
    so the tokens a patch leaves unchanged share them with the corrupted run (a quarter of a
    block's arithmetic); after a token-by-token point the patched block's output differs from the
    corrupted run's at the patched tokens only, so the block itself costs just their rows, and the
    next block shares the rest's queries, keys and values."""
    names = {name for cell in cells for name in cell}
    if len(names) != 1:
        return None
    (name,) = names
    if hook_block(name) != start:
        return None
    point = name.split(".", 2)[-1]
    if point == "hook_resid_pre":
        if not _shares_qkv(model, start, readout_layer, prefix_rows):
            return None
        return _Plan(start, point, start, None, (name,))
    if point not in ROW_LOCAL_POINTS or _block_hooked(model, start):
        return None
    if readout_layer is not None and readout_layer <= start:
        return None
    base = act_name(_WRITE_IN_BASE[point], start) if point in _WRITE_IN_BASE else None
    corrupted = {name, act_name("resid_post", start)} | ({base} if base else set())
    nxt = start + 1
    qkv_block = nxt if _shares_qkv(model, nxt, readout_layer, prefix_rows) else None
    if qkv_block is not None:
        corrupted.add(act_name("resid_pre", nxt))
    return _Plan(start, point, qkv_block, base, tuple(sorted(corrupted)))


def _plain_attention(model: HookedViT, layer: int) -> bool:
    """True when block ``layer``'s attention has no standing score mask and is not forced onto
    the explicit path: what the hook-free shortcuts compute (the fused kernel, unmasked)."""
    attn = _block(model, layer).attn
    return not attn.force_explicit and attn.score_mask is None


def _block_hooked(model: HookedViT, layer: int) -> bool:
    """True when a hook point of block ``layer`` has a standing hook."""
    return any(p.has_hooks() for name, p in model.hook_dict.items() if hook_block(name) == layer)


def _shares_qkv(
    model: HookedViT, layer: int, readout_layer: Optional[int], prefix_rows: bool
) -> bool:
    """True when block ``layer`` may run with shared queries, keys and values: it exists, nothing
    hooks it (no standing hook, mask or forced explicit attention), the metric reads after it,
    and it is not a last block that runs for the prefix rows only (cheaper still)."""
    last = model.cfg.n_layers - 1
    if layer > last or (prefix_rows and layer == last):
        return False
    if readout_layer is not None and readout_layer <= layer:
        return False
    return _plain_attention(model, layer) and not _block_hooked(model, layer)


def _forward_planned(
    model: HookedViT,
    plan: _Plan,
    corrupted: Mapping[str, Tensor],
    shared_qkv: Mapping[int, Tuple[Tensor, ...]],
    n: int,
    stop: Optional[int],
    hooks: List,
    prefix_rows: bool,
) -> Tensor:
    """A chunk of ``n`` cells run by ``plan``: the patches applied to the (repeated) corrupted
    activation as their hook would, the patched block by the plan, then the rest of the model as
    usual (``hooks`` but the patches, e.g. the metric's capture)."""
    block = _block(model, plan.block)
    point = plan.name
    x = corrupted[point].repeat(n, 1, 1)
    patched = x
    for name, fn in hooks:
        if name == point:
            patched = fn(patched, hook=block.get_submodule(plan.point))
    changed = (patched != x).any(-1)  # a patch that copies an equal row changes nothing
    rest = [(name, fn) for name, fn in hooks if name != point]
    if plan.point == "hook_resid_pre":
        resid = block.with_shared_qkv(patched, changed, shared_qkv[plan.block])
        return _forward_from(model, resid, plan.block + 1, stop, rest, prefix_rows)
    resid = corrupted[act_name("resid_post", plan.block)].repeat(n, 1, 1)
    where = changed.nonzero(as_tuple=True)
    if where[0].numel():
        image = where[0] % corrupted[point].shape[0]  # copy c of image i sits at c * B + i
        base = corrupted[plan.base][image, where[1]] if plan.base else None
        resid[where] = block.resid_post_from(plan.point, patched[where], base)
    nxt = plan.block + 1
    if plan.qkv_block is not None:
        resid = _block(model, nxt).with_shared_qkv(resid, changed, shared_qkv[nxt])
        nxt += 1
    return _forward_from(model, resid, nxt, stop, rest, prefix_rows)


def _forward_from(
    model: HookedViT, x: Tensor, layer: int, stop: Optional[int], hooks: List, prefix_rows: bool
) -> Tensor:
    """The model with ``hooks`` from the residual stream ``x`` entering block ``layer`` (the
    images when ``layer`` is 0; the readout alone when ``layer`` is past the last block), the last
    block for the prefix rows where it may."""
    if prefix_rows and layer < model.cfg.n_layers:
        return _forward_prefix_rows(model, x, layer, hooks)
    return _run_blocks(model, x, layer, stop, hooks)


def _block(model: HookedViT, layer: int) -> "TransformerBlock":
    return cast("TransformerBlock", model.blocks[layer])


def _forward_prefix_rows(model: HookedViT, x: Tensor, start: int, hooks: List) -> Tensor:
    """Logits of the (repeated) corrupted input ``x`` with the chunk's patch ``hooks``: blocks
    ``start..`` before the last one as usual, then the last block for the prefix rows only and
    the readout on them (see :func:`_reads_prefix_rows`)."""
    last = model.cfg.n_layers - 1
    last_input = act_name("resid_pre", last)
    before = [(name, fn) for name, fn in hooks if name not in (last_input, LOGITS)]
    if start < last:
        x = _run_blocks(model, x, start, last, before)
    block = _block(model, last)
    for name, fn in hooks:  # a patch of the last block's input, applied as its hook would be
        if name == last_input:
            x = fn(x, hook=block.hook_resid_pre)
    resid = block.rows(x, slice(0, model.layout.n_prefix))
    with model.hooks(fwd_hooks=[(name, fn) for name, fn in hooks if name == LOGITS]):
        return model.readout(resid)  # a metric's capture of the logits fires here


def _run_blocks(
    model: HookedViT, x: Tensor, start: int, stop: Optional[int], hooks: List
) -> Tensor:
    """``model`` with ``hooks`` from block ``start`` (``x`` the residual stream entering it;
    the images when ``start`` is 0) up to block ``stop`` (None: through the readout)."""
    if start > 0:
        return model.run_with_hooks(x, start_at_layer=start, stop_at_layer=stop, fwd_hooks=hooks)
    return model.run_with_hooks(x, stop_at_layer=stop, fwd_hooks=hooks)


def _chunks(
    cells: Sequence[Cell], k: int, readout_layer: Optional[int], skip: bool
) -> Tuple[List[List[int]], List[int]]:
    """Cell indices in chunks of at most ``k`` that share a forward pass, and each chunk's start
    block.

    With ``skip``, cells are grouped by the block they start at (their earliest patched block), so
    that no cell runs a block it does not need: a chunk mixing cells of blocks ``l`` and ``l+1``
    would run block ``l`` for all of them. Results are returned to the cells' order by the caller.
    """
    if not skip:
        chunks = [list(range(i, min(i + k, len(cells)))) for i in range(0, len(cells), k)]
        return chunks, [0] * len(chunks)
    by_start: Dict[int, List[int]] = {}
    for c in range(len(cells)):
        by_start.setdefault(_start_layer(cells, [c], readout_layer), []).append(c)
    chunks, starts = [], []
    for start, members in sorted(by_start.items()):
        for i in range(0, len(members), k):
            chunks.append(members[i : i + k])
            starts.append(start)
    return chunks, starts


def _clean_activations(
    model: HookedViT, clean_cache, names: List[str], batch: int
) -> Dict[str, Tensor]:
    clean = {}
    device = model.embed.W_E.device
    for name in names:
        model.check_hook_name(name)
        try:
            act = clean_cache[name]
        except (KeyError, ValueError):
            raise ValueError(
                f"the clean cache has no {name!r}; run model.run_with_cache(clean_images) without "
                f"a names_filter, or with names_filter={names}"
            ) from None
        if act.shape[0] != batch:
            raise ValueError(
                f"the clean cache holds {act.shape[0]} images at {name} but there are {batch} "
                "corrupted images; patch between batches of the same size (pairs of clean and "
                "corrupted images)"
            )
        clean[name] = act.to(device)
    return clean


def _start_layer(cells, chunk, readout_layer) -> int:
    layers = [hook_block(name) for c in chunk for name in cells[c]]
    blocks = [l for l in layers if l is not None]
    if len(blocks) < len(layers):
        return 0  # a patch before the blocks (embeddings): run everything
    start = min(blocks)
    if readout_layer is not None:
        start = min(start, readout_layer)
    return start


def _corrupted_acts(model: HookedViT, images: Tensor, names: List[str]) -> Dict[str, Tensor]:
    """The corrupted run's activations ``names`` (hook points in the blocks; one forward, up to
    the last block they are in)."""
    if not names:
        return {}
    stop = max(cast(int, hook_block(name)) for name in names) + 1
    with torch.no_grad():
        _, cache = model.run_with_cache(images, names_filter=names, stop_at_layer=stop)
    return {name: cache[name] for name in names}


def _chunk_hooks(cells, chunk, clean, B, readout) -> Tuple[List, List[Tensor]]:
    """Patch hooks for a chunk of cells (copy ``c`` patches ``cells[chunk[c]]``) and a capture
    hook."""
    n = len(chunk)
    by_name: Dict[str, List[Tuple[int, Tensor]]] = {}
    for copy, c in enumerate(chunk):
        for name, mask in cells[c].items():
            by_name.setdefault(name, []).append((copy, mask))
    hooks = []
    for name, items in by_name.items():
        shape = torch.broadcast_shapes(*[m.shape for _, m in items])
        stacked = torch.zeros(n, *shape, dtype=torch.bool, device=items[0][1].device)
        for copy, mask in items:
            stacked[copy] = mask.expand(shape)
        hooks.append((name, _patch_hook(stacked, clean[name], n, B)))
    captured: List[Tensor] = []
    if readout is not None:
        hooks.append((readout, lambda act, hook: captured.append(act)))
    return hooks, captured


def _patch_hook(stacked: Tensor, clean: Tensor, n: int, B: int) -> Callable:
    mask = stacked.to(clean.device)

    def hook(act: Tensor, hook) -> Tensor:
        if act.shape[1:] != clean.shape[1:]:
            raise ValueError(
                f"{hook.name}: the corrupted activation has shape {tuple(act.shape[1:])} per "
                f"image, the clean one {tuple(clean.shape[1:])}; patch between images of the same "
                "size"
            )
        patched = torch.where(mask, clean.unsqueeze(0), act.reshape(n, B, *act.shape[1:]))
        return patched.reshape(act.shape)

    return hook


# -------------------------------------------------------------------------------------------------
# Sweeps
# -------------------------------------------------------------------------------------------------
def _token_sets(layout: TokenLayout, tokens: Tokens) -> Tuple[str, List, List[TokenSpec]]:
    """(dimension name, coordinate labels, token specs): every token, or named groups."""
    if tokens is None:
        return "token", list(range(layout.n_tokens)), [[t] for t in range(layout.n_tokens)]
    if isinstance(tokens, Mapping):
        return "group", list(tokens.keys()), list(tokens.values())
    if isinstance(tokens, (str, Tensor)):
        return "group", [tokens if isinstance(tokens, str) else "selected"], [tokens]
    if isinstance(tokens, int):
        raise TypeError(f"tokens= takes token groups, not one token index; use [{tokens}]")
    specs = list(tokens)
    return "group", [s if isinstance(s, str) else f"group{i}" for i, s in enumerate(specs)], specs


def sweep(
    model: HookedViT,
    corrupted_images: Tensor,
    clean_cache: Mapping[str, Tensor],
    metric: Metric,
    activations: Union[str, Sequence[str]],
    per: Sequence[str] = ("layer", "token"),
    *,
    tokens: Tokens = None,
    layers=None,
    **options,
) -> PatchingResult:
    """A patching sweep over ``per`` (from ``"layer"``, ``"token"``, ``"head"``) of one or several
    ``activations`` (hook suffixes such as ``"hook_resid_pre"`` or ``"attn.hook_z"``; several add a
    leading ``"component"`` dimension). Without ``"token"`` in ``per`` every position is patched;
    ``tokens`` (groups) replaces single tokens by named token groups. ``options`` go to
    :func:`run_patching` (``batch_cells``, ``max_batch``, ``progress`` ...)."""
    layout = model.layout
    H = model.cfg.n_heads
    single = isinstance(activations, str)
    suffixes = [activations] if isinstance(activations, str) else list(activations)
    for suffix in suffixes:
        if suffix.endswith("hook_result") and not model.cfg.use_attn_result:
            raise ValueError(
                "per-head results are not computed; call model.set_use_attn_result(True) first"
            )
    layer_ids = resolve_blocks(model, layers, distinct=True, allow_empty=True)
    dims: List[str] = [] if single else ["component"]
    coords: Dict[str, List] = (
        {} if single else {"component": [s.split(".")[-1].replace("hook_", "") for s in suffixes]}
    )
    axes: List[List] = [] if single else [list(range(len(suffixes)))]
    token_specs: List = [None]
    for dim in per:
        if dim == "layer":
            dims.append("layer")
            coords["layer"] = layer_ids
            axes.append(layer_ids)
        elif dim == "head":
            dims.append("head")
            coords["head"] = list(range(H))
            axes.append(list(range(H)))
        elif dim == "token":
            name, labels, token_specs = _token_sets(layout, tokens)
            dims.append(name)
            coords[name] = labels
            axes.append(list(range(len(labels))))
        else:
            raise ValueError(f"unknown sweep dimension {dim!r}; use 'layer', 'token' and 'head'")
    if "layer" not in dims:
        raise ValueError("a sweep needs the 'layer' dimension")
    if "token" not in per and tokens is not None:
        token_specs = [tokens]  # patch these tokens in every cell
    device = model.embed.W_E.device
    cells: List[Cell] = []
    mask_cache: Dict[Tuple, Tensor] = {}
    for point in itertools.product(*axes):
        coord = dict(zip(dims, point))
        suffix = suffixes[coord.get("component", 0)]
        layer = coord["layer"]
        tok_index = coord.get("token", coord.get("group"))
        head = coord.get("head")
        name = act_name(suffix, layer)
        key = (suffix, tok_index, head)
        if key not in mask_cache:
            spec = token_specs[tok_index] if tok_index is not None else token_specs[0]
            mask_cache[key] = selection_mask(
                name, layout, H, tokens=spec, heads=None if head is None else [head], device=device
            )
        cells.append({name: mask_cache[key]})
    values = run_patching(model, corrupted_images, clean_cache, metric, cells, **options)
    shape = [len(coords[d]) for d in dims]
    return PatchingResult(
        values=values.reshape(*shape, *values.shape[1:]),
        dims=tuple(dims),
        coords=coords,
        layout=layout,
        activation=suffixes[0] if single else "+".join(coords["component"]),
    )


# -- TransformerLens-like names --------------------------------------------------------------------
_DOC = """Patch ``{what}`` from the clean run into the corrupted one, per {per}.

``tokens`` (optional): named token groups instead of single tokens - a dict ``{{name: spec}}``, a
list of specs, or one spec; a spec is a layout group (``"cls"``, ``"image"`` ...), token indices,
a per-token bool mask ``[pos]`` or a per-image one ``[batch, pos]`` (an object mask); see
also :func:`~vit_embedding_lens.interventions.selection.grid_tiles`. Other options go to
:func:`run_patching`. Returns a :class:`PatchingResult` shaped ``{shape}``."""


def _make(suffix, per, what, shape_doc):
    def fn(
        model: HookedViT, corrupted_images, clean_cache, metric, *, tokens: Tokens = None, **options
    ) -> PatchingResult:
        return sweep(
            model, corrupted_images, clean_cache, metric, suffix, per, tokens=tokens, **options
        )

    fn.__doc__ = _DOC.format(what=what, per=" × ".join(per), shape=shape_doc)
    return fn


get_act_patch_resid_pre = _make("hook_resid_pre", ("layer", "token"), "resid_pre", "[block, pos]")
get_act_patch_resid_mid = _make("hook_resid_mid", ("layer", "token"), "resid_mid", "[block, pos]")
get_act_patch_resid_post = _make(
    "hook_resid_post", ("layer", "token"), "resid_post", "[block, pos]"
)
get_act_patch_attn_out = _make("hook_attn_out", ("layer", "token"), "attn_out", "[block, pos]")
get_act_patch_mlp_out = _make("hook_mlp_out", ("layer", "token"), "mlp_out", "[block, pos]")
get_act_patch_attn_head_out_all_pos = _make(
    "attn.hook_z", ("layer", "head"), "each head's output z (all positions)", "[block, head]"
)
get_act_patch_attn_head_out_by_pos = _make(
    "attn.hook_z",
    ("layer", "token", "head"),
    "each head's output z",
    "[block, pos, head]",
)
get_act_patch_attn_head_q_all_pos = _make(
    "attn.hook_q", ("layer", "head"), "each head's queries (all positions)", "[block, head]"
)
get_act_patch_attn_head_k_all_pos = _make(
    "attn.hook_k", ("layer", "head"), "each head's keys (all positions)", "[block, head]"
)
get_act_patch_attn_head_v_all_pos = _make(
    "attn.hook_v", ("layer", "head"), "each head's values (all positions)", "[block, head]"
)
get_act_patch_attn_head_q_by_pos = _make(
    "attn.hook_q",
    ("layer", "token", "head"),
    "each head's queries",
    "[block, pos, head]",
)
get_act_patch_attn_head_k_by_pos = _make(
    "attn.hook_k", ("layer", "token", "head"), "each head's keys", "[block, pos, head]"
)
get_act_patch_attn_head_v_by_pos = _make(
    "attn.hook_v", ("layer", "token", "head"), "each head's values", "[block, pos, head]"
)
get_act_patch_attn_head_pattern_all_pos = _make(
    "attn.hook_pattern",
    ("layer", "head"),
    "each head's attention pattern (all positions)",
    "[block, head]",
)
get_act_patch_attn_head_pattern_by_query_pos = _make(
    "attn.hook_pattern",
    ("layer", "token", "head"),
    "each head's attention pattern, one query (destination) row at a time",
    "[block, pos, head]",
)
get_act_patch_attn_head_result_all_pos = _make(
    "attn.hook_result",
    ("layer", "head"),
    "each head's write-in (result; needs use_attn_result)",
    "[block, head]",
)
get_act_patch_attn_head_result_by_pos = _make(
    "attn.hook_result",
    ("layer", "token", "head"),
    "each head's write-in (result; needs use_attn_result)",
    "[block, pos, head]",
)
for _name, _fn in list(globals().items()):
    if _name.startswith("get_act_patch_"):
        _fn.__name__ = _fn.__qualname__ = _name


def get_act_patch_block_every(
    model: HookedViT, corrupted_images, clean_cache, metric, *, tokens: Tokens = None, **options
) -> PatchingResult:
    """``resid_pre``, ``attn_out`` and ``mlp_out`` per layer × token: ``[3, block, pos]``
    (dimension ``"component"`` first), as TransformerLens's function of that name."""
    return sweep(
        model,
        corrupted_images,
        clean_cache,
        metric,
        ["hook_resid_pre", "hook_attn_out", "hook_mlp_out"],
        ("layer", "token"),
        tokens=tokens,
        **options,
    )


def get_act_patch_attn_head_all_pos_every(
    model: HookedViT, corrupted_images, clean_cache, metric, **options
) -> PatchingResult:
    """Head output (z), q, k, v and pattern per layer × head, all positions:
    ``[5, block, head]``."""
    return sweep(
        model,
        corrupted_images,
        clean_cache,
        metric,
        ["attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern"],
        ("layer", "head"),
        **options,
    )
