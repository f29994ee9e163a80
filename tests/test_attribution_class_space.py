"""The paper's class-space attribution (METHODS §6) against finite differences on float64 models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vit_embedding_lens import HookedViT
from vit_embedding_lens.attribution import class_space_attribution, readout_positions
from vit_embedding_lens.lens import ClassProjection
from vit_embedding_lens.testing import create_timm_vit

TINY = dict(depth=2, img_size=32, patch_size=8, num_classes=10, embed_dim=64, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name="vit_tiny_patch16_224", dtype=torch.float64, **kw):
    return HookedViT.from_timm(create_timm_vit(name, **{**TINY, **kw}), dtype=dtype)


def finite_difference_map(model, image, cls, block, loss="cross_entropy", eps=1e-6):
    """``-d loss_l / d A^l[h, readout rows, j]`` by central differences, one (head, key) per batch
    row.

    The loss reads ``blocks.{block}.hook_attn_out`` of the real forward, so a perturbation of the
    pattern can reach the loss only through that block's own attention write-in. For models that
    read several rows (average pooling), the whole column ``j`` is moved in every readout row at
    once and the result divided by the number of rows (= the mean over rows of the gradient).
    """
    layout = model.layout
    rows = readout_positions(model, layout)
    heads, keys = model.cfg.n_heads, list(layout.patch_indices)
    combos = [(h, j) for h in range(heads) for j in keys]
    deltas = torch.zeros(2 * len(combos), heads, layout.n_tokens, dtype=image.dtype)
    for i, (h, j) in enumerate(combos):
        deltas[2 * i, h, j], deltas[2 * i + 1, h, j] = eps, -eps
    store = {}

    def perturb(pattern, hook):
        pattern = pattern.clone()
        for r in rows:
            pattern[:, :, r, :] += deltas
        return pattern

    def read(out, hook):
        store["out"] = out

    batch = image.expand(len(deltas), -1, -1, -1)
    with torch.no_grad():
        model.run_with_hooks(
            batch,
            fwd_hooks=[
                (f"blocks.{block}.attn.hook_pattern", perturb),
                (f"blocks.{block}.hook_attn_out", read),
            ],
        )
    logits = ClassProjection(model)(store["out"][:, rows].mean(1))
    if loss == "double_softmax":
        logits = logits.softmax(-1)
    losses = F.cross_entropy(logits, torch.full((len(deltas),), cls), reduction="none")
    fd = -(losses[0::2] - losses[1::2]) / (2 * eps) / len(rows)
    return fd.reshape(heads, len(keys))


@pytest.mark.parametrize(
    "name, kw, loss",
    [
        ("vit_tiny_patch16_224", {}, "cross_entropy"),  # CLS, pre-norm
        ("vit_tiny_patch16_224", {}, "double_softmax"),  # the reference code's loss
        ("vit_tiny_patch16_224", dict(reg_tokens=4), "cross_entropy"),  # CLS + 4 registers
        ("deit_tiny_distilled_patch16_224", {}, "cross_entropy"),  # CLS + distillation token
        ("vit_base_patch16_rpn_224", {}, "cross_entropy"),  # no CLS, avg pool, post-norm blocks
    ],
)
def test_gradients_match_finite_differences(name, kw, loss, make_images):
    model = tiny(name, **kw)
    images = make_images(2, 32, seed=3).double()
    result = class_space_attribution(
        model, images, classes=[4, 7], loss=loss, per_head=True, progress=False
    )
    assert result.per_head.shape == (2, 2, model.cfg.n_heads, model.layout.n_patches)
    for b, cls in enumerate([4, 7]):
        for block in range(2):
            expected = finite_difference_map(model, images[b : b + 1], cls, block, loss)
            torch.testing.assert_close(result.per_head[b, block], expected, atol=1e-6, rtol=1e-5)
    assert result.per_head.abs().max() > 1e-3  # the comparison is not between zeros


def test_parts_sum_to_the_map_and_batches_are_independent(make_images):
    model = tiny(dtype=torch.float32)
    images = make_images(5, 32, seed=1)
    full = class_space_attribution(
        model, images, classes=2, per_head=True, batch_size=2, progress=False
    )
    torch.testing.assert_close(full.per_head.sum(2), full.per_block)
    torch.testing.assert_close(full.per_block.sum(1), full.scores)
    assert full.grid.shape == (5, 4, 4)
    torch.testing.assert_close(full.grid[:, 1, 2], full.scores[:, 1 * 4 + 2])
    alone = class_space_attribution(model, images[3:4], classes=2, progress=False)
    torch.testing.assert_close(alone.scores[0], full.scores[3], atol=1e-5, rtol=1e-4)
    last = class_space_attribution(model, images, classes=2, blocks=[-1], progress=False)
    torch.testing.assert_close(last.scores, full.per_block[:, 1])
    assert last.blocks == (1,)


def test_default_class_is_the_prediction(make_images):
    model = tiny(dtype=torch.float32)
    images = make_images(3, 32, seed=2)
    predicted = model(images).argmax(-1)
    default = class_space_attribution(model, images, progress=False)
    assert torch.equal(default.classes, predicted)
    explicit = class_space_attribution(model, images, classes=predicted, progress=False)
    torch.testing.assert_close(default.scores, explicit.scores)
    other = class_space_attribution(model, images, classes=(predicted + 1) % 10, progress=False)
    assert not torch.allclose(other.scores, default.scores)


def test_frozen_weights_and_no_grad_mode_still_work(make_images):
    model = tiny(dtype=torch.float32)
    images = make_images(2, 32)
    expected = class_space_attribution(model, images, classes=1, progress=False).scores
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        got = class_space_attribution(model, images, classes=1, progress=False).scores
    torch.testing.assert_close(got, expected)
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_raise_clear_errors(make_images):
    model = tiny(dtype=torch.float32)
    images = make_images(2, 32)
    with pytest.raises(ValueError, match="loss must be"):
        class_space_attribution(model, images, loss="mse", progress=False)
    with pytest.raises(ValueError, match="2 images"):
        class_space_attribution(model, images, classes=[1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        class_space_attribution(model, images, classes=10, progress=False)
    with pytest.raises(TypeError, match="integer"):
        class_space_attribution(model, images, classes=torch.tensor([1.0, 2.0]), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        class_space_attribution(model, images, blocks=[5], progress=False)
    maxpool = tiny(dtype=torch.float32, class_token=False, global_pool="max")
    with pytest.raises(ValueError, match="global_pool='max'"):
        class_space_attribution(maxpool, images, classes=0, progress=False)


def test_bundled_map_prefers_the_digit_stroke():
    """On the trained model the top tokens of the map lie on the digit's stroke far more often than
    a random token does (measured: about 2x the stroke's share of the image)."""
    from vit_embedding_lens.zoo.bundled import load_mnist_eval

    model = HookedViT.from_bundled()
    data = load_mnist_eval()
    pick = torch.cat([torch.nonzero(data.labels == c).flatten()[:20] for c in range(10)])
    result = class_space_attribution(
        model, data.images[pick], data.labels[pick], batch_size=200, progress=False
    )
    on_stroke = data.class_token_mask(model.layout)[pick, model.layout.n_prefix :].float()
    top = result.scores.topk(5, dim=-1).indices
    hit_rate = on_stroke.gather(1, top).mean()
    assert hit_rate > 1.5 * on_stroke.mean()
