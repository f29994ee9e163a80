"""The reference code's two group comparisons: key-value agreement of correct vs incorrect images,
and attention/MLP change of class vs context tokens, checked against hand-computed means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit_embedding_lens import TokenLayout
from vit_embedding_lens.lens import (
    LensResult,
    PerImageMemoryCounts,
    class_vs_context_changes,
    kv_agreement_by_correctness,
)
from vit_embedding_lens.lens.memory_usage import TOKEN_GROUPS


def counts(agree_cls, agree_image, n_image_tokens=4):
    """Counts for images with one CLS and ``n_image_tokens`` image tokens, one kind, one block."""
    n = len(agree_cls)
    G = len(TOKEN_GROUPS)
    tokens = torch.zeros(n, G, dtype=torch.long)
    tokens[:, TOKEN_GROUPS.index("cls")] = 1
    tokens[:, TOKEN_GROUPS.index("image")] = n_image_tokens
    agree = torch.zeros(n, 1, 1, G, dtype=torch.long)
    agree[:, 0, 0, TOKEN_GROUPS.index("cls")] = torch.tensor(agree_cls)
    agree[:, 0, 0, TOKEN_GROUPS.index("image")] = torch.tensor(agree_image)
    return PerImageMemoryCounts(
        kinds=("mlp",),
        labels=torch.zeros(n, dtype=torch.long),
        tokens=tokens,
        agree=agree,
        match=torch.zeros_like(agree),
        drawn=torch.zeros(n, 1, dtype=torch.long),
        random_agree=torch.zeros(n, 1, 1, 1, G, dtype=torch.long),
    )


def test_kv_agreement_by_correctness_hand_computed():
    c = counts([1, 1, 1, 0, 1, 0, 0, 0], [4, 3, 2, 1, 0, 0, 1, 0])
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    table = kv_agreement_by_correctness(c, correct, n_permutations=500).set_index("token_group")
    assert table.loc["cls", "agreement_correct"] == pytest.approx(75.0)
    assert table.loc["cls", "agreement_incorrect"] == pytest.approx(25.0)
    assert table.loc["cls", "difference"] == pytest.approx(50.0)
    image = table.loc["image"]
    assert image["agreement_correct"] == pytest.approx(100 * np.mean([1, 0.75, 0.5, 0.25]))
    assert image["agreement_incorrect"] == pytest.approx(100 * np.mean([0, 0, 0.25, 0]))
    assert image["p_value"] < 0.05 and image["n_correct"] == 4 and image["n_incorrect"] == 4
    # no difference: the one-sided p-value is large
    same = kv_agreement_by_correctness(counts([1, 0] * 4, [2] * 8), correct, n_permutations=500)
    assert (same["p_value"] > 0.3).all()
    with pytest.raises(ValueError, match="one flag per image"):
        kv_agreement_by_correctness(c, correct[:3])


def test_class_vs_context_changes_hand_computed():
    layout = TokenLayout((2, 2), (8, 8))  # CLS + 4 image tokens
    n, L, N = 3, 2, layout.n_tokens
    gen = torch.Generator().manual_seed(0)
    rose = {k: torch.rand(n, L, N, generator=gen) < 0.5 for k in ("block", "attn", "mlp")}
    rose["mlp_vs_resid_mid"] = rose["mlp"].clone()
    rose["attn"][:, 1] = torch.tensor([False, True, True, False, False])  # class tokens rise
    mask = torch.tensor([[False, True, True, False, False]] * n)
    zeros = torch.zeros(n, L, N, dtype=torch.long)
    result = LensResult(
        rank={k: zeros for k in ("attn", "mlp", "resid")},
        rose=rose,
        composition=zeros,
        labels=torch.zeros(n, dtype=torch.long),
        n_classes=10,
        layout=layout,
        token_mask=mask,
    )
    table = class_vs_context_changes(result, n_permutations=500)
    assert len(table) == 2 * L and set(table.comparison) == {"attn", "mlp"}
    for row in table.itertuples():
        flags = rose[row.comparison][:, row.block].double()
        assert row.class_rate == pytest.approx(100 * flags[:, 1:3].mean().item())
        assert row.context_rate == pytest.approx(100 * flags[:, 3:].mean().item())
        assert row.n_class_tokens == 2 * n and row.n_context_tokens == 2 * n
    top = table[(table.comparison == "attn") & (table.block == 1)].iloc[0]
    assert top.difference == pytest.approx(100.0) and top.p_value < 0.05
    result.token_mask = None
    with pytest.raises(ValueError, match="token labels"):
        class_vs_context_changes(result)
