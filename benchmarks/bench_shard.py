"""Sharded captioning on several GPUs of one host (issue 18/20): `jpcap caption` over a folder of image
files under `accelerate launch --multi_gpu --num_processes N` for each N, against N = 1 in the same run.
Random weights of the real Qwen2-VL-2B shape (bf16, params/h100.yaml generation settings), COCO-like size
mix. The first N runs twice: "cold" pays compilation into inductor's on-disk cache; every later run is
"warm" (compiled kernels from that cache), but each process still captures its CUDA graphs per image
shape inside the timed engine seconds — the cost a one-shot evaluation pays on every GPU. Each process
runs whole batches of the one-GPU run (engine/sharding.py); ``seconds_per_process`` shows the balance. Rows are
compared with the one-GPU run's: same ids, none missing or doubled, and the share of equal captions.

``--warmup`` and ``--grid-buckets K`` set ``generation.warmup`` / ``generation.grid_buckets``: every row
then reports the engine's images/s after the warm-up (warm rate), the first-pass images/s that include
it (``first_pass_images_per_s``), ``warmup_seconds``, ``n_grids`` (distinct visual grids met, the most
any process met) and ``n_resized``. The cold run starts from an empty inductor cache of its own
(``--work``/inductor-…), so "cold" is cold however often the script ran before.

    python benchmarks/bench_shard.py --images 2048 --gpus 1 2 4 [--warmup] [--grid-buckets 4] [--cpu-threads 1 16]

``--cpu-threads N`` gives every run N torch CPU threads per process (without it the runs differ: one
thread per GPU process under ``accelerate launch``, every core for the one-GPU run); several values run
the GPU counts once per value, after one cold run. ``--reverse-gpus`` runs the
largest GPU count again with rank k on GPU N−1−k (does a slow process follow its rank or its GPU?).
``--concurrent-alone``
adds N plain one-GPU processes run at once, one per GPU, each over every file: if each is slower than the
one-GPU run alone, the processes slow each other down on this host whatever the sharding does.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, launch_prefix, random_model_dir, versions, write_images  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def caption_cli(model_dir: Path, images: Path, out: Path, batch: int, warmup: bool, grid_buckets: int) -> list[str]:
    """`jpcap caption` over the folder with the benchmark's settings (after the python or launcher prefix)."""
    return ["-m", "jpcap_helpers.cli", "caption", "--model", "qwen2-vl-2b-instruct", "--model-path", str(model_dir),
            "--images", str(images), "--out", str(out), "--params", str(ROOT / "params/h100.yaml"),
            "--set", "model.load_in_4bit=false", "--set", f"generation.batch_size={batch}",
            "--set", "generation.max_new_tokens=24", "--set", f"generation.warmup={'true' if warmup else 'false'}",
            "--set", f"generation.grid_buckets={grid_buckets}"]


