"""The documentation: the strict mkdocs build (API pages generated from the docstrings, every
link and cross-reference resolved), proof that the configuration really fails on a broken
reference, and the executable examples of the guide pages run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mkdocs.yml"
#: pages whose ```python blocks are executed, in order, in one namespace per page (```py: shown
#: only)
EXECUTED_PAGES = ["quickstart.md", "guide/visualization.md"]

mkdocs = pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[dev]'")
pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed: pip install -e '.[dev]'")
yaml = pytest.importorskip("yaml", reason="PyYAML (a dependency of mkdocs) is not installed")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config),
            "--site-dir",
            str(site),
        ],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.mark.slow
def test_strict_build_succeeds(tmp_path):
    result = _build(CONFIG, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    # the API pages are generated from the docstrings, and Sphinx roles are rendered as code
    viz_page = (site / "api" / "viz" / "index.html").read_text()
    assert "token_class_predictions" in viz_page and "plot_identifiability_evolution" in viz_page
    assert ":func:" not in viz_page and ":class:" not in viz_page
    hooked = (site / "api" / "hooked_vit" / "index.html").read_text()
    assert "run_with_cache" in hooked and "from_timm" in hooked
    for page in [
        "install",
        "quickstart",
        "concepts/class-projection",
        "guide/reproducing",
        "guide/cli",
    ]:
        assert (site / page / "index.html").is_file(), page


@pytest.mark.slow
def test_the_configuration_fails_on_a_broken_reference(tmp_path):
    """Same plugins and strictness as mkdocs.yml, two pages: one fine, one with a dangling
    reference."""
    config = yaml.safe_load(CONFIG.read_text())
    plugin = next(p for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)
    handler = plugin["mkdocstrings"]["handlers"]["python"]
    handler["paths"] = [str(ROOT)]
    handler["options"]["extensions"] = [str(ROOT / e) for e in handler["options"]["extensions"]]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n::: vit_embedding_lens.model.layout.TokenLayout\n")
    config.update(docs_dir=str(docs), nav=[{"Home": "index.md"}])
    config.pop("exclude_docs", None)
    ok = tmp_path / "ok.yml"
    ok.write_text(yaml.safe_dump(config))
    assert _build(ok, tmp_path / "site_ok").returncode == 0

    (docs / "broken.md").write_text(
        "# Broken\n\nSee [a class that does not exist][vit_embedding_lens.NoSuchClass].\n"
    )
    config["nav"].append({"Broken": "broken.md"})
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump(config))
    result = _build(broken, tmp_path / "site_broken")
    assert result.returncode != 0
    assert "NoSuchClass" in result.stdout + result.stderr


def _python_blocks(page: Path) -> list:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@pytest.mark.slow
@pytest.mark.parametrize("page", EXECUTED_PAGES)
def test_page_examples_run(page):
    import matplotlib

    matplotlib.use("Agg")
    blocks = _python_blocks(ROOT / "docs" / page)
    assert blocks, f"no ```python blocks in {page}"
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page}[block {i}]", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message says which block broke
            raise AssertionError(f"{page}, code block {i} failed:\n{code}") from error


def test_every_page_is_in_the_nav():
    config = yaml.safe_load(CONFIG.read_text())

    def pages(entries):
        for entry in entries:
            value = entry if isinstance(entry, str) else next(iter(entry.values()))
            yield from (pages(value) if isinstance(value, list) else [value])

    in_nav = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk == in_nav
