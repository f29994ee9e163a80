"""Interactive circuitsvis views with a static fallback that needs no JavaScript.

A view is an object Jupyter displays: ``_repr_html_`` gives the circuitsvis HTML (self-contained by
default: the JavaScript is inlined, so it works offline) followed by a ``<noscript>`` block holding
a PNG (base64) of the matching static matplotlib figure; ``_repr_png_`` and ``.figure()`` serve
front ends without HTML (terminals, PDF export). ``.data`` is the tidy table behind both, and
``.save()`` writes a standalone ``.html`` page or a ``.png``.
"""

from __future__ import annotations

import base64
import html as html_lib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional, Sequence, Union, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from vit_embedding_lens.lens.projection import ClassProjection
from vit_embedding_lens.lens.readings import sublayer_cache, token_logits, token_types
from vit_embedding_lens.model.hook_names import LOGITS, act_name
from vit_embedding_lens.model.readout import readout_logits
from vit_embedding_lens.model.targets import class_names_or_ids
from vit_embedding_lens.viz._figures import figure_to_png, to_numpy
from vit_embedding_lens.viz.attention import (
    attention_table,
    heads_first,
    layout_of,
    plot_attention,
)
from vit_embedding_lens.viz.token_grid import plot_token_grid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vit_embedding_lens.model.hooked_vit import HookedViT

Source = Literal["local", "cdn"]


class InteractiveView:
    """circuitsvis HTML plus a static figure; displays itself in Jupyter and degrades without JS."""

    def __init__(
        self,
        rendered: Any,
        figure_factory: Callable[[], Any],
        title: str,
        data: Optional[pd.DataFrame] = None,
        source: Source = "local",
    ) -> None:
        if source not in ("local", "cdn"):
            raise ValueError(
                f"source must be 'local' (JavaScript inlined, offline) or 'cdn', got {source!r}"
            )
        self._rendered, self._figure_factory = rendered, figure_factory
        self._figure: Optional[Figure] = None
        self._png: Optional[bytes] = None
        self.title, self.data, self.source = title, data, source

    def html(self) -> str:
        """The circuitsvis HTML alone (needs JavaScript)."""
        return self._rendered.local_src if self.source == "local" else self._rendered.cdn_src

    def figure(self):
        """The static matplotlib Figure (built once)."""
        if self._figure is None:
            self._figure = self._figure_factory()
        return self._figure

    def png(self) -> bytes:
        """PNG bytes of the static figure."""
        if self._png is None:
            self._png = figure_to_png(self.figure())
        return self._png

    def offline_html(self) -> str:
        """The interactive HTML with its JavaScript inlined whatever ``source`` says, so that it
        works without network (e.g. embedded in a run's report)."""
        return self._rendered.local_src

    def savefig(self, *args: Any, **kwargs: Any) -> None:
        """Save the static figure (matplotlib's ``Figure.savefig``): a view goes wherever a figure
        does, e.g. into a run's report, which also embeds :meth:`offline_html`."""
        self.figure().savefig(*args, **kwargs)

    def _repr_html_(self) -> str:
        encoded = base64.b64encode(self.png()).decode("ascii")
        alt = html_lib.escape(self.title, quote=True)
        return (
            f'<div class="vit-lens-view" title="{alt}">\n{self.html()}\n'
            f'<noscript><img alt="{alt}" src="data:image/png;base64,{encoded}"/></noscript>\n</div>'
        )

    def _repr_png_(self) -> bytes:
        return self.png()

    def save(self, path: Union[str, Path]) -> Path:
        """Write ``.html`` (standalone page) or ``.png`` (static figure); returns the path."""
        path = Path(path)
        if path.suffix.lower() == ".png":
            path.write_bytes(self.png())
        elif path.suffix.lower() in (".html", ".htm"):
            title = html_lib.escape(self.title)
            path.write_text(
                '<!DOCTYPE html>\n<html lang="en">\n<head><meta '
                f'charset="utf-8"><title>{title}</title></head>\n'
                f"<body>\n{self._repr_html_()}\n</body>\n</html>\n",
                encoding="utf-8",
            )
        else:
            raise ValueError(f"save to a .html or .png file, got {path.name!r}")
        return path

    def __repr__(self) -> str:
        return (
            f"<InteractiveView: {self.title} (display in Jupyter, or .figure() / "
            ".save('view.html'))>"
        )


