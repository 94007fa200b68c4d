"""Multi-GPU check: the same smoke params trained in one process and under `accelerate launch`
(DDP, one process per GPU) follow the same loss curve. Offline (tiny model + jp-shapes).

    python benchmarks/ddp_check.py [--gpus 2] [--steps 30] [--method lora|qlora]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--method", default="lora")
    args = ap.parse_args(argv)
    from jpcap_helpers import data, models
    from jpcap_helpers.params import load_params

    # no validation (eval_images 0), one checkpoint at the end
    base = ["train.micro_batch_size=8", "train.effective_batch_size=16", f"train.max_steps={args.steps}",
            "train.eval_images=0", f"train.save_every={args.steps}",
            f"model.load_in_4bit={'true' if args.method == 'qlora' else 'false'}"]
    params = load_params(ROOT / "params/smoke.yaml", {"run.name": "ddp-data"})
    data.fetch_raw(params)
    data.prepare_from_params(params, models.load_tokenizer(params), reject=models.processor_rejection, progress=False)
    losses = {}
    jpcap_train = ["-m", "jpcap_helpers.cli", "train"]
    for name, launcher in (("single", [sys.executable, *jpcap_train]),
                           (f"ddp{args.gpus}", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                                f"--num_processes={args.gpus}", *jpcap_train])):
        run = f"ddp-check-{args.method}-{name}"
        cmd = launcher + [str(ROOT / "params/smoke.yaml"), "--no-resume", "--run-name", run]
        for item in base:
            cmd += ["--set", item]
        res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True)
        print(res.stdout[-1500:], res.stderr[-3000:] if res.returncode else "", flush=True)
        log = Path(params.run.output_dir) / run / "train_log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        losses[name] = {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}
    single, ddp = losses["single"], losses[f"ddp{args.gpus}"]
    common = sorted(set(single) & set(ddp))
    diffs = [abs(single[s] - ddp[s]) for s in common]
    print(json.dumps({"bench": "ddp", "method": args.method, "gpus": args.gpus, "steps_compared": len(common),
                      "max_abs_loss_diff": max(diffs) if diffs else None,
                      "single_first_last": [single.get(common[0]), single.get(common[-1])] if common else None,
                      "ddp_first_last": [ddp.get(common[0]), ddp.get(common[-1])] if common else None}))


if __name__ == "__main__":
    main()
