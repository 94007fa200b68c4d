"""What one DDP step's gradient all-reduce costs on this host (issue 18: the 2-GPU training gap). Every
process all-reduces fp32 tensors of the trainable gradient's size — LoRA r32 on the top 6 layers + the
projector of Qwen2-VL-2B, 42.0 M parameters, ≈ 168 MB — in DDP's 25 MB buckets and in one piece, through
NCCL, and reports milliseconds and bus bandwidth (nccl-tests' definition: bytes × 2(n−1)/n ÷ time). With
``NCCL_DEBUG=INFO`` in the environment NCCL's log names the transport it chose (P2P/NVLink, SHM, NET);
``--nccl-log FILE`` keeps it. A step that waits tens of milliseconds beyond one GPU's step time cannot be
explained by the all-reduce if this shows about a millisecond.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_allreduce.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, versions  # noqa: E402

TRAINABLE = 42_000_000   # LoRA r32, top 6 layers + projector (run X2-3's trainable parameters)
BUCKET = 25 * 2 ** 20    # DDP's default bucket_cap_mb


def timed(fn, repeat: int) -> float:
    """Median milliseconds of ``fn`` over ``repeat`` calls, each synchronised."""
    out = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=TRAINABLE)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    whole = torch.ones(args.numel, device="cuda")
    per_bucket = BUCKET // 4
    buckets = list(whole.split(per_bucket))
    small = torch.ones(2, device="cuda")
    for _ in range(3):                      # NCCL's communicators and buffers are set up on first use
        dist.all_reduce(whole)
        dist.all_reduce(small)
    rows = {
        "one_piece_ms": timed(lambda: dist.all_reduce(whole), args.repeat),
        "buckets_ms": timed(lambda: [dist.all_reduce(b) for b in buckets], args.repeat),
        # the step's small host-read collectives (token count, loss + finiteness): latency only
        "two_floats_read_on_host_ms": timed(lambda: (dist.all_reduce(small), small.tolist()), args.repeat),
    }
    nbytes = args.numel * 4
    busbw = nbytes * 2 * (world - 1) / world / (rows["one_piece_ms"] / 1e3) / 1e9
    if rank == 0:
        emit({"bench": "allreduce", "versions": versions(), "world": world, "numel": args.numel,
              "megabytes": round(nbytes / 1e6, 1), "n_buckets": len(buckets),
              **{k: round(v, 3) for k, v in rows.items()}, "bus_gb_per_s": round(busbw, 1),
              "nccl": torch.cuda.nccl.version(), "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
