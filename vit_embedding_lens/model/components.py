"""The modules of a HookedViT: norms, embeddings, attention, MLP, blocks and the classifier head.

Weights use TransformerLens's names and orientation (``W_Q`` [H, d_model, d_head], ``W_O``
[H, d_head, d_model], ``W_in`` [d_model, d_mlp], ...). Each module computes exactly what its timm
counterpart computes; hook points sit where TransformerLens users expect them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from vit_embedding_lens.model.activation_store import Derivation, DerivedHookPoint
from vit_embedding_lens.model.config import HookedViTConfig


def _hooked(*points: HookPoint) -> bool:
    """True when any of the hook points has a forward or backward hook attached."""
    return any(p.has_hooks() for p in points)


def head_projections(
    x: Float[Tensor, "... d_model"], weights: Sequence[Tensor], biases: Sequence[Tensor]
) -> Tuple[Float[Tensor, "... head d_head"], ...]:
    """``x`` through per-head input maps (``W`` ``[head, d_model, d_head]`` with its bias
    ``[head, d_head]``; several, e.g. Q, K and V, in one matmul): ``[..., head, d_head]`` each,
    in order. The weights are laid out ``[(n head d_head), d_model]`` as ``F.linear`` wants."""
    n = len(weights)
    head, _, d_head = weights[0].shape
    w = weights[0] if n == 1 else torch.cat(list(weights))
    b = biases[0] if n == 1 else torch.cat(list(biases))
    out = F.linear(x, w.transpose(1, 2).reshape(n * head * d_head, -1), b.reshape(-1))
    return out.view(*x.shape[:-1], n, head, d_head).unbind(-3)


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens's ``hook_scale`` and ``hook_normalized``.

    Runs the fused ``F.layer_norm`` unless one of its hooks is in use; then it computes the
    centred input, the scale and the normalized vector explicitly so the hooks see (and may edit)
    them. ``affine=False`` is the folded form (TransformerLens's ``LNPre``).
    """

    def __init__(self, d: int, eps: float, affine: bool = True) -> None:
        super().__init__()
        self.d = d
        self.eps = eps
        self.affine = affine
        if affine:
            self.w = nn.Parameter(torch.ones(d))
            self.b = nn.Parameter(torch.zeros(d))
        self.hook_scale = HookPoint()  # [..., 1]
        self.hook_normalized = HookPoint()  # [..., d]

    def normalize(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        """The norm without its hook points (what ``forward`` computes when they are unused)."""
        w = self.w if self.affine else None
        b = self.b if self.affine else None
        return F.layer_norm(x, (self.d,), w, b, self.eps)

    def forward(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if not _hooked(self.hook_scale, self.hook_normalized):
            return self.normalize(x)
        w = self.w if self.affine else None
        b = self.b if self.affine else None
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale)
        if w is None or b is None:  # affine=False
            return x
        return x * w + b

    def extra_repr(self) -> str:
        return f"{self.d}, eps={self.eps}, affine={self.affine}"


class PatchEmbed(nn.Module):
    """Convolutional patch embedding plus the learned prefix tokens (CLS, distillation, registers).

    Returns the token sequence *before* position embeddings, prefix tokens in place, so that
    ``hook_embed + hook_pos_embed`` is the first residual stream.
    """

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ph, pw = cfg.patch_size
        self.W_E = nn.Parameter(torch.empty(cfg.d_model, cfg.in_chans, ph, pw))
        self.b_E = nn.Parameter(torch.zeros(cfg.d_model))
        self.W_prefix = nn.Parameter(torch.zeros(cfg.n_prefix_tokens, cfg.d_model))

    def forward(
        self, images: Float[Tensor, "batch chan height width"]
    ) -> Tuple[Float[Tensor, "batch pos d_model"], Tuple[int, int]]:
        if self.cfg.dynamic_img_pad:
            ph, pw = self.cfg.patch_size
            pad_h = (ph - images.shape[-2] % ph) % ph
            pad_w = (pw - images.shape[-1] % pw) % pw
            images = F.pad(images, (0, pad_w, 0, pad_h))
        patches = F.conv2d(images, self.W_E, self.b_E, stride=self.cfg.patch_size)
        grid = (patches.shape[-2], patches.shape[-1])
        patches = patches.flatten(2).transpose(1, 2)
        prefix = self.W_prefix.unsqueeze(0).expand(patches.shape[0], -1, -1)
        return torch.cat([prefix, patches], dim=1), grid


class PosEmbed(nn.Module):
    """Learned absolute position embeddings, laid out over the full token sequence.

    ``W_pos`` is timm's table: one row per token, or per patch only when the model adds no
    position embedding to prefix tokens (``no_embed_class``); those rows come back as zeros.
    A grid other than the configured one (``dynamic_img_size`` models) resamples the table with
    timm's own ``resample_abs_pos_embed``, as timm does.
    """

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_pos = cfg.n_patches if cfg.no_embed_class else cfg.n_ctx
        self.W_pos = nn.Parameter(torch.zeros(n_pos, cfg.d_model))

    def forward(self, grid: Tuple[int, int], batch: int) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        n_prefix = cfg.n_prefix_tokens
        pos: Tensor = self.W_pos
        if tuple(grid) != tuple(cfg.grid_size):
            pos = resample_abs_pos_embed(
                pos.unsqueeze(0),
                new_size=list(grid),
                old_size=list(cfg.grid_size),
                num_prefix_tokens=0 if cfg.no_embed_class else n_prefix,
            ).squeeze(0)
        if cfg.no_embed_class and n_prefix:
            pos = torch.cat([pos.new_zeros(n_prefix, cfg.d_model), pos], dim=0)
        return pos.unsqueeze(0).expand(batch, -1, -1)


class Attention(nn.Module):
    """Multi-head self-attention with TransformerLens hook points.

    Uses fused ``scaled_dot_product_attention`` unless the scores or the pattern are hooked (or
    cached, or ``force_explicit`` is set); then it computes them explicitly, as timm's non-fused
    path does. Both paths compute the same function. ``attn_mask`` (boolean, True = may attend,
    or additive float) broadcasts to ``[batch, head, query, key]`` and is honoured by both paths.

    :meth:`masked_scores` sets a standing mask in *layout order* for the duration of a ``with``
    block (attention knockout uses it): scores it forbids are removed before the softmax, on the
    fused path as well. When tokens were removed from the sequence, ``positions`` (``[batch, n]``,
    the layout position of every slot, ``-1`` at padding) maps it to the slots.
    """

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, d, dh = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(H, d, dh))
        self.W_K = nn.Parameter(torch.empty(H, d, dh))
        self.W_V = nn.Parameter(torch.empty(H, d, dh))
        self.W_O = nn.Parameter(torch.empty(H, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(H, dh))
        self.b_K = nn.Parameter(torch.zeros(H, dh))
        self.b_V = nn.Parameter(torch.zeros(H, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        if cfg.qk_norm:
            self.q_norm = LayerNorm(dh, cfg.eps)
            self.k_norm = LayerNorm(dh, cfg.eps)
        self.scale = dh**-0.5
        self.force_explicit = False
        self._score_mask: Optional[Tensor] = None

        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_z = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query, key]
        self.hook_pattern = HookPoint()
        self.hook_result = HookPoint()  # [batch, pos, head, d_model]

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        attn_mask: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        B, N, _ = x.shape
        attn_mask = self.combined_mask(attn_mask, positions, N)
        H, dh = self.cfg.n_heads, self.cfg.d_head
        q, k, v = head_projections(
            x, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V)
        )
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]

        if self.force_explicit or _hooked(self.hook_attn_scores, self.hook_pattern):
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = _apply_mask(scores, attn_mask)
            pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1))
            z = pattern @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]

        if self.cfg.use_attn_result:
            result = self.hook_result(torch.einsum("bnhe,hed->bnhd", z, self.W_O))
            return result.sum(dim=-2) + self.b_O
        return F.linear(z.reshape(B, N, H * dh), self.W_O.reshape(H * dh, -1).T, self.b_O)

    def rows(
        self, x: Float[Tensor, "batch pos d_model"], rows: slice
    ) -> Float[Tensor, "batch row d_model"]:
        """The attention output at the query tokens ``rows`` only, every token still a key and a
        value; no hook point fires and no mask applies (the forward's function, read at a few
        rows: what a readout of the prefix tokens needs from the last block)."""
        (q,) = head_projections(x[:, rows], (self.W_Q,), (self.b_Q,))
        k, v = head_projections(x, (self.W_K, self.W_V), (self.b_K, self.b_V))
        return self.attend(*self._qk_normed(q, k), v)

    def qkv(self, x: Float[Tensor, "... d_model"]) -> Tuple[Float[Tensor, "... head d_head"], ...]:
        """Queries, keys and values of ``x`` (after the q/k norms where the model has them), firing
        no hook point. Each token's depend on its own row of ``x`` alone."""
        q, k, v = head_projections(
            x, (self.W_Q, self.W_K, self.W_V), (self.b_Q, self.b_K, self.b_V)
        )
        return (*self._qk_normed(q, k), v)

    def _qk_normed(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """Queries and keys through the q/k norms where the model has them, hook-free."""
        if not self.cfg.qk_norm:
            return q, k
        return self.q_norm.normalize(q), self.k_norm.normalize(k)

    def attend(
        self,
        q: Float[Tensor, "batch row head d_head"],
        k: Float[Tensor, "batch pos head d_head"],
        v: Float[Tensor, "batch pos head d_head"],
    ) -> Float[Tensor, "batch row d_model"]:
        """The attention output of queries over keys and values, unmasked, firing no hook point."""
        B, n = q.shape[:2]
        H, dh = self.cfg.n_heads, self.cfg.d_head
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        z = z.transpose(1, 2).reshape(B, n, H * dh)
        return F.linear(z, self.W_O.reshape(H * dh, -1).T, self.b_O)

    @property
    def score_mask(self) -> Optional[Bool[Tensor, "... pos pos"]]:
        """The standing mask in layout order (True = may attend), or None: read-only; set it with
        :meth:`masked_scores`."""
        return self._score_mask

    @contextmanager
    def masked_scores(self, allowed: Bool[Tensor, "... pos pos"]) -> Iterator[None]:
        """Within the ``with`` block, remove the scores ``allowed`` forbids before the softmax.

        ``allowed`` is a bool ``[query, key]`` or ``[head, query, key]`` mask in layout order (True
        = may attend). Nested blocks combine their masks (logical and); leaving a block restores
        the mask before it. The fused kernel stays in use: the mask is passed to it.
        """
        if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool:
            raise TypeError(
                f"the score mask must be a bool tensor (True = may attend), got "
                f"{getattr(allowed, 'dtype', type(allowed).__name__)}"
            )
        n_heads = self.cfg.n_heads
        if allowed.ndim not in (2, 3) or allowed.shape[-1] != allowed.shape[-2]:
            raise ValueError(
                f"the score mask must be [query, key] or [{n_heads}, query, key] over the same "
                f"tokens, got shape {tuple(allowed.shape)}"
            )
        if allowed.ndim == 3 and allowed.shape[0] != n_heads:
            raise ValueError(
                f"the score mask has {allowed.shape[0]} heads but the attention has {n_heads}"
            )
        previous = self._score_mask
        self._score_mask = allowed if previous is None else previous & allowed
        try:
            yield
        finally:
            self._score_mask = previous

    def combined_mask(
        self, attn_mask: Optional[Tensor], positions: Optional[Tensor], n: int
    ) -> Optional[Tensor]:
        """``attn_mask`` combined with the standing score mask (mapped through ``positions``)."""
        if self._score_mask is None:
            return attn_mask
        mask = self._score_mask.to(device=self.W_Q.device)
        if positions is None:
            if mask.shape[-1] != n or mask.shape[-2] != n:
                raise ValueError(
                    f"the attention score mask is over {mask.shape[-1]} tokens but the sequence "
                    f"has {n}; build the knockout for this input size (or remove tokens with "
                    f"keep_mask=, which maps the mask to the kept tokens)"
                )
        else:
            mask = _mask_at_positions(mask, positions)
        if attn_mask is None:
            combined = mask
        elif attn_mask.dtype == torch.bool:
            combined = mask & attn_mask
        else:
            return torch.where(mask, attn_mask, torch.full_like(attn_mask, float("-inf")))
        if not bool(combined.any(dim=-1).all()):
            raise ValueError(
                "the attention mask leaves a query token with no key to attend to (its softmax "
                "would be undefined); keep at least one key per query, e.g. the token itself"
            )
        return combined


def _mask_at_positions(mask: Tensor, positions: Tensor) -> Tensor:
    """A layout-order ``[(head,) N, N]`` mask read at each row's kept positions:
    ``[batch, head|1, n, n]``.

    Padded slots (position -1) get all-True rows: their own padding mask decides for them.
    """
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    valid = positions >= 0
    idx = positions.clamp(min=0)
    out = mask[:, idx[:, :, None], idx[:, None, :]]  # [head, batch, n, n]
    out = out.transpose(0, 1)
    return out | ~valid[:, None, :, None]


def _apply_mask(scores: Tensor, attn_mask: Tensor) -> Tensor:
    """Apply a boolean (True = keep) or additive mask to attention scores, as SDPA does."""
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, float("-inf"))
    return scores + attn_mask


