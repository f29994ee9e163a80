"""The lens on the bundled trained MNIST ViT (METHODS §2, §5): the directions of the paper's
findings.

The CLS token becomes class-identifiable with depth and, at the last block, is identifiable exactly
for the images the model classifies correctly; image tokens follow later, those on the digit's
stroke more than the background; the random-init twin stays at chance and the trained model beats it
with significance. 200 held-out digits (20 per class), float64 so that rank 0 and the argmax of the
logits cannot disagree through rounding."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.lens.baseline import random_init_twin
from vit_embedding_lens.lens.metrics import (
    class_vs_context,
    compare_with_random,
    identifiability_table,
)
from vit_embedding_lens.lens.streaming import LensRecorder, lens_batch
from vit_embedding_lens.testing import create_timm_vit
from vit_embedding_lens.zoo.bundled import load_mnist_eval

PER_CLASS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def trained():
    """``(model, images, labels, token_mask, logits, lens result)`` on a class-balanced subset."""
    model = HookedViT.from_bundled(dtype=torch.float64)
    data = load_mnist_eval()
    idx = torch.cat(
        [torch.nonzero(data.labels == c).squeeze(1)[:PER_CLASS] for c in range(model.cfg.n_classes)]
    )
    images, labels = data.images[idx].double(), data.labels[idx]
    mask = data.class_token_mask(model.layout)[idx]
    recorder = LensRecorder(model)  # one forward pass gives both the logits and the lens readings
    with torch.no_grad(), recorder.recording(labels):
        logits = model(images)
    return (
        model,
        images,
        labels,
        mask,
        logits,
        dataclasses.replace(recorder.result, token_mask=mask),
    )


@functools.lru_cache(maxsize=None)
def twin():
    """``(random-init twin, its lens result)`` on the same images."""
    model, images, labels, mask, _, _ = trained()
    random_model = random_init_twin(model, seed=0)
    return random_model, lens_batch(random_model, images, labels, mask)


def per_block(table, group: str, metric: str, kind: str = "resid") -> np.ndarray:
    rows = table[
        (table.token_group == group) & (table.metric == metric) & (table.layer_type == kind)
    ]
    return rows.sort_values("block")["value"].to_numpy()


def rises_with_depth(values: np.ndarray, gain: float, slack: float) -> None:
    """Last well above first, rank correlation with depth high, no step down larger than
    ``slack``."""
    assert values[-1] - values[0] > gain, values
    assert np.corrcoef(np.argsort(np.argsort(values)), np.arange(len(values)))[0, 1] > 0.8, values
    assert (np.diff(values) > -slack).all(), values


def test_cls_identifiability_rises_with_depth():
    model, _, _, _, _, result = trained()
    table = identifiability_table(result)
    score, identifiable = (
        per_block(table, "cls", "score"),
        per_block(table, "cls", "identifiable_pct"),
    )
    assert len(score) == model.cfg.n_layers
    rises_with_depth(score, gain=0.15, slack=0.02)
    rises_with_depth(identifiable, gain=50.0, slack=3.0)
    assert score[-1] > 0.97
    # the table's CLS score is the plain mean over images of 1 - rank / C
    cls_rank = result.rank["resid"][:, :, model.layout.cls_index].double()
    np.testing.assert_allclose(score, (1 - cls_rank / model.cfg.n_classes).mean(0).numpy())


def test_last_block_cls_identifiability_is_the_accuracy():
    model, _, labels, _, logits, result = trained()
    top2 = logits.topk(2, dim=-1).values
    assert bool((top2[:, 0] > top2[:, 1]).all()), (
        "an exact tie in the logits: rank 0 and argmax may differ"
    )
    correct = logits.argmax(-1) == labels
    cls_top1 = result.rank["resid"][:, -1, model.layout.cls_index] == 0
    assert torch.equal(cls_top1, correct)
    accuracy = 100 * correct.double().mean().item()
    assert 90 < accuracy < 100  # the model is good, and a few mistakes make the check meaningful
    table = identifiability_table(result)
    assert per_block(table, "cls", "identifiable_pct")[-1] == pytest.approx(accuracy, abs=1e-9)


def test_image_tokens_follow_and_stroke_tokens_lead():
    _, _, _, _, _, result = trained()
    table = identifiability_table(result)
    image = per_block(table, "image", "score")
    assert image[-1] - image[0] > 0.08 and image[-1] > 0.6
    cls = per_block(table, "cls", "score")
    assert (cls > image).all()  # the CLS token is ahead of the image tokens at every block
    n_permutations = 200
    stroke = class_vs_context(result, n_permutations=n_permutations)
    late = stroke[stroke.block >= result.n_blocks // 2]
    assert (late["difference"] > 0.05).all()
    assert np.allclose(
        late["p_value"], 1 / (n_permutations + 1)
    )  # no shuffle of the labels comes close


def test_random_init_twin_stays_at_chance():
    model, _, _, _, _, _ = trained()
    random_model, random_result = twin()
    mine = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "model_name"}
    theirs = {k: v for k, v in dataclasses.asdict(random_model.cfg).items() if k != "model_name"}
    assert mine == theirs
    assert not torch.equal(model.head.W_head, random_model.head.W_head)
    table = identifiability_table(random_result)
    for group in ("cls", "image"):
        score = per_block(table, group, "score")
        assert (np.abs(score - 0.5) < 0.1).all(), (group, score)
    assert (
        np.abs(per_block(table, "cls", "identifiable_pct") - 10.0) < 10.0
    ).all()  # chance is 1 / 10


def test_trained_beats_random_init_for_cls_in_late_blocks():
    _, _, _, _, _, result = trained()
    _, random_result = twin()
    table = compare_with_random(result, random_result)
    cls_rows = table[table.token_group == "cls"].sort_values("block")
    assert (cls_rows["trained"] > cls_rows["random"]).all()
    late = cls_rows[cls_rows.block >= result.n_blocks // 2]
    assert (late["stars"] == "***").all() and (late["p_value"] < 1e-6).all()
    image_rows = table[table.token_group == "image"].sort_values("block")
    assert image_rows["stars"].iloc[-1] == "***"  # image tokens too, by the last block


def tiny_timm(**kwargs):
    return create_timm_vit(
        "vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=7, **kwargs
    )


@pytest.mark.parametrize(
    "timm_kwargs", [dict(reg_tokens=4), dict(class_token=False, global_pool="avg")]
)
def test_random_init_twin_of_a_timm_model_is_seeded_and_leaves_the_global_rng_alone(timm_kwargs):
    model = HookedViT.from_timm(tiny_timm(**timm_kwargs), dtype=torch.float64)
    state = torch.random.get_rng_state()
    a, b, c = (
        random_init_twin(model, seed=3),
        random_init_twin(model, seed=3),
        random_init_twin(model, seed=4),
    )
    assert torch.equal(torch.random.get_rng_state(), state)
    assert next(a.parameters()).dtype == torch.float64 and a.layout == model.layout
    assert torch.equal(a.blocks[0].attn.W_Q, b.blocks[0].attn.W_Q)
    assert not torch.equal(a.blocks[0].attn.W_Q, c.blocks[0].attn.W_Q)
    assert not torch.equal(a.blocks[0].attn.W_Q, model.blocks[0].attn.W_Q)


def test_random_init_twin_refuses_an_architecture_it_cannot_rebuild():
    # LayerScale added to a name that has none: the name alone rebuilds a different model
    model = HookedViT.from_timm(tiny_timm(init_values=1e-5))
    with pytest.raises(ValueError, match="layer_scale"):
        random_init_twin(model)
    assert random_init_twin(model, init_values=1e-5).cfg.layer_scale
