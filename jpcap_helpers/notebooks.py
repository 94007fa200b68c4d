"""Keep the committed notebooks clean and Colab-ready: py:percent source and .ipynb pair in sync, no
outputs, no widget state, exactly one ``parameters`` cell, GPU-runtime metadata, and the repository URL
(``[project.urls] Repository`` in pyproject.toml, the one place it is set) in every install cell and
"Open in Colab" badge. ``python -m jpcap_helpers.notebooks check notebooks``;
``python -m jpcap_helpers.notebooks set-repo https://github.com/YOU/jpcap`` after forking."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

# what Colab reads to open a notebook on a GPU runtime (a T4 on the free tier)
COLAB_METADATA = {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []},
                  "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
_URL_RE = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+?(?=\.git|/blob/|\"|\)|\s|$)")
_BADGE_RE = re.compile(r"(colab\.research\.google\.com/github/)[\w.-]+/[\w.-]+(?=/blob/)")


def repo_url(project: str | Path | None = None) -> str:
    """The repository URL from pyproject.toml (``[project.urls] Repository``)."""
    import tomllib

    project = Path(project) if project else Path(__file__).resolve().parent.parent
    data = tomllib.loads((project / "pyproject.toml").read_text(encoding="utf-8"))
    return data["project"]["urls"]["Repository"].rstrip("/")


def colab_badge(url: str, stem: str) -> str:
    github = url.removeprefix("https://github.com/")
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/{github}/blob/main/notebooks/{stem}.ipynb)")


def set_repo(folder: str | Path, url: str) -> list[Path]:
    """Write ``url`` into pyproject.toml and every notebook source (install cell, badge)."""
    folder = Path(folder)
    changed = []
    url = url.rstrip("/").removesuffix(".git")
    for path in [folder.parent / "pyproject.toml", *sorted(folder.glob("*.py")), *sorted(folder.glob("*.ipynb"))]:
        text = path.read_text(encoding="utf-8")
        new = _BADGE_RE.sub(lambda m: m.group(1) + url.removeprefix("https://github.com/"), _URL_RE.sub(url, text))
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


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
    nb.metadata.update(COLAB_METADATA)
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
    url = repo_url(folder.parent) if (folder.parent / "pyproject.toml").exists() else None
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
        if any(json_nb.metadata.get(k) != v for k, v in COLAB_METADATA.items() if k != "kernelspec"):
            problems.append(f"{stem}.ipynb: no Colab GPU-runtime metadata (run `make notebooks-sync`)")
        if url is not None:
            found = set(_URL_RE.findall(src))
            if found != {url} or colab_badge(url, stem) not in src:
                problems.append(f"{stem}.py: repository URL or Colab badge differs from pyproject.toml's "
                                f"{url} (run `python -m jpcap_helpers.notebooks set-repo URL`)")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "strip":
        for p in argv[1:]:
            if strip(p):
                print(f"stripped {p}")
        return 0
    if len(argv) == 2 and argv[0] == "set-repo":
        folder = Path(__file__).resolve().parent.parent / "notebooks"
        for p in set_repo(folder, argv[1]):
            print(f"updated {p}")
        return 0
    if len(argv) == 2 and argv[0] == "check":
        problems = check(argv[1])
        for p in problems:
            print(p)
        return 1 if problems else 0
    print("usage: python -m jpcap_helpers.notebooks strip FILE.ipynb... | check FOLDER | set-repo URL", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
