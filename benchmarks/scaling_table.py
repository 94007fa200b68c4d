"""Scaling table (issue 18): time and cost to fine-tune Qwen2-VL-2B for 3 epochs on the full STAIR train
split with caption packing and to caption STAIR val + test and YJ Captions, on a T4 (ESTIMATED from the
cost model), one H100 (captioning MEASURED, training ESTIMATED from the step's H100/H200 ratio), one and two H200s (MEASURED on one host), four (captioning MEASURED on one 4-GPU host;
training PROJECTED) and 8 (PROJECTED from the largest measured doubling).
Arithmetic only: every input is a named constant below with its source, or a flag.

    python benchmarks/scaling_table.py [--usd-per-gpu-hour 3.5] [--usd-per-t4-hour 0.35] [--write-results]

``--write-results`` replaces the table between the markers in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from jpcap_helpers.train.costs import T4_EFFECTIVE_TFLOPS, cost_estimate, packed_flops_per_caption  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- scaling-table:start -->", "<!-- scaling-table:end -->"

# ---- the work (docs/data.md; data/splits.py; params/h100.yaml) --------------------------------------
STAIR_TRAIN_IMAGES = 82_783      # all of STAIR train = COCO train2014 (data/download.py: 82,783 images)
STAIR_TRAIN_CAPTIONS = 413_915   # STAIR Captions v1.2 train annotations (≈ 5 per image)
EPOCHS = 3
STAIR_VAL_IMAGES = 5_000         # data.val_size: carved from STAIR val (data/splits.py)
STAIR_TEST_IMAGES = 5_000        # data.test_size: likewise, disjoint from val
YJ_TEST_IMAGES = 26_500          # YJ Captions 26k: an UPPER bound — yj_test drops every training image
CAPTION_IMAGES = STAIR_VAL_IMAGES + STAIR_TEST_IMAGES + YJ_TEST_IMAGES

# ---- the model and the cost model (train/costs.py; docs/training.md "Cost model") ------------------
N_VIT = 665_271_296              # Qwen2-VL-2B vision tower parameters (tests/test_scaling_table.py counts them)
N_LLM = 1_543_714_304            # its language model
IMAGE_TOKENS, PATCHES = 234, 936  # a 640×480 COCO image at model.max_pixels 448²
PROMPT_TOKENS, CAPTION_TOKENS = 30, 25

# ---- measured rates (benchmarks/results/) ----------------------------------------------------------
# runs X2-1…X2-8 (2026-11-29-x2.jsonl): hosts with 2 NVIDIA H200, the 1- and 2-GPU rows of a pair on one host
H200_TRAIN_CAPTIONS_PER_S = 341.98   # run X2-2: `jpcap train` end to end, packed QLoRA at the h100.yaml
                                     # defaults (micro-batch 16 images ≈ 5 captions each), median step rate
H200_STEP_ALONE_CAPTIONS_PER_S = 367.23  # run pack-2 (2026-11-28-pack.jsonl): the training step alone
H200_CUDAGRAPH_TRAIN_CAPTIONS_PER_S = 447.16  # run G9 (2026-11-30-h200.jsonl): the same recipe with the opt-in
                                     # train.cudagraphs (one GPU, no in-training validation), COCO-like mix, 1.30× the
                                     # same call's default (342.75); three sizes 445.81 vs 374.11 (1.19×, run G5)
TRAIN_SPEEDUP = {1: 1.0, 2: 1.855}   # median of runs X2-10…X2-13, Y1 and Z3 on six hosts (1.91, 1.83, 1.60, 2.14,
                                     # 1.70, 1.88; Y1, Z3 in 2026-11-30-x2.jsonl): the same
                                     # command on 2 GPUs against the same call's one GPU, DDP without its per-forward
                                     # buffer broadcast (the trainer's default since X2-10; with it 1.55–1.80×)
H200_CAPTION_IMAGES_PER_S = 174.50   # run X2-8: engine, 1 GPU, warm, COCO-like mix of 4,096 files, batch 256,
                                     # 24 new tokens, no adapter, generation.warmup (its seconds apart)
CAPTION_SPEEDUP = {1: 1.0, 2: 1.94, 4: 3.50}  # 2: run X2-8, sharded over 2 GPUs (whole batches, every process
                                     # warmed on the whole run's shapes), 337.74 images/s (mean of 3 runs:
                                     # 334.75–340.91); 4: run X4-2 (2026-11-29-x4.jsonl), a 4×H200 host, 615.94
                                     # images/s against the same call's warm one-GPU run, 176.14
CUDAGRAPH_TRAIN_SPEEDUP = {1: 1.0, 2: 174.73 / 89.32}   # run Z4 (2026-11-30-x2.jsonl), one host: the packed recipe
                                     # with train.cudagraphs under DDP on 2 GPUs against the same call's one GPU with
                                     # it (three COCO sizes, grouped grids; 1.44× the next call's 2-GPU default)
TRAIN_RUNS = {2: "median of runs X2-10…X2-13, Y1 and Z3, six hosts"}   # the runs behind each measured speed-up
CAPTION_RUNS = {2: "run X2-8", 4: "run X4-2"}
X4_LORA_SPEEDUP = 3.45               # run X4-2: bf16 LoRA unpacked, micro-batch 8, 185.27 against 53.68 samples/s
                                     # (the packed QLoRA recipe on 4 GPUs: not measured, cut by the call's limit)
D1_LORA_SPEEDUP = {2: 1.85, 4: 3.29}  # run D1 (2026-11-28-x4.jsonl): bf16 LoRA, unpacked, micro-batch 8 (context)
# one H100 (2026-12-07-h100.jsonl): runs F1, H2 and T1, three calls on H100 hosts
H100_CAPTION_IMAGES_PER_S = (190.35 + 164.83 + 190.94) / 3   # the engine on the COCO-like mix (2,048 files,
                                     # batch 256, merged adapter, warm-up + 4 canonical grids, its seconds apart),
                                     # the pass after the warm-up: run F1 190.35, run H2 164.83, run T1 190.94
                                     # (T1's process without kernel tuning, the captioning default; the mean)
H100_STEP_RATIO = 145.45 / 152.74    # the QLoRA training step at micro-batch 96 (compute-bound): H100 run H2
                                     # against H200 run POS-2 (other hosts and commits, same benchmark)
T4_CAPTION_IMAGES_PER_S = 2.5        # ESTIMATE (docs/training.md, params/colab_t4.yaml: "≈ 2–3 images/s")

DEFAULT_USD_PER_GPU_HOUR = 3.50      # ASSUMPTION: one H200 on demand (no quote; pass --usd-per-gpu-hour)
DEFAULT_USD_PER_T4_HOUR = 0.35       # ASSUMPTION: one T4 on demand (a free Colab T4 costs nothing but
                                     # gives ≈ 3 usable hours per session)


def projected_speedup(gpus: int, measured: dict[int, float] = TRAIN_SPEEDUP) -> tuple[float, bool]:
    """(speed-up over one GPU, projected?). Measured where it was; beyond, each doubling of GPUs keeps
    multiplying the parallel efficiency (speed-up / GPUs) by the factor the last measured doubling did."""
    if gpus in measured:
        return measured[gpus], False
    top = max(measured)
    eff_top, eff_half = measured[top] / top, measured[top // 2] / (top // 2)
    doublings = math.log2(gpus / top)
    return gpus * eff_top * (eff_top / eff_half) ** doublings, True


def t4_train_captions_per_s() -> float:
    """The cost model's T4 rate for packed captions (ESTIMATED: 12 TFLOP/s effective)."""
    per_image = STAIR_TRAIN_CAPTIONS / STAIR_TRAIN_IMAGES
    flops = packed_flops_per_caption(N_VIT, N_LLM, IMAGE_TOKENS + PROMPT_TOKENS, CAPTION_TOKENS, PATCHES, per_image)
    return cost_estimate(flops, 1)["samples_per_s"]


