"""Training throughput and peak memory: the cookbook-style QLoRA baseline and the project's trainer,
same run, same GPU, same synthetic batches (640×480 images, 20 prompt + 24 caption tokens).

    python benchmarks/bench_train.py [--arch qwen2-vl-2b|qwen2.5-vl-3b|qwen3-vl-2b] [--batch 8 16 32] [--rows all]

Rows: cookbook (prepare_model_for_kbit_training + gradient checkpointing + full-vocabulary loss +
default max_pixels), jpcap QLoRA with params/h100.yaml defaults (regional torch.compile included),
jpcap bf16 LoRA, and the T4 recipe (params/colab_t4.yaml: fp16, sdpa, 4-bit, gradient checkpointing,
no compile) for peak memory. --lean-off / --compile-off / --tuning-off add same-run rows with one lever off;
--inductor KEY=VALUE rows whose compiled blocks take those inductor options; --cudagraphs rows whose compiled
blocks replay as CUDA graphs (``torch.compile(mode="reduce-overhead")``).
Prints one JSON line per measurement (and appends to $BENCH_OUT).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is a folder of scripts
from common import (  # noqa: E402
    consecutive_vision_runs,
    emit,
    flops_per_sample,
    inductor_options,
    peak_tflops,
    random_model_dir,
    synthetic_batch,
    timed_steps,
    versions,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAX_PIXELS = 12845056  # Qwen2-VL's preprocessor default


def free():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def cookbook_model(path: Path, top_k: int = 6):
    """The usual notebook recipe (as in the H100 baseline reference)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16,
                           llm_int8_skip_modules=["visual", "model.visual", "lm_head"])
    m = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, quantization_config=q,
                                                    device_map={"": 0}, attn_implementation="sdpa")
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True)
    from jpcap_helpers.train import lora_target_modules, projector_modules
    # the same trainable set as the jpcap rows: LoRA + the projector (Qwen3-VL: with its deepstack mergers)
    cfg = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, target_modules=lora_target_modules(m, top_k),
                     modules_to_save=projector_modules(m), task_type="CAUSAL_LM")
    return get_peft_model(m, cfg)


def jpcap_model(path: Path, params_file: str, method: str, overrides: dict | None = None):
    from jpcap_helpers import models
    from jpcap_helpers.params import load_params
    from jpcap_helpers.train import prepare_model

    over = {"model.name": str(path), "model.load_in_4bit": method == "qlora", **(overrides or {})}
    params = load_params(ROOT / params_file, over, check_paths=False)
    model, _, _ = models.load_model(params, load_in_4bit=params.model.load_in_4bit, for_training=True)
    model = prepare_model(model, params)
    if method != "qlora":
        model.to("cuda")
    return model, params


def undo_lean_activations(model) -> int:
    """Lever probe: put the plain SwiGLU/RMSNorm forwards back (fastpath.use_lean_activations undone)."""
    from jpcap_helpers.models import fastpath
    lean = {fastpath._lean_mlp_forward, fastpath._lean_rmsnorm_forward}
    n = 0
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) in lean:
            del module.forward
            n += 1
    return n


