"""`jpcap train` with measurement patches, for `bench_ddp.py` (a script file: `accelerate launch` runs
scripts, not ``-c``). Flags before the ``train`` command:

    python benchmarks/train_variant.py [--same-batches] [--trace] [--compile-static] train params/... --set ...

``--same-batches``: every rank draws rank 0's micro-batches — equal work on every GPU (the loss curve is not
the run's; only the rate is compared).
``--trace``: each rank appends one row per optimizer step to ``<run_dir>/trace-rank<r>.jsonl``: GPU
milliseconds of each micro-batch's forward and backward (CUDA events around them: the backward's includes
DDP's wait for the gradient all-reduce, hence for the slower rank), the GPU time from this step's first
forward to the next step's (``gpu_step_ms``), the host seconds spent in the step's three pieces (up to run
X2-11 each ended in a host read that waits for the GPU; since, only the last does), and the micro-batches'
shapes (sequence tokens, image patches, target tokens). Events are read after the step's own host reads, so the trace adds no synchronisation.
``--broadcast-buffers``: DDP with its buffer broadcast before every forward (torch's default; the trainer
turns it off since run X2-10: the buffers are constant rotary frequencies) — the baseline of that change.
``--no-ddp-optimizer``: dynamo's DDP optimizer off (torch's default, which the trainer keeps, is on: inside a
DDP forward each compiled graph is split at DDP's gradient-bucket sizes, whose first holds 1 MB — less than one
LoRA layer's fp32 adapters). Tried in run X2-13 and not kept: it did not pay.
``--compile-static``: the language layers compiled as before run ETA-2's fix (specialised on the first
shapes, recompiled when they change) with dynamo's recompile limit 8.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def same_batches() -> None:
    from jpcap_helpers.train import batches, session

    class SameBatches(batches.StepBatchSampler):
        def __init__(self, order, first, last, effective, micro, world, rank):
            super().__init__(order, first, last, effective, micro, world, 0)

    session.StepBatchSampler = SameBatches


def compile_static() -> None:
    import torch._dynamo

    from jpcap_helpers.models import fastpath

    real = fastpath.compile_blocks

    def specialised(blocks, dynamic=None, **kw):
        n = real(blocks, dynamic=None, **kw)
        torch._dynamo.config.recompile_limit = 8
        return n

    fastpath.compile_blocks = specialised


def trace() -> None:
    import torch

    from jpcap_helpers.train import loop

    state: dict = {"pending": None}
    real_count, real_fb, real_clip = loop.count_step, loop.forward_backward, loop.clip_and_step

    class CpuMark:   # a CPU run (no CUDA events): host time, which is the device's there
        def __init__(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return 1e3 * (other.t - self.t)

        def synchronize(self):
            pass

    def event():
        if not torch.cuda.is_available():
            return CpuMark()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def install(session):
        inner = getattr(session.loss_module, "module", session.loss_module)
        inner.register_forward_pre_hook(lambda *_: state["marks"].append(("f0", event())))
        inner.register_forward_hook(lambda *_: state["marks"].append(("f1", event())))
        acc = session.accelerator
        real_backward = acc.backward

        def backward(*a, **kw):
            out = real_backward(*a, **kw)
            state["marks"].append(("b1", event()))
            return out

        acc.backward = backward
        state["file"] = open(Path(session.params.run_dir) / f"trace-rank{session.accelerator.process_index}.jsonl",
                             "a", encoding="utf-8")
        state["installed"] = True

    def count_step(session, micro, missing=0, local=None):
        if not state.get("installed"):
            install(session)
        state["marks"], state["shapes"] = [], [
            {"tokens": list(b["input_ids"].shape), "patches": int(b["pixel_values"].shape[0]) if "pixel_values" in b else 0,
             "targets": int(b["target_ids"].numel()) if "target_ids" in b else None} for b in micro]  # no sync
        t = time.perf_counter()
        out = real_count(session, micro, missing, local)
        state["count_s"] = time.perf_counter() - t
        return out

    def forward_backward(session, micro, n_tokens):
        t = time.perf_counter()
        state["start"] = event()
        out = real_fb(session, micro, n_tokens)
        state["fb_s"] = time.perf_counter() - t
        return out

    def clip_and_step(session, n_bad, scalars=()):
        t = time.perf_counter()
        out = real_clip(session, n_bad, scalars)
        state["clip_s"] = time.perf_counter() - t
        flush(state["start"])   # the previous step's row needs this step's start
        marks = state["marks"]
        f0 = [e for k, e in marks if k == "f0"]
        f1 = [e for k, e in marks if k == "f1"]
        b1 = [e for k, e in marks if k == "b1"]
        state["pending"] = {
            "start": state["start"], "end": event(),
            "row": {"fwd_ms": [round(a.elapsed_time(b), 2) for a, b in zip(f0, f1)],
                    "bwd_ms": [round(a.elapsed_time(b), 2) for a, b in zip(f1, b1)],
                    "host_count_s": round(state["count_s"], 4), "host_fb_s": round(state["fb_s"], 4),
                    "host_clip_s": round(state["clip_s"], 4), "micro": state["shapes"]}}
        return out

    def flush(next_start):
        p = state["pending"]
        if p is None:
            return
        next_start.synchronize()
        row = {**p["row"], "gpu_step_ms": round(p["start"].elapsed_time(next_start), 2),
               "gpu_own_ms": round(p["start"].elapsed_time(p["end"]), 2)}
        state["file"].write(json.dumps(row) + "\n")
        state["file"].flush()
        state["pending"] = None

    loop.count_step, loop.forward_backward, loop.clip_and_step = count_step, forward_backward, clip_and_step


def broadcast_buffers() -> None:
    import accelerate

    class Broadcast(accelerate.Accelerator):
        def __init__(self, *a, **kw):
            kw["kwargs_handlers"] = [accelerate.DistributedDataParallelKwargs(broadcast_buffers=True)]
            super().__init__(*a, **kw)

    accelerate.Accelerator = Broadcast   # the session imports it when it opens


def no_ddp_optimizer() -> None:
    from jpcap_helpers.models import fastpath

    real = fastpath.compile_blocks

    def compile_blocks(*a, **kw):
        n = real(*a, **kw)
        fastpath.torch._dynamo.config.optimize_ddp = False
        return n

    fastpath.compile_blocks = compile_blocks


def main(argv: list[str]) -> int:
    flags = {"--same-batches": same_batches, "--trace": trace, "--compile-static": compile_static,
             "--broadcast-buffers": broadcast_buffers, "--no-ddp-optimizer": no_ddp_optimizer}
    while argv and argv[0] in flags:
        flags[argv.pop(0)]()
    from jpcap_helpers.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