def _measured(x: float) -> str:
    """A measured speed-up as written: two decimals, three where a median of an even count needs them."""
    return f"{x:.2f}" if abs(x - round(x, 2)) < 1e-9 else f"{x:.3f}"


@dataclass
class Row:
    hardware: str
    gpus: int
    basis: str
    train_h: float
    caption_h: float
    usd_per_gpu_hour: float

    @property
    def total_h(self) -> float:
        return self.train_h + self.caption_h

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.total_h   # every GPU of the machine is held while captioning, too

    @property
    def usd(self) -> float:
        return self.gpu_hours * self.usd_per_gpu_hour


def rows(usd_per_gpu_hour: float = DEFAULT_USD_PER_GPU_HOUR, usd_per_t4_hour: float = DEFAULT_USD_PER_T4_HOUR,
         gpu_counts: tuple[int, ...] = (1, 2, 4, 8)) -> list[Row]:
    """The table's rows: a T4, one H100, then H200 machines of ``gpu_counts`` GPUs (1 and 2 GPUs also with
    ``train.cudagraphs``)."""
    captions = EPOCHS * STAIR_TRAIN_CAPTIONS
    out = [Row("T4", 1, "ESTIMATED: cost model (train/costs.py, 12 TFLOP/s effective) and ≈ 2.5 images/s captioning",
               captions / t4_train_captions_per_s() / 3600, CAPTION_IMAGES / T4_CAPTION_IMAGES_PER_S / 3600,
               usd_per_t4_hour)]
    out.append(Row("1× H100", 1, f"training ESTIMATED: the 1× H200 rate × {H100_STEP_RATIO:.3f} (the QLoRA step at "
                   "micro-batch 96 on an H100, run H2, over an H200's, run POS-2); captioning MEASURED on the COCO-like "
                   "mix (runs F1, H2, T1: the mean of three hosts)",
                   captions / (H200_TRAIN_CAPTIONS_PER_S * H100_STEP_RATIO) / 3600,
                   CAPTION_IMAGES / H100_CAPTION_IMAGES_PER_S / 3600, usd_per_gpu_hour))
    for gpus in gpu_counts:
        train_x, train_projected = projected_speedup(gpus, TRAIN_SPEEDUP)
        caption_x, caption_projected = projected_speedup(gpus, CAPTION_SPEEDUP)
        if gpus == 1:
            basis = ("MEASURED: `jpcap train` end to end, packed QLoRA (run X2-2); the engine on the COCO-like mix "
                     "(run X2-8)")
        else:
            parts = []
            for what, x, projected, runs in (("training", train_x, train_projected, TRAIN_RUNS),
                                             ("captioning", caption_x, caption_projected, CAPTION_RUNS)):
                parts.append(f"{what} {x:.2f}× PROJECTED (each doubling of GPUs multiplies the parallel efficiency "
                             "as the last measured one did)" if projected else
                             f"{what} {_measured(x)}× MEASURED on {gpus} GPUs of one host ({runs[gpus]})")
            basis = "; ".join(parts)
        out.append(Row(f"{gpus}× H200", gpus, basis, captions / (H200_TRAIN_CAPTIONS_PER_S * train_x) / 3600,
                       CAPTION_IMAGES / (H200_CAPTION_IMAGES_PER_S * caption_x) / 3600, usd_per_gpu_hour))
        if gpus in CUDAGRAPH_TRAIN_SPEEDUP:
            cg_x = CUDAGRAPH_TRAIN_SPEEDUP[gpus]
            basis = ("MEASURED: `jpcap train` with the opt-in `train.cudagraphs` (no validation during training), "
                     "packed QLoRA, COCO-like mix (run G9: 1.30× the same call's default)" if gpus == 1 else
                     f"training {cg_x:.2f}× the row above, MEASURED on 2 GPUs of one host (run Z4, three COCO sizes; "
                     "one host only)")
            out.append(Row(f"{gpus}× H200, `train.cudagraphs`", gpus, basis + "; captioning as above",
                           captions / (H200_CUDAGRAPH_TRAIN_CAPTIONS_PER_S * cg_x) / 3600,
                           CAPTION_IMAGES / (H200_CAPTION_IMAGES_PER_S * caption_x) / 3600, usd_per_gpu_hour))
    return out


