"""The bundled image-text model: a small OpenCLIP ``CLIP`` trained contrastively on MNIST digits and
captions made from the class names.

- ``mnist-clip``: a ViT image tower on 28x28 grey digits (7x7 patches of 4 px, CLS pooling,
  projection to a 64-d joint space) and a 3-block text transformer, trained on the same 4,500 real
  MNIST digits as ``mnist-vit`` (the same 500 held-out digits are its evaluation set).

It is a genuine ``open_clip.CLIP`` built from a custom config, with two small changes that keep the
package small, both recorded in its card: the patch embedding reads one grey channel (``conv1`` has
``in_channels=1``), and the text tower's vocabulary is the few dozen open_clip BPE tokens its
captions and the default prompt templates use (:class:`CompactTokenizer` maps open_clip's
tokenizer onto it; unknown tokens read as one ``<unk>`` id). ``load_bundled_clip()`` gives the
model (eval mode) and ``bundled_clip_tokenizer()`` its tokenizer;
``HookedViT.from_pretrained("bundled:mnist-clip")`` converts the image tower with a zero-shot head
whose classes come from the text tower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor, nn

from vit_embedding_lens.model.checkpoint import load_checkpoint_

if TYPE_CHECKING:
    import open_clip

DATA_DIR = Path(__file__).parent / "data"

DIGIT_WORDS: List[str] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]
#: the captions seen in training: each digit image is paired with one of these, filled with the
#: digit's word or numeral
TRAIN_TEMPLATES: List[str] = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a drawing of a {}.",
    "an image of the digit {}.",
    "a {} written by hand.",
    "{}",
]
#: prompts never seen in training: the card's zero-shot accuracy with them shows generalization
HELD_OUT_TEMPLATES: List[str] = [
    "a picture of the number {}.",
    "a photo of a {}.",
    "the handwritten digit {}.",
]


@dataclass(frozen=True)
class BundledClipSpec:
    """One bundled image-text model: its files in ``zoo/data``, config and classes."""

    name: str
    weights: str
    card: str
    eval_model: str  # the bundled timm model whose held-out images this model shares
    class_names: List[str]
    templates: List[str]
    embed_dim: int = 64
    vision_cfg: Dict[str, Any] = field(
        default_factory=lambda: dict(
            layers=4,
            width=64,
            head_width=16,
            mlp_ratio=2.0,
            patch_size=4,
            image_size=28,
            pool_type="tok",
        )
    )
    text_cfg: Dict[str, Any] = field(
        default_factory=lambda: dict(context_length=16, width=64, heads=4, layers=3, mlp_ratio=2.0)
    )
    in_chans: int = 1


BUNDLED_CLIP_MODELS: Dict[str, BundledClipSpec] = {
    "mnist-clip": BundledClipSpec(
        "mnist-clip",
        "mnist_clip.safetensors",
        "mnist_clip.json",
        "mnist-vit",
        list(DIGIT_WORDS),
        list(TRAIN_TEMPLATES),
    ),
}


def bundled_clip_spec(name: str = "mnist-clip") -> BundledClipSpec:
    if name not in BUNDLED_CLIP_MODELS:
        raise ValueError(
            f"unknown bundled image-text model {name!r}; available: {sorted(BUNDLED_CLIP_MODELS)}"
        )
    return BUNDLED_CLIP_MODELS[name]


class CompactTokenizer:
    """open_clip's BPE tokenizer mapped onto a small vocabulary (the BPE ids a model knows).

    ``bpe_ids`` lists the kept open_clip ids in increasing order, including the pad id 0 and the
    start/end-of-text ids; compact id 0 is padding, 1 is ``<unk>`` (any other BPE token), and the
    others follow in BPE order, so the end-of-text token keeps the largest id (OpenCLIP's text
    tower pools at the argmax id).
    """

    UNK = 1

    def __init__(self, bpe_ids: Sequence[int], context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        ids = sorted(set(int(i) for i in bpe_ids))
        self.bpe = SimpleTokenizer(context_length=context_length)
        if ids[0] != 0 or ids[-1] != self.bpe.eot_token_id or self.bpe.sot_token_id not in ids:
            raise ValueError("bpe_ids must hold the pad id 0 and the start/end-of-text ids")
        self.bpe_ids = ids
        self.context_length = context_length
        table = torch.full((len(self.bpe.encoder),), self.UNK, dtype=torch.long)
        table[0] = 0
        table[torch.tensor(ids[1:])] = torch.arange(2, len(ids) + 1)
        self.table = table
        self.vocab_size = len(ids) + 1

    @classmethod
    def from_texts(cls, texts: Sequence[str], context_length: int) -> "CompactTokenizer":
        """The vocabulary of every BPE token in ``texts`` (plus pad and start/end of text)."""
        from open_clip.tokenizer import SimpleTokenizer

        bpe = SimpleTokenizer(context_length=context_length)
        ids = set(bpe(list(texts)).flatten().tolist()) | {0, bpe.sot_token_id, bpe.eot_token_id}
        return cls(sorted(ids), context_length)

    def __call__(
        self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None
    ) -> Int[Tensor, "text ctx"]:
        ids = self.bpe(texts, context_length=context_length or self.context_length)
        return self.table[ids]


def create_bundled_clip_model(name: str = "mnist-clip") -> "open_clip.CLIP":
    """A bundled image-text architecture as an untrained ``open_clip.CLIP`` (grey input)."""

    spec = bundled_clip_spec(name)
    vocab = len(_card(spec).get("tokenizer", {}).get("bpe_ids", [])) + 1
    return _build_clip(spec, vocab)


def _build_clip(spec: BundledClipSpec, vocab_size: int) -> "open_clip.CLIP":
    import open_clip

    model = open_clip.CLIP(
        embed_dim=spec.embed_dim,
        vision_cfg=dict(spec.vision_cfg),
        text_cfg=dict(spec.text_cfg, vocab_size=vocab_size),
    )
    width, patch = spec.vision_cfg["width"], spec.vision_cfg["patch_size"]
    model.visual.conv1 = nn.Conv2d(spec.in_chans, width, patch, patch, bias=False)
    return model


def _card(spec: BundledClipSpec) -> dict:
    path = DATA_DIR / spec.card
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled file {path} is missing; reinstall the package or retrain with "
            f"`python -m vit_embedding_lens.zoo.train_clip --model {spec.name}`"
        )
    return json.loads(path.read_text())


def clip_model_card(name: str = "mnist-clip") -> dict:
    """Data, config, training settings and measured zero-shot accuracy of a bundled CLIP."""
    return _card(bundled_clip_spec(name))


def bundled_clip_tokenizer(name: str = "mnist-clip") -> CompactTokenizer:
    """The tokenizer the bundled image-text model was trained with."""
    spec = bundled_clip_spec(name)
    tok = _card(spec)["tokenizer"]
    return CompactTokenizer(tok["bpe_ids"], tok["context_length"])


def load_bundled_clip(name: str = "mnist-clip") -> "open_clip.CLIP":
    """A bundled image-text model as an ``open_clip.CLIP`` (eval mode), weights loaded strictly."""
    spec = bundled_clip_spec(name)
    model = create_bundled_clip_model(name)
    path = DATA_DIR / spec.weights
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled file {path} is missing; retrain with "
            f"`python -m vit_embedding_lens.zoo.train_clip --model {name}`"
        )
    load_checkpoint_(model, path)
    return model.eval()
