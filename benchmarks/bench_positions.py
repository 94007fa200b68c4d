"""What the model's own 3-D rotary positions (``get_rope_index``, a Python loop over the rows with
host reads) cost inside a training step's forward, where transformers computes them from GPU tensors,
against the same call on the batch's CPU tensors (as the collator holds them). Qwen2-VL-2B config,
synthetic training batches (640×480 images at 448², 20 prompt + 24 caption tokens).

    python benchmarks/bench_positions.py [--batch 8 48 96]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts
from common import build_config, emit, processor_for, special_ids, synthetic_batch, versions  # noqa: E402


def timed(fn, device: str, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-2b")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 48, 96])
    args = ap.parse_args(argv)
    from transformers import AutoModelForImageTextToText

    cfg = build_config(args.arch, special_ids(processor_for(args.arch).tokenizer))
    with torch.device("meta"):  # get_rope_index reads only the config
        inner = AutoModelForImageTextToText.from_config(cfg).model
    config_dir = Path(tempfile.mkdtemp(prefix="jpcap-positions-"))
    cfg.save_pretrained(config_dir)  # synthetic_batch reads the special ids from it (no weights needed)
    emit({"bench": "positions", "versions": versions(), "arch": args.arch})
    for bs in args.batch:
        batch, _ = synthetic_batch(args.arch, bs, 448 * 448, model_dir=config_dir)
        keys = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
        row = {"bench": "positions", "batch": bs, "seq": batch["input_ids"].shape[1]}
        for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
            b = {k: batch[k].to(device) for k in keys}
            row[f"{device}_ms"] = round(1000 * timed(lambda b=b: inner.get_rope_index(**b), device), 2)
        emit(row)


if __name__ == "__main__":
    main()
