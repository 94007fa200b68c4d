"""DDP training throughput (issue 18/20): `jpcap train` on 1, 2, 4 … GPUs under `accelerate launch`,
final defaults (bf16, compile, lean activations; QLoRA or LoRA r32 on the top 6 layers + projector),
random weights of the real Qwen2-VL-2B shape, jp-shapes captions on COCO-like image sizes (640×480,
480×640, 640×427; ≤ 448² pixels → ≤ 256 image tokens). Micro-batch 8 per GPU (``--micro``), no accumulation (global
batch micro × GPUs); ``--pack``: a sample is an image with all its captions (``captions_per_s`` too).
samples/s = the train log's global rate, median over steps after --skip (compilation
and graph capture excluded; reported apart as the first steps' seconds). Each run also prints the plan's
ETA against the measured run time (row ``ddp-eta``: issue 18's honest probe).
The jp-shapes training set is sized so every run's steps fit in one epoch (``n_train``): a new epoch starts
the loader's workers again (run X2-3's step 16, the first of its second epoch, took 0.86 s). ``data_s``: the
seconds a step waited for its micro-batches (rank 0's train log).

    python benchmarks/bench_ddp.py --gpus 1 2 4 --method qlora --steps 40
    python benchmarks/bench_ddp.py --gpus 1 --mix coco --group-by-grid both   # the COCO-like mix, grouped or not
    python benchmarks/bench_ddp.py --gpus 1 --group-by-grid on --set train.lora_dropout=0.05   # + any override
    python benchmarks/bench_ddp.py --gpus 1 2 --pack --micro 16          # h100.yaml's packed recipe
    python benchmarks/bench_ddp.py --gpus 1 2 --concurrent-alone        # + 2 lone one-GPU runs at once
    python benchmarks/bench_ddp.py --gpus 1 2 --same-batches            # + 2 GPUs with equal work per rank
    python benchmarks/bench_ddp.py --gpus 2 1 --pack --micro 16 --broadcast-buffers --trace   # + DDP as before
                         # X2-10 (buffer broadcast on); per-rank forward/backward/step times (row ddp-trace)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COCO_LIKE_SIZES, emit, launch_prefix, random_model_dir, versions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def image_sizes(mix: str) -> list[list[int]]:
    """The jp-shapes image sizes of ``mix``: ``three`` (640×480, 480×640, 640×427), ``coco`` (the 14 sizes of
    ``common.COCO_LIKE_SIZES``, each repeated by its share in percent: the toy data draws uniformly from the
    list) or ``uniform`` (640×480 only)."""
    if mix == "coco":
        return [[w, h] for (w, h), share in COCO_LIKE_SIZES.items() for _ in range(round(100 * share))]
    return [[640, 480]] if mix == "uniform" else [[640, 480], [480, 640], [640, 427]]


def overrides(model_dir: Path, method: str, gpus: int, steps: int, micro: int, mix: str = "three",
              group_by_grid: bool = False, pack: bool = False, n_train: int = 480) -> list[str]:
    """``n_train`` jp-shapes training images: enough for every run's steps in one epoch (``train_images``),
    so no timed step pays the next epoch's loader start."""
    sizes = json.dumps(image_sizes(mix), separators=(",", ":"))
    root = "outputs/data/jp-shapes-bench" + ("" if mix == "three" else f"-{mix}") + ("" if n_train == 480 else f"-{n_train}")
    return [f"model.name={model_dir}", f"model.load_in_4bit={'true' if method == 'qlora' else 'false'}",
            "model.max_pixels=200704", "model.min_pixels=3136", "run.cpu_threads=null",
            f"data.root={root}", f"data.toy.image_sizes={sizes}", f"data.toy.n_train={n_train}", "data.max_caption_tokens=32",
            f"train.group_by_grid={'true' if group_by_grid else 'false'}",
            f"train.pack_captions={'true' if pack else 'false'}",
            f"train.micro_batch_size={micro}", f"train.effective_batch_size={micro * gpus}",
            f"train.max_steps={steps}", "train.eval_images=0", f"train.save_every={steps}", "train.top_k_layers=6",
            "train.learning_rate=2.0e-4", "train.gradient_checkpointing=false", "train.epochs=50"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--mix", default="three", choices=["three", "coco", "uniform"],
                    help="image sizes of the training images (coco: the 14-size COCO-like mix, weighted)")
    ap.add_argument("--group-by-grid", default="off", choices=["off", "on", "both"],
                    help="train.group_by_grid; both: each GPU count ungrouped, then grouped (same data)")
    ap.add_argument("--compile-static", action="store_true",
                    help="baseline: language layers compiled specialised (recompiled on new shapes), limit 8")
    ap.add_argument("--pack", action="store_true",
                    help="train.pack_captions (h100.yaml's default): a sample is an image with all its captions")
    ap.add_argument("--keep-logs", default=None, help="folder for each train command's stdout and stderr")
    ap.add_argument("--same-batches", action="store_true",
                    help="also: each GPU count > 1 again with every rank drawing rank 0's micro-batches (equal "
                         "work per GPU: is the DDP gap the ranks' unequal shares?)")
    ap.add_argument("--broadcast-buffers", action="store_true",
                    help="also: each GPU count > 1 again with DDP's per-forward buffer broadcast on (torch's "
                         "default; the trainer's before run X2-10), right after the same count's default run")
    ap.add_argument("--no-ddp-optimizer", action="store_true",
                    help="also: each GPU count > 1 again with dynamo's DDP optimizer off (on: torch's default and "
                         "the trainer's; it splits compiled graphs at DDP's bucket sizes)")
    ap.add_argument("--trace", action="store_true",
                    help="also write each rank's per-step GPU times (forward, backward incl. DDP's wait, step) and "
                         "host waits (train_variant.py --trace) and emit their medians (row ddp-trace)")
    ap.add_argument("--concurrent-alone", action="store_true",
                    help="also: as many plain one-GPU runs as the largest --gpus, at once, one per GPU, each the "
                         "one-GPU run's work (do processes slow each other down on this host without DDP?)")
    ap.add_argument("--cudagraphs", default="off", choices=["off", "on", "both"],
                    help="runs with train.cudagraphs (compiled blocks as CUDA graphs; needs --group-by-grid on), "
                         "on every GPU count; both: each GPU count without, then with (variant cg)")
    ap.add_argument("--cpu-affinity", action="store_true",
                    help="also: each GPU count > 1 again under `accelerate launch --enable_cpu_affinity` (each "
                         "process pinned to its GPU's NUMA-local cores; needs nvidia-ml-py), right after the same "
                         "count's default run (variant aff)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="a further params override for every run (e.g. train.lora_dropout=0.05), after the bench's")
    ap.add_argument("--cpu-threads", type=int, default=None,
                    help="torch CPU threads per process for every run (default: accelerate launch gives each GPU "
                         "process 1, a one-GPU run keeps torch's default of every core)")
    args = ap.parse_args(argv)
    if args.cudagraphs != "off" and args.group_by_grid != "on":
        ap.error("--cudagraphs needs --group-by-grid on (train.cudagraphs records one graph per batch shape)")
    from jpcap_helpers import data, models
    from jpcap_helpers.params import load_params

    model_dir = random_model_dir("qwen2-vl-2b")
    n_train = train_images(args.steps, args.micro, max(args.gpus))
    base = overrides(model_dir, args.method, 1, args.steps, args.micro, args.mix, n_train=n_train)
    from jpcap_helpers.params import parse_overrides
    params = load_params(ROOT / "params/smoke.yaml", {**parse_overrides(base), "run.name": "ddp-bench-data"})
    data.fetch_raw(params)
    data.prepare_from_params(params, models.load_tokenizer(params), reject=models.processor_rejection, progress=False)
    emit({"bench": "ddp", "versions": versions(), "method": args.method, "micro_per_gpu": args.micro,
          "mix": args.mix, "pack_captions": args.pack, "cpu_threads": args.cpu_threads, "image_sizes": sorted({tuple(s) for s in image_sizes(args.mix)})})
    groupings = {"off": [False], "on": [True], "both": [False, True]}[args.group_by_grid]
    rates, variant_rates = {}, {}
    single = {"off": [None], "on": ["cg"], "both": [None, "cg"]}[args.cudagraphs]
    multi = (single + (["same"] if args.same_batches else []) + (["buf"] if args.broadcast_buffers else [])
             + (["noddpopt"] if args.no_ddp_optimizer else []) + (["aff"] if args.cpu_affinity else []))
    variants = ((g, b, v) for g in args.gpus for b in groupings for v in (multi if g > 1 else single))
    for gpus, grouped, variant in variants:
        same = variant == "same"
        run = f"ddp-bench-{args.method}-{gpus}" + ("-grouped" if grouped else "") + ("-pack" if args.pack else "") + ("-static" if args.compile_static else "") + (f"-{variant}" if variant else "")
        launch, extra_env = launch_prefix(gpus, args.cpu_threads, cpu_affinity=variant == "aff")
        patches = [flag for flag, on in (("--compile-static", args.compile_static), ("--same-batches", same),
                                          ("--broadcast-buffers", variant == "buf"), ("--no-ddp-optimizer", variant == "noddpopt"),
                                          ("--trace", args.trace)) if on]
        entry = [str(ROOT / "benchmarks/train_variant.py"), *patches, "train"] if patches else ["-m", "jpcap_helpers.cli", "train"]
        cmd = launch + entry + [str(ROOT / "params/smoke.yaml"), "--no-resume", "--run-name", run]
        for item in overrides(model_dir, args.method, gpus, args.steps, args.micro, args.mix, grouped, args.pack,
                              n_train) + args.extra + (["train.cudagraphs=true"] if variant == "cg" else []):
            cmd += ["--set", item]
        t = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **extra_env}, capture_output=True, text=True)
        wall = time.perf_counter() - t
        keep_log(args.keep_logs, run, res.stdout, res.stderr)
        if res.returncode:
            emit({"bench": "ddp", "gpus": gpus, "error": res.stderr[-1500:]})
            continue
        log = Path(params.run.output_dir) / run / "train_log.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        steps = [r for r in rows if r.get("samples_per_s") is not None]
        warm = [r for r in steps if r["step"] > args.skip]
        first = [r for r in steps if r["step"] <= 2]
        batch = lambda r, g=gpus: r.get("global_batch", args.micro * g)  # noqa: E731
        rate = statistics.median(r["samples_per_s"] for r in warm)
        (rates if variant is None else variant_rates)[gpus, grouped, variant] = rate
        captions = [r["captions_per_s"] for r in warm if r.get("captions_per_s") is not None]
        data_s = [r["data_s"] for r in warm if r.get("data_s") is not None]
        one = rates.get((min(args.gpus), grouped, None))   # None until the smallest count has run
        emit({"bench": "ddp", "method": args.method, "mix": args.mix, "group_by_grid": grouped, "pack_captions": args.pack,
              "micro_per_gpu": args.micro, "gpus": gpus, "same_batches_on_every_rank": same,
              "broadcast_buffers": variant == "buf", "ddp_optimizer": variant != "noddpopt",
              "cpu_affinity": variant == "aff", "compile": "static (before ETA-2's fix)" if args.compile_static else
              ("blocks as CUDA graphs (train.cudagraphs)" if variant == "cg" else "default"), "set": args.extra,
              "samples_per_s": round(rate, 2),
              # all samples over all seconds of the steps after --skip: slow steps (a recompilation) count
              "mean_samples_per_s": round(sum(map(batch, warm)) / sum(batch(r) / r["samples_per_s"] for r in warm), 2),
              "captions_per_s": round(statistics.median(captions), 2) if captions else None,
              "per_gpu": round(rate / gpus, 2), "speedup": round(rate / one, 2) if one else None,
              "first_steps_s": [round(batch(r) / r["samples_per_s"], 2) for r in first],
              # seconds a step waited for its micro-batches (rank 0): median and worst after --skip
              "data_s_median_max": [round(statistics.median(data_s), 4), round(max(data_s), 4)] if data_s else None,
              "epochs_run": round(steps[-1].get("epoch", 0.0), 2), "n_train": n_train,
              "losses_first_last": [steps[0]["loss"], steps[-1]["loss"]], "wall_s": round(wall, 1)})
        if args.trace:
            emit({"bench": "ddp-trace", "gpus": gpus, "method": args.method, "pack_captions": args.pack,
                  "same_batches_on_every_rank": same, "broadcast_buffers": variant == "buf",
                  "ddp_optimizer": variant != "noddpopt", **trace_summary(Path(params.run.output_dir) / run, args.skip)})
        emit({**eta_check(Path(params.run.output_dir) / run, gpus), "mix": args.mix, "group_by_grid": grouped, "set": args.extra,
              "compile_static": args.compile_static, "cudagraphs": variant == "cg"})

    ones = {grouped: r for (g, grouped, _), r in rates.items() if g == 1}
    if ones:   # each run against the call's one-GPU run, whatever the order of --gpus
        emit({"bench": "ddp-summary", "method": args.method, "pack_captions": args.pack, "order": args.gpus,
               "runs": [{"gpus": g, "group_by_grid": grouped, "variant": v or "default", "samples_per_s": round(r, 2),
                         "vs_one_gpu": round(r / ones[grouped], 3) if grouped in ones else None}
                        for (g, grouped, v), r in {**rates, **variant_rates}.items()]})
    if args.concurrent_alone and max(args.gpus) > 1:
        concurrent_alone(args, model_dir, n_train, max(args.gpus), Path(params.run.output_dir), rates.get((1, False, None)))


