"""Caption packing on toy data (CPU): the loss curve of unpacked training against packed training with all
of an image's captions per sample (``captions_per_image: 0``) or k of them, at about the same captions per
optimizer step, on the tiny random Qwen2-VL and jp-shapes.

    python benchmarks/toy_pack_k.py [--steps 300] [--out /tmp/jpcap-pack-k]

Prints one JSON line per run: training loss averaged over windows of steps, the final validation loss
(all captions of the validation images, unpacked), captions seen and seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, pack_captions, captions_per_image, effective batch): ≈ 16 captions per optimizer step each
RUNS = [("unpacked", False, 0, 16), ("packed, all captions", True, 0, 3), ("packed, k=2", True, 2, 8),
        ("packed, k=1", True, 1, 16)]


def prepare(out: Path) -> dict:
    """jp-shapes written as the data stage would: train/val jsonl and train_pairs.jsonl."""
    from jpcap_helpers.data import generate_jp_shapes
    from jpcap_helpers.io import atomic_write_jsonl

    root, processed = out / "jp-shapes", out / "processed"
    if not (processed / "train_pairs.jsonl").exists():
        generate_jp_shapes(root, n_train=480, n_val=40, n_yj=10, seed=0)
        for split in ("train", "val"):
            data = json.loads((root / f"stair_captions_v1.2_{split}.json").read_text(encoding="utf-8"))
            caps: dict[int, list[str]] = {}
            for a in data["annotations"]:
                caps.setdefault(a["image_id"], []).append(a["caption"])
            recs = [{"image_id": im["id"], "file_name": f"{split}2014/{im['file_name']}", "captions": caps[im["id"]]}
                    for im in data["images"]]
            atomic_write_jsonl(processed / f"{split}.jsonl", recs)
            if split == "train":
                atomic_write_jsonl(processed / "train_pairs.jsonl", [
                    {"image_id": r["image_id"], "file_name": r["file_name"], "caption": c}
                    for r in recs for c in r["captions"]])
    return {"root": root, "processed": processed, "models": out / "models", "outputs": out / "outputs"}


def params_for(paths: dict, name: str, pack: bool, k: int, effective: int, steps: int):
    from jpcap_helpers.params import Params

    p = Params()
    p.run.output_dir, p.run.name, p.run.seed = str(paths["outputs"]), name.replace(" ", "_").replace(",", ""), 0
    p.data.root, p.data.processed_dir = str(paths["root"]), str(paths["processed"])
    p.model.models_dir = str(paths["models"])
    p.model.min_pixels, p.model.max_pixels = 56 * 56, 112 * 112
    t = p.train
    t.top_k_layers, t.lora_rank, t.lora_alpha, t.lora_dropout = "all", 32, 32, 0.0
    t.learning_rate, t.warmup_ratio, t.gradient_checkpointing = 3e-3, 0.05, False
    t.micro_batch_size = t.effective_batch_size = effective
    t.max_steps, t.eval_every, t.eval_images, t.save_every = steps, steps, 40, 0
    t.pack_captions, t.captions_per_image = pack, k
    return p


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--out", default="/tmp/jpcap-pack-k")
    args = ap.parse_args(argv)
    from jpcap_helpers import train as T
    from jpcap_helpers.train import packing

    paths = prepare(Path(args.out))
    for name, pack, k, effective in RUNS:
        params = params_for(paths, name, pack, k, effective, args.steps)
        t0 = time.time()
        result = T.train(params, resume=False)
        pairs, _ = T.read_pairs(params)
        per_sample = len(pairs) / len(packing.PackedSamples(pairs, k, 0)) if pack else 1.0
        losses = [result.losses[s] for s in sorted(result.losses)]
        windows = {f"{i + 1}-{i + len(losses[i:i + args.window])}":
                   round(sum(losses[i:i + args.window]) / len(losses[i:i + args.window]), 3)
                   for i in range(0, len(losses), args.window)}
        print(json.dumps({"run": name, "captions_per_image": k, "effective_batch": effective,
                          "captions_per_step": round(effective * per_sample, 2),
                          "train_loss_by_steps": windows, "final_val_loss": round(result.final_val_loss, 4),
                          "final_val_CIDEr": result.final_val_cider, "seconds": round(time.time() - t0, 1)},
                         ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
