"""Interactive views: valid, self-contained HTML without a browser, the right token labels and
numbers inside, and a static PNG fallback for front ends without JavaScript."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from vit_embedding_lens import HookedViT
from vit_embedding_lens.testing import create_timm_vit
from vit_embedding_lens.viz import (
    InteractiveView,
    attention_view,
    class_probability_view,
    token_class_predictions,
    topk_tokens_view,
)
from vit_embedding_lens.zoo import load_mnist_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"img", "meta", "br", "hr", "input", "link"}


class _Collector(HTMLParser):
    """Records elements, ids, script bodies and what sits inside <noscript>; checks nesting."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack, self.ids, self.scripts, self.noscript_imgs, self.errors = [], set(), [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img" and "noscript" in self.stack:
            self.noscript_imgs.append(attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img" and "noscript" in self.stack:
            self.noscript_imgs.append(attrs)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if tag not in self.stack:
            self.errors.append(f"stray </{tag}>")
            return
        while (
            self.stack and self.stack.pop() != tag
        ):  # circuitsvis writes <div .../>: HTML5 leaves it open
            pass

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)


def _parse(html: str) -> _Collector:
    parser = _Collector()
    parser.feed(html)
    parser.close()
    assert not parser.errors, parser.errors
    return parser


def _circuitsvis_call(parsed: _Collector):
    """(element id, component name, props) of the circuitsvis render() call in the page."""
    script = "".join(parsed.scripts)
    start = script.rfind("CircuitsVis.render(")
    assert start >= 0, "no circuitsvis render call"
    call = script[start + len("CircuitsVis.render(") :]
    target, rest = call.split(",", 1)
    component, rest = rest.split(",", 1)
    props = json.JSONDecoder().raw_decode(rest.strip())[0]
    return json.loads(target.strip()), component.strip().removeprefix("CircuitsVis."), props


def _fallback_png(parsed: _Collector) -> Image.Image:
    assert len(parsed.noscript_imgs) == 1
    src = parsed.noscript_imgs[0]["src"]
    assert src.startswith("data:image/png;base64,")
    data = base64.b64decode(src.split(",", 1)[1])
    assert data.startswith(PNG_MAGIC)
    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def bundled():
    model = HookedViT.from_bundled()
    digits = load_mnist_eval()
    images, labels = digits.images[::125], digits.labels[::125]  # 4 digits: 0, 2, 5, 7
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    return model, images, labels, cache


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """The views must never ask whether the internet is up (circuitsvis's own _repr_html_ does)."""
    import circuitsvis.utils.render as render

    def refuse():
        raise AssertionError("a view tried to reach the network")

    monkeypatch.setattr(render, "internet_on", refuse)


def test_attention_view_html_carries_labels_weights_and_a_png_fallback(bundled):
    model, _, _, cache = bundled
    view = attention_view(model, cache, block=3, image_index=2)
    html = view._repr_html_()
    parsed = _parse(html)
    target, component, props = _circuitsvis_call(parsed)
    assert component == "AttentionHeads"
    assert target in parsed.ids  # the element the script renders into exists
    assert props["tokens"] == model.layout.token_labels()
    assert props["tokens"][:2] == ["CLS", "P0,0"] and "P6,6" in props["tokens"]
    assert props["attentionHeadNames"] == [f"L3H{h}" for h in range(model.cfg.n_heads)]
    expected = cache["blocks.3.attn.hook_pattern"][2]
    np.testing.assert_allclose(np.asarray(props["attention"]), expected.numpy(), atol=1e-6)
    image = _fallback_png(parsed)
    assert image.size == tuple(int(round(s * 100)) for s in view.figure().get_size_inches())
    assert view._repr_png_() == view.png()
    # the tidy table agrees with the pattern
    row = view.data[
        (view.data["head"] == "L3H1") & (view.data["query"] == 0) & (view.data["key"] == 9)
    ]
    assert row.weight.item() == pytest.approx(float(expected[1, 0, 9]), abs=1e-6)