def markdown(table: list[Row], usd_per_gpu_hour: float, usd_per_t4_hour: float) -> str:
    """The table and the assumptions it rests on, as markdown."""
    captions = EPOCHS * STAIR_TRAIN_CAPTIONS
    lines = [
        f"Work: **{EPOCHS} epochs × {STAIR_TRAIN_CAPTIONS:,} STAIR train captions** ({STAIR_TRAIN_IMAGES:,} images, "
        f"packed ≈ {STAIR_TRAIN_CAPTIONS / STAIR_TRAIN_IMAGES:.1f} captions per row) = {captions:,} training captions; "
        f"**captioning {CAPTION_IMAGES:,} images** = STAIR val {STAIR_VAL_IMAGES:,} + test {STAIR_TEST_IMAGES:,} "
        f"(`data.val_size`/`test_size`, carved from STAIR val) + YJ Captions ≤ {YJ_TEST_IMAGES:,} (an upper bound: "
        "`yj_test` drops every training image, and YJ appears to reuse COCO train images, so with the full train "
        "split far fewer may remain). Validation during training is not counted.",
        "",
        f"Price per GPU-hour (assumptions, not quotes): H200 and H100 ${usd_per_gpu_hour:.2f} (`--usd-per-gpu-hour`), "
        f"T4 ${usd_per_t4_hour:.2f} (`--usd-per-t4-hour`; a free Colab T4 costs nothing but gives ≈ 3 usable hours "
        "per session). A machine's every GPU counts while it captions.",
        "",
        "| hardware | train 3 epochs (h) | caption (h) | total (h) | GPU-hours | cost (USD) | basis |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r.hardware} | {r.train_h:.2f} | {r.caption_h:.2f} | {r.total_h:.2f} | {r.gpu_hours:.1f} | "
                     f"{r.usd:,.2f} | {r.basis} |")
    flops = packed_flops_per_caption(N_VIT, N_LLM, IMAGE_TOKENS + PROMPT_TOKENS, CAPTION_TOKENS, PATCHES,
                                     STAIR_TRAIN_CAPTIONS / STAIR_TRAIN_IMAGES)
    lines += [
        "",
        f"- Training rates: 1× H200 = {H200_TRAIN_CAPTIONS_PER_S} captions/s (run X2-2, `results/2026-11-29-x2.jsonl`: "
        "`jpcap train` end to end — data loading, logging, the step — packed QLoRA at the `h100.yaml` defaults, "
        "micro-batch 16 images, random weights of the Qwen2-VL-2B shape, jp-shapes captions on three COCO sizes, "
        f"median step rate after 8 steps; the step alone ran {H200_STEP_ALONE_CAPTIONS_PER_S} captions/s, run "
        f"pack-2). With the opt-in `train.cudagraphs` (refused with validation during "
        f"training): {H200_CUDAGRAPH_TRAIN_CAPTIONS_PER_S} captions/s (run G9, `results/2026-11-30-h200.jsonl`, the "
        "COCO-like mix, 342.75 without it in the same call); on 2 GPUs "
        f"{CUDAGRAPH_TRAIN_SPEEDUP[2]:.2f}× that (run Z4, one host: 174.73 against 89.32 samples/s with graphs on one "
        "GPU in the same call). 2× H200: the same command under `accelerate launch`, "
        f"{TRAIN_SPEEDUP[2]:.3f}× the same call's "
        "one-GPU run: the median of six hosts (runs X2-10…X2-13: 1.91, 1.83, 1.60 and 2.14×; runs Y1 and Z3, "
        "`results/2026-11-30-x2.jsonl`: 1.70 and 1.88×), DDP without its "
        "per-forward buffer broadcast, the trainer's default since X2-10 (with it 1.55–1.80×, runs X2-3, "
        "X2-9–X2-11). 4 and 8 GPUs are "
        f"projections for this recipe, not measurements (its 4-GPU run was cut by the call's time limit); bf16 LoRA "
        f"unpacked at micro-batch 8 measured {X4_LORA_SPEEDUP:.2f}× on 4 GPUs (run X4-2) and, on another host, "
        f"{D1_LORA_SPEEDUP[2]:.2f}× on 2 and {D1_LORA_SPEEDUP[4]:.2f}× on 4 (run D1). T4: the cost model's "
        f"{flops / 1e12:.2f} TFLOP per packed caption at an assumed {T4_EFFECTIVE_TFLOPS:g} TFLOP/s ≈ "
        f"{t4_train_captions_per_s():.1f} captions/s (no T4 was available); on free Colab that is ≈ "
        f"{math.ceil(table[0].train_h / 3)} sessions of ≈ 3 usable hours, resuming from checkpoints.",
        f"- Captioning: {H200_CAPTION_IMAGES_PER_S} images/s on one H200 (run X2-8, `results/2026-11-29-x2.jsonl`: "
        "warm inductor cache, the COCO-like size mix, batch 256, 24 new tokens — the default `max_new_tokens` is "
        "40 — after `generation.warmup`, whose seconds are not counted: a one-shot run pays 18–37 s of it per "
        f"process). 2 GPUs: {CAPTION_SPEEDUP[2]:.2f}× with whole batches per GPU, each process warmed on the whole "
        "run's shapes (run X2-8, same host, mean of three runs; against that call's other one-GPU run, 182.42 "
        "images/s, it is 1.85×; each process warmed on its own share only: 1.59–1.75×). 4 GPUs: "
        f"{CAPTION_SPEEDUP[4]:.2f}× (run X4-2, a 4×H200 host, 4,096 files, rows identical to the one-GPU run's; "
        "1.92× on 2 GPUs of that host, run X4-1). 8 GPUs: projected. The rate holds for the "
        "QLoRA recipe's adapter since it is merged into its dequantized base (run QL-1: 150.2 images/s against "
        "149.0 for a bf16 base with a merged adapter, same run; the 4-bit base with the adapter kept separate ran "
        "28.2–44.9). "
        f"T4: ≈ {T4_CAPTION_IMAGES_PER_S} images/s, the project's estimate (not measured). 1× H100: "
        f"{H100_CAPTION_IMAGES_PER_S:.1f} images/s, the mean of the pass after the warm-up on three H100 hosts (runs "
        "F1 190.35, H2 164.83 and T1 190.94, `results/2026-12-07-h100.jsonl`; their second passes 183.53, 173.89 and "
        "183.67; with the opt-in, not exact `generation.fp8: all` 218.08, 210.91 and 218.91; T1 with "
        "`model.compile_tuning: all` 195.32); its training time is an estimate (no `jpcap train` run on "
        "an H100; no 2-GPU H100 machine was lent).",
    ]
    return "\n".join(lines)


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace what lies between the markers in RESULTS.md with ``text``."""
    doc = path.read_text(encoding="utf-8")
    if START not in doc or END not in doc:
        raise SystemExit(f"{path}: markers {START} … {END} not found")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--usd-per-gpu-hour", type=float, default=DEFAULT_USD_PER_GPU_HOUR,
                    help="price of one H200 GPU-hour (an assumption; default %(default)s)")
    ap.add_argument("--usd-per-t4-hour", type=float, default=DEFAULT_USD_PER_T4_HOUR,
                    help="price of one T4 GPU-hour (an assumption; default %(default)s)")
    ap.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.usd_per_gpu_hour < 0 or args.usd_per_t4_hour < 0:
        raise SystemExit("prices must be ≥ 0")
    text = markdown(rows(args.usd_per_gpu_hour, args.usd_per_t4_hour), args.usd_per_gpu_hour, args.usd_per_t4_hour)
    print(text)
    if args.write_results:
        write_results(text)


if __name__ == "__main__":
    main()
