"""ClassSpace: a class embedding matrix with its names, logit scale and bias (METHODS §8).

A zero-shot (cosine) head reads ``logit_scale * normalize(features) @ E.T + logit_bias``: ``E``
holds one L2-normalized row per class, for CLIP and SigLIP computed once from the text tower
(prompt templates filled with the class names, averaged). A ``ClassSpace`` is that head's data,
saved beside a model (safetensors + a small json) so that the text tower is not needed again;
:meth:`HookedViT.with_class_space` puts it on a model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["ClassSpace"]

EMBEDDINGS_FILE = "class_space.safetensors"
CARD_FILE = "class_space.json"
_FORMAT = "vit-embedding-lens class space, version 1"


class ClassSpace:
    """Class embeddings ``[class, d]`` (rows L2-normalized on construction unless they already
    have unit norm), class names, the
    logit scale (already exponentiated, e.g. CLIP's ``logit_scale.exp()``) and the logit bias
    (SigLIP's; 0 for CLIP). ``metadata`` (json-serializable) records where the space came from
    (model, templates, ...).

    Invalid input (not 2-D, NaN/inf, a zero row, a names count that differs from the rows, a
    non-positive or non-finite scale) raises a ValueError that names the problem.
    """

    def __init__(
        self,
        embeddings: Float[Tensor, "class d"],
        names: Sequence[str],
        *,
        logit_scale: float = 1.0,
        logit_bias: float = 0.0,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> None:
        if not isinstance(embeddings, Tensor):
            raise TypeError(
                "class embeddings must be a torch.Tensor [class, d], got "
                f"{type(embeddings).__name__}"
            )
        if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
            raise ValueError(
                f"class embeddings must be a 2-D tensor [class, d] with at least one class, got "
                f"shape {tuple(embeddings.shape)}"
            )
        if not embeddings.is_floating_point():
            raise TypeError(f"class embeddings must be floating point, got {embeddings.dtype}")
        if not bool(torch.isfinite(embeddings).all()):
            bad = torch.nonzero(~torch.isfinite(embeddings).all(-1)).flatten().tolist()
            raise ValueError(f"class embeddings contain NaN or infinite values (rows {bad[:10]})")
        norms = embeddings.detach().double().norm(dim=-1)
        if bool((norms == 0).any()):
            bad = torch.nonzero(norms == 0).flatten().tolist()
            raise ValueError(f"class embeddings have all-zero rows (rows {bad[:10]})")
        if isinstance(names, str):
            raise TypeError("names must be a sequence of class names, not one string")
        names = [str(n) for n in names]
        if len(names) != embeddings.shape[0]:
            raise ValueError(
                f"{len(names)} class names for {embeddings.shape[0]} class embeddings (one name "
                "per row)"
            )
        scale, bias = float(logit_scale), float(logit_bias)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"logit_scale must be a positive finite number (already exponentiated), got "
                f"{logit_scale}"
            )
        if not math.isfinite(bias):
            raise ValueError(f"logit_bias must be finite, got {logit_bias}")
        embeddings = embeddings.detach().cpu()
        if not bool(((norms - 1).abs() < 1e-6).all()):  # unit rows are kept bit for bit
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        #: ``[class, d]``, rows L2-normalized (in the given dtype, on the CPU)
        self.embeddings: Tensor = embeddings.contiguous()
        self.names: List[str] = names
        self.logit_scale = scale
        self.logit_bias = bias
        self.metadata: Dict[str, Any] = dict(metadata or {})
        json.dumps(self.metadata)  # fails early, not at save time

    @property
    def n_classes(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def d(self) -> int:
        """Width of the space (the model's ``d_embed``, or ``d_model`` without a projection)."""
        return int(self.embeddings.shape[1])

    def check_width(self, d_features: int, model_name: str = "the model") -> None:
        """A ValueError unless the embeddings are ``d_features`` wide."""
        if self.d != d_features:
            raise ValueError(
                f"the class space is {self.d} wide but {model_name}'s head reads "
                f"{d_features}-wide features (d_embed after a projection, else d_model); compute "
                "the class embeddings with this model's own text tower"
            )

    def logits(self, features: Float[Tensor, "batch d"]) -> Float[Tensor, "batch class"]:
        """``logit_scale * normalize(features) @ E.T + logit_bias``."""
        E = self.embeddings.to(device=features.device, dtype=features.dtype)
        z = torch.nn.functional.normalize(features, dim=-1)
        return self.logit_scale * (z @ E.T) + self.logit_bias

    # -- files -----------------------------------------------------------------------------------
    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``class_space.safetensors`` (the embeddings) and ``class_space.json`` (names,
        scale, bias, metadata) into ``folder`` (created); returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": self.embeddings}, str(folder / EMBEDDINGS_FILE))
        card = {
            "format": _FORMAT,
            "n_classes": self.n_classes,
            "d": self.d,
            "names": self.names,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "metadata": self.metadata,
        }
        (folder / CARD_FILE).write_text(json.dumps(card, indent=2))
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path]) -> "ClassSpace":
        """A space written by :meth:`save`; clear errors for a missing or inconsistent file."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (EMBEDDINGS_FILE, CARD_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder} has no {name}: not a class space folder (write one with "
                    "ClassSpace.save)"
                )
        card = json.loads((folder / CARD_FILE).read_text())
        if card.get("format") != _FORMAT:
            raise ValueError(
                f"{folder / CARD_FILE} is not a class space card ({card.get('format')})"
            )
        tensors = load_file(str(folder / EMBEDDINGS_FILE))
        if set(tensors) != {"embeddings"}:
            raise ValueError(f"{folder / EMBEDDINGS_FILE} must hold one tensor 'embeddings'")
        embeddings = tensors["embeddings"]
        if tuple(embeddings.shape) != (card["n_classes"], card["d"]):
            raise ValueError(
                f"{folder}: the embeddings are {tuple(embeddings.shape)} but the card says "
                f"[{card['n_classes']}, {card['d']}]"
            )
        return cls(
            embeddings,
            card["names"],
            logit_scale=card["logit_scale"],
            logit_bias=card["logit_bias"],
            metadata=card.get("metadata"),
        )

    def __repr__(self) -> str:
        return (
            f"ClassSpace({self.n_classes} classes x {self.d}, logit_scale={self.logit_scale:g}, "
            f"logit_bias={self.logit_bias:g})"
        )