def _is_cache(x: Any) -> bool:
    """An activation cache (TransformerLens ``ActivationCache`` or a plain dict of activations)."""
    return isinstance(x, Mapping) or (
        not isinstance(x, (Tensor, np.ndarray)) and hasattr(x, "keys")
    )


# -------------------------------------------------------------------------------------------------
# Attention
# -------------------------------------------------------------------------------------------------
def attention_view(
    model_or_layout: Any,
    pattern: Union[Mapping[str, Tensor], Tensor, np.ndarray],
    *,
    block: Optional[int] = None,
    image_index: int = 0,
    heads: Optional[Sequence[int]] = None,
    source: Source = "local",
) -> InteractiveView:
    """Attention heads of one block over the token sequence, labelled "CLS", "REG0", "P{r},{c}".

    ``pattern``: a cache (then ``block`` is required and ``blocks.{block}.attn.hook_pattern`` is
    read), a cached pattern ``[batch, head, pos, pos]`` (``image_index`` picks the image), ``[head,
    pos, pos]`` or ``[pos, pos]``. Static fallback: :func:`~vit_embedding_lens.viz.plot_attention`.
    """
    import circuitsvis

    layout = layout_of(model_or_layout)
    if _is_cache(pattern):
        if block is None:
            raise ValueError(
                "block= is required when a cache is given (which block's attention to show)"
            )
        name = act_name("pattern", block)
        if name not in pattern:
            raise ValueError(
                f"the cache has no {name!r}; run the model with names_filter including it"
            )
        pattern = cast(Mapping[str, Tensor], pattern)[name]  # a cache, by hook name
    arr = to_numpy(pattern, "pattern")
    if arr.ndim == 4:
        if not 0 <= image_index < arr.shape[0]:
            raise IndexError(
                f"image_index {image_index} out of range for a batch of {arr.shape[0]}"
            )
        arr = arr[image_index]
    arr = heads_first(arr, layout)
    head_ids = list(range(arr.shape[0])) if heads is None else list(heads)
    if any(not 0 <= h < arr.shape[0] for h in head_ids):
        raise ValueError(f"heads {head_ids} out of range for {arr.shape[0]} heads")
    arr = arr[head_ids]
    prefix = f"L{block}" if block is not None else ""
    names = [f"{prefix}H{h}" for h in head_ids]
    rendered = circuitsvis.attention.attention_heads(
        attention=arr.astype(np.float32), tokens=layout.token_labels(), attention_head_names=names
    )
    title = f"attention, block {block}" if block is not None else "attention"
    return InteractiveView(
        rendered,
        lambda: plot_attention(arr, layout, head_names=names, title=title),
        title,
        data=attention_table(arr, layout, head_names=names),
        source=source,
    )


# -------------------------------------------------------------------------------------------------
# Class probabilities across blocks
# -------------------------------------------------------------------------------------------------
def _class_probabilities(model: "HookedViT", cache: Any, hook: str, layout: Any) -> tuple:
    """``(probs [batch, block, pos, class], cache)``: every token after every block."""
    _, names, cache = sublayer_cache(model, cache, hook, also=[LOGITS])
    projection = ClassProjection(model)
    probs = [token_logits(projection, cache[n], layout, n).float().softmax(-1) for n in names]
    return torch.stack(probs, dim=1), cache


def _predicted_class(model: "HookedViT", cache: Any, image_index: int) -> int:
    if LOGITS in cache:
        logits = cache[LOGITS]
    else:
        last = act_name("resid_post", model.cfg.n_layers - 1)
        if last not in cache:
            raise ValueError(
                "class_id= is needed: the cache has neither hook_logits nor the last resid_post"
            )
        with torch.no_grad():
            resid = cache[last] if cache[last].ndim == 3 else cache[last][None]
            logits = readout_logits(model, resid)
    logits = logits[None] if logits.ndim == 1 else logits
    return int(logits[image_index].argmax())


