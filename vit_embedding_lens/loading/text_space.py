"""Class spaces defined by text (METHODS section 8): class names and prompt templates, encoded by a
CLIP-like model's text tower, give the class embedding matrix of a zero-shot head.

For each class every template is filled with the class name and encoded; each text embedding is
L2-normalized, the template embeddings are averaged, and the mean is L2-normalized again. The
result is a :class:`~vit_embedding_lens.model.class_space.ClassSpace` with the model's own logit
scale (``logit_scale.exp()``) and, for SigLIP, its logit bias: the zero-shot head of the image
tower (``HookedViT.with_class_space``). Computed once, it is saved with ``ClassSpace.save`` so the
text tower is not needed again.

Text towers read here: OpenCLIP models (``open_clip.CLIP``, ``CustomTextCLIP``: ``encode_text``)
and Hugging Face ``CLIPModel`` / ``SiglipModel`` (``get_text_features``). The tokenizer is passed
in: an OpenCLIP tokenizer (``open_clip.get_tokenizer(ARCH)``), a Hugging Face tokenizer object, or
any callable from a list of texts to token ids (a tensor) or to a mapping with ``input_ids`` (and
``attention_mask``). For an OpenCLIP model with CLIP's BPE vocabulary the default is open_clip's
own tokenizer at the model's context length.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from vit_embedding_lens.model.class_space import ClassSpace

__all__ = [
    "DEFAULT_TEMPLATES",
    "class_space_from_embeddings",
    "class_space_of",
    "encode_texts",
    "fill_templates",
    "text_class_space",
    "text_tower_kind",
]

#: a short version of the OpenAI ImageNet prompt templates (the seven of CLIP's prompt-engineering
#: notebook, plus the plain "a photo of a {}.")
DEFAULT_TEMPLATES: List[str] = [
    "a photo of a {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

#: a tokenizer: texts -> ids ``[text, ctx]``, or -> a mapping with ``input_ids`` (+ masks)
Tokenizer = Callable[..., Union[Tensor, Mapping[str, Any]]]
#: CLIP's BPE vocabulary size (open_clip's SimpleTokenizer)
_CLIP_BPE_VOCAB = 49408


def text_tower_kind(model: nn.Module) -> str:
    """``"open_clip"``, ``"hf_clip"`` or ``"hf_siglip"``; a TypeError for anything else."""
    kind = type(model).__name__
    if kind in ("CLIPModel", "SiglipModel", "Siglip2Model"):
        return "hf_siglip" if kind.startswith("Siglip") else "hf_clip"
    if callable(getattr(model, "encode_text", None)) and hasattr(model, "logit_scale"):
        return "open_clip"
    raise TypeError(
        f"{kind} has no text tower this library reads: pass an OpenCLIP model (open_clip.CLIP, "
        f"CustomTextCLIP) or a Hugging Face CLIPModel / SiglipModel, or give the class embeddings "
        f"directly (class_embeddings=, a [class, d_embed] tensor or a saved ClassSpace)"
    )


def fill_templates(class_names: Sequence[str], templates: Sequence[str]) -> List[str]:
    """Every template filled with every class name, class-major: ``[c0t0, c0t1, ..., c1t0, ...]``.

    A template holds one ``{}`` for the name; a template without it, or an empty list, is a
    ValueError.
    """
    if isinstance(class_names, str) or isinstance(templates, str):
        raise TypeError("class_names and templates are sequences of strings, not one string")
    if len(class_names) == 0:
        raise ValueError("no class names given")
    if len(templates) == 0:
        raise ValueError("no prompt templates given (use DEFAULT_TEMPLATES or e.g. ['{}'])")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name: {bad}")
    return [t.format(name) for name in class_names for t in templates]


def _default_tokenizer(model: nn.Module, kind: str) -> Tokenizer:
    if kind == "open_clip" and getattr(model, "vocab_size", None) == _CLIP_BPE_VOCAB:
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))
    raise ValueError(
        f"pass tokenizer= for this {type(model).__name__}: its vocabulary is not CLIP's BPE "
        f"(OpenCLIP: open_clip.get_tokenizer(ARCH); Hugging Face: the model's tokenizer, or save "
        f"it into the model's folder with tokenizer.save_pretrained(FOLDER); or any callable from "
        f"texts to token ids)"
    )


def _tokenize(tokenizer: Tokenizer, texts: List[str], kind: str, model: Any) -> Dict:
    """Token ids (and attention mask) for ``texts`` as keyword arguments of the text tower."""
    if kind == "open_clip":
        out = tokenizer(texts)
    else:
        try:  # a Hugging Face tokenizer object: padding as the model was trained
            if kind == "hf_siglip":
                length = int(model.config.text_config.max_position_embeddings)
                out = tokenizer(texts, padding="max_length", max_length=length, return_tensors="pt")
            else:
                out = tokenizer(texts, padding=True, return_tensors="pt")
        except TypeError:  # a plain callable from texts to ids
            out = tokenizer(texts)
    if isinstance(out, Tensor):
        return {"input_ids": out}
    if isinstance(out, Mapping) and "input_ids" in out:
        # SigLIP's text tower was trained on max-length padding without a mask; CLIP's masks
        keep = ("input_ids", "attention_mask") if kind == "hf_clip" else ("input_ids",)
        return {k: torch.as_tensor(out[k]) for k in keep if k in out and out[k] is not None}
    raise TypeError(
        f"the tokenizer returned {type(out).__name__}; it must return token ids (a tensor) or a "
        f"mapping with 'input_ids'"
    )


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    texts: Sequence[str],
    tokenizer: Optional[Tokenizer] = None,
    *,
    batch_size: int = 256,
) -> Float[Tensor, "text d_embed"]:
    """The text tower's joint-space embeddings of ``texts`` (not normalized), in batches."""
    kind = text_tower_kind(model)
    tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(model, kind)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i in range(0, len(texts), batch_size):
            inputs = _tokenize(tokenizer, list(texts[i : i + batch_size]), kind, model)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            tower: Any = model  # encode_text / get_text_features, by kind
            if kind == "open_clip":
                out: Any = tower.encode_text(inputs["input_ids"])
            else:
                out = tower.get_text_features(**inputs)
                out = out if isinstance(out, Tensor) else out.pooler_output
            rows.append(out)
    finally:
        model.train(was_training)
    return torch.cat(rows)


