"""TokenLayout: the one place that knows which tokens are prefix tokens and where patches sit."""

import pytest
import torch

from vit_embedding_lens import TokenLayout


@pytest.mark.parametrize(
    "cls_index, dist_index, registers, n_prefix",
    [
        (None, None, (), 0),
        (0, None, (), 1),
        (0, 1, (), 2),
        (0, None, (1, 2, 3, 4), 5),
        (None, None, (0, 1, 2, 3), 4),
    ],
)
def test_counts_and_labels(cls_index, dist_index, registers, n_prefix):
    layout = TokenLayout(
        (3, 4), (16, 16), cls_index=cls_index, dist_index=dist_index, register_indices=registers
    )
    assert layout.n_prefix == n_prefix
    assert layout.n_tokens == n_prefix + 12
    assert list(layout.patch_indices) == list(range(n_prefix, n_prefix + 12))
    labels = layout.token_labels()
    assert len(labels) == layout.n_tokens
    assert labels[n_prefix] == "P0,0" and labels[-1] == "P2,3"
    assert ("CLS" in labels) == (cls_index is not None)
    assert sum(lab.startswith("REG") for lab in labels) == len(registers)
    mask = layout.image_token_mask()
    assert mask.sum() == 12 and not mask[:n_prefix].any()
    kinds = layout.token_kinds()
    expected = {"CLS": "cls", "DIST": "dist"}
    assert kinds == [
        expected.get(lab, "register" if lab.startswith("REG") else "image") for lab in labels
    ]
    assert [k == "image" for k in kinds] == mask.tolist()
    assert layout.image_size == (48, 64)


def test_grid_round_trip_and_positions():
    layout = TokenLayout((3, 4), (8, 8), cls_index=0, register_indices=(1, 2))
    values = torch.arange(layout.n_tokens).float().expand(2, -1)
    grid = layout.to_grid(values)  # prefix dropped
    assert grid.shape == (2, 3, 4)
    assert grid[0, 1, 2] == layout.token_index(1, 2) == 3 + 1 * 4 + 2
    assert torch.equal(layout.from_grid(grid), values[:, 3:])
    assert layout.patch_position(layout.token_index(2, 3)) == (2, 3)
    x = torch.randn(2, layout.n_tokens, 5)
    assert torch.equal(layout.patch_tokens(x), x[:, 3:])
    assert torch.equal(layout.prefix_tokens(x), x[:, :3])


def test_bad_input_errors():
    layout = TokenLayout((2, 2), (16, 16))
    with pytest.raises(IndexError, match="outside"):
        layout.token_index(2, 0)
    with pytest.raises(IndexError, match="not an image-patch token"):
        layout.patch_position(0)
    with pytest.raises(ValueError, match="tokens"):
        layout.patch_tokens(torch.randn(1, 7, 3))
    with pytest.raises(ValueError, match="patches"):
        layout.to_grid(torch.randn(3))
    with pytest.raises(ValueError, match="without gaps"):
        TokenLayout((2, 2), (16, 16), cls_index=0, register_indices=(2,))