def test_attention_view_with_registers_and_distillation_tokens():
    for name, kwargs, prefix in [
        ("vit_small_patch16_224", dict(reg_tokens=4), ["CLS", "REG0", "REG1", "REG2", "REG3"]),
        ("deit_tiny_distilled_patch16_224", {}, ["CLS", "DIST"]),
        ("vit_small_patch16_224", dict(class_token=False, global_pool="avg"), []),
    ]:
        tm = create_timm_vit(
            name,
            depth=2,
            img_size=32,
            patch_size=8,
            num_classes=3,
            embed_dim=24,
            num_heads=3,
            **kwargs,
        )
        model = HookedViT.from_timm(tm)
        _, cache = model.run_with_cache(torch.randn(2, 3, 32, 32))
        pattern = cache["blocks.1.attn.hook_pattern"]  # a batched tensor, not a cache
        view = attention_view(model.layout, pattern, image_index=1, heads=[0, 2])
        _, _, props = _circuitsvis_call(_parse(view.html()))  # (the PNG fallback is tested above)
        assert props["tokens"][: len(prefix)] == prefix and props["tokens"][len(prefix)] == "P0,0"
        assert len(props["tokens"]) == model.layout.n_tokens
        np.testing.assert_allclose(
            np.asarray(props["attention"]), pattern[1, [0, 2]].numpy(), atol=1e-6
        )


def test_class_probability_view_matches_the_predictions_helper(bundled):
    model, images, labels, cache = bundled
    view = class_probability_view(
        model, cache, image_index=1, class_id=int(labels[1]), image=images[1]
    )
    parsed = _parse(view._repr_html_())
    _, component, props = _circuitsvis_call(parsed)
    assert component == "ColoredTokensMulti"
    assert props["tokens"] == model.layout.token_labels()
    assert props["labels"] == [f"block {b}" for b in range(model.cfg.n_layers)]
    values = np.asarray(props["values"])  # [pos, block]
    reference = token_class_predictions(model, cache, k=1, targets=labels).target_probs[
        1
    ]  # [block, pos]
    np.testing.assert_allclose(values, reference.T.numpy(), atol=1e-6)
    _fallback_png(parsed)
    # default class: the model's prediction; a class name works too
    by_default = class_probability_view(model, cache, image_index=1)
    predicted = int(cache["hook_logits"][1].argmax())
    assert set(by_default.data["class"]) == {predicted}
    by_name = class_probability_view(
        model, images, image_index=1, class_id=model.class_names[predicted]
    )
    np.testing.assert_allclose(by_name.data["prob"], by_default.data["prob"], atol=1e-6)
    # on the trained model, the CLS token's probability of the right digit rises through the blocks
    cls = view.data[view.data.token == "CLS"].sort_values("block")["prob"].to_numpy()
    assert cls[-1] > cls[0] + 0.3


def test_topk_tokens_view_lists_the_most_confident_tokens_per_class(bundled):
    model, _, _, cache = bundled
    view = topk_tokens_view(model, cache, image_indices=[0, 3], k=3)
    _, component, props = _circuitsvis_call(_parse(view._repr_html_()))
    assert component == "TopkTokens"
    assert props["tokens"] == [model.layout.token_labels()] * 2
    assert props["firstDimensionName"] == "Block" and props["thirdDimensionName"] == "Class"
    # for image 3, block 5, class 7: the best token by a direct argmax over the projection
    from vit_embedding_lens.lens import ClassProjection

    probs = ClassProjection(model)(cache["blocks.5.hook_resid_post"][3]).softmax(-1)[:, 7]
    top = view.data[
        (view.data.image == 3)
        & (view.data.block == 5)
        & (view.data["class"] == 7)
        & (view.data.k == 0)
    ]
    assert top.position.item() == int(probs.argmax())
    assert top.token.item() == model.layout.token_labels()[int(probs.argmax())]


def test_save_cdn_and_errors(bundled, tmp_path):
    model, _, _, cache = bundled
    view = attention_view(model, cache, block=0, source="cdn")
    assert "unpkg.com/circuitsvis" in view.html()
    local = attention_view(model, cache, block=0, heads=[1])
    assert "unpkg.com" not in local.html()  # self-contained: works offline
    page = local.save(tmp_path / "attention.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    _parse(page)
    assert local.save(tmp_path / "attention.png").read_bytes().startswith(PNG_MAGIC)
    assert "InteractiveView" in repr(local)
    with pytest.raises(ValueError, match=".html or .png"):
        local.save(tmp_path / "attention.svg")
    with pytest.raises(ValueError, match="source"):
        InteractiveView(None, lambda: None, "x", source="web")
    with pytest.raises(ValueError, match="block="):
        attention_view(model, cache)
    with pytest.raises(ValueError, match="layout"):
        attention_view(model, torch.rand(2, 4, 10, 10))
    _, partial = model.run_with_cache(
        torch.zeros(1, 1, 28, 28), names_filter="blocks.0.hook_resid_post"
    )
    with pytest.raises(ValueError, match="names_filter"):
        class_probability_view(model, partial)
