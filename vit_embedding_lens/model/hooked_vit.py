"""HookedViT: a timm Vision Transformer as a TransformerLens ``HookedRootModule``."""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union, cast

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.FactoredMatrix import FactoredMatrix
from transformer_lens.hook_points import HookPoint

from vit_embedding_lens.model.activation_store import ActivationStore, DerivedHookPoint
from vit_embedding_lens.model.activations import make_activation
from vit_embedding_lens.model.cache import ViTActivationCache
from vit_embedding_lens.model.class_space import ClassSpace
from vit_embedding_lens.model.components import (
    AttentionPool,
    ClassifierHead,
    CosineHead,
    LayerNorm,
    PatchEmbed,
    PosEmbed,
    Projection,
    TransformerBlock,
)
from vit_embedding_lens.model.config import HookedViTConfig
from vit_embedding_lens.model.convert import TimmConversion, convert_timm
from vit_embedding_lens.model.host_memory import retain_freed_memory_by_default
from vit_embedding_lens.model.layout import TokenLayout
from vit_embedding_lens.model.registry import loader
from vit_embedding_lens.model.token_slots import (
    check_keep_mask,
    gather_tokens,
    kept_positions,
    padding_mask,
)

ClassIds = Union[int, str, Int[Tensor, "..."], Sequence[int]]


