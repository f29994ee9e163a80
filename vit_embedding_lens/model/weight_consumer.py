"""Strict weight consumption for every converter (timm, Hugging Face, OpenCLIP): one home.

A converter takes each source tensor by name; whatever it never took is a ConversionError that
names it, so no conversion silently drops a weight. Tensors are held in float64 while folding
(LayerScale, transposes, fused projections), so the only rounding is the final cast.
"""

from __future__ import annotations

from itertools import chain
from typing import Dict, Optional, Set

import torch
from torch import Tensor, nn

from vit_embedding_lens.errors import ConversionError


class WeightConsumer:
    """Hands out ``module``'s parameters and buffers by name and checks that all were taken.

    ``source`` names where the tensors come from (``"timm"``, ``"Hugging Face"``, ``"OpenCLIP"``)
    in the errors; ``name`` is the model's name.
    """

    def __init__(self, module: nn.Module, name: str, source: str) -> None:
        self.tensors: Dict[str, Tensor] = {
            k: v.detach().to(torch.float64) if v.is_floating_point() else v.detach()
            for k, v in chain(module.named_parameters(), module.named_buffers())
        }
        self.taken: Set[str] = set()
        #: tensors taken without a HookedViT counterpart, each with the reason
        self.set_aside: Dict[str, str] = {}
        self.name = name
        self.source = source

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> Tensor:
        if key not in self.tensors:
            raise ConversionError(f"{self.name}: expected {self.source} tensor {key!r} is missing")
        self.taken.add(key)
        return self.tensors[key]

    def maybe(self, key: str) -> Optional[Tensor]:
        return self.take(key) if key in self.tensors else None

    def put_aside(self, key: str, why: str) -> None:
        """Take ``key`` knowingly unused (e.g. a text tower's weight); listed in ``set_aside``."""
        self.take(key)
        self.set_aside[key] = why

    def check_all_taken(self) -> None:
        left = sorted(set(self.tensors) - self.taken)
        if left:
            raise ConversionError(
                f"{self.name}: {self.source} tensors not consumed by the conversion: {left[:20]}"
                f"{' ...' if len(left) > 20 else ''}; refusing a conversion that would drop weights"
            )
