"""The demo's report and the circuitsvis views in a real browser (headless Chromium), offline.

What a newcomer sees: every figure of ``index.html`` loads, nothing is fetched from the network,
no console error is raised, and the interactive views render (their circuitsvis element gets
children). Chromium is Debian's ``chromium`` package driven by Playwright (its own browser download
is never used). In CI (``CI=true``) a missing browser or Playwright fails the test; elsewhere it is
skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

from vit_embedding_lens.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

IN_CI = os.environ.get("CI") == "true"
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def _chromium() -> str | None:
    explicit = os.environ.get("VIT_LENS_CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium under Playwright; skipped only outside CI when either is missing."""
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        missing = "chromium (apt-get install chromium)" if chromium is None else "playwright"
        if IN_CI:
            pytest.fail(f"{missing} is missing; .ci/run installs it, so the browser test must run")
        pytest.skip(f"{missing} is not installed (the test runs in CI)")
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox; a container's /dev/shm
        # may be too small for it
        launched = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()


def _visit(browser: Any, path: Path, wait_for: str | None = None) -> Dict[str, Any]:
    """Open ``path`` offline; return what was requested off the file system, the console errors
    and page errors, and the <img> elements' state."""
    context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})
    outside: List[str] = []

    def route(r: Any) -> None:
        url = r.request.url
        if url.startswith(("file://", "data:", "blob:", "about:")):
            r.continue_()
        else:
            outside.append(url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    errors: List[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on(
        "requestfailed",
        lambda r: errors.append(f"request failed: {r.url}") if r.url not in outside else None,
    )
    page.goto(path.resolve().as_uri(), wait_until="load")
    if wait_for:
        page.wait_for_function(wait_for, timeout=20_000)
    images = page.evaluate(
        "Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
        "complete: i.complete, width: i.naturalWidth}))"
    )
    state = {"outside": outside, "errors": errors, "images": images, "page": page}
    return state


RENDERED = (
    "() => { const els = document.querySelectorAll('[id^=\"circuits-vis-\"]');"
    " return els.length > 0 && Array.from(els).every(e => e.querySelector('canvas, svg, table,"
    " span, div') !== null && e.getBoundingClientRect().height > 20); }"
)


def test_demo_report_and_circuitsvis_views_work_offline_in_chromium(tmp_path, browser):
    out = tmp_path / "demo"
    assert main(["demo", "--n", "8", "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    index = out / "report" / "index.html"
    report = _visit(browser, index)
    figures = sorted((out / "report" / "figures").glob("*.png"))
    assert len(figures) >= 6  # every analysis of the demo draws at least one
    assert sorted(i["src"] for i in report["images"]) == sorted(
        f"figures/{p.name}" for p in figures
    )
    broken = [i["src"] for i in report["images"] if not (i["complete"] and i["width"] > 0)]
    assert broken == [], f"figures that did not load: {broken}"
    assert report["outside"] == [], f"the report asked the network for {report['outside']}"
    assert report["errors"] == [], f"console errors: {report['errors']}"
    text = report["page"].inner_text("body")
    # a newcomer's page: what each analysis shows, the stars' test, versions and command line
    assert "Wilcoxon" in text and "no correction" in text and "n = 8 images" in text
    assert "Run details" in text and "torch" in text and "--n 8" in text

    from vit_embedding_lens import HookedViT
    from vit_embedding_lens.viz import attention_view, class_probability_view, topk_tokens_view
    from vit_embedding_lens.zoo import load_mnist_eval

    model = HookedViT.from_bundled()
    images = load_mnist_eval().images[:2]
    with torch.no_grad():
        _, cache = model.run_with_cache(images)
    views = {
        "attention": attention_view(model, cache, block=1),
        "class_probability": class_probability_view(model, cache, image_index=1),
        "topk": topk_tokens_view(model, cache, k=3),
    }
    for name, view in views.items():
        page_path = view.save(tmp_path / f"{name}.html")
        state = _visit(browser, page_path, wait_for=RENDERED)
        assert state["outside"] == [], f"{name} asked the network for {state['outside']}"
        assert state["errors"] == [], f"{name}: console errors {state['errors']}"
        children = state["page"].evaluate(
            "document.querySelector('[id^=\"circuits-vis-\"]').querySelectorAll('*').length"
        )
        assert children > 5, f"{name}: the circuitsvis element rendered {children} elements"


def test_the_browser_checks_catch_network_requests_broken_figures_and_console_errors(
    tmp_path, browser
):
    """The checks above can fail: a remote script and image, a missing figure and a console
    error are all reported, and an unrendered circuitsvis element is not taken as rendered."""
    page_path = tmp_path / "bad.html"
    page_path.write_text(
        "<!doctype html><html><body><img src='figures/missing.png'>"
        "<img src='https://example.com/x.png'><script src='http://example.com/x.js'></script>"
        "<div id='circuits-vis-0'></div><script>console.error('boom')</script></body></html>",
        encoding="utf-8",
    )
    state = _visit(browser, page_path)
    assert sorted(state["outside"]) == ["http://example.com/x.js", "https://example.com/x.png"]
    assert "boom" in state["errors"]
    assert [i["width"] for i in state["images"]] == [0, 0]
    assert state["page"].evaluate(RENDERED) is False


PLOTLY_RENDERED = (
    "() => { const plots = document.querySelectorAll('.js-plotly-plot');"
    " return plots.length > 0 && Array.from(plots).every(p => p.querySelector('svg.main-svg')"
    " !== null && p.getBoundingClientRect().height > 100); }"
)


def test_circuit_graph_renders_offline_in_the_report_and_alone(tmp_path, browser):
    """The circuit graph (plotly, its JavaScript inlined) draws in the report and in a saved
    view with the network off: an SVG with one path per edge, nothing fetched, no console error."""
    import pandas as pd

    from vit_embedding_lens.report import write_report
    from vit_embedding_lens.viz.circuit import circuit_view

    edges = pd.DataFrame(
        [("embed", "a0.h1", 0.8), ("a0.h1", "m0", -0.4), ("m0", "m1", 0.5), ("m1", "logits", 1.0)],
        columns=["sender", "receiver", "score"],
    )
    view = circuit_view(edges, n_layers=2, n_heads=2, title="a circuit")
    index = write_report(
        tmp_path / "report", {"circuits": {"edges": edges}}, {"circuits": {"graph": view}}
    )
    for path in (index, view.save(tmp_path / "circuit.html")):
        state = _visit(browser, path, wait_for=PLOTLY_RENDERED)
        assert state["outside"] == [], f"{path.name} asked the network for {state['outside']}"
        assert state["errors"] == [], f"{path.name}: console errors {state['errors']}"
        n_edges = state["page"].evaluate(
            "document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length"
        )
        assert n_edges >= len(edges) + 1  # one trace per edge, and the nodes'
