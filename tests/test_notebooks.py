"""Committed notebooks: paired with their py:percent source, no outputs, one parameters cell,
literals only in it, no sys.path hacks, the shared Colab/setup cell first."""
import ast

import jupytext
import pytest

from jpcap_helpers.notebooks import check
from jpcap_helpers.runner import NOTEBOOKS


def test_notebook_folder_is_clean(project_root):
    assert check(project_root / "notebooks") == []


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell_holds_literals_only(project_root, name):
    nb = jupytext.read(project_root / "notebooks" / f"{name}.py")
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    tree = ast.parse(cells[0].source)
    names = set()
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{name}: only assignments in the parameters cell"
        ast.literal_eval(node.value)  # raises if not a literal
        names |= {t.id for t in node.targets}
    assert {"params_file", "run_name", "overrides"} <= names


def test_every_notebook_starts_with_the_same_setup_cell(project_root):
    setups = set()
    for name in NOTEBOOKS:
        nb = jupytext.read(project_root / "notebooks" / f"{name}.py")
        code = [c.source for c in nb.cells if c.cell_type == "code"]
        assert "P = jpcap_helpers.setup(params_file, run_name, overrides)" in code[1]
        setups.add(code[1])
    assert len(setups) == 1


def test_set_repo_rewrites_every_url_in_one_go(tmp_path, project_root):
    import shutil

    from jpcap_helpers.notebooks import repo_url, set_repo

    (tmp_path / "notebooks").mkdir()
    shutil.copy(project_root / "pyproject.toml", tmp_path)
    for name in ("02_zero_shot.py", "02_zero_shot.ipynb"):
        shutil.copy(project_root / "notebooks" / name, tmp_path / "notebooks")
    set_repo(tmp_path / "notebooks", "https://github.com/student/jpcap-fork.git")
    assert repo_url(tmp_path) == "https://github.com/student/jpcap-fork"
    src = (tmp_path / "notebooks" / "02_zero_shot.py").read_text()
    assert "colab.research.google.com/github/student/jpcap-fork/blob/main/notebooks/02_zero_shot.ipynb" in src
    assert '"https://github.com/student/jpcap-fork", "/content/jpcap"' in src
    assert "YOUR-ACCOUNT" not in src


def test_check_reports_outputs_and_unpaired(tmp_path, project_root):
    import shutil

    import nbformat

    shutil.copy(project_root / "notebooks" / "05_ablations.py", tmp_path)
    shutil.copy(project_root / "notebooks" / "05_ablations.ipynb", tmp_path)
    shutil.copy(project_root / "notebooks" / "06_failure_cases.py", tmp_path)
    nb = nbformat.read(tmp_path / "05_ablations.ipynb", as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="hi")]
    nbformat.write(nb, tmp_path / "05_ablations.ipynb")
    problems = check(tmp_path)
    assert any("06_failure_cases: not paired" in p for p in problems)
    assert any("05_ablations.ipynb: 1 committed outputs" in p for p in problems)
