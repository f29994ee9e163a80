"""The ``paper`` preset: which analyses it configures, and on the bundled model its knockout and
context removal against a reference-style computation written the way the paper's code does it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.data import bundled_eval_dataset
from vit_embedding_lens.presets import PRESET_NAMES, get_preset, preset_analyses
from vit_embedding_lens.runner import Batch
from vit_embedding_lens.runner.analyses import DEFAULT_ANALYSES

N_IMAGES = 24


@pytest.fixture(scope="module")
def model():
    return HookedViT.from_bundled()


def batch_of(dataset):
    sl = slice(0, N_IMAGES)
    return Batch(
        dataset.images[sl],
        dataset.label_tensor[sl],
        dataset.image_ids[sl],
        torch.arange(N_IMAGES),
        token_masks=dataset.token_masks[sl],
    )


def test_presets_configure_the_builtin_analyses():
    assert PRESET_NAMES == ("library", "paper") and get_preset(None).name == "library"
    library = {a.name: a for a in preset_analyses(None, "library")}
    paper = {a.name: a for a in preset_analyses(None, "paper")}
    assert list(paper) == list(DEFAULT_ANALYSES)
    assert (library["knockout"].mode, paper["knockout"].mode) == ("pre_softmax", "post_softmax")
    assert (library["knockout"].tokens, paper["knockout"].tokens) == ("image", "all")
    assert (library["context_removal"].tokens, paper["context_removal"].tokens) == ("image", "all")
    assert (library["attribution"].loss, paper["attribution"].loss) == (
        "cross_entropy",
        "double_softmax",
    )
    assert library["attribution"].n_keep == paper["attribution"].n_keep == "full"
    assert get_preset("paper").token_labels == "corner"
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nature")


def reference_knockout(model, images, labels, kind):
    """The reference's loop on the post-softmax weights, then the last block's ranks of all
    tokens."""

    def edit(attn, hook):
        attn = attn.clone()
        for t in range(1, attn.shape[-1]):
            if kind == "self_only":
                attn[:, :, t, :] = 0
                attn[:, :, t, t] = 1
            else:
                attn[:, :, t, 0] = 0
        return attn

    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    hooks = [(f"blocks.{l}.attn.hook_pattern", edit) for l in range(model.cfg.n_layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits, cache = model.run_with_cache(images, names_filter=last)
    order = torch.argsort(model.head(model.ln_final(cache[last])), dim=2, descending=True)
    top1 = (order[..., 0] == labels[:, None]).float().mean(-1)
    return (logits.argmax(-1) == labels).float(), 100 * top1


def test_paper_knockout_equals_the_reference_loop(model):
    dataset = bundled_eval_dataset(model, token_labels="corner")
    batch = batch_of(dataset)
    knockout = {a.name: a for a in preset_analyses(["knockout"], "paper")}["knockout"]
    out = knockout.run(model, batch)
    for c, condition in enumerate(knockout.conditions):
        if condition == "none":
            continue
        correct, pct = reference_knockout(model, batch.images, batch.labels, condition)
        np.testing.assert_array_equal(out["correct"][:, c], correct.numpy())
        np.testing.assert_allclose(out["pct_identifiable"][:, c, -1], pct.numpy(), atol=1e-4)


def test_paper_context_removal_equals_the_reference_loop(model):
    """Per image: the mask sampled at the patches' top-left pixels, CLS plus the kept tokens'
    indices, the last block's ranks of the whole kept sequence (CLS included)."""
    from vit_embedding_lens.zoo.bundled import load_bundled_eval

    dataset = bundled_eval_dataset(model, token_labels=get_preset("paper").token_labels)
    batch = batch_of(dataset)
    analysis = {a.name: a for a in preset_analyses(["context_removal"], "paper")}
    out = analysis["context_removal"].run(model, batch)
    masks = load_bundled_eval("mnist-vit").masks[:N_IMAGES]
    p = model.layout.patch_size[0]
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    for c, on_object in ((1, 1), (2, 0)):
        for i in range(N_IMAGES):
            grid = masks[i][::p, ::p].flatten().long()
            tokens = torch.cat([torch.tensor([0]), (grid == on_object).nonzero()[:, 0] + 1])
            keep = torch.zeros(1, model.layout.n_tokens, dtype=torch.bool)
            keep[0, tokens] = True
            with torch.no_grad():
                logits, cache = model.run_with_cache(
                    batch.images[i : i + 1], keep_mask=keep, names_filter=last
                )
            order = torch.argsort(model.head(model.ln_final(cache[last])), dim=2, descending=True)
            label = int(batch.labels[i])
            assert out["correct"][i, c] == float(logits.argmax(-1).item() == label)
            pct = 100 * (order[0, :, 0] == label).float().mean().item()
            assert out["pct_identifiable"][i, c] == pytest.approx(pct, abs=1e-4)
            assert out["n_kept"][i, c] == len(tokens)
