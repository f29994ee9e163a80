"""Every notebook in notebooks/ runs top to bottom (nbclient, kernel ``python3``, cwd notebooks/),
offline, on the interpreter running the tests; stored notebooks carry no outputs and match their
``notebooks/sources/*.py`` when they have one. New notebooks are picked up automatically."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip(
    "nbformat", reason="nbformat is not installed: pip install -e '.[dev]'"
)
nbclient = pytest.importorskip(
    "nbclient", reason="nbclient is not installed: pip install -e '.[dev]'"
)
pytest.importorskip("ipykernel", reason="ipykernel is not installed: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
TIMEOUT_PER_CELL_S = 300


def _kernel_env() -> dict:
    """The test's environment, offline, with the repository importable and a headless backend."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _execute(notebook, env: dict):
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=TIMEOUT_PER_CELL_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # cwd of the kernel
        allow_errors=False,
    )
    original = dict(os.environ)
    os.environ.update(env)  # the kernel inherits the environment of its launcher
    try:
        return client.execute()
    finally:
        os.environ.clear()
        os.environ.update(original)


def test_notebooks_exist():
    assert NOTEBOOK_PATHS, "no notebooks found in notebooks/"


def test_the_kernel_is_the_running_interpreter():
    """nbclient's ``python3`` kernel must run this interpreter (the venv), not some other Python."""
    probe = nbformat.v4.new_notebook()
    probe.cells = [
        nbformat.v4.new_code_cell("import os, sys; print(sys.executable); print(os.getcwd())")
    ]
    done = _execute(probe, _kernel_env())
    executable, cwd = done.cells[0].outputs[0]["text"].split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(cwd).resolve() == NOTEBOOKS.resolve()


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.name for p in NOTEBOOK_PATHS])
def test_notebook_is_stored_clean_and_matches_its_source(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name}: strip the outputs"
            )
    source = NOTEBOOKS / "sources" / f"{path.stem}.py"
    if source.exists():
        spec = importlib.util.spec_from_file_location("_notebook_build", NOTEBOOKS / "build.py")
        build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
        assert path.read_text(encoding="utf-8") == build.render(source), (
            f"{path.name} is out of date with {source.name}: run python notebooks/build.py"
        )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=[p.name for p in NOTEBOOK_PATHS])
def test_notebook_runs_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)
    done = _execute(notebook, _kernel_env())
    code = [c for c in done.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    results = [
        o for c in code for o in c.outputs if o.output_type in ("execute_result", "display_data")
    ]
    # figures and views display as pictures, never as a bare "<Figure size ...>"
    for output in results:
        if output["data"].get("text/plain", "").startswith(("<Figure", "<InteractiveView")):
            assert "image/png" in output["data"], output["data"]["text/plain"]
