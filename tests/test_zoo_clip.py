"""The bundled image-text model (an OpenCLIP CLIP trained on MNIST digits): its files, card,
tokenizer, zero-shot accuracy from text prompts, and its HookedViT (issue 13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from vit_embedding_lens import HookedViT  # noqa: E402
from vit_embedding_lens.testing import assert_close_scaled  # noqa: E402
from vit_embedding_lens.zoo import load_bundled_eval  # noqa: E402
from vit_embedding_lens.zoo.clip import (  # noqa: E402
    DIGIT_WORDS,
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    CompactTokenizer,
    bundled_clip_tokenizer,
    clip_model_card,
    load_bundled_clip,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return load_bundled_clip()


@pytest.fixture(scope="module")
def digits():
    return load_bundled_eval("mnist-vit")


def test_card_records_data_command_seed_config_and_zero_shot_accuracy():
    card = clip_model_card()
    assert card["name"] == "mnist-clip" and card["kind"].startswith("open_clip.CLIP")
    assert card["command"].startswith("python -m vit_embedding_lens.zoo.train_clip")
    assert card["training"]["seed"] == 0
    assert card["vision_cfg"]["layers"] == 4 and card["embed_dim"] == 64
    accuracy = card["zero_shot_accuracy"]
    # far above chance (0.1) with every prompt set, including templates never seen in training
    for key in ("train_templates_words", "held_out_templates_words", "default_templates_words"):
        assert accuracy[key] > 0.8, (key, accuracy[key])


def test_shipped_weights_give_the_cards_accuracy(clip, digits):
    from vit_embedding_lens.zoo.train_clip import zero_shot_accuracy

    card = clip_model_card()
    tokenizer = bundled_clip_tokenizer()
    acc = zero_shot_accuracy(clip, tokenizer, digits.images, digits.labels, HELD_OUT_TEMPLATES)
    assert acc == pytest.approx(card["zero_shot_accuracy"]["held_out_templates_words"], abs=2e-3)


def test_compact_tokenizer_keeps_end_of_text_largest_and_marks_unknown_words():
    tok = bundled_clip_tokenizer()
    ids = tok(["a photo of the digit seven.", "a xylophone"])
    assert ids.shape == (2, tok.context_length) and int(ids.max()) < tok.vocab_size
    assert int(ids[0].argmax()) == int((ids[0] > 0).nonzero().max())  # pooling finds the EOT
    assert (ids[1] == CompactTokenizer.UNK).any() and not (ids[0] == CompactTokenizer.UNK).any()


def test_hooked_zero_shot_model_equals_open_clips_logits(clip, digits):
    hooked = HookedViT.from_pretrained("bundled:mnist-clip")
    assert hooked.class_names == DIGIT_WORDS and hooked.cfg.head_type == "cosine"
    assert hooked.cfg.in_chans == 1 and hooked.cfg.d_embed == 64
    images = digits.images[::25]
    tok = bundled_clip_tokenizer()
    with torch.no_grad():
        img = F.normalize(clip.encode_image(images), dim=-1)
        rows = [
            F.normalize(
                F.normalize(
                    clip.encode_text(tok([t.format(n) for t in TRAIN_TEMPLATES])), dim=-1
                ).mean(0),
                dim=-1,
            )
            for n in DIGIT_WORDS
        ]
        expected = clip.logit_scale.exp() * img @ torch.stack(rows).T
    assert_close_scaled(hooked(images), expected)
    assert HookedViT.from_bundled("mnist-clip").class_names == DIGIT_WORDS


def test_timm_loaders_name_the_image_text_model_clearly():
    with pytest.raises(ValueError, match="OpenCLIP image-text model"):
        HookedViT.from_timm("bundled:mnist-clip")


def _lens_reads_cosine_heads() -> bool:
    """Whether the class-embedding lens reads zero-shot (cosine) heads yet (issue 13's lens
    floor, branch h-13m)."""
    from vit_embedding_lens.lens import ClassProjection

    try:
        ClassProjection(HookedViT.from_pretrained("bundled:mnist-clip"))
    except AttributeError:
        return False
    return True


def test_the_text_defined_model_works_with_interventions_and_attributions(digits):
    """The zero-shot model is a classifier like any other: knockout, token removal, patching and
    attributions run on it unchanged (and the patching end points are its own runs)."""
    from vit_embedding_lens import attribution
    from vit_embedding_lens.interventions import (
        get_act_patch_resid_pre,
        knockout,
        logit_diff,
        remove_context,
    )

    model = HookedViT.from_pretrained("bundled:mnist-clip")
    pick = torch.arange(0, 500, 50)  # one digit per class
    images, labels = digits.images[pick], digits.labels[pick]
    with torch.no_grad():
        logits = model(images)
        with knockout(model, "self_only"):
            knocked = model(images)
    assert knocked.shape == logits.shape and not torch.allclose(knocked, logits)
    on_digit = digits.class_token_mask(model.layout)[pick]
    with torch.no_grad():
        removed = remove_context(model, images, on_digit)
    assert removed.logits.shape == logits.shape
    metric = logit_diff(model, target=7, other=1)
    clean, corrupted = images[7:8], images[1:2]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        patched = get_act_patch_resid_pre(model, corrupted, clean_cache, metric, progress=False)
    assert patched.values.shape[0] == model.cfg.n_layers and torch.isfinite(patched.values).all()
    relevance = attribution.chefer_relevance(model, images[:2], labels[:2], progress=False)
    assert relevance.scores.shape == (2, model.layout.n_patches)
    assert torch.isfinite(relevance.scores).all()


@pytest.mark.skipif(
    not _lens_reads_cosine_heads(), reason="the lens floor for zero-shot heads (h-13m) is not here"
)
def test_the_class_embedding_lens_reads_the_text_defined_model(digits):
    from vit_embedding_lens import lens

    model = HookedViT.from_pretrained("bundled:mnist-clip")
    pick = torch.arange(0, 500, 25)
    result = lens.lens_batch(model, digits.images[pick], digits.labels[pick])
    table = lens.identifiability_table(result)
    assert len(table) > 0
    # the last block's CLS reading is the zero-shot head itself
    with torch.no_grad():
        logits, cache = model.run_with_cache(digits.images[pick])
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, model.layout.cls_index]
    assert_close_scaled(lens.ClassProjection(model)(last), logits)