def class_probability_view(
    model: HookedViT,
    cache: Union[Mapping[str, Tensor], Tensor],
    *,
    image_index: int = 0,
    class_id: Optional[Union[int, str]] = None,
    image: Any = None,
    hook: str = "hook_resid_post",
    source: Source = "local",
) -> InteractiveView:
    """Probability of one class at every token after every block (circuitsvis
    ``colored_tokens_multi``).

    Tokens are labelled from ``model.layout``; hover a token to see its probability per block, pick
    a block to colour the sequence by it. ``class_id`` (index or name) defaults to the model's
    prediction for the image. ``cache`` may also be a batch of images. The static fallback puts the
    same numbers on the patch grid (over ``image`` when given), prefix tokens in the titles.
    """
    import circuitsvis

    layout = model.layout
    probs, cache = _class_probabilities(model, cache, hook, layout)
    if not 0 <= image_index < probs.shape[0]:
        raise IndexError(f"image_index {image_index} out of range for a batch of {probs.shape[0]}")
    c = (
        _predicted_class(model, cache, image_index)
        if class_id is None
        else model.to_single_token(class_id)
    )
    name = class_names_or_ids(model.class_names, model.cfg.n_classes)[c]
    values = probs[image_index, :, :, c]  # [block, pos]
    blocks = [f"block {b}" for b in range(values.shape[0])]
    labels = layout.token_labels()
    rendered = circuitsvis.tokens.colored_tokens_multi(labels, values.T.contiguous(), blocks)
    n_blocks, n_tokens = values.shape
    data = pd.DataFrame(
        {
            "block": np.repeat(np.arange(n_blocks), n_tokens),
            "position": np.tile(np.arange(n_tokens), n_blocks),
            "token": labels * n_blocks,
            "token_type": token_types(layout) * n_blocks,
            "class": c,
            "class_name": name,
            "prob": values.reshape(-1).double().cpu().numpy(),
        }
    )
    title = f"p(class {name}) per token and block ({hook})"
    return InteractiveView(
        rendered,
        lambda: plot_token_grid(
            values, image=image, layout=layout, vmin=0.0, vmax=1.0, colorbar_label=f"p({name})"
        ),
        title,
        data=data,
        source=source,
    )


def topk_tokens_view(
    model: HookedViT,
    cache: Union[Mapping[str, Tensor], Tensor],
    *,
    image_indices: Optional[Sequence[int]] = None,
    k: int = 5,
    image: Any = None,
    hook: str = "hook_resid_post",
    source: Source = "local",
) -> InteractiveView:
    """For every block and class, the tokens with the highest probability of that class
    (circuitsvis ``topk_tokens``; one sample per image). The static fallback shows the first image's
    top-1 class per token and block on the patch grid."""
    import circuitsvis

    layout = model.layout
    probs, _ = _class_probabilities(model, cache, hook, layout)
    indices = list(range(probs.shape[0])) if image_indices is None else list(image_indices)
    if not indices or any(not 0 <= i < probs.shape[0] for i in indices):
        raise IndexError(f"image_indices {indices} out of range for a batch of {probs.shape[0]}")
    labels = layout.token_labels()
    rendered = circuitsvis.topk_tokens.topk_tokens(
        tokens=[labels for _ in indices],
        activations=[probs[i].double().cpu().numpy() for i in indices],
        max_k=k,
        first_dimension_name="Block",
        third_dimension_name="Class",
        sample_labels=[f"image {i}" for i in indices],
        first_dimension_labels=[f"block {b}" for b in range(probs.shape[1])],
    )
    top_p, top_c = probs[indices].topk(
        min(k, probs.shape[2]), dim=2
    )  # over tokens: [n_img, blocks, k, C]
    n_img, n_blocks, kk, n_cls = top_c.shape
    grid = np.stack(
        np.meshgrid(
            np.arange(n_img), np.arange(n_blocks), np.arange(kk), np.arange(n_cls), indexing="ij"
        ),
        -1,
    ).reshape(-1, 4)
    names = class_names_or_ids(model.class_names, n_cls)
    data = pd.DataFrame(
        {
            "image": np.asarray(indices)[grid[:, 0]],
            "block": grid[:, 1],
            "k": grid[:, 2],
            "class": grid[:, 3],
            "class_name": np.asarray(names)[grid[:, 3]],
            "position": top_c.reshape(-1).cpu().numpy(),
            "token": np.asarray(labels)[top_c.reshape(-1).cpu().numpy()],
            "prob": top_p.reshape(-1).double().cpu().numpy(),
        }
    )
    first = probs[indices[0]].argmax(-1)  # [block, pos]
    class_names = getattr(model, "class_names", None)
    return InteractiveView(
        rendered,
        lambda: plot_token_grid(first, image=image, layout=layout, class_names=class_names),
        f"top-{k} tokens per class and block ({hook})",
        data=data,
        source=source,
    )
