"""The bundled trained model: loads offline, converts exactly, and is the classifier its card says."""

import pytest
import torch

from vit_embedding_lens import HookedViT
from vit_embedding_lens.zoo import load_mnist_eval, model_card
from vit_embedding_lens.zoo.bundled import MNIST_FOREGROUND_THRESHOLD, load_bundled_timm


@pytest.fixture(scope="module")
def model():
    return HookedViT.from_bundled()


@pytest.fixture(scope="module")
def eval_set():
    return load_mnist_eval()


def test_layout_and_names(model):
    assert model.cfg.model_name == "bundled:mnist-vit"
    assert model.cfg.in_chans == 1 and model.cfg.image_size == (28, 28)
    assert model.layout.n_prefix == 1 and model.layout.grid_size == (7, 7)
    assert model.class_names == [str(d) for d in range(10)]
    assert model.to_single_token("7") == 7
    assert HookedViT.from_timm("bundled:mnist-vit").cfg == model.cfg


def test_matches_its_timm_model_exactly(model, eval_set):
    timm_model = load_bundled_timm()
    x = eval_set.images[:32]
    with torch.no_grad():
        expected = timm_model(x)
        got = model(x)
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


def test_held_out_accuracy_is_what_the_card_says(model, eval_set):
    with torch.no_grad():
        preds = model(eval_set.images).argmax(-1)
    acc = (preds == eval_set.labels).float().mean().item()
    card = model_card()
    assert acc >= 0.95
    assert acc == pytest.approx(card["held_out_accuracy"], abs=2e-3)


def test_eval_set_is_balanced_with_stroke_masks(eval_set):
    assert len(eval_set) == 500
    assert torch.bincount(eval_set.labels, minlength=10).tolist() == [50] * 10
    assert eval_set.masks.shape == (500, 28, 28) and eval_set.masks.dtype == torch.bool
    assert torch.equal(eval_set.masks, torch.from_numpy(eval_set.raw > MNIST_FOREGROUND_THRESHOLD))
    on_stroke = eval_set.masks.float().mean().item()
    assert 0.05 < on_stroke < 0.4  # a digit covers a minority of the image
    assert len(load_mnist_eval(n=20)) == 20


def test_cls_readout_improves_with_depth(model, eval_set):
    """Read the CLS token through the final norm and head after each block: a trained classifier
    gets more accurate with depth and the last block is the model's own prediction."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(eval_set.images[:200], names_filter=lambda n: n.endswith("resid_post"))
    labels = eval_set.labels[:200]
    accs = []
    for layer in range(model.cfg.n_layers):
        cls = cache[f"blocks.{layer}.hook_resid_post"][:, model.layout.cls_index]
        readout = model.ln_final(cls) @ model.W_U + model.b_U
        accs.append((readout.argmax(-1) == labels).float().mean().item())
    torch.testing.assert_close(readout, logits, atol=1e-5 * logits.abs().max().item(), rtol=1e-5)
    assert accs[-1] > accs[0] + 0.3
    assert accs[-1] >= 0.95


def test_unknown_bundled_name_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown bundled model"):
        HookedViT.from_bundled("imagenet-vit")
    with pytest.raises(ValueError, match="bundled model takes no"):
        HookedViT.from_timm("bundled:mnist-vit", pretrained=True)
