"""Build the notebooks from their plain-Python sources, without outputs.

Each ``notebooks/sources/NAME.py`` becomes ``notebooks/NAME.ipynb``. Cells are separated by lines
starting with ``# %%``; ``# %% [markdown]`` starts a Markdown cell whose lines are comments
(``# `` is stripped). Cell ids are derived from the position, so rebuilding an unchanged source
gives an identical file (the tests check that every notebook matches its source).

    python notebooks/build.py            # rebuild all
    python notebooks/build.py --check    # exit 1 if a notebook is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources"


def parse_cells(text: str) -> List[nbformat.NotebookNode]:
    """The cells of a ``# %%`` source file, in order (empty cells dropped)."""
    cells, kind, lines = [], None, []

    def flush() -> None:
        body = "\n".join(lines).strip("\n")
        if kind is not None and body.strip():
            if kind == "markdown":
                body = "\n".join(
                    line[2:] if line.startswith("# ") else line.lstrip("#")
                    for line in body.split("\n")
                )
                cells.append(nbformat.v4.new_markdown_cell(body))
            else:
                cells.append(nbformat.v4.new_code_cell(body))

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build_notebook(source: Path) -> nbformat.NotebookNode:
    """The notebook for one source file, with stable cell ids and no outputs."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = parse_cells(source.read_text(encoding="utf-8"))
    for i, cell in enumerate(notebook.cells):
        cell["id"] = f"{source.stem[:40]}-{i:03d}"
    notebook.metadata = {
        "kernelspec": {
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
            "name": "python3",
        },
        "language_info": {"name": "python"},
    }
    nbformat.validate(notebook)
    return notebook


def render(source: Path) -> str:
    return nbformat.writes(build_notebook(source)) + "\n"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the notebooks are up to date"
    )
    args = parser.parse_args(argv)
    stale = []
    for source in sorted(SOURCES.glob("*.py")):
        target = HERE / f"{source.stem}.ipynb"
        text = render(source)
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(target.name)
        else:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(HERE.parent)}")
    if stale:
        print(f"out of date (run python notebooks/build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