def _scale_and_bias(model: nn.Module, kind: str) -> tuple[float, float]:
    """The model's own logit scale (exponentiated) and bias (SigLIP's; 0 without one)."""
    scale = float(cast(Tensor, model.logit_scale).detach().exp())
    bias = getattr(model, "logit_bias", None)
    return scale, float(bias.detach().reshape(())) if isinstance(bias, Tensor) else 0.0


def text_class_space(
    model: nn.Module,
    class_names: Sequence[str],
    templates: Optional[Sequence[str]] = None,
    *,
    tokenizer: Optional[Tokenizer] = None,
    batch_size: int = 256,
    metadata: Optional[Dict[str, Any]] = None,
) -> ClassSpace:
    """The text-defined class space of a CLIP-like model (METHODS section 8).

    ``templates`` default to :data:`DEFAULT_TEMPLATES`; each holds one ``{}``. The embeddings are
    the normalized, template-averaged, re-normalized text embeddings ``[class, d_embed]``; the
    scale is ``logit_scale.exp()`` and the bias SigLIP's ``logit_bias`` (0 for CLIP). With one
    template the head's logits are exactly the model's own image-text logits for those prompts.
    """
    templates = list(DEFAULT_TEMPLATES if templates is None else templates)
    texts = fill_templates(class_names, templates)
    kind = text_tower_kind(model)
    emb = encode_texts(model, texts, tokenizer, batch_size=batch_size)
    emb = F.normalize(emb, dim=-1).reshape(len(class_names), len(templates), -1)
    embeddings = F.normalize(emb.mean(1), dim=-1)
    scale, bias = _scale_and_bias(model, kind)
    info = {"source": f"text tower of {type(model).__name__}", "templates": templates}
    return ClassSpace(
        embeddings,
        list(class_names),
        logit_scale=scale,
        logit_bias=bias,
        metadata={**info, **(metadata or {})},
    )


def class_space_from_embeddings(
    model: Optional[nn.Module],
    class_embeddings: Union[Tensor, ClassSpace, str, Any],
    class_names: Optional[Sequence[str]] = None,
    *,
    logit_scale: Optional[float] = None,
    logit_bias: Optional[float] = None,
) -> ClassSpace:
    """A class space from precomputed embeddings: a ``[class, d_embed]`` tensor, a
    :class:`ClassSpace`, or the folder of a saved one (``ClassSpace.save``).

    A bare tensor takes its names from ``class_names`` (default ``"0"``, ``"1"``, ...) and its
    scale and bias from ``model`` (a CLIP-like module) unless given; a saved space keeps its own,
    and ``class_names`` must then match or be omitted.
    """
    from pathlib import Path

    if isinstance(class_embeddings, (str, Path)):
        class_embeddings = ClassSpace.load(class_embeddings)
    if isinstance(class_embeddings, ClassSpace):
        space = class_embeddings
        if class_names is not None and list(class_names) != space.names:
            raise ValueError(
                f"class_names {list(class_names)[:5]}... differ from the saved class space's "
                f"{space.names[:5]}...; omit class_names to use the saved ones"
            )
        return space
    if not isinstance(class_embeddings, Tensor):
        raise TypeError(
            f"class_embeddings must be a [class, d_embed] tensor, a ClassSpace or a folder saved "
            f"by ClassSpace.save, got {type(class_embeddings).__name__}"
        )
    n = class_embeddings.shape[0] if class_embeddings.ndim == 2 else 0
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    scale, bias = 1.0, 0.0
    if model is not None and hasattr(model, "logit_scale"):
        scale, bias = _scale_and_bias(model, "model")
    return ClassSpace(
        class_embeddings.float(),
        names,
        logit_scale=scale if logit_scale is None else logit_scale,
        logit_bias=bias if logit_bias is None else logit_bias,
        metadata={"source": "precomputed class embeddings"},
    )


def class_space_of(model: Any) -> ClassSpace:
    """The class space of a HookedViT's zero-shot (cosine) head, to save with ``ClassSpace.save``
    and reuse without the text tower (``class_embeddings=``)."""
    if getattr(model.cfg, "head_type", None) != "cosine" or not model.cfg.n_classes:
        raise ValueError(
            f"{model.cfg.model_name} has no zero-shot head: give it class names (and templates) "
            f"or class embeddings first"
        )
    head = model.head
    return ClassSpace(
        head.W_head.detach().T.float().cpu(),
        list(model.class_names),
        logit_scale=float(head.logit_scale),
        logit_bias=float(head.logit_bias),
        metadata={"source": f"zero-shot head of {model.cfg.model_name}"},
    )