class HookedViT(HookedRootModule):
    """A ViT image classifier with TransformerLens hook points on every intermediate activation.

    Build one with :meth:`from_timm`; it computes exactly what the timm model computes (tested to
    1e-5 in fp32). ``run_with_cache`` returns a :class:`ViTActivationCache`, a TransformerLens
    ``ActivationCache``; ``layout`` says which tokens are CLS, registers and image patches.
    """

    def __init__(
        self,
        cfg: HookedViTConfig,
        class_names: Optional[Sequence[str]] = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model], prefix tokens included
        self.pos_embed = PosEmbed(cfg) if cfg.has_pos_embed else None
        self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.pre_norm:
            self.ln_pre = LayerNorm(cfg.d_model, cfg.eps)
        self.blocks = nn.ModuleList(
            [TransformerBlock(cfg, make_activation(cfg.act_fn)) for _ in range(cfg.n_layers)]
        )
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps, affine=cfg.normalization_type == "LN")
        if cfg.global_pool == "map":
            self.attn_pool = AttentionPool(cfg, make_activation(cfg.act_fn))
        self.hook_pooled = HookPoint()  # [batch, d_model]
        if cfg.has_dist_token:
            self.hook_pooled_dist = HookPoint()
        if cfg.d_embed:
            self.proj = Projection(cfg)
            self.hook_image_embed = HookPoint()  # [batch, d_embed], before L2 normalization
        if cfg.n_classes:
            #: ClassifierHead or CosineHead (``cfg.head_type``)
            self.head: Any = CosineHead(cfg) if cfg.head_type == "cosine" else ClassifierHead(cfg)
            self.hook_logits = HookPoint()  # [batch, class]
        if class_names is not None and len(class_names) != cfg.n_classes:
            raise ValueError(f"{len(class_names)} class names given for {cfg.n_classes} classes")
        self.class_names: Optional[List[str]] = list(class_names) if class_names else None
        #: check every input batch (rank, channels, size, dtype, device, NaN/inf); the NaN/inf check
        #: reads the whole batch and, on a GPU, waits for it: set False in tight loops you trust
        self.validate_inputs = True
        #: after a forward with ``keep_mask``: layout position of every token slot ``[batch, n]``
        #: (-1 = padding); None after a forward without token removal. Hooks may read it.
        self.token_positions: Optional[Tensor] = None
        self.layout = TokenLayout(
            grid_size=cfg.grid_size,
            patch_size=cfg.patch_size,
            cls_index=0 if cfg.has_cls_token else None,
            dist_index=1 if cfg.has_dist_token else None,
            register_indices=tuple(
                range(int(cfg.has_cls_token), int(cfg.has_cls_token) + cfg.n_registers)
            ),
        )
        if init_weights:
            self._init_weights()
        self.setup()
        self.eval()

    # ---------------------------------------------------------------------------------------------
    # Construction
    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_conversion(
        cls,
        conversion: TimmConversion,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "HookedViT":
        """The HookedViT of a converter's output, its weights loaded strictly (all keys and shapes).

        The one place a converted model is built. ``device``/``dtype`` default to the converted
        weights'.
        """
        model = cls(conversion.cfg, class_names=conversion.class_names, init_weights=False)
        model = model.to(device=device or conversion.device, dtype=dtype or conversion.dtype)
        model.load_state_dict(conversion.state_dict, strict=True)
        return model

    @classmethod
    def from_timm(
        cls,
        model_or_name: Union[str, nn.Module],
        pretrained: bool = False,
        checkpoint_path: Optional[Union[str, Path]] = None,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
        class_names: Optional[Sequence[str]] = None,
        model_name: Optional[str] = None,
        **timm_kwargs: Any,
    ) -> "HookedViT":
        """Convert a timm ViT (a live module, or a timm model name with tag) exactly and strictly.

        ``pretrained`` and ``timm_kwargs`` go to ``timm.create_model`` when a name is given.
        ``checkpoint_path`` loads the user's own weights for that timm model (safetensors, or a
        torch file read with ``weights_only=True``) before conversion. Every timm parameter and
        buffer is consumed, or the conversion fails. The weight-processing flags are opt-in and
        each keeps the model's log-probabilities (see :mod:`vit_embedding_lens.model.processing`).
        ``"bundled:NAME"`` (``mnist-vit``, ``fashion-vit``) names a trained model shipped with the
        package (see :meth:`from_bundled`). ``model_name`` labels the result (default: the timm
        name). Names are parsed and modules created by :mod:`vit_embedding_lens.loading`.
        """
        return loader("timm")(
            model_or_name,
            pretrained,
            checkpoint_path,
            device=device,
            dtype=dtype,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
            class_names=class_names,
            model_name=model_name,
            **timm_kwargs,
        )

    @classmethod
    def from_hf(
        cls,
        model_or_path_or_name: Union[str, Path, nn.Module],
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        class_names: Optional[Sequence[str]] = None,
        model_name: Optional[str] = None,
        ignore_pooler: bool = False,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
    ) -> "HookedViT":
        """Convert a Hugging Face ``transformers`` vision model exactly and strictly.

        Accepts a live module (``ViTForImageClassification``, ``DeiTForImageClassification[With
        Teacher]``, ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel[With
        Projection]``, ``SiglipVisionModel``, the image tower of ``CLIPModel``/``SiglipModel``), a
        local folder written by ``save_pretrained`` (read offline), or a hub name ``"hf:NAME"``
        (without a reachable hub: the local cache, else a ``HubUnreachableError``). Class names
        default to ``config.id2label`` when those are real labels. ``ignore_pooler`` converts a
        ``ViTModel``/``DeiTModel`` without its tanh pooler (the output is then the final-normed
        CLS token). The weight-processing flags are :meth:`from_timm`'s. See
        :mod:`vit_embedding_lens.model.convert_hf` for what is converted and how;
        :mod:`vit_embedding_lens.loading.hf_models` reads folders and hub names.
        """
        return loader("hf")(
            model_or_path_or_name,
            device=device,
            dtype=dtype,
            class_names=class_names,
            model_name=model_name,
            ignore_pooler=ignore_pooler,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )

    @classmethod
    def from_open_clip(
        cls,
        model_or_name: Union[str, nn.Module],
        pretrained: Optional[str] = None,
        *,
        checkpoint_path: Optional[Union[str, Path]] = None,
        class_names: Optional[Sequence[str]] = None,
        templates: Optional[Sequence[str]] = None,
        tokenizer: Optional[Callable[..., Any]] = None,
        class_embeddings: Any = None,
        zero_shot: Optional[bool] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        model_name: Optional[str] = None,
    ) -> "HookedViT":
        """Convert an OpenCLIP image tower exactly and strictly, optionally with a zero-shot head.

        ``model_or_name``: an OpenCLIP model (``open_clip.CLIP``, ``CustomTextCLIP``), its image
        tower (``model.visual``: ``VisionTransformer``, or SigLIP's ``TimmModel``), or a name:
        ``"ViT-B-16"`` / ``"open_clip:ViT-B-16"`` (random weights), with ``pretrained=TAG`` or
        ``"open_clip:ViT-B-16:TAG"`` (needs the hub) or ``checkpoint_path=FILE``, or
        ``"bundled:mnist-clip"`` (offline, trained). Without classes the output is the projected
        image features (``encode_image`` before normalization). ``class_names`` with
        ``templates`` (default ``DEFAULT_TEMPLATES``; a bundled model's own) and ``tokenizer`` give
        a zero-shot head from the text tower; ``class_embeddings`` (a ``[class, d_embed]`` tensor,
        a ``ClassSpace`` or its saved folder) gives it without one. ``zero_shot=False`` keeps the
        tower headless. See :mod:`vit_embedding_lens.loading.open_clip_models`.
        """
        return loader("open_clip")(
            model_or_name,
            pretrained,
            checkpoint_path=checkpoint_path,
            class_names=class_names,
            templates=templates,
            tokenizer=tokenizer,
            class_embeddings=class_embeddings,
            zero_shot=zero_shot,
            device=device,
            dtype=dtype,
            model_name=model_name,
        )

    @classmethod
    def from_pretrained(
        cls, model_or_name: Union[str, Path, nn.Module], *args: Any, **kwargs: Any
    ) -> "HookedViT":
        """One entry point: picks the converter from what it is given.

        A live timm ViT (-> :meth:`from_timm`), ``transformers`` model (-> ``from_hf``; a full
        ``CLIPModel``/``SiglipModel`` converts its image tower, with a zero-shot head when
        ``class_names`` or ``class_embeddings`` are given) or OpenCLIP model (->
        :meth:`from_open_clip`); or a name: a timm name (``pretrained=True``, ``checkpoint_path``),
        a timm folder, ``"hf:NAME"`` or a ``save_pretrained`` folder, ``"open_clip:ARCH[:TAG]"``,
        ``"bundled:NAME"`` (``mnist-vit``, ``fashion-vit``, ``mnist-clip``). Keywords:
        ``class_names``, ``templates``, ``tokenizer``, ``class_embeddings``, ``device``, ``dtype``,
        ``model_name``, and those of the converter picked. See
        :mod:`vit_embedding_lens.loading.pretrained`.
        """
        return loader("pretrained")(model_or_name, *args, **kwargs)

    @classmethod
    def from_bundled(cls, name: str = "mnist-vit", **kwargs: Any) -> "HookedViT":
        """A small trained model shipped with the package (offline): ``"mnist-vit"`` (the default, a
        6-block ViT on MNIST digits) or ``"fashion-vit"`` (the same architecture on Fashion-MNIST).

        Its held-out images come from :func:`vit_embedding_lens.zoo.load_bundled_eval`; its model
        card (data, split, accuracy, training command) from
        :func:`vit_embedding_lens.zoo.model_card`.
        ``kwargs`` are :meth:`from_timm`'s.
        """
        return loader("bundled")(name, **kwargs)

    def _init_weights(self) -> None:
        """Small random weights for a model built from a config alone (from_timm overwrites all)."""
        gen = torch.Generator().manual_seed(0)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith(".w"):  # norm weights
                    p.fill_(1.0)
                elif p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                else:
                    p.zero_()
        if self.cfg.n_classes and self.cfg.head_type == "cosine":
            with torch.no_grad():  # the zero-shot head reads unit class embeddings
                self.head.W_head.copy_(torch.nn.functional.normalize(self.head.W_head, dim=0))

    # ---------------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------------
    def forward(
        self,
        images: Float[Tensor, "batch chan height width"],
        *,
        stop_at_layer: Optional[int] = None,
        start_at_layer: Optional[int] = None,
        keep_mask: Optional[Bool[Tensor, "batch pos"]] = None,
    ) -> Tensor:
        """Logits ``[batch, class]`` for a batch of preprocessed images.

        ``stop_at_layer=l`` returns the residual stream entering block ``l`` instead (``[batch,
        pos, d_model]``), skipping the rest. ``start_at_layer=l`` takes that residual stream in
        place of the images and runs blocks ``l..`` only (as TransformerLens does; used by
        activation patching to skip blocks a patch cannot change). Models without a classifier head
        return the projected features ``[batch, d_embed]`` when they have a projection to a joint
        image-text space, else the pooled features ``[batch, d_model]``.

        ``keep_mask`` (bool ``[batch, pos]`` in layout order) removes the tokens where it is
        False right after the position embedding (and ``ln_pre``): the blocks see only the kept
        tokens, in their original order. Prefix tokens must be kept. Rows that keep different
        numbers of tokens are padded to the longest row and a padding mask keeps padded slots out of
        every attention; average pooling averages the kept image tokens only. From
        ``blocks.0.hook_resid_pre`` on, activations are over the kept slots:
        ``self.token_positions`` (set on every forward) and
        :func:`vit_embedding_lens.interventions.kept_positions` say which original token each slot
        is.
        """
        if start_at_layer is not None:
            return self._forward_from(images, start_at_layer, stop_at_layer, keep_mask)
        if self.validate_inputs:
            self.check_images(images)
        self.token_positions = None
        embed, grid = self.embed(images)
        embed = self.hook_embed(embed)
        if self.pos_embed is not None:
            pos = self.pos_embed(grid, embed.shape[0])
        else:
            pos = torch.zeros_like(embed)
        resid = embed + self.hook_pos_embed(pos)
        if self.cfg.pre_norm:
            resid = self.ln_pre(resid)
        attn_mask = positions = None
        if keep_mask is not None:
            resid, positions, attn_mask = self._remove_tokens(resid, keep_mask, grid)
            self.token_positions = positions
        blocks = self.blocks if stop_at_layer is None else self.blocks[:stop_at_layer]
        for block in blocks:
            resid = block(resid, attn_mask, positions)
        if stop_at_layer is not None:
            return resid
        return self.readout(resid, positions)

    def _forward_from(
        self,
        resid: Tensor,
        start_at_layer: int,
        stop_at_layer: Optional[int],
        keep_mask: Optional[Tensor],
    ) -> Tensor:
        """Blocks ``start_at_layer..`` (to ``stop_at_layer``) and the readout on a given residual
        stream."""
        if keep_mask is not None:
            raise ValueError(
                "keep_mask= removes tokens from images; it cannot be combined with start_at_layer="
            )
        if not isinstance(resid, Tensor) or resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model:
            raise ValueError(
                "with start_at_layer= the input is the residual stream [batch, pos, "
                f"{self.cfg.d_model}], got {tuple(getattr(resid, 'shape', ()))}"
            )
        if not 0 <= start_at_layer <= self.cfg.n_layers:
            raise ValueError(
                f"start_at_layer must be in 0..{self.cfg.n_layers}, got {start_at_layer}"
            )
        self.token_positions = None
        for block in self.blocks[start_at_layer:stop_at_layer]:
            resid = block(resid)
        return resid if stop_at_layer is not None else self.readout(resid)

    def _remove_tokens(
        self, resid: Float[Tensor, "batch pos d_model"], keep_mask: Tensor, grid: Sequence[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Drop the tokens ``keep_mask`` removes: ``(resid, positions, padding mask)``."""
        layout = (
            self.layout
            if tuple(grid) == tuple(self.layout.grid_size)
            else self.layout.with_grid(grid)
        )
        check_keep_mask(keep_mask, layout, resid.shape[0], resid.device)
        if self.cfg.global_pool != "token" and not self.cfg.pool_include_prefix:  # avg, max, map
            if not bool(keep_mask[:, layout.n_prefix :].any(dim=1).all()):
                raise ValueError(
                    f"{self.cfg.model_name} pools its image tokens ({self.cfg.global_pool!r}) and "
                    "a row of keep_mask keeps none of them; keep at least one image token per "
                    "image"
                )
        positions, valid = kept_positions(keep_mask)
        resid = gather_tokens(resid, positions, dim=1) * valid[..., None].to(resid.dtype)
        return resid, positions, padding_mask(positions)

    def readout(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        positions: Optional[Tensor] = None,
        *,
        valid: Optional[Bool[Tensor, "batch pos"]] = None,
        fire_hooks: bool = True,
    ) -> Tensor:
        """Final norm, pooling, ``fc_norm``, the projection and the head: residual stream ->
        logits.

        ``positions`` (after token removal: layout position per slot, -1 = padding), or ``valid``
        (False at padded slots), restricts average/max/attention pooling to the kept tokens.
        ``fire_hooks=False`` computes the same without firing any hook point (``ln_final``'s, the
        attention pool's, ``hook_pooled``, ``hook_image_embed``, ``hook_logits``): for analyses
        that read other residual streams as the model would, inside hooks
        (:func:`vit_embedding_lens.model.readout.readout_logits`). A headless model returns its
        features (projected when it has a projection).
        """
        cfg = self.cfg
        if valid is None and positions is not None:
            valid = positions >= 0
        norm = self.ln_final if fire_hooks else self.ln_final.normalize

        def point(hook: HookPoint, x: Tensor) -> Tensor:
            return hook(x) if fire_hooks else x

        if cfg.final_norm == "tokens":
            resid = norm(resid)
        pooled = self.pool(resid, valid, fire_hooks=fire_hooks)
        if cfg.final_norm == "pooled":
            pooled = norm(pooled)
        pooled = point(self.hook_pooled, pooled)
        features = pooled
        if cfg.d_embed:
            features = point(self.hook_image_embed, self.proj(pooled))
        if not cfg.n_classes:
            return features
        if cfg.head_type == "cosine":
            return point(self.hook_logits, cast(CosineHead, self.head)(features))
        pooled_dist = None
        if cfg.has_dist_token:
            pooled_dist = point(self.hook_pooled_dist, resid[:, self.layout.dist_index].clone())
        return point(self.hook_logits, cast(ClassifierHead, self.head)(features, pooled_dist))

    def pool(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        valid: Optional[Bool[Tensor, "batch pos"]] = None,
        *,
        fire_hooks: bool = True,
    ) -> Float[Tensor, "batch d_model"]:
        """timm's global pooling: the CLS token, avg/max/avgmax over the image tokens, or the
        attention pool (``"map"``, :class:`~vit_embedding_lens.model.components.AttentionPool`).

        ``valid`` (False at padded slots after token removal) leaves padding out of the pool.
        ``fire_hooks=False``: the attention pool's hook points stay silent.
        """
        pool = self.cfg.global_pool
        if pool == "token":
            # a copy, not a view: a cached or kept pooled vector must not hold [batch, pos, d] alive
            return resid[:, self.layout.cls_index].clone()
        n_prefix = 0 if self.cfg.pool_include_prefix else self.layout.n_prefix
        tokens = resid[:, n_prefix:]  # any grid size (dynamic_img_size models)
        if pool == "map":
            kept = None if valid is None else valid[:, n_prefix:]
            return self.attn_pool(tokens, kept, fire_hooks=fire_hooks)
        if valid is None:
            mean = tokens.mean(dim=1) if pool != "max" else None
            amax = tokens.amax(dim=1) if pool != "avg" else None
        else:
            real = valid[:, n_prefix:, None]
            mean = (tokens * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
            amax = tokens.masked_fill(~real, float("-inf")).amax(dim=1)
        if pool == "avg":
            assert mean is not None
            return mean
        if pool == "max":
            assert amax is not None
            return amax
        assert mean is not None and amax is not None
        return 0.5 * (amax + mean)  # avgmax

    def layout_for(self, image_size: Sequence[int]) -> TokenLayout:
        """The token layout for another input size (models created with ``dynamic_img_size``)."""
        h, w = int(image_size[-2]), int(image_size[-1])
        ph, pw = self.cfg.patch_size
        if self.cfg.dynamic_img_pad:
            grid = (-(-h // ph), -(-w // pw))
        else:
            grid = (h // ph, w // pw)
        return self.layout.with_grid(grid)

    def check_images(self, images: Any) -> None:
        """Raise a clear error for inputs the model cannot take; say what to do instead."""
        cfg = self.cfg
        if not isinstance(images, Tensor):
            raise TypeError(
                f"images must be a torch.Tensor [batch, {cfg.in_chans}, H, W], got "
                f"{type(images).__name__}"
            )
        if images.ndim != 4:
            hint = " (a single image? use images.unsqueeze(0))" if images.ndim == 3 else ""
            raise ValueError(
                f"images must have 4 dimensions [batch, channels, height, width], got shape "
                f"{tuple(images.shape)}{hint}"
            )
        if not images.is_floating_point():
            raise TypeError(
                "images must be a float tensor (preprocessed, normalized), got dtype "
                f"{images.dtype}; convert with images.float() and apply the model's normalization"
            )
        w = self.embed.W_E
        if images.dtype != w.dtype:
            raise TypeError(
                f"images are {images.dtype} but the model's weights are {w.dtype}; use "
                f"images.to({w.dtype})"
            )
        if images.device != w.device:
            raise ValueError(
                f"images are on {images.device} but the model is on {w.device}; use "
                f"images.to('{w.device}')"
            )
        if images.shape[1] != cfg.in_chans:
            raise ValueError(
                f"images have {images.shape[1]} channels, {cfg.model_name} expects {cfg.in_chans} "
                f"(shape {tuple(images.shape)})"
            )
        size = tuple(images.shape[-2:])
        if not cfg.dynamic_img_size and size != tuple(cfg.image_size):
            raise ValueError(
                f"image size {size[0]}x{size[1]} does not match {cfg.model_name}'s input size "
                f"{cfg.image_size[0]}x{cfg.image_size[1]}; resize the images (or create the timm "
                f"model with dynamic_img_size=True)"
            )
        if cfg.dynamic_img_size and not cfg.dynamic_img_pad:
            ph, pw = cfg.patch_size
            if size[0] % ph or size[1] % pw:
                raise ValueError(
                    f"image size {size[0]}x{size[1]} is not a multiple of the patch size {ph}x{pw}"
                )
        if not torch.isfinite(images).all():
            raise ValueError("images contain NaN or infinite values")

    # ---------------------------------------------------------------------------------------------
    # Hooks and caching
    # ---------------------------------------------------------------------------------------------
    def run_with_cache(
        self,
        *model_args: Any,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run the model and return ``(output, ViTActivationCache)``, as TransformerLens does.

        ``names_filter`` (a name, a list of names or a predicate), ``device`` and
        ``remove_batch_dim`` behave as in TransformerLens; unknown names raise an error.

        The first call keeps freed host memory in the process for reuse
        (:func:`~vit_embedding_lens.model.host_memory.retain_freed_memory`), so that later caches
        do not page-fault their way in; ``VIT_LENS_RETAIN_FREED_MEMORY=0`` opts out.
        """
        retain_freed_memory_by_default()
        names_filter = kwargs.get("names_filter")
        if isinstance(names_filter, str):
            self.check_hook_name(names_filter)
        elif isinstance(names_filter, (list, tuple)):
            for name in names_filter:
                self.check_hook_name(name)
            kwargs["names_filter"] = list(names_filter)
        out, cache_dict = super().run_with_cache(
            *model_args, remove_batch_dim=remove_batch_dim, **kwargs
        )
        if return_cache_object:
            return out, ViTActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)
        return out, cache_dict

    def get_caching_hooks(
        self,
        names_filter: Any = None,
        incl_bwd: bool = False,
        device: Any = None,
        remove_batch_dim: bool = False,
        cache: Optional[dict] = None,
        pos_slice: Any = None,
    ) -> Tuple[Any, list, list]:
        """TransformerLens's caching hooks, filling an :class:`ActivationStore` (unless ``cache``
        is given): an entry that is an exact function of another cached entry (``mlp.hook_post =
        act(mlp.hook_pre)``) is kept as that function until it is read."""
        store = ActivationStore() if cache is None else cache
        cache_out, fwd, bwd = super().get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim, cast(dict, store), pos_slice
        )
        if isinstance(store, ActivationStore):
            fwd = [
                (name, _derive_or_save(store, save) if self._derives(name) else save)
                for name, save in fwd
            ]
        return cache_out, fwd, bwd

    def _derives(self, name: str) -> bool:
        """True for hook points whose module notes how their tensor was computed."""
        return isinstance(self.hook_dict[name], DerivedHookPoint)

    def check_hook_name(self, name: str) -> None:
        """Raise a ValueError naming the closest valid hook names when ``name`` is not one."""
        if name in self.hook_dict:
            return
        close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"{name!r} is not a hook point of this {self.cfg.model_name} HookedViT{hint}"
        )

    def add_hook(
        self, name: Union[str, Callable[[str], bool]], hook: Callable, *args: Any, **kwargs: Any
    ) -> None:
        if isinstance(name, str):
            self.check_hook_name(name)
        super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Any) -> None:
        self.check_hook_name(name)
        super()._enable_hook_with_name(name, hook, dir)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head write-ins (``attn.hook_result``) on every forward, as
        TransformerLens."""
        self.replace_cfg(use_attn_result=use_attn_result)

    def set_attention_implementation(self, mode: str) -> None:
        """``"auto"`` (fused unless scores/pattern are hooked) or ``"explicit"`` (always)."""
        if mode not in ("auto", "explicit"):
            raise ValueError(f"attention implementation must be 'auto' or 'explicit', got {mode!r}")
        for block in self.blocks:
            cast(TransformerBlock, block).attn.force_explicit = mode == "explicit"

    def replace_cfg(self, **changes: Any) -> None:
        """Swap in ``dataclasses.replace(cfg, **changes)`` here and in every submodule.

        For changes that keep the weights valid (weight processing, ``use_attn_result``); the
        architecture fields must not change.
        """
        self.cfg = dataclasses.replace(self.cfg, **changes)
        for module in self.modules():
            if module is not self and hasattr(module, "cfg"):
                setattr(module, "cfg", self.cfg)  # nn.Module.__setattr__, as `module.cfg = ...`

    # ---------------------------------------------------------------------------------------------
    # TransformerLens conveniences (used by ActivationCache.logit_attrs and friends)
    # ---------------------------------------------------------------------------------------------
    @property
    def W_U(self) -> Float[Tensor, "d_model class"]:
        """The linear map from the pooled vector to the logits: ``W_head`` (through ``W_proj``
        when the model projects to a joint space). For a cosine head it is scaled by
        ``logit_scale`` and misses the per-image factor ``1 / |features|``; the attention pool
        has no linear map (a ValueError)."""
        head = self.classifier_head()
        if self.cfg.global_pool == "map":
            raise ValueError(
                f"{self.cfg.model_name} pools with an attention pool (MAP), which has no linear "
                "map from the residual stream to the logits; read vectors with "
                "vit_embedding_lens.lens.ClassProjection"
            )
        weight: Tensor = head.W_head
        if self.cfg.d_embed:
            weight = self.proj.W_proj @ weight
        if isinstance(head, CosineHead):
            weight = weight * head.logit_scale
        return weight

    @property
    def b_U(self) -> Float[Tensor, " class"]:
        """The logits' constant term (``b_head``, plus ``b_proj`` through the head; the cosine
        head's ``logit_bias``)."""
        head = self.classifier_head()
        if isinstance(head, CosineHead):
            return head.logit_bias.expand(self.cfg.n_classes)
        bias: Tensor = head.b_head
        if self.cfg.d_embed and self.cfg.proj_bias:
            bias = bias + self.proj.b_proj @ head.W_head
        return bias

    def classifier_head(self) -> Union[ClassifierHead, CosineHead]:
        """The classifier head; a clear error for a headless model (``num_classes=0``)."""
        if not self.cfg.n_classes:
            raise ValueError(
                f"{self.cfg.model_name} has no classifier head (num_classes=0); create the timm "
                f"model with num_classes>0, load a checkpoint with a head, or give it a class "
                f"space (with_class_space / with_class_embeddings)"
            )
        return self.head

    def with_class_space(self, space: ClassSpace) -> "HookedViT":
        """A copy of this model whose head is the zero-shot (cosine) head of ``space``.

        ``logits = logit_scale * normalize(features) @ E.T + logit_bias`` with ``E`` the space's
        L2-normalized class embeddings ``[class, d_features]`` (``d_embed`` after a projection,
        else ``d_model``) and its class names. Everything else (weights, processing, device,
        dtype) is kept; the original model is untouched.
        """
        if not isinstance(space, ClassSpace):
            raise TypeError(f"with_class_space takes a ClassSpace, got {type(space).__name__}")
        cfg = self.cfg
        if cfg.has_dist_token:
            raise ValueError(
                f"{cfg.model_name} is distilled (two heads on two tokens); a zero-shot head "
                "replaces one head on one pooled vector: use a model without a distillation token"
            )
        space.check_width(cfg.d_features, cfg.model_name)
        new_cfg = dataclasses.replace(cfg, head_type="cosine", n_classes=space.n_classes)
        param = self.embed.W_E
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}
        E = space.embeddings.to(device=param.device, dtype=param.dtype)
        state["head.W_head"] = E.T.contiguous()
        state["head.logit_scale"] = torch.tensor(space.logit_scale, dtype=param.dtype)
        state["head.logit_bias"] = torch.tensor(space.logit_bias, dtype=param.dtype)
        model = type(self)(new_cfg, class_names=space.names, init_weights=False)
        model = model.to(device=param.device, dtype=param.dtype)
        model.load_state_dict(state, strict=True)
        model.validate_inputs = self.validate_inputs
        for mine, theirs in zip(self.blocks, model.blocks):
            cast(TransformerBlock, theirs).attn.force_explicit = cast(
                TransformerBlock, mine
            ).attn.force_explicit
        model.train(self.training)
        return model

    def with_class_embeddings(
        self,
        embeddings: Float[Tensor, "class d_features"],
        names: Sequence[str],
        *,
        logit_scale: float = 1.0,
        logit_bias: float = 0.0,
    ) -> "HookedViT":
        """:meth:`with_class_space` of ``ClassSpace(embeddings, names, logit_scale, logit_bias)``
        (rows are L2-normalized)."""
        return self.with_class_space(
            ClassSpace(embeddings, names, logit_scale=logit_scale, logit_bias=logit_bias)
        )

    def to_single_token(self, class_id: Union[int, str]) -> int:
        """A class index from an index or a class name (``model.class_names``)."""
        if isinstance(class_id, str):
            return self.class_index(class_id)
        if not 0 <= int(class_id) < self.cfg.n_classes:
            raise ValueError(
                f"class index {class_id} is out of range for {self.cfg.n_classes} classes"
            )
        return int(class_id)

    def class_index(self, name: str) -> int:
        """Index of a class by its name, or by one of its comma-separated synonyms."""
        if self.class_names is None:
            raise ValueError("this model has no class names; pass class_names= to from_timm")
        wanted = name.strip().lower()
        hits = [i for i, n in enumerate(self.class_names) if n.lower() == wanted]
        if not hits:
            hits = [
                i
                for i, n in enumerate(self.class_names)
                if wanted in (s.strip().lower() for s in n.split(","))
            ]
        if len(hits) != 1:
            close = difflib.get_close_matches(name, self.class_names, n=5)
            what = "ambiguous" if hits else "unknown"
            raise ValueError(f"{what} class name {name!r}; close names: {close}")
        return hits[0]

    def tokens_to_residual_directions(self, class_ids: ClassIds) -> Tensor:
        """Directions in the (final-normed) residual stream whose dot product is a class logit.

        ``W_U[:, c]`` per class id; the shape follows ``class_ids`` with ``d_model`` appended.
        For distilled DeiT the CLS readout contributes half of each logit (timm averages the two
        heads), so its direction is ``W_U[:, c] / 2``.
        """
        if isinstance(class_ids, str) or isinstance(class_ids, int):
            ids = torch.as_tensor(self.to_single_token(class_ids))
        else:
            ids = torch.as_tensor(class_ids)
        W_U = self.W_U
        directions = W_U[:, ids.to(W_U.device)]
        directions = torch.movedim(directions, 0, -1)
        return directions / 2 if self.cfg.has_dist_token else directions

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """Sum of the attention and MLP output biases written into the residual before ``layer``."""
        bias = torch.zeros(
            self.cfg.d_model, device=self.embed.W_E.device, dtype=self.embed.W_E.dtype
        )
        blocks = cast(Sequence[TransformerBlock], self.blocks)
        for i in range(layer):
            bias = bias + blocks[i].attn.b_O
            if include_mlp_biases:
                bias = bias + blocks[i].mlp.b_out
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError(
                    f"layer {layer} has no MLP input: the model has {self.cfg.n_layers} layers"
                )
            bias = bias + blocks[layer].attn.b_O
        return bias

    def _stack(self, attr: str, sub: str) -> Tensor:
        return torch.stack([getattr(getattr(block, sub), attr) for block in self.blocks], dim=0)

    W_Q = property(lambda self: self._stack("W_Q", "attn"), doc="[block, head, d_model, d_head]")
    W_K = property(lambda self: self._stack("W_K", "attn"), doc="[block, head, d_model, d_head]")
    W_V = property(lambda self: self._stack("W_V", "attn"), doc="[block, head, d_model, d_head]")
    W_O = property(lambda self: self._stack("W_O", "attn"), doc="[block, head, d_head, d_model]")
    b_Q = property(lambda self: self._stack("b_Q", "attn"), doc="[block, head, d_head]")
    b_K = property(lambda self: self._stack("b_K", "attn"), doc="[block, head, d_head]")
    b_V = property(lambda self: self._stack("b_V", "attn"), doc="[block, head, d_head]")
    b_O = property(lambda self: self._stack("b_O", "attn"), doc="[block, d_model]")
    W_in = property(lambda self: self._stack("W_in", "mlp"), doc="[block, d_model, d_mlp]")
    W_out = property(lambda self: self._stack("W_out", "mlp"), doc="[block, d_mlp, d_model]")
    b_in = property(lambda self: self._stack("b_in", "mlp"), doc="[block, d_mlp]")
    b_out = property(lambda self: self._stack("b_out", "mlp"), doc="[block, d_model]")

    @property
    def QK(self) -> FactoredMatrix:
        """Per-head ``W_Q W_K^T`` [block, head, d_model, d_model], factored."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """Per-head ``W_V W_O`` [block, head, d_model, d_model], factored."""
        return FactoredMatrix(self.W_V, self.W_O)

    def __repr__(self) -> str:  # keep notebooks readable: the module tree is long
        c = self.cfg
        return (
            f"HookedViT({c.model_name}: {c.n_layers} layers, d_model={c.d_model}, {c.n_heads} "
            f"heads, {c.n_ctx} tokens = {self.layout.n_prefix} prefix + "
            f"{c.grid_size[0]}x{c.grid_size[1]} patches, {c.n_classes} classes)"
        )


def _derive_or_save(store: ActivationStore, save: Callable) -> Callable:
    """A caching hook that keeps its tensor as a recipe when the store can, else saves it."""

    def hook_fn(tensor: Tensor, hook: HookPoint) -> None:
        derivation = hook.derivation if isinstance(hook, DerivedHookPoint) else None
        if not store.derive(cast(str, hook.name), tensor, derivation):
            save(tensor, hook=hook)

    return hook_fn


def convert_timm_vit(
    model: nn.Module,
    name: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> HookedViT:
    """Build the HookedViT equivalent of a timm ViT; the timm module is left untouched.

    :func:`~vit_embedding_lens.model.convert.convert_timm` then :meth:`HookedViT.from_conversion`.
    ``device``/``dtype`` default to the timm weights'; converting to a wider dtype than timm's
    folds in that dtype, so a float64 HookedViT of a float32 timm model is exact in float64.
    """
    conversion = convert_timm(model, name, class_names, dtype)
    return HookedViT.from_conversion(conversion, device=device)