def caption(model_dir: Path, images: Path, out: Path, gpus: int, batch: int, warmup: bool = False,
            grid_buckets: int = 0, env: dict | None = None, cpu_threads: int | None = None,
            reverse_gpus: bool = False) -> dict:
    launch, extra = launch_prefix(gpus, cpu_threads)
    if reverse_gpus:   # rank k on GPU gpus-1-k: does the slow process follow its rank or its GPU?
        extra["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in reversed(range(gpus)))
    start = time.perf_counter()
    res = subprocess.run(launch + caption_cli(model_dir, images, out, batch, warmup, grid_buckets), cwd=ROOT,
                         capture_output=True, text=True, env={**env, **extra})
    wall = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return summary_row(out, wall)


def concurrent_alone(model_dir: Path, images: Path, work: Path, n: int, batch: int, warmup: bool, grid_buckets: int,
                     env: dict, cpu_threads: int | None) -> list[dict]:
    """``n`` plain one-GPU processes at once, process k on GPU k (``CUDA_VISIBLE_DEVICES``), each captioning
    every file — the one-GPU run's exact batches, no launcher, no process group, no sharding: whether
    processes slow each other down on this host by themselves (compare each with the one-GPU rate)."""
    _, extra = launch_prefix(1, cpu_threads)
    running = []
    start = time.perf_counter()
    for k in range(n):
        out = work / f"alone-{n}-{k}" / "pred.jsonl"   # a folder each: one captioning run per folder
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob("pred*"):
            stale.unlink()
        cmd = [sys.executable] + caption_cli(model_dir, images, out, batch, warmup, grid_buckets)
        running.append((out, subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra, "CUDA_VISIBLE_DEVICES": str(k)},
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    results = []
    for out, proc in running:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(err[-3000:])
        results.append(summary_row(out, time.perf_counter() - start))
    return results


def summary_row(out: Path, wall: float) -> dict:
    """The benchmark's fields from a captioning run's ``.meta.json``."""
    meta = json.loads(out.with_suffix(".meta.json").read_text())["last_run"]
    warm_s = float(meta.get("warmup_seconds") or 0.0)
    return {"images_per_s": meta["images_per_s"], "engine_seconds": meta["seconds"], "warmup_seconds": warm_s,
            "first_pass_images_per_s": round(meta["n_done"] / (meta["seconds"] + warm_s), 3) if meta["n_done"] else 0.0,
            "n_grids": meta.get("n_grids"), "n_resized": meta.get("n_resized"), "wall_seconds": round(wall, 1),
            "processes": meta.get("processes"), "n_done": meta["n_done"], "peak_gpu_gib": meta["peak_gpu_gib"],
            "seconds_per_process": meta.get("seconds_per_process"), "n_done_per_process": meta.get("n_done_per_process"),
            "n_batches": meta.get("n_batches"),
            "fill_seconds": meta.get("fill_seconds_per_process") or meta.get("fill_seconds"),
            "slowest_batches": meta.get("slowest_batches_per_process") or meta.get("slowest_batches")}


def rows(path: Path) -> dict:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        out.setdefault(r["image_id"], []).append(r.get("caption"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--mix", default="coco", choices=["coco", "uniform"])
    ap.add_argument("--work", default="/tmp/jpcap-shard")
    ap.add_argument("--warmup", action="store_true", help="generation.warmup: compile/capture before the timed run")
    ap.add_argument("--grid-buckets", type=int, default=0, help="generation.grid_buckets K (0: off)")
    ap.add_argument("--concurrent-alone", action="store_true",
                    help="also: as many plain one-GPU processes as the largest --gpus, at once, each on its own GPU "
                         "and over every file (do processes slow each other down without sharding?)")
    ap.add_argument("--cpu-threads", type=int, nargs="+", default=[None],
                    help="torch CPU threads per process for every run; several values: the GPU counts again for "
                         "each, against that value's one-GPU run (default: accelerate launch gives each GPU "
                         "process 1, a one-GPU run keeps torch's default of every core)")
    ap.add_argument("--reverse-gpus", action="store_true",
                    help="also: the largest GPU count again with the GPUs in reverse order (rank 0 on the last GPU)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    model_dir = random_model_dir("qwen2-vl-2b")
    images = write_images(work / f"images-{args.mix}-{args.images}", args.images, args.mix)
    cache = work / f"inductor-{time.strftime('%Y%m%d-%H%M%S')}"   # empty: the first run is cold
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    emit({"bench": "shard", "versions": versions(), "images": args.images, "mix": args.mix, "batch": args.batch,
          "warmup": args.warmup, "grid_buckets": args.grid_buckets, "cpu_threads": args.cpu_threads})
    base = None
    for threads in args.cpu_threads:
        for gpus in args.gpus:
            first = threads == args.cpu_threads[0] and gpus == args.gpus[0]
            for phase in ("cold", "warm") if first else ("warm",):
                out = work / f"pred-{gpus}-{phase}.jsonl"
                for stale in work.glob(f"pred-{gpus}-{phase}*"):
                    stale.unlink()
                res = caption(model_dir, images, out, gpus, args.batch, args.warmup, args.grid_buckets, env, threads)
                got = rows(out)
                row = {"bench": "shard", "gpus": gpus, "phase": phase, "cpu_threads": threads, **res,
                       "rows": sum(len(v) for v in got.values()), "ids": len(got),
                       "doubled": sum(len(v) > 1 for v in got.values())}
                if phase == "warm":
                    if gpus == min(args.gpus):
                        base = (got, res["images_per_s"])
                    else:
                        same = sum(got.get(i, [None])[0] == c[0] for i, c in base[0].items())
                        row.update(speedup=round(res["images_per_s"] / base[1], 2), same_ids=set(got) == set(base[0]),
                                   equal_captions=round(same / max(1, len(base[0])), 4))
                emit(row)
    if args.reverse_gpus and max(args.gpus) > 1:
        gpus, threads = max(args.gpus), args.cpu_threads[-1]
        out = work / f"pred-{gpus}-reversed.jsonl"
        for stale in work.glob(f"{out.stem}*"):
            stale.unlink()
        res = caption(model_dir, images, out, gpus, args.batch, args.warmup, args.grid_buckets, env, threads,
                      reverse_gpus=True)
        emit({"bench": "shard", "gpus": gpus, "phase": "warm, GPUs in reverse order", "cpu_threads": threads, **res,
              "speedup": round(res["images_per_s"] / base[1], 2) if base else None})
    if args.concurrent_alone and max(args.gpus) > 1:   # against the last --cpu-threads value's one-GPU run
        n, threads = max(args.gpus), args.cpu_threads[-1]
        results = concurrent_alone(model_dir, images, work, n, args.batch, args.warmup, args.grid_buckets, env,
                                   threads)
        rates = [r["images_per_s"] for r in results]
        emit({"bench": "shard", "gpus": n, "phase": "concurrent one-GPU processes, every file each",
              "cpu_threads": threads, "images_per_s_per_process": rates,
              "vs_one_gpu_alone": [round(r / base[1], 3) for r in rates] if base else None,
              "warmup_seconds_per_process": [r["warmup_seconds"] for r in results],
              "wall_seconds": max(r["wall_seconds"] for r in results)})


if __name__ == "__main__":
    main()
