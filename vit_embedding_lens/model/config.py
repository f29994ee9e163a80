"""HookedViTConfig: the architecture of a converted ViT, read from the live timm module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

BlockNorm = Literal["pre", "post"]
FinalNorm = Literal["tokens", "pooled"]
GlobalPool = Literal["token", "avg", "max", "avgmax", "map"]
HeadType = Literal["linear", "cosine"]


@dataclass(frozen=True)
class HookedViTConfig:
    """Everything that shapes a HookedViT's forward pass.

    Field names follow TransformerLens (``n_layers``, ``d_model``, ``n_heads``, ``d_head``,
    ``d_mlp``, ``normalization_type``, ``attn_only``, ``d_vocab``) so that TransformerLens's
    ``ActivationCache`` methods work unchanged; the rest describe the ViT: tokens, pooling, norms.
    Frozen: change it with ``dataclasses.replace`` (weight processing does).
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    n_classes: int
    image_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    in_chans: int = 3
    has_cls_token: bool = True
    has_dist_token: bool = False
    n_registers: int = 0
    #: position embeddings added to patch tokens only (DeiT-3, DINOv2); prefix tokens get none
    no_embed_class: bool = False
    has_pos_embed: bool = True
    #: a norm between the embeddings and the first block (CLIP's ``norm_pre``), exposed as
    #: ``ln_pre``
    pre_norm: bool = False
    #: "pre": ``x + f(norm(x))`` (standard); "post": ``x + norm(f(x))`` (timm's ``ResPostBlock``)
    block_norm: BlockNorm = "pre"
    #: "tokens": final norm on every token before pooling; "pooled": ``fc_norm`` after pooling
    final_norm: FinalNorm = "tokens"
    #: "map": SigLIP's attention pool (a learned probe attends over the tokens, then an MLP)
    global_pool: GlobalPool = "token"
    pool_include_prefix: bool = False
    #: the attention pool's heads and MLP width (``global_pool="map"`` only; 0 otherwise)
    pool_n_heads: int = 0
    pool_d_mlp: int = 0
    #: width of the projection from the pooled vector to a joint image-text space (0 = none)
    d_embed: int = 0
    proj_bias: bool = False
    #: "linear": ``features @ W_head + b_head``; "cosine": the zero-shot head
    #: ``logit_scale * normalize(features) @ W_head + logit_bias`` (W_head: normalized class
    #: embeddings, transposed)
    head_type: HeadType = "linear"
    qkv_bias: bool = True
    qk_norm: bool = False
    #: LayerScale present in timm (folded into W_O/b_O and W_out/b_out)
    layer_scale: bool = False
    act_fn: str = "gelu"
    eps: float = 1e-6
    dynamic_img_size: bool = False
    dynamic_img_pad: bool = False
    model_name: str = "vit"
    normalization_type: Optional[str] = "LN"
    use_attn_result: bool = False
    attn_only: bool = False

    @property
    def n_prefix_tokens(self) -> int:
        return int(self.has_cls_token) + int(self.has_dist_token) + self.n_registers

    @property
    def grid_size(self) -> Tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def n_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def n_ctx(self) -> int:
        """Tokens in the sequence at the configured image size (prefix + patches)."""
        return self.n_prefix_tokens + self.n_patches

    @property
    def d_features(self) -> int:
        """Width of what the head reads: ``d_embed`` after a projection, else ``d_model``."""
        return self.d_embed or self.d_model

    @property
    def pool_d_head(self) -> int:
        """Head width of the attention pool (``global_pool="map"``)."""
        return self.d_model // self.pool_n_heads if self.pool_n_heads else 0

    def __post_init__(self) -> None:
        if self.global_pool == "map":
            if self.pool_n_heads < 1 or self.d_model % self.pool_n_heads:
                raise ValueError(
                    f"global_pool='map' needs pool_n_heads >= 1 dividing d_model={self.d_model}, "
                    f"got pool_n_heads={self.pool_n_heads}"
                )
            if self.pool_d_mlp < 1:
                raise ValueError(f"global_pool='map' needs pool_d_mlp >= 1, got {self.pool_d_mlp}")
            if self.final_norm != "tokens":
                raise ValueError(
                    "global_pool='map' reads the final-normed tokens (final_norm='tokens'); a norm "
                    "after the attention pool is not supported"
                )
            if self.has_dist_token:
                raise ValueError("global_pool='map' with a distillation token is not supported")
        if self.d_embed < 0:
            raise ValueError(f"d_embed must be >= 0, got {self.d_embed}")
        if self.head_type not in ("linear", "cosine"):
            raise ValueError(f"head_type must be 'linear' or 'cosine', got {self.head_type!r}")
        if self.head_type == "cosine" and self.has_dist_token:
            raise ValueError("a cosine (zero-shot) head on a distilled model is not supported")

    @property
    def d_vocab(self) -> int:
        """TransformerLens's name for the output size: the number of classes."""
        return self.n_classes

    @property
    def d_vocab_out(self) -> int:
        return self.n_classes

    @property
    def is_distilled(self) -> bool:
        return self.has_dist_token