def keep_log(folder: str | None, run: str, stdout: str, stderr: str) -> None:
    """The train command's own output (e.g. under TORCH_LOGS=recompiles) in ``folder``/``run``.log."""
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{run}.log").write_text(stdout + "\n--- stderr ---\n" + stderr)


def concurrent_alone(args: argparse.Namespace, model_dir: Path, n_train: int, n: int, output_dir: Path,
                     one_gpu: float | None) -> None:
    """``n`` plain one-GPU training runs at once, run k on GPU k (``CUDA_VISIBLE_DEVICES``), each the one-GPU
    run's work: no launcher, no process group, no gradient all-reduce. If each is slower than the one-GPU
    run alone, the processes slow each other down on this host (CPU, loader workers, memory) whatever DDP
    does; if not, the 2-GPU gap lies in DDP itself (collectives, waiting for the slower rank)."""
    _, extra = launch_prefix(1, args.cpu_threads)
    running = []
    for k in range(n):
        run = f"ddp-bench-{args.method}-alone-{n}-{k}" + ("-pack" if args.pack else "")
        entry = [str(ROOT / "benchmarks/train_variant.py"), "--trace"] if args.trace else ["-m", "jpcap_helpers.cli"]
        cmd = [sys.executable, *entry, "train", str(ROOT / "params/smoke.yaml"), "--no-resume", "--run-name", run]
        for item in overrides(model_dir, args.method, 1, args.steps, args.micro, args.mix, False, args.pack, n_train):
            cmd += ["--set", item]
        running.append((run, subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **extra, "CUDA_VISIBLE_DEVICES": str(k)},
                                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    medians, traces = [], []
    for run, proc in running:
        out, err = proc.communicate()
        keep_log(args.keep_logs, run, out, err)
        if proc.returncode:
            emit({"bench": "ddp", "phase": "concurrent alone", "error": err[-1500:]})
            return
        rows = [json.loads(line) for line in (output_dir / run / "train_log.jsonl").read_text().splitlines()]
        medians.append(statistics.median(r["samples_per_s"] for r in rows
                                         if r.get("samples_per_s") is not None and r["step"] > args.skip))
        if args.trace:
            traces.append(trace_summary(output_dir / run, args.skip)["rank0"])
    emit({"bench": "ddp", "phase": "concurrent one-GPU runs, one per GPU", "method": args.method, "mix": args.mix,
          "pack_captions": args.pack, "micro_per_gpu": args.micro, "gpus": n, "cpu_threads": args.cpu_threads,
          "samples_per_s_per_process": [round(m, 2) for m in medians],
          "vs_one_gpu_alone": [round(m / one_gpu, 3) for m in medians] if one_gpu else None,
          **({"trace_per_process": traces} if traces else {})})


def trace_summary(run_dir: Path, skip: int) -> dict:
    """Medians over the steps after ``skip`` of each rank's trace (train_variant.py --trace): GPU ms of the
    step's forwards and backwards (a DDP backward includes waiting for the other ranks' gradients), of the
    whole step (first forward to the next step's) and of its GPU idle part (``gap``: the step's time not
    covered by its own work), host seconds of its three pieces, its sequence tokens (B×L summed over
    micro-batches) and image patches; under DDP also the per-step spread of the forwards across ranks."""
    ranks = sorted(run_dir.glob("trace-rank*.jsonl"))
    rows = {int(p.stem.removeprefix("trace-rank")): [json.loads(x) for x in p.read_text().splitlines()][skip:]
            for p in ranks}
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    out: dict = {"steps": min((len(v) for v in rows.values()), default=0)}
    for r, steps in sorted(rows.items()):
        out[f"rank{r}"] = {
            "fwd_ms": med([sum(s["fwd_ms"]) for s in steps]), "bwd_ms": med([sum(s["bwd_ms"]) for s in steps]),
            "gpu_step_ms": med([s["gpu_step_ms"] for s in steps]),
            "gap_ms": med([s["gpu_step_ms"] - s["gpu_own_ms"] for s in steps]),
            "host_count_s": med([s["host_count_s"] for s in steps]), "host_fb_s": med([s["host_fb_s"] for s in steps]),
            "host_clip_s": med([s["host_clip_s"] for s in steps]),
            "seq_tokens": med([sum(m["tokens"][0] * m["tokens"][1] for m in s["micro"]) for s in steps]),
            "patches": med([sum(m["patches"] for m in s["micro"]) for s in steps])}
    if len(rows) > 1:
        n = out["steps"]
        per_step = [[sum(rows[r][k]["fwd_ms"]) for r in rows] for k in range(n)]
        out["fwd_spread_ms"] = med([max(v) - min(v) for v in per_step])
        bwd = [[sum(rows[r][k]["bwd_ms"]) for r in rows] for k in range(n)]
        out["bwd_spread_ms"] = med([max(v) - min(v) for v in bwd])
    return out


def train_images(steps: int, micro: int, gpus: int) -> int:
    """Training images so that ``steps`` steps of ``micro`` × ``gpus`` samples (the probe's few more) fit
    in one epoch: at least the smoke data's 480."""
    return max(480, (steps + 8) * micro * gpus)


def eta_check(run_dir: Path, gpus: int) -> dict:
    """The plan's ETA (train_plan.json: steady steps + the probe's warm-up once) against the measured run:
    train_result.json's seconds (after the probe, whose warm-up the run then no longer pays) and those
    plus the probe's warm-up (what a fresh process pays in all); and where the run's seconds went (the
    steps' sum, the five slowest steps, the time outside the steps)."""
    plan = json.loads((run_dir / "train_plan.json").read_text())
    result = json.loads((run_dir / "train_result.json").read_text())
    run_s, warm_s = float(result["seconds"]), float(plan.get("probe_warmup_s", 0.0))
    row = {"bench": "ddp-eta", "gpus": gpus, "eta_s": round(plan["eta_s"], 1), "steady_s": round(plan.get("steady_s") or 0.0, 1),
           "probe_step_s": round(plan["step_s"], 4), "probe_warmup_s": round(warm_s, 1),
           "probe_warmup_micro_batches": plan.get("probe_warmup_micro_batches"),
           "probe_warmup_extra_s": plan.get("probe_warmup_extra_s"), "measured_run_s": round(run_s, 1),
           "measured_probe_warmup_plus_run_s": round(run_s + warm_s, 1)}
    row["eta_over_measured"] = round(plan["eta_s"] / max(run_s + warm_s, 1e-9), 2)
    # where the run's seconds went: the steps themselves (the slowest named: a compilation after the probe
    # shows there) and what lies outside them (data loader start, checkpoint writes)
    steps = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    timed = [(r["step"], r.get("global_batch", plan["effective_batch_size"]) / r["samples_per_s"])
             for r in steps if r.get("samples_per_s")]
    row["steps_sum_s"] = round(sum(s for _, s in timed), 1)
    row["outside_steps_s"] = round(run_s - row["steps_sum_s"], 1)
    row["slowest_steps_s"] = [(k, round(s, 2)) for k, s in sorted(timed, key=lambda ks: -ks[1])[:5]]
    if plan.get("steady_s") is not None:
        row["steady_over_run"] = round(plan["steady_s"] / max(run_s, 1e-9), 2)
    print(f"ETA check ({gpus} GPU): plan said {plan['eta_s']:.1f} s (steady {plan.get('steady_s') or 0:.1f} s + "
          f"warm-up {plan.get('probe_warmup_extra_s') or 0:.1f} s once); measured {run_s:.1f} s of steps after a "
          f"{warm_s:.1f} s probe warm-up → ETA / (warm-up + run) = {row['eta_over_measured']}", flush=True)
    return row


if __name__ == "__main__":
    main()
