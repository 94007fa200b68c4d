"""Shared pieces of the GPU benchmarks: random-weight models of the real architectures, synthetic
batches, timing and FLOP accounting. No hub is needed: speed and memory do not depend on weight values.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CONFIGS = json.loads((HERE / "qwen_vl_configs.json").read_text())
# The real checkpoints' special ids (qwen_vl_configs.json _note) are replaced by those of the small
# tokenizer saved with the random model, so the processor's <|image_pad|> matches the config (the
# vocabulary keeps its real size, 151,936 rows).
ARCHS = {"qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct", "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
         "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct"}
# dense bf16/fp16 tensor-core peaks (vendor spec sheets), for MFU
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "Tesla T4": 65.0}


def peak_tflops() -> float:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return float("nan")


def versions() -> dict:
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes
        out["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        out["bitsandbytes"] = None
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if out["gpu"]:
        out["gpu_limits"] = gpu_limits()
        out["gpu_numa_nodes"], out["numa_nodes"] = gpu_numa_nodes(), numa_node_count()
    out["date"] = time.strftime("%Y-%m-%d")
    return out


def gpu_limits() -> list[str] | None:
    """Per GPU: its power limit, max and current SM clock, CPU model (``nvidia-smi``, ``/proc/cpuinfo``) —
    hosts of one card differed by 36% in the same training forward (runs X2-9 … X2-11), with nothing
    recorded to tell a slower GPU setting from a slower host."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=power.limit,clocks.max.sm,clocks.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo", encoding="utf-8")
                if line.startswith("model name")), None) if os.path.exists("/proc/cpuinfo") else None
    return [line.strip() for line in out.splitlines() if line.strip()] + ([f"cpu: {cpu}"] if cpu else [])


def gpu_numa_nodes() -> list[int | None]:
    """Per GPU: the NUMA node of its PCI device (``/sys/bus/pci``; -1: the kernel reports none) — two DDP
    processes each queued their step 16% more slowly than one process alone (run Y1): is a process's host work
    running on the socket far from its GPU?"""
    nodes: list[int | None] = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        bus = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        try:
            nodes.append(int(Path(f"/sys/bus/pci/devices/{bus}/numa_node").read_text()))
        except (OSError, ValueError):
            nodes.append(None)
    return nodes


def numa_node_count() -> int | None:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return len(nodes) or None


def special_ids(tok) -> dict:
    get = tok.convert_tokens_to_ids
    return dict(bos_token_id=get("<|endoftext|>"), eos_token_id=get("<|im_end|>"),
                vision_start_token_id=get("<|vision_start|>"), vision_end_token_id=get("<|vision_end|>"),
                image_token_id=get("<|image_pad|>"), video_token_id=get("<|video_pad|>"),
                im_start=get("<|im_start|>"))


def build_config(arch: str, ids: dict):
    ids = {k: v for k, v in ids.items() if k != "im_start"}
    spec = CONFIGS[ARCHS[arch]]
    text, vision = dict(spec["text"]), dict(spec["vision"])
    if arch == "qwen2-vl-2b":
        from transformers import Qwen2VLConfig
        section = text.pop("mrope_section")
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": section}
        vision["in_channels"] = 3
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    if arch == "qwen2.5-vl-3b":
        from transformers import Qwen2_5_VLConfig
        section = text.pop("mrope_section")
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": section}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    from transformers import Qwen3VLConfig
    section = text.pop("mrope_section")
    interleaved = text.pop("mrope_interleaved", True)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                               "mrope_section": section, "mrope_interleaved": interleaved}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                         vision_start_token_id=ids["vision_start_token_id"],
                         vision_end_token_id=ids["vision_end_token_id"])


def random_model_dir(arch: str, root: str | Path = "/tmp/jpcap-bench") -> Path:
    """Save a random-weight bf16 model of the real shape with a processor (tiny tokenizer: the
    batches are synthetic ids, so only the image processor matters)."""
    from transformers import AutoModelForImageTextToText

    out = Path(root) / f"{arch}-v3"
    if (out / "config.json").exists():
        return out
    processor = processor_for(arch)
    cfg = build_config(arch, special_ids(processor.tokenizer))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