def measure(name, model, loss_fn, arch, bs, max_pixels, steps, extra=None, autocast=None, positions=True,
            cudagraphs=False, warmup=None):
    """``positions``: the batch carries its rotary positions, computed on the CPU as the trainer's
    collators do (``train.positions``); off, the model computes them in its forward (GPU idle meanwhile).
    ``cudagraphs``: each step begins a new generation of cudagraph trees (outputs of the last step's
    replays may be overwritten), and two more warm-up steps let them record (``warmup``: steps before the
    timed ones, default 2, or 4 with ``cudagraphs``)."""
    batch, n_img = synthetic_batch(arch, bs, max_pixels)
    if positions:
        from jpcap_helpers.train.positions import rope_positions
        batch["position_ids"] = rope_positions(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                               merge_size=2, attention_mask=batch["attention_mask"])
    batch = {k: v.cuda() for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    free()

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if autocast is None:
            loss = loss_fn(model, batch)
        else:  # as the trainer runs: autocast over fp32 trainable weights (accelerate mixed precision)
            with torch.autocast("cuda", dtype=autocast):
                loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step.loss = float(loss)

    warmup_seconds: list[float] = []
    try:
        sec = timed_steps(step, steps=steps, warmup=warmup or (4 if cudagraphs else 2), warmup_seconds=warmup_seconds)
    except torch.OutOfMemoryError:
        opt = None  # free the optimizer state before the next size
        free()
        emit({"bench": "train", "arch": arch, "row": name, "micro_batch": bs, "error": "OOM"})
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    seq = batch["input_ids"].shape[1]
    n_patches = int(batch["image_grid_thw"][0].prod())
    flops = flops_per_sample(model, seq, n_patches)
    row = {"bench": "train", "arch": arch, "row": name, "micro_batch": bs, "seq": seq, "image_tokens": n_img,
           "step_s": round(sec, 4), "samples_per_s": round(bs / sec, 2), "peak_gib": round(peak, 2),
           "mfu": round(flops * bs / sec / (peak_tflops() * 1e12), 4), "loss": round(step.loss, 3),
           "warmup_s": [round(w, 2) for w in warmup_seconds],
           **(extra or {})}
    if cudagraphs:
        row["cudagraph_skips"] = cudagraph_skips()  # counted since the last dynamo reset (compiles are lazy)
    emit(row)
    opt = None  # free the optimizer state before the next size
    free()
    return row


@contextlib.contextmanager
def cudagraph_blocks(variant: str = "dynamic", reset: bool = True):
    """Lever probe: every block compiled by ``fastpath.compile_blocks`` while the model loads is compiled with
    ``mode="reduce-overhead"`` (inductor's cudagraph trees: each compiled region's kernels, forward and
    backward, replay as one CUDA graph per shape). ``variant``: ``dynamic`` keeps each call's ``dynamic`` (the
    language layers': True), ``static`` compiles ``dynamic=None`` (specialised on the first shapes: runs
    CG-3/CG-4; a second shape turns dynamo's automatic dynamic shapes on, so one ``--batch`` per run),
    ``never-dynamic`` ``dynamic=False`` (as ``train.cudagraphs`` compiles the language layers). Dynamo's caches are reset first
    (other rows' entries) unless ``reset`` is off (A/B rounds: a model compiled the trainer's way stays loaded
    next to it)."""
    import torch._dynamo

    from jpcap_helpers.models import fastpath

    real = fastpath.compile_blocks
    if reset:
        torch._dynamo.reset()
    choose = {"dynamic": lambda d: d, "static": lambda d: None, "never-dynamic": lambda d: False}[variant]
    fastpath.compile_blocks = lambda blocks, dynamic=None, **kw: real(blocks, dynamic=choose(dynamic),
                                                                      **{**kw, "tuned": False, "mode": "reduce-overhead"})
    try:
        yield
    finally:
        fastpath.compile_blocks = real


def variant_rows(path, key: str, label: str, args, overrides: dict | None = None, extra: dict | None = None) -> None:
    """One row per ``args.batch`` of a model loaded with ``overrides`` (then freed)."""
    m, p = jpcap_model(path, "params/h100.yaml", key, overrides)
    for bs in args.batch:
        measure(label, m, fast, args.arch, bs, p.model.max_pixels, args.steps, extra, autocast=torch.bfloat16)
    del m
    free()


@contextlib.contextmanager
def tuned_blocks(options: dict):
    """Lever probe: every block compiled by ``fastpath.compile_blocks`` while the model loads is compiled with
    these inductor ``options`` (e.g. ``coordinate_descent_tuning``: each fused element-wise/reduction kernel's
    launch configuration tuned by benchmarking on first use). Dynamo's caches are reset first."""
    import torch._dynamo

    from jpcap_helpers.models import fastpath

    real = fastpath.compile_blocks
    torch._dynamo.reset()
    fastpath.compile_blocks = lambda blocks, **kw: real(blocks, **{**kw, "options": options})
    try:
        yield
    finally:
        fastpath.compile_blocks = real
        torch._dynamo.reset()  # the next rows compile as the trainer does


def cudagraph_ab(path, key, label, variant, args) -> None:
    """Rows alternating between a model compiled as the trainer does and one whose blocks replay as CUDA
    graphs, both loaded in this process, ``args.ab_rounds`` rounds."""
    cg_label = label + f", compiled blocks as CUDA graphs (reduce-overhead, {variant} shapes)"
    torch.manual_seed(0)  # the same LoRA initialisation, the same steps: the losses compare too
    m0, p = jpcap_model(path, "params/h100.yaml", key)
    torch.manual_seed(0)
    with cudagraph_blocks(variant, reset=False):
        m1, _ = jpcap_model(path, "params/h100.yaml", key)
    try:
        for r in range(args.ab_rounds):
            for bs in args.batch:
                measure(label, m0, fast, args.arch, bs, p.model.max_pixels, args.steps, {"ab_round": r},
                        autocast=torch.bfloat16, warmup=4)
                measure(cg_label, m1, fast, args.arch, bs, p.model.max_pixels, args.steps, {"ab_round": r},
                        autocast=torch.bfloat16, cudagraphs=True, warmup=4)
    except Exception as e:  # a probe: report it and go on with the other rows
        emit({"bench": "train", "arch": args.arch, "row": cg_label, "error": f"{type(e).__name__}: {e}"[:500]})
    del m0, m1
    free()


def cudagraph_skips() -> int:
    """How many compiled graphs inductor ran without a CUDA graph (and why: its perf_hints log)."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"].get("cudagraph_skips", 0))


def plain(model, batch):
    return model(**batch).loss


def fast(model, batch):
    from jpcap_helpers.train import caption_loss
    total, n = caption_loss(model, batch)
    return total / n


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2-vl-2b", choices=["qwen2-vl-2b", "qwen2.5-vl-3b", "qwen3-vl-2b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--rows", default="cookbook,qlora,lora,t4")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile-off", action="store_true", help="add rows without torch.compile (lever probe)")
    ap.add_argument("--vision-runs-baseline", action="store_true",
                    help="with --compile-off: also rows with the vision attention's previous plan (consecutive runs)")
    ap.add_argument("--positions-off", action="store_true",
                    help="add rows whose batches lack position_ids (the model computes them: lever probe)")
    ap.add_argument("--lean-off", action="store_true", help="add rows without lean activations (lever probe)")
    ap.add_argument("--cudagraphs", nargs="*", choices=["dynamic", "static", "never-dynamic"],
                    help="add rows whose compiled blocks replay as CUDA graphs (mode='reduce-overhead'; lever "
                         "probe for the launch-bound small micro-batch): language layers dynamic as the "
                         "trainer compiles them, specialised on the first shapes (static: dynamic=None), or "
                         "dynamic=False (never-dynamic) (default: dynamic)")
    ap.add_argument("--ab-rounds", type=int, default=0,
                    help="with --cudagraphs: both models loaded in one process, rows alternating default / "
                         "CUDA graphs this many rounds (launch-bound rows differ by up to 30%% between processes)")
    ap.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                    help="after each model's default rows: rows whose compiled blocks use these inductor options "
                         "(e.g. coordinate_descent_tuning=True), then the default again (A B A; lever probe)")
    ap.add_argument("--tuning-off", action="store_true",
                    help="after each model's default rows: rows with model.compile_tuning: off (untuned kernels), "
                         "then the default again (A B A; lever probe)")
    ap.add_argument("--compile-unmeasured", action="store_true",
                    help="use regional torch.compile for this arch even if its model type is not in "
                         "fastpath.COMPILE_MEASURED (with --compile-off: measure whether it pays)")
    args = ap.parse_args(argv)
    if args.compile_unmeasured:
        import json

        from jpcap_helpers.models import fastpath
        model_type = json.loads((random_model_dir(args.arch) / "config.json").read_text())["model_type"]
        fastpath.COMPILE_MEASURED = tuple(set(fastpath.COMPILE_MEASURED) | {model_type})
    rows = args.rows.split(",")
    emit({"bench": "train", "versions": versions(), "arch": args.arch})
    path = random_model_dir(args.arch)
    results = {}
    if "cookbook" in rows:
        m = cookbook_model(path)
        results["cookbook"] = measure("cookbook QLoRA (baseline)", m, plain, args.arch, 8, DEFAULT_MAX_PIXELS,
                                      args.steps, positions=False)
        del m
        free()
    for key, label in (("qlora", "jpcap QLoRA (h100.yaml defaults)"), ("lora", "jpcap bf16 LoRA")):
        if key not in rows:
            continue
        if args.ab_rounds and args.cudagraphs is not None:
            for variant in args.cudagraphs or ["dynamic"]:
                cudagraph_ab(path, key, label, variant, args)
            continue
        m, p = jpcap_model(path, "params/h100.yaml", key)
        for bs in args.batch:
            results.setdefault(key, {})[bs] = measure(
                label, m, fast, args.arch, bs, p.model.max_pixels, args.steps,
                {"gradient_checkpointing": p.train.gradient_checkpointing}, autocast=torch.bfloat16)
        if args.positions_off:  # same model, same process: the previous default
            for bs in args.batch:
                measure(label + ", positions in the forward (previous default)", m, fast, args.arch, bs,
                        p.model.max_pixels, args.steps, autocast=torch.bfloat16, positions=False)
        if args.inductor or args.tuning_off:  # A B A, the last model stays for the rows below
            del m
            free()
            if args.inductor:
                options = inductor_options(args.inductor)
                with tuned_blocks(options):
                    variant_rows(path, key, label + f", compiled blocks with inductor options {options}", args,
                                 extra={"inductor_options": options})
            if args.tuning_off:
                torch._dynamo.reset()   # compiled again, untuned
                variant_rows(path, key, label + ", model.compile_tuning: off", args, {"model.compile_tuning": "off"})
                torch._dynamo.reset()
            m, p = jpcap_model(path, "params/h100.yaml", key)
            for bs in args.batch:
                measure(label + " (again, after the variant rows)", m, fast, args.arch, bs,
                        p.model.max_pixels, args.steps, autocast=torch.bfloat16)
        if args.lean_off:
            n = undo_lean_activations(m)
            for bs in args.batch:
                measure(label + ", lean activations off", m, fast, args.arch, bs, p.model.max_pixels, args.steps,
                        {"unpatched_modules": n}, autocast=torch.bfloat16)
        del m
        free()
        for variant in ([] if args.cudagraphs is None else args.cudagraphs or ["dynamic"]):
            cg_label = label + f", compiled blocks as CUDA graphs (reduce-overhead, {variant} shapes)"
            try:
                with cudagraph_blocks(variant):
                    m, p = jpcap_model(path, "params/h100.yaml", key)
                for bs in args.batch:
                    measure(cg_label, m, fast, args.arch, bs, p.model.max_pixels, args.steps,
                            autocast=torch.bfloat16, cudagraphs=True)
            except Exception as e:  # a probe: report it and go on with the other rows
                emit({"bench": "train", "arch": args.arch, "row": cg_label, "error": f"{type(e).__name__}: {e}"[:500]})
            m = None
            free()
            torch._dynamo.reset()  # the next rows compile as the trainer does
        if args.compile_off:
            m, p = jpcap_model(path, "params/h100.yaml", key, {"model.compile": False})
            for bs in args.batch:
                measure(label + ", torch.compile off", m, fast, args.arch, bs, p.model.max_pixels, args.steps,
                        autocast=torch.bfloat16)
            if args.vision_runs_baseline:
                with consecutive_vision_runs():
                    for bs in args.batch:
                        measure(label + ", torch.compile off, vision attention by consecutive runs (previous plan)",
                                m, fast, args.arch, bs, p.model.max_pixels, args.steps, autocast=torch.bfloat16)
            del m
            free()
    if "t4" in rows:
        # as on a T4: fp16, and no torch.compile (model.compile applies from compute capability 8.0)
        m, p = jpcap_model(path, "params/colab_t4.yaml", "qlora", {"model.precision": "fp16", "model.compile": False})
        measure("T4 recipe (colab_t4.yaml: fp16, 4-bit, grad. checkpointing) — memory", m, fast, args.arch,
                p.train.micro_batch_size, p.model.max_pixels, args.steps,
                {"gradient_checkpointing": p.train.gradient_checkpointing, "note": "speed is the H100's, not a T4's"},
                autocast=torch.float16)
        del m
        free()
    base = results.get("cookbook")
    if base:
        for key in ("qlora", "lora"):
            for bs, r in (results.get(key) or {}).items():
                if r:
                    emit({"bench": "train", "ratio_to_cookbook": key, "micro_batch": bs,
                          "speedup": round(r["samples_per_s"] / base["samples_per_s"], 2),
                          "memory_ratio": round(r["peak_gib"] / base["peak_gib"], 3)})


if __name__ == "__main__":
    main()
