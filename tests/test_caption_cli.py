"""`jpcap caption`: one model over a processed split or a folder of photos into a resumable JSONL, from a
registry name with a local folder in its hub layout (--model-path); bad input is one line, exit 2."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from test_asagi import build_asagi

from jpcap_helpers import io as jio
from jpcap_helpers.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def asagi_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cap")
    build_asagi(root / "model", ["赤い丸が一つある。", "青い四角", "以下は、タスクを説明する指示です。"] * 10)
    photos = root / "photos"
    (photos / "trip").mkdir(parents=True)
    Image.new("RGB", (50, 40), (200, 20, 20)).save(photos / "a.jpg")
    Image.new("RGB", (40, 50), (20, 20, 200)).save(photos / "trip" / "b.png")
    (photos / "notes.txt").write_text("not an image")
    return root


def test_caption_a_folder_of_photos_then_resume(asagi_dir, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    argv = ["caption", "--model", "asagi-2b", "--model-path", str(asagi_dir / "model"),
            "--images", str(asagi_dir / "photos"), "--out", str(out), "--set", "generation.max_new_tokens=4"]
    assert main(argv) == 0
    rows = list(jio.read_jsonl(out))
    assert sorted(r["file_name"] for r in rows) == ["a.jpg", "trip/b.png"]
    assert all(r["model"] == "asagi-2b" and "error" not in r for r in rows)
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["model_id"] == "MIL-UT/Asagi-2B" and meta["contamination"] == "contaminated"
    assert meta["generation"]["max_new_tokens"] == 4 and meta["card_generation"]["num_beams"] == 5
    assert "2 captioned" in capsys.readouterr().out
    assert main(argv) == 0  # resumed: nothing new, no duplicate rows
    assert "0 captioned, 0 errors, 2 already done" in capsys.readouterr().out
    assert len(list(jio.read_jsonl(out))) == 2


def test_wrong_family_folder_is_one_line(asagi_dir, tmp_path, capsys):
    rc = main(["caption", "--model", "llava-jp-1.3b", "--model-path", str(asagi_dir / "model"),
               "--images", str(asagi_dir / "photos"), "--out", str(tmp_path / "p.jsonl")])
    err = _one_line(capsys)
    assert rc == 2 and "llava-jp-1.3b" in err and "holds a 'llava' model" in err and "toshi456" in err


def test_remote_code_without_opt_in_is_one_line(asagi_dir, tmp_path, capsys):
    rc = main(["caption", "--model", "japanese-stable-vlm", "--model-path", str(asagi_dir / "model"),
               "--images", str(asagi_dir / "photos"), "--out", str(tmp_path / "p.jsonl")])
    err = _one_line(capsys)
    assert rc == 2 and "model.trust_remote_code: [japanese-stable-vlm]" in err
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("extra,expected", [
    (["--split", "test"], "--split needs --params"),
    (["--images", "/nonexistent/photos"], "not a folder of images"),
])
def test_bad_sources_are_one_line(extra, expected, tmp_path, capsys):
    rc = main(["caption", "--model", "asagi-2b", "--out", str(tmp_path / "p.jsonl"), *extra])
    assert rc == 2 and expected in _one_line(capsys)


def test_missing_split_names_the_file(tmp_path, project_root, capsys):
    rc = main(["caption", "--model", "tiny-qwen2-vl", "--params", str(project_root / "params" / "smoke.yaml"),
               "--set", f"data.root={tmp_path / 'nodata'}", "--set", f"run.output_dir={tmp_path}",
               "--split", "nosuch", "--out", str(tmp_path / "p.jsonl")])
    err = _one_line(capsys)
    assert rc == 2 and "nosuch" in err and "does not exist" in err