@functools.lru_cache(maxsize=None)
def processor_for(arch: str):
    """Only ``load_model`` needs it (batches are synthetic ids and pre-processed pixels)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    from jpcap_helpers.models import train_tiny_tokenizer
    tok = train_tiny_tokenizer(["画像の説明"] * 10, 300)
    from transformers import Qwen2VLVideoProcessor
    patch = CONFIGS[ARCHS[arch]]["vision"].get("patch_size", 14)  # Qwen3-VL: 16
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=patch), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor())


def synthetic_images(n: int, width: int = 640, height: int = 480, seed: int = 0):
    from PIL import Image
    return [Image.fromarray((np.random.default_rng(seed + i).random((height, width, 3)) * 255).astype("uint8"))
            for i in range(n)]


# A COCO-like mix of image sizes (width, height) → share, used where a benchmark should not see one size
# only (`--mix coco` of bench_shard.py, bench_generate.py --first-pass; bench_ddp.py uses its first three).
# Approximate, from the common sizes of COCO train/val 2014: 640-wide landscape dominates (640×480 alone
# 42%), then portrait and other 4:3, 3:2, 16:9 and square variants. By orientation: landscape 72%
# (640×480, 640×427, 500×375, 640×360, 640×512, 640×425, 640×428, 480×360), portrait 23% (480×640,
# 427×640, 375×500, 333×500), square 5% (612×612, 640×640). At model.max_pixels 448² the 14 sizes give
# 9 visual grids (the processor's smart_resize; 364×504 for 47% of the images).
COCO_LIKE_SIZES = {(640, 480): 0.42, (480, 640): 0.14, (640, 427): 0.14, (427, 640): 0.05, (500, 375): 0.05,
                   (640, 360): 0.04, (375, 500): 0.03, (612, 612): 0.03, (640, 512): 0.02, (640, 425): 0.02,
                   (640, 428): 0.02, (333, 500): 0.01, (640, 640): 0.02, (480, 360): 0.01}


def coco_like_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (width, height) pairs drawn from :data:`COCO_LIKE_SIZES` (seeded)."""
    rng = np.random.default_rng(seed)
    sizes = list(COCO_LIKE_SIZES)
    p = np.array(list(COCO_LIKE_SIZES.values()))
    return [sizes[i] for i in rng.choice(len(sizes), size=n, p=p / p.sum())]


def write_images(folder: Path, n: int, mix: str = "coco", seed: int = 0) -> Path:
    """``n`` noise JPEGs in ``folder`` (uniform 640×480, or the COCO-like size mix); kept if present."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = coco_like_sizes(n, seed) if mix == "coco" else [(640, 480)] * n
    for i, (w, h) in enumerate(sizes):
        path = folder / f"img_{i:05d}.jpg"
        if not path.exists():
            Image.fromarray((np.random.default_rng(seed + i).random((h, w, 3)) * 255).astype("uint8")).save(
                path, quality=90)
    return folder


def synthetic_batch(arch: str, bs: int, max_pixels: int, prompt_len: int = 20, cap_len: int = 24, seed: int = 0,
                    min_pixels: int = 56 * 56, model_dir: Path | None = None):
    """A training batch like the probe's: 640×480 images, 20 prompt + 24 caption tokens, labels on the
    caption and the end token."""
    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor(patch_size=CONFIGS[ARCHS[arch]]["vision"].get("patch_size", 14))
    out = ip(images=synthetic_images(bs, seed=seed), return_tensors="pt", size={"shortest_edge": min_pixels,
                                                                              "longest_edge": max_pixels})
    thw = out["image_grid_thw"]
    n_img = int(thw[0].prod()) // 4
    cfg = json.loads((Path(model_dir or random_model_dir(arch)) / "config.json").read_text())
    tok_ids = special_ids(processor_for(arch).tokenizer)
    IM_START, IM_END = tok_ids["im_start"], tok_ids["eos_token_id"]
    VISION_START, VISION_END, IMAGE_PAD = cfg["vision_start_token_id"], cfg["vision_end_token_id"], cfg["image_token_id"]
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for _ in range(bs):
        p = torch.randint(1000, 150000, (prompt_len,), generator=g).tolist()  # no special ids
        c = torch.randint(1000, 150000, (cap_len,), generator=g).tolist()
        ids = [IM_START] + p[:3] + [VISION_START] + [IMAGE_PAD] * n_img + [VISION_END] + p[3:] + [IM_END, IM_START] + c + [IM_END]
        seqs.append(ids)
        labels.append([-100] * (len(ids) - cap_len - 1) + c + [IM_END])
    ids = torch.tensor(seqs)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor(labels),
                 pixel_values=out["pixel_values"], image_grid_thw=thw, mm_token_type_ids=(ids == IMAGE_PAD).int())
    return batch, n_img


def flops_per_sample(model, seq_len: int, n_patches: int) -> float:
    """Model FLOPs per training sample, stated in RESULTS.md: the package's cost model
    (``jpcap_helpers.train.costs``: 2·N_vit·patches + 6·N_llm·seq)."""
    from jpcap_helpers.train.costs import model_flops_per_sample
    return model_flops_per_sample(model, seq_len, n_patches)


def timed_steps(step_fn, steps: int = 6, warmup: int = 2, warmup_seconds: list | None = None) -> float:
    """Median seconds of ``steps`` calls after ``warmup`` calls (CUDA synchronised); the warm-up calls'
    seconds (compilation included) are appended to ``warmup_seconds`` when given."""
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step_fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        if i >= warmup:
            times.append(seconds)
        elif warmup_seconds is not None:
            warmup_seconds.append(seconds)
    return statistics.median(times)


def inductor_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings (``coordinate_descent_tuning=True``) as a dict of inductor config values,
    each key checked against ``torch._inductor.config`` (lever probes)."""
    import ast

    import torch._inductor.config as config

    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not hasattr(config, key.split(".")[0]):
            raise SystemExit(f"--inductor {pair}: torch._inductor.config has no {key!r}")
        out[key] = ast.literal_eval(value)
    return out


