"""Keep the committed notebooks clean: py:percent source and .ipynb pair in sync, no outputs, no widget
state, exactly one ``parameters`` cell. ``python -m jpcap_helpers.notebooks check notebooks``."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def strip(path: str | Path) -> bool:
    """Remove outputs, execution counts and widget state from an .ipynb; True if it changed."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after, encoding="utf-8")
        return True
    return False


def _sources(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def check(folder: str | Path) -> list[str]:
    """Problems with the notebooks in ``folder`` (empty list = all good)."""
    import jupytext

    folder = Path(folder)
    problems = []
    py = {p.stem for p in folder.glob("*.py")}
    ipynb = {p.stem for p in folder.glob("*.ipynb")}
    for stem in sorted(py ^ ipynb):
        problems.append(f"{stem}: not paired (need both {stem}.py and {stem}.ipynb)")
    for stem in sorted(py & ipynb):
        text_nb = jupytext.read(folder / f"{stem}.py")
        json_nb = nbformat.read(folder / f"{stem}.ipynb", as_version=4)
        if _sources(text_nb) != _sources(json_nb):
            problems.append(f"{stem}: .py and .ipynb differ (run `make notebooks-sync`)")
        outputs = sum(len(c.get("outputs", [])) for c in json_nb.cells if c.cell_type == "code")
        if outputs:
            problems.append(f"{stem}.ipynb: {outputs} committed outputs")
        if "widgets" in json_nb.metadata:
            problems.append(f"{stem}.ipynb: widget state in metadata")
        tagged = sum("parameters" in c.metadata.get("tags", []) for c in json_nb.cells)
        if tagged != 1:
            problems.append(f"{stem}.ipynb: {tagged} cells tagged 'parameters' (papermill needs exactly one)")
        src = (folder / f"{stem}.py").read_text(encoding="utf-8")
        if "sys.path.append" in src or "sys.path.insert" in src:
            problems.append(f"{stem}.py: sys.path hack (install the package instead)")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "strip":
        for p in argv[1:]:
            if strip(p):
                print(f"stripped {p}")
        return 0
    if len(argv) == 2 and argv[0] == "check":
        problems = check(argv[1])
        for p in problems:
            print(p)
        return 1 if problems else 0
    print("usage: python -m jpcap_helpers.notebooks strip FILE.ipynb... | check FOLDER", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
