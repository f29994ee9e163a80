"""Ranks of a class among all classes, without sorting (METHODS §2).

``rank = #{k : p_k > p_c}``: the 0-based position of class ``c`` in the logits sorted from high to
low, ties resolved in the class's favour (a tie never pushes the correct class down), which is the
same for every token and block. One comparison per class: ``O(C)`` per token instead of a sort.
"""

from __future__ import annotations

from typing import cast

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from vit_embedding_lens.model.targets import check_class_ids


def class_rank(
    logits: Float[Tensor, "... class"], target: Int[Tensor, "..."]
) -> Int[Tensor, "..."]:
    """0-based rank of ``target`` in ``logits``, ``#{k : logit_k > logit_target}`` (int64; ties
    count in the class's favour). ``target`` broadcasts against the leading axes; ids outside
    the class range are refused."""
    target = torch.as_tensor(target, device=logits.device).long()
    target = target.expand(logits.shape[:-1])
    check_class_ids(target, logits.shape[-1])
    return rank_and_logit(logits, target)[0]


def rank_and_logit(logits: Float[Tensor, "... class"], target: Int[Tensor, "..."]) -> tuple:
    """``(rank, logit)`` of ``target`` (shaped like ``logits[..., 0]``); no range check (hot
    path)."""
    correct = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return count_true(logits > correct.unsqueeze(-1)), correct


def count_true(flags: Bool[Tensor, "... n"]) -> Int[Tensor, "..."]:
    """``flags.sum(-1)``, several times faster for contiguous CPU flags.

    Summing bools converts every flag to int64 first. Instead, eight flags are read as the bytes of
    one int64 and summed as such: each byte lane counts its own flags (no carry while a lane's count
    stays below 256, i.e. up to 2,040 flags per row), and the eight lane counts are added at the
    end.
    """
    n = flags.shape[-1]
    packable = (
        n and n % 8 == 0 and n <= 8 * 255 and flags.storage_offset() % 8 == 0
    )  # whole int64 words
    if not packable or not flags.is_contiguous() or flags.device.type != "cpu":
        return flags.sum(-1)
    packed = flags.view(torch.int64).sum(-1)
    return cast(Tensor, sum((packed >> (8 * lane)) & 0xFF for lane in range(8)))


def identifiability_score(rank: Tensor, n_classes: int) -> Tensor:
    """``s = 1 - r / C``: 1.0 when the class is top-1, about 0.5 at chance."""
    return 1.0 - rank.float() / n_classes


def rank_dtype(n_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds every rank (ranks are stored per token)."""
    return torch.int16 if n_classes <= torch.iinfo(torch.int16).max else torch.int32
