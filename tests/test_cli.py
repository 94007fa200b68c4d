"""The `jpcap` command: explicit dispatch, and every user-fixable error as one line naming the path and
the fix, exit code 2 (OS errors of any command are mapped in one place, cli.main)."""
import errno
import json
import os
import subprocess
import sys

import pytest

from jpcap_helpers.cli import COMMANDS, build_parser, main


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_every_command_is_in_the_table_and_parses():
    parser = build_parser()
    assert set(COMMANDS) == {"run", "prepare", "caption", "evaluate", "train", "sweep", "compare", "push", "params",
                             "toy-data", "models"}
    args = parser.parse_args(["train", "params/smoke.yaml", "--set", "train.max_steps=3", "--plan-only"])
    assert (args.command, args.overrides, args.plan_only) == ("train", ["train.max_steps=3"], True)


def test_a_file_where_the_output_folder_should_be(tmp_path, project_root, capsys):
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")
    rc = main(["run", "--params", str(project_root / "params" / "smoke.yaml"), "--only", "01",
               "--set", f"run.output_dir={blocker}"])
    assert rc == 2
    err = one_line(capsys)
    assert str(blocker) in err and "a file stands where a folder is needed" in err


def test_an_unwritable_output_folder(tmp_path, project_root, capsys, monkeypatch):
    from pathlib import Path

    real_mkdir = Path.mkdir
    target = tmp_path / "readonly"

    def mkdir(self, *a, **kw):
        if str(self).startswith(str(target)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc = main(["sweep", "--params", str(project_root / "params" / "smoke.yaml"),
               "--set", f"run.output_dir={target}", "--set", f"data.root={tmp_path / 'nodata'}"])
    assert rc == 2
    err = one_line(capsys)
    assert "jpcap sweep: error:" in err


def test_disk_full_while_writing_names_the_file(tmp_path, capsys, monkeypatch):
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"image_id": 1, "captions": ["赤い 丸"]}) + "\n", encoding="utf-8")
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"image_id": 1, "caption": "赤い 丸"}) + "\n", encoding="utf-8")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["evaluate", "--pred", str(pred), "--refs", str(refs), "--out", str(tmp_path / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Traceback" not in err


def test_a_locked_run_folder_is_one_line(tmp_path, project_root, capsys):
    from jpcap_helpers.io import LOCK_ENV

    hold = ("import sys, time\nfrom jpcap_helpers.io import run_lock\n"
            "with run_lock(sys.argv[1], 'train'):\n    print('holding', flush=True)\n    time.sleep(60)\n")
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "outputs" / "locked")],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        rc = main(["run", "--params", str(project_root / "params" / "smoke.yaml"), "--run-name", "locked",
                   "--only", "01", "--set", f"run.output_dir={tmp_path / 'outputs'}"])
        assert rc == 2
        err = one_line(capsys)
        assert f"in use by PID {holder.pid}" in err and "(train:" in err
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("argv, expected", [
    (["params", "missing.yaml"], "params file not found"),
    (["evaluate", "--pred", "nope.jsonl", "--refs", "nope.json"], "nope"),
    (["prepare", "--captions", "nope.json", "--images", ".", "--out", "o"], "nope.json"),
])
def test_missing_inputs_are_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert expected in one_line(capsys)


def test_offline_without_the_model_is_one_line_naming_it(tmp_path, project_root, capsys):
    """A newcomer offline (no hub, nothing cached): the model and the fix, not a traceback."""
    rc = main(["train", str(project_root / "params" / "smoke.yaml"), "--plan-only",
               "--set", "model.name=qwen2-vl-2b-instruct", "--set", f"run.output_dir={tmp_path}",
               "--set", f"data.root={tmp_path / 'data'}"])
    assert rc == 2
    err = one_line(capsys)
    assert "qwen2-vl-2b-instruct" in err and "not in the local cache" in err and "model.name" in err
