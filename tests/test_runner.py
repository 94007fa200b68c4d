"""The notebook runner: selection, parameter injection, failures named by notebook and cell."""
import json
import shutil

import nbformat
import pytest

from jpcap_helpers import runner
from jpcap_helpers.runner import NotebookFailed, run_notebooks, select


def test_select_by_number_or_name_keeps_run_order():
    assert select(None) == runner.NOTEBOOKS
    assert select("03,01") == ["01_data", "03_qlora_train"]
    assert select(["04_eval", "2"]) == ["02_zero_shot", "04_eval"]
    with pytest.raises(ValueError, match="no such notebook"):
        select("07")


def _project(tmp_path, project_root, cells: str):
    (tmp_path / "params").mkdir()
    shutil.copy(project_root / "params" / "smoke.yaml", tmp_path / "params" / "smoke.yaml")
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_data.py").write_text(cells, encoding="utf-8")
    return tmp_path / "params" / "smoke.yaml", nbdir


PARAMS_CELL = '''# %% tags=["parameters"]
params_file = "x"
run_name = "x"
overrides = {}
'''


def test_runs_notebook_injects_params_and_writes_executed_copy(tmp_path, project_root):
    params_file, nbdir = _project(tmp_path, project_root, PARAMS_CELL + '''
# %%
import json
import jpcap_helpers
P = jpcap_helpers.setup(params_file, run_name, overrides, report=False)
print(json.dumps({"run": P.run.name, "rank": P.train.lora_rank}))
''')
    results = run_notebooks(params_file, only="01", run_name="unit", overrides={"train.lora_rank": 4},
                            folder=nbdir, echo=lambda *_: None, progress_bar=False)
    out = results[0].output
    assert out == tmp_path / "outputs" / "unit" / "01_data.ipynb"
    nb = nbformat.read(out, as_version=4)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert json.loads(printed.strip().splitlines()[-1]) == {"run": "unit", "rank": 4}
    assert (tmp_path / "outputs" / "unit" / "params.yaml").exists()


def test_failure_names_notebook_and_cell(tmp_path, project_root):
    params_file, nbdir = _project(tmp_path, project_root, PARAMS_CELL + '''
# %%
x = 1

# %%
raise RuntimeError("boom in the third cell")
''')
    with pytest.raises(NotebookFailed, match=r"01_data failed in cell \d+ .*RuntimeError: boom in the third cell"):
        run_notebooks(params_file, only="01", folder=nbdir, echo=lambda *_: None, progress_bar=False)


def test_bad_params_stop_before_any_notebook(tmp_path, project_root):
    params_file, nbdir = _project(tmp_path, project_root, PARAMS_CELL + "# %%\nraise SystemExit('should not run')\n")
    from jpcap_helpers.params import ParamsError
    with pytest.raises(ParamsError, match="unknown key train.rank"):
        run_notebooks(params_file, overrides={"train.rank": 3}, folder=nbdir, echo=lambda *_: None)
    assert not (tmp_path / "outputs").exists()


def test_cli_exit_codes(tmp_path, project_root, capsys):
    from jpcap_helpers.cli import main

    assert main(["run", "--params", str(tmp_path / "missing.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err
