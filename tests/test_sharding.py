"""Captioning sharded over the processes of `accelerate launch` (engine/sharding.py): the merged file holds
exactly the rows of a one-process run; shards resume and a killed merge is finished by the next run.
The multi-process test runs two CPU processes (gloo) with the tiny Asagi folder of tests/test_asagi.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_asagi import build_asagi

from jpcap_helpers import io as jio
from jpcap_helpers.engine.sharding import caption_sharded, deal_batches, merge_shards, shard_path


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


def test_every_process_gets_its_whole_batches_and_the_whole_plan_for_its_warm_up(tmp_path, monkeypatch):
    from jpcap_helpers.engine import sharding

    class Group:
        def wait_for_everyone(self):
            pass

        def gather(self, obj):
            return [obj, obj]

    records = [{"image_id": i} for i in range(7)] + [{"image_id": 3}]   # a duplicate id
    jio.append_jsonl(tmp_path / "p.jsonl", [{"image_id": 0, "caption": "done"}])
    calls = []
    monkeypatch.setattr(sharding, "process_group", lambda: (1, 2, Group()))
    plan = lambda recs: [recs[:4], recs[4:]]  # noqa: E731
    caption_sharded(lambda shard, path, planned: calls.append((shard, path, planned)) or {"n_done": len(shard)},
                    records, tmp_path / "p.jsonl", plan)
    (shard, path, planned), = calls
    assert path == shard_path(tmp_path / "p.jsonl", 1, 2)
    # the run's batches (records not done, each once) for the warm-up; rank 1 captions its whole batch
    assert [[r["image_id"] for r in b] for b in planned] == [[1, 2, 3, 4], [5, 6]]
    assert [r["image_id"] for r in shard] == [5, 6]


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


def test_whole_batches_are_dealt_largest_first_to_the_shard_with_fewest_items():
    a, b, c, d, e = ["a0", "a1", "a2", "a3"], ["b0", "b1"], ["c0", "c1", "c2", "c3"], ["d0"], ["e0", "e1", "e2"]
    # 2 shards: a→0, c→1, e→0 (4 = 4 items, 1 = 1 batch: the lower rank), b→1, d→1
    assert deal_batches([a, b, c, d, e], 2) == [a + e, c + b + d]
    assert deal_batches([a, b, c, d, e], 3) == [a + d, c, e + b]
    assert deal_batches([a, b], 4) == [a, b, [], []]


# (width, height): 8 visual grids under the tiny model's 112² pixels, 4:3 landscape the most frequent
SIZES = [(140, 112)] * 9 + [(112, 140)] * 5 + [(112, 112)] * 3 + [(196, 56), (56, 196), (140, 84), (84, 140),
                                                                     (60, 60)]


def test_each_process_runs_whole_batches_of_the_one_gpu_run(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from jpcap_helpers.engine import pipeline, sharding
    from jpcap_helpers.models import REGISTRY

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    order = np.random.default_rng(0).permutation(len(SIZES))   # grids interleaved, as in a real split
    records = []
    for i in order:
        w, h = SIZES[i]
        Image.new("RGB", (w, h), (int(i) * 9, 80, 160)).save(tmp_path / f"p{i:02d}.png")
        records.append({"image_id": int(i), "file_name": f"p{i:02d}.png"})
    records.insert(7, {"image_id": 99, "file_name": "missing.png"})   # an error row, not a batch
    batch_size = 4

    def ids(batches):
        return [[r["image_id"] for r in batch] for batch in batches]

    def engine_batches(recs):   # what caption_records cuts its records into (the fast decoder's batches)
        ready, _ = pipeline.sort_by_visual_tokens(pipeline.pending_items(recs, set(), tmp_path).items, processor)
        return [[it.image_id for it in batch] for batch in pipeline.make_batches(ready, batch_size, one_grid=True)]

    def plan(recs):
        return pipeline.plan_batches(model, processor, REGISTRY["tiny-qwen2-vl"], recs, tmp_path, batch_size=batch_size)

    planned = ids(plan(records))
    assert planned[:-1] == engine_batches(records) and planned[-1] == [99]
    for world in (2, 3):
        shards = [sharding._my_shard(records, rank, world, plan)[0] for rank in range(world)]
        assert sorted(r["image_id"] for shard in shards for r in shard) == sorted(r["image_id"] for r in records)
        ran = [batch for shard in shards for batch in engine_batches(shard)]
        assert sorted(ran) == sorted(planned[:-1])   # every one-GPU batch once, none split
        # dealing single records instead splits the grids' tail batches: more, smaller batches
        assert sum(len(engine_batches(records[rank::world])) for rank in range(world)) > len(ran)


def _qwen_two_vs_one(tiny_model_dir, tmp_path, two: list[str], env: dict, processes: int = 2) -> None:
    """The tiny Qwen2-VL's fast decoder (fp32) over 40 images of 8 visual grids: ``two`` (a launcher of
    ``processes`` processes) writes exactly the one-process run's rows, and every process got work."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        w, h = SIZES[i % len(SIZES)]
        Image.fromarray((np.random.default_rng(i).random((h, w, 3)) * 255).astype("uint8")).save(images / f"p{i:02d}.png")
    base = ["-m", "jpcap_helpers.cli", "caption", "--model", "tiny-qwen2-vl", "--model-path", str(tiny_model_dir),
            "--images", str(images), "--set", "generation.batch_size=4", "--set", "generation.max_new_tokens=8",
            "--set", "model.precision=fp32", "--set", "model.max_pixels=12544", "--set", "model.min_pixels=3136"]
    for out, launcher in ((tmp_path / "one.jsonl", [sys.executable]), (tmp_path / "two.jsonl", two)):
        res = subprocess.run(launcher + base + ["--out", str(out)], capture_output=True, text=True, timeout=1200,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
        assert res.returncode == 0, res.stderr[-3000:]
    one = {r["image_id"]: (r["file_name"], r["caption"]) for r in jio.read_jsonl(tmp_path / "one.jsonl")}
    rows = list(jio.read_jsonl(tmp_path / "two.jsonl"))
    assert len(rows) == len(one) == 40 and {r["image_id"]: (r["file_name"], r["caption"]) for r in rows} == one
    meta = json.loads((tmp_path / "two.meta.json").read_text())["last_run"]
    assert meta["processes"] == processes and sum(meta["n_done_per_process"]) == 40
    assert len(meta["n_done_per_process"]) == processes and min(meta["n_done_per_process"]) > 0
    assert len(meta["fill_seconds_per_process"]) == processes and meta["fill_seconds"] == max(meta["fill_seconds_per_process"])
    assert meta["decoder"] == "static-cache greedy" and not list(tmp_path.glob("two.shard-*"))


@pytest.mark.slow
def test_two_cpu_processes_write_the_rows_of_one_with_the_fast_decoder(tiny_model_dir, tmp_path):
    _qwen_two_vs_one(tiny_model_dir, tmp_path, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc_per_node=2"],
                     {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("gpus", [2, 4], ids=["two_gpus", "four_gpus"])
def test_gpu_several_gpus_write_the_rows_of_one_gpu(tiny_model_dir, tmp_path, gpus):
    """`accelerate launch --multi_gpu` on 2 and on 4 GPUs (CUDA graphs; compiled where the GPU allows)."""
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs")
    _qwen_two_vs_one(tiny_model_dir, tmp_path, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                                f"--num_processes={gpus}", "--num_machines=1", "--mixed_precision=no",
                                                "--dynamo_backend=no"], {}, processes=gpus)
