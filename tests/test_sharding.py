"""Captioning sharded over the processes of `accelerate launch` (engine/sharding.py): the merged file holds
exactly the rows of a one-process run; shards resume and a killed merge is finished by the next run.
The multi-process test runs two CPU processes (gloo) with the tiny Asagi folder of tests/test_asagi.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image
from test_asagi import build_asagi

from jpcap_helpers import io as jio
from jpcap_helpers.engine.sharding import caption_sharded, merge_shards, shard_path


def test_merge_appends_missing_ids_only_and_survives_a_killed_merge(tmp_path):
    out = tmp_path / "pred.jsonl"
    jio.append_jsonl(out, [{"image_id": 1, "caption": "a"}])
    jio.append_jsonl(shard_path(out, 0, 2), [{"image_id": 1, "caption": "dup"}, {"image_id": 2, "caption": "b"}])
    with open(shard_path(out, 1, 2), "w", encoding="utf-8") as f:
        f.write(json.dumps({"image_id": 3, "caption": "c"}) + "\n" + '{"image_id": 4, "cap')  # killed mid-line
    jio.append_jsonl(shard_path(out, 0, 4), [{"image_id": 5, "caption": "e"}])  # an earlier 4-GPU run's
    (tmp_path / "pred.shard-x.jsonl").write_text("not a shard of ours")
    assert merge_shards(out) == 3
    rows = list(jio.read_jsonl(out))
    assert [(r["image_id"], r["caption"]) for r in rows] == [(1, "a"), (2, "b"), (5, "e"), (3, "c")]
    assert not list(tmp_path.glob("pred.shard-*-of-*.jsonl")) and (tmp_path / "pred.shard-x.jsonl").exists()
    assert merge_shards(out) == 0


def test_one_process_is_a_plain_call(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seen = []
    summary = caption_sharded(lambda recs, path: seen.append((len(recs), path)) or {"n_done": len(recs)},
                              [{"image_id": i} for i in range(5)], tmp_path / "p.jsonl")
    assert seen == [(5, tmp_path / "p.jsonl")] and summary["processes"] == 1


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    build_asagi(root / "model", ["赤い丸が一つある。", "青い四角", "以下は、タスクを説明する指示です。"] * 10)
    for i in range(7):
        Image.new("RGB", (30 + 5 * i, 40), (30 * i, 200 - 20 * i, 90)).save(root / f"p{i}.png")
    return root


def _caption(photos, out, processes):
    # torchrun sets the same RANK/WORLD_SIZE as `accelerate launch --multi_gpu` (which needs GPUs);
    # accelerate's PartialState then joins a gloo group on the CPU
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m"] if processes > 1 else [sys.executable, "-m"]
    cmd = launcher + ["jpcap_helpers.cli", "caption", "--model", "asagi-2b", "--model-path", str(photos / "model"),
                      "--images", str(photos), "--out", str(out), "--set", "generation.max_new_tokens=5",
                      "--set", "generation.batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_two_processes_write_the_rows_of_one(photos, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    _caption(photos, one, 1)
    printed = _caption(photos, two, 2)
    rows_one = {r["image_id"]: (r["file_name"], r["caption"]) for r in jio.read_jsonl(one)}
    rows_two = list(jio.read_jsonl(two))
    assert len(rows_two) == len(rows_one) == 7                         # none missing, no duplicates
    assert {r["image_id"]: (r["file_name"], r["caption"]) for r in rows_two} == rows_one  # same captions
    assert "7 captioned" in printed and not list(tmp_path.glob("two.shard-*"))
    meta = json.loads(two.with_suffix(".meta.json").read_text())
    assert meta["last_run"]["processes"] == 2