def launch_prefix(gpus: int, cpu_threads: int | None = None, cpu_affinity: bool = False) -> tuple[list[str], dict]:
    """(command prefix, environment additions) to run a ``python`` command on ``gpus`` GPUs: plain python
    for one, ``accelerate launch --multi_gpu`` for more. ``accelerate launch`` gives each GPU process
    ``OMP_NUM_THREADS=1`` (torch's CPU ops single-threaded) unless told otherwise, while a plain one-GPU
    process keeps torch's default (every core): ``cpu_threads`` sets the same count for every run.
    ``cpu_affinity``: ``--enable_cpu_affinity``, each process pinned to the cores of its GPU's NUMA node
    (accelerate reads them through nvidia-ml-py)."""
    import sys

    env = {} if cpu_threads is None else {"OMP_NUM_THREADS": str(cpu_threads)}
    if gpus == 1:
        return [sys.executable], env
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={gpus}",
              "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
    if cpu_threads is not None:
        prefix.append(f"--num_cpu_threads_per_process={cpu_threads}")
    if cpu_affinity:
        prefix.append("--enable_cpu_affinity")
    return prefix, env


def emit(row: dict, path: str | None = None) -> None:
    line = json.dumps(row, ensure_ascii=False)
    print(line, flush=True)
    path = path or os.environ.get("BENCH_OUT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


@contextlib.contextmanager
def consecutive_vision_runs():
    """Inside: the vision attention's previous plan — one SDPA call per run of *consecutive* equal-length
    segments, instead of one per distinct length — for same-run rows against the length groups
    (Qwen2.5-VL's window blocks: 8 runs per 364×504 image instead of 4 calls per batch)."""
    from jpcap_helpers.models import fastpath

    def runs(cu_seqlens):
        cached = getattr(cu_seqlens, "_bench_runs", None)
        if cached is not None:
            return cached
        bounds, plan = cu_seqlens.tolist(), []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b == a:
                continue
            if plan and plan[-1][0] == b - a and plan[-1][2] + plan[-1][1] * plan[-1][0] == a:
                plan[-1][1] += 1
            else:
                plan.append([b - a, 1, a])
        cu_seqlens._bench_runs = [tuple(p) for p in plan]
        return cu_seqlens._bench_runs

    saved, fastpath._segment_groups = fastpath._segment_groups, runs
    try:
        yield
    finally:
        fastpath._segment_groups = saved