class MLP(nn.Module):
    """Two-layer MLP; ``hook_pre`` is the pre-activation (the key-value memory coefficients).

    ``d_mlp`` defaults to the blocks' (``cfg.d_mlp``); the attention pool's MLP has its own.
    """

    def __init__(self, cfg: HookedViTConfig, act: nn.Module, d_mlp: Optional[int] = None) -> None:
        super().__init__()
        self.cfg = cfg
        d_mlp = cfg.d_mlp if d_mlp is None else d_mlp
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.empty(d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = act
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        #: notes on each hooked forward that hook_post = act(hook_pre) (see model.activation_store)
        self.hook_post = DerivedHookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        pre = self.hook_pre(F.linear(x, self.W_in.T, self.b_in))
        post = self.act(pre)
        if self.hook_post.has_hooks() and self.hook_pre.name is not None and post is not pre:
            # lets a cache keep hook_post as act(hook_pre) (see model.activation_store)
            hooks = len(self.hook_post._forward_hooks)
            self.hook_post.derivation = Derivation(self.hook_pre.name, self.act, pre, post, hooks)
        return F.linear(self.hook_post(post), self.W_out.T, self.b_out)

    def compute(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The same function without firing the hook points."""
        return F.linear(self.act(F.linear(x, self.W_in.T, self.b_in)), self.W_out.T, self.b_out)


class TransformerBlock(nn.Module):
    """One ViT block. Pre-norm: ``x + attn(ln1(x))``; residual post-norm: ``x + ln1(attn(x))``.

    ``hook_attn_out``/``hook_mlp_out`` are what is added to the residual stream (LayerScale is
    folded into ``W_O``/``W_out``; post-norm blocks include their norm).
    """

    def __init__(self, cfg: HookedViTConfig, act: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        affine = cfg.normalization_type == "LN"  # "LNPre" after fold_ln
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps, affine=affine)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps, affine=affine)
        self.mlp = MLP(cfg, act)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        attn_mask: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``positions``: layout position of every slot after token removal (-1 = padding), or
        None."""
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.cfg.block_norm == "pre":
            attn_out = self.attn(self.ln1(resid_pre), attn_mask, positions)
        else:
            attn_out = self.ln1(self.attn(resid_pre, attn_mask, positions))
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        if self.cfg.block_norm == "pre":
            mlp_out = self.mlp(self.ln2(resid_mid))
        else:
            mlp_out = self.ln2(self.mlp(resid_mid))
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))

    def rows(
        self, resid_pre: Float[Tensor, "batch pos d_model"], rows: slice
    ) -> Float[Tensor, "batch row d_model"]:
        """``resid_post`` at the tokens ``rows`` only (every token still attended to), firing no
        hook point, without masks: the last block as a readout of the prefix tokens needs it."""
        attn_out = self.attn.rows(self._attn_input(resid_pre), rows)
        return self._after_attention(resid_pre[:, rows], attn_out)

    def shared_qkv(
        self, resid_pre: Float[Tensor, "batch pos d_model"]
    ) -> Tuple[Float[Tensor, "batch pos head d_head"], ...]:
        """The queries, keys and values of ``resid_pre`` (no hook point fires), for
        :meth:`with_shared_qkv` to reuse."""
        return self.attn.qkv(self._attn_input(resid_pre))

    def with_shared_qkv(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        changed: Bool[Tensor, "batch pos"],
        shared: Tuple[Tensor, ...],
    ) -> Float[Tensor, "batch pos d_model"]:
        """``resid_post`` of ``resid_pre`` when it differs from the input ``shared`` was made from
        (:meth:`shared_qkv`, its batch repeated to fill ``resid_pre``'s) only at the tokens
        ``changed``: their queries, keys and values are computed, every other token's is taken
        from ``shared`` (a token's depend on its own row alone). Fires no hook point, without masks:
        activation patching runs a patched block's input so."""
        reps, rem = divmod(resid_pre.shape[0], shared[0].shape[0])
        if rem or changed.shape != resid_pre.shape[:2]:
            raise ValueError(
                f"with_shared_qkv: {resid_pre.shape[0]} images is not a repeat of the "
                f"{shared[0].shape[0]} that made the shared queries, keys and values, or the "
                f"changed tokens {tuple(changed.shape)} do not match {tuple(resid_pre.shape[:2])}"
            )
        q, k, v = (t.repeat(reps, 1, 1, 1) for t in shared)
        where = changed.nonzero(as_tuple=True)
        if where[0].numel():
            fresh = self.attn.qkv(self._attn_input(resid_pre[where]))
            for full, rows in zip((q, k, v), fresh):
                full[where] = rows
        return self._after_attention(resid_pre, self.attn.attend(q, k, v))

    def _attn_input(self, resid_pre: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """What the attention reads: the normed residual (pre-norm) or the residual itself."""
        return self.ln1.normalize(resid_pre) if self.cfg.block_norm == "pre" else resid_pre

    def resid_post_from(
        self, point: str, value: Float[Tensor, "... d_model"], before: Optional[Tensor] = None
    ) -> Float[Tensor, "... d_model"]:
        """``resid_post`` from the block's activation ``point`` (``"hook_attn_out"``,
        ``"hook_resid_mid"``, ``"hook_mlp_out"`` or ``"hook_resid_post"``) set to ``value``;
        ``before`` is the residual the write-in adds to (``resid_pre`` for ``hook_attn_out``,
        ``resid_mid`` for ``hook_mlp_out``). Every step from those points is token by token, so
        ``value`` may be any rows. Fires no hook point."""
        if point == "hook_resid_post":
            return value
        if point == "hook_resid_mid":
            return self._after_mid(value)
        if before is None or point not in ("hook_attn_out", "hook_mlp_out"):
            raise ValueError(
                f"resid_post_from: {point!r} is not hook_attn_out, hook_resid_mid, hook_mlp_out or "
                "hook_resid_post, or the residual before the write-in is missing"
            )
        if point == "hook_mlp_out":
            return before + value
        return self._after_mid(before + value)

    def _after_attention(
        self, resid_pre: Float[Tensor, "batch row d_model"], attn_out: Tensor
    ) -> Float[Tensor, "batch row d_model"]:
        """The rest of the block from the attention output, hook-free: ``resid_post``."""
        if self.cfg.block_norm != "pre":
            attn_out = self.ln1.normalize(attn_out)
        return self._after_mid(resid_pre + attn_out)

    def _after_mid(self, resid_mid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The MLP half of the block, hook-free: ``resid_post`` from ``resid_mid``."""
        if self.cfg.block_norm == "pre":
            return resid_mid + self.mlp.compute(self.ln2.normalize(resid_mid))
        return resid_mid + self.ln2.normalize(self.mlp.compute(resid_mid))


class AttentionPool(nn.Module):
    """SigLIP's attention-pool (MAP) head: a learned probe attends over the tokens, then an MLP.

    ``pooled = a + mlp(ln(a))`` with ``a = softmax(q k^T / sqrt(d_head)) v W_O + b_O``, the query
    ``q = probe W_Q + b_Q`` one row per head. Exactly timm's ``AttentionPoolLatent`` (latent
    length 1, its q projection, ``proj``, ``norm`` and ``mlp``) and transformers'
    ``SiglipMultiheadAttentionPoolingHead``. Weights in TransformerLens layout, as the blocks'.

    Hook points: ``hook_q`` ``[batch, 1, head, d_head]``, ``hook_k``/``hook_v``/``hook_z``
    (``[batch, pos, head, d_head]``, ``z``: ``[batch, 1, head, d_head]``),
    ``hook_attn_scores``/``hook_pattern`` ``[batch, head, 1, pos]`` (the probe's attention over
    the pooled tokens), ``hook_attn_out`` ``[batch, d_model]``, ``ln.hook_scale``/
    ``ln.hook_normalized``, ``mlp.hook_pre``/``mlp.hook_post`` ``[batch, pool_d_mlp]``,
    ``hook_mlp_out`` ``[batch, d_model]``.
    """

    def __init__(self, cfg: HookedViTConfig, act: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        H, d, dh = cfg.pool_n_heads, cfg.d_model, cfg.pool_d_head
        self.probe = nn.Parameter(torch.zeros(1, d))
        self.W_Q = nn.Parameter(torch.empty(H, d, dh))
        self.W_K = nn.Parameter(torch.empty(H, d, dh))
        self.W_V = nn.Parameter(torch.empty(H, d, dh))
        self.W_O = nn.Parameter(torch.empty(H, dh, d))
        self.b_Q = nn.Parameter(torch.zeros(H, dh))
        self.b_K = nn.Parameter(torch.zeros(H, dh))
        self.b_V = nn.Parameter(torch.zeros(H, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.ln = LayerNorm(d, cfg.eps)
        self.mlp = MLP(cfg, act, d_mlp=cfg.pool_d_mlp)
        self.scale = dh**-0.5
        self.hook_q = HookPoint()  # [batch, 1, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, 1, pos]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, 1, head, d_head]
        self.hook_attn_out = HookPoint()  # [batch, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, d_model]

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        valid: Optional[Bool[Tensor, "batch pos"]] = None,
        fire_hooks: bool = True,
    ) -> Float[Tensor, "batch d_model"]:
        """Pool the tokens ``x``; ``valid`` (False at padded slots) keeps padding out of the
        softmax. ``fire_hooks=False`` computes the same without firing any hook point."""

        def point(hook: HookPoint, t: Tensor) -> Tensor:
            return hook(t) if fire_hooks else t

        B = x.shape[0]
        H, dh = self.cfg.pool_n_heads, self.cfg.pool_d_head
        q = torch.einsum("qd,hde->qhe", self.probe, self.W_Q) + self.b_Q  # [1, head, d_head]
        q = point(self.hook_q, q.unsqueeze(0).expand(B, -1, -1, -1))
        k, v = head_projections(x, (self.W_K, self.W_V), (self.b_K, self.b_V))
        k, v = point(self.hook_k, k), point(self.hook_v, v)
        scores = torch.einsum("bqhe,bnhe->bhqn", q * self.scale, k)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        pattern = point(self.hook_pattern, point(self.hook_attn_scores, scores).softmax(dim=-1))
        z = point(self.hook_z, torch.einsum("bhqn,bnhe->bqhe", pattern, v))
        attn_out = F.linear(z.reshape(B, H * dh), self.W_O.reshape(H * dh, -1).T, self.b_O)
        attn_out = point(self.hook_attn_out, attn_out)
        if fire_hooks:
            mlp_out = self.hook_mlp_out(self.mlp(self.ln(attn_out)))
        else:
            mlp_out = self.mlp.compute(self.ln.normalize(attn_out))
        return attn_out + mlp_out

    def value_output(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The value/output path ``sum_h (x W_V[h] + b_V[h]) W_O[h] + b_O``: the attention output
        for a single token, whose attention weight is 1 (no hook fires)."""
        H, dh = self.cfg.pool_n_heads, self.cfg.pool_d_head
        (v,) = head_projections(x, (self.W_V,), (self.b_V,))
        return F.linear(v.flatten(-2), self.W_O.reshape(H * dh, -1).T, self.b_O)

    def finish(self, attn_out: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """``a + mlp(ln(a))``: the pool's output for an attention output ``a`` (no hook fires)."""
        return attn_out + self.mlp.compute(self.ln.normalize(attn_out))


class Projection(nn.Module):
    """The projection from the pooled vector to the joint image-text space: ``W_proj``
    ``[d_model, d_embed]`` (+ ``b_proj`` when ``proj_bias``); CLIP's ``proj``, SigLIP's none."""

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_proj = nn.Parameter(torch.empty(cfg.d_model, cfg.d_embed))
        if cfg.proj_bias:
            self.b_proj = nn.Parameter(torch.zeros(cfg.d_embed))

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_embed"]:
        return F.linear(x, self.W_proj.T, self.b_proj if self.cfg.proj_bias else None)


class CosineHead(nn.Module):
    """The zero-shot head: ``logit_scale * normalize(features) @ W_head + logit_bias``.

    ``W_head`` ``[d_features, class]`` holds the L2-normalized class embeddings (one column per
    class; text-defined for CLIP and SigLIP, see :class:`~vit_embedding_lens.model.class_space.
    ClassSpace`); ``logit_scale`` (already exponentiated) and ``logit_bias`` (SigLIP's; 0 for CLIP)
    are 0-dim buffers.
    """

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_head = nn.Parameter(torch.empty(cfg.d_features, cfg.n_classes))
        self.register_buffer("logit_scale", torch.tensor(1.0))
        self.register_buffer("logit_bias", torch.tensor(0.0))
        self.logit_scale: Tensor
        self.logit_bias: Tensor

    def forward(self, features: Float[Tensor, "batch d_features"]) -> Float[Tensor, "batch class"]:
        z = F.normalize(features, dim=-1)
        return self.logit_scale * (z @ self.W_head) + self.logit_bias


class ClassifierHead(nn.Module):
    """The linear classifier: ``W_head`` [d_features, class] (TransformerLens's ``W_U``).

    Distilled DeiT models have a second head on the distillation token; at evaluation timm
    averages the two, and so does this module.
    """

    def __init__(self, cfg: HookedViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_head = nn.Parameter(torch.empty(cfg.d_features, cfg.n_classes))
        self.b_head = nn.Parameter(torch.zeros(cfg.n_classes))
        if cfg.has_dist_token:
            self.W_head_dist = nn.Parameter(torch.empty(cfg.d_model, cfg.n_classes))
            self.b_head_dist = nn.Parameter(torch.zeros(cfg.n_classes))

    def forward(
        self,
        pooled: Float[Tensor, "batch d_model"],
        pooled_dist: Optional[Float[Tensor, "batch d_model"]] = None,
    ) -> Float[Tensor, "batch class"]:
        logits = F.linear(pooled, self.W_head.T, self.b_head)
        if pooled_dist is None:
            return logits
        return (logits + F.linear(pooled_dist, self.W_head_dist.T, self.b_head_dist)) / 2
