"""Captioning on several GPUs: the records sharded over the processes of ``accelerate launch`` or
``torchrun`` (one per GPU; ``torch.distributed`` gives rank, world size, barriers and the gathering of
the summaries, over gloo).

The records left to caption (duplicates and the ids already in the output dropped) are dealt out as
the engine's own batches (``plan``: the batches one GPU would run, :func:`.pipeline.plan_batches`):
whole batches, the largest first, each to the process with the fewest images so far
(:func:`deal_batches`). Each process then runs exactly those batches — the one-GPU run's, none split
into smaller ones (dealing single records instead cut every visual grid's tail batch once per GPU:
a COCO-like mix of 4,096 images ran 14 batches per GPU on 2 GPUs instead of 10). Without a plan every
``world``-th record goes to each process. Each writes its own kill-safe shard
``<out>.shard-<rank>-of-<world>.jsonl`` — resumable by the same rule as one GPU. When all are done,
rank 0 merges the shards into ``<out>`` (ids already there are skipped, so a merge killed half-way is
finished by the next run) and deletes them. The merged file holds the rows of a one-GPU run: every
record once, none missing (order aside). A run started with another number of GPUs first merges what
an earlier run left in shards.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .. import io as jio

__all__ = ["process_group", "shard_path", "merge_shards", "deal_batches", "caption_sharded"]


class _Group:
    """The launch's process group: ``wait_for_everyone`` and ``gather`` (every process gets the list)."""

    def wait_for_everyone(self) -> None:
        import torch.distributed as dist
        dist.barrier()

    def gather(self, obj: Any) -> list:
        import torch.distributed as dist
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out


def process_group() -> tuple[int, int, Any]:
    """(rank, world size, group) under ``accelerate launch`` / ``torchrun`` with more than one process:
    joins the process group (once) and binds this process to its GPU before any model loads; (0, 1,
    None) otherwise.

    Each process is shown only its own GPU (``CUDA_VISIBLE_DEVICES`` narrowed to the ``LOCAL_RANK``-th
    one, when CUDA is not initialised yet): every process then compiles for ``cuda:0`` and reuses the
    kernels another process put in inductor's on-disk cache instead of compiling its own. The group only
    synchronises small objects (barriers, the summaries), so it runs on gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not torch.cuda.is_initialized() and visible != "":
            ids = visible.split(",") if visible else [str(i) for i in range(_gpu_count())]
            if local < len(ids):
                os.environ["CUDA_VISIBLE_DEVICES"] = ids[local]
        elif torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), _Group()


def _gpu_count() -> int:
    """GPUs on this host without initialising CUDA in this process (NVML)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            return sum(line.startswith("GPU ") for line in out.splitlines())
        except (OSError, subprocess.SubprocessError):
            return 0


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.stem}.shard-{rank}-of-{world}.jsonl")


def _shards(out: Path) -> list[Path]:
    pattern = re.compile(re.escape(out.stem) + r"\.shard-\d+-of-\d+\.jsonl$")
    return sorted(p for p in out.parent.glob(f"{out.stem}.shard-*.jsonl") if pattern.match(p.name))


def merge_shards(out: Path) -> int:
    """Append every shard's rows whose id ``out`` lacks (a shard's partial last line dropped), then
    delete the shards. Returns the rows appended. Rank 0 only."""
    jio.repair_jsonl_tail(out)
    done = {r.get("image_id") for r in jio.read_jsonl(out, tolerate_partial_last=True)} if out.exists() else set()
    added = 0
    for shard in _shards(out):
        jio.repair_jsonl_tail(shard)
        rows = []
        for row in jio.read_jsonl(shard, tolerate_partial_last=True):
            if row.get("image_id") not in done:
                done.add(row.get("image_id"))
                rows.append(row)
        if rows:
            added += jio.append_jsonl(out, rows)
        shard.unlink()
    return added


def _record_id(record: Any) -> Any:
    return record.get("image_id") if isinstance(record, Mapping) else getattr(record, "image_id", None)


def deal_batches(batches: Sequence[Sequence[Any]], world: int) -> list[list[Any]]:
    """Whole batches dealt to ``world`` shards: the largest first, each to the shard with the fewest
    items so far (then the fewest batches, then the lowest rank). Deterministic; every item once."""
    shards: list[list[Any]] = [[] for _ in range(world)]
    load = [(0, 0, rank) for rank in range(world)]
    for batch in sorted(batches, key=len, reverse=True):   # stable: equal sizes keep their order
        n_items, n_batches, rank = min(load)
        shards[rank].extend(batch)
        load[rank] = (n_items + len(batch), n_batches + 1, rank)
    return shards


def _my_shard(pending: list, rank: int, world: int, plan: Optional[Callable[[list], list[list]]]
              ) -> tuple[list, Optional[list[list]]]:
    """(this process's records in their order in ``pending``, the run's planned batches): whole planned
    batches, or every ``world``-th record without a plan (batches None)."""
    if plan is None:
        return pending[rank::world], None
    batches = plan(pending)
    position = {id(r): i for i, r in enumerate(pending)}
    if sorted(position.get(id(r), -1) for batch in batches for r in batch) != list(range(len(pending))):
        raise RuntimeError("plan(records) must return every record it was given exactly once")
    return sorted(deal_batches(batches, world)[rank], key=lambda r: position[id(r)]), batches


def caption_sharded(caption: Callable[..., dict], records: Sequence[Any], out: str | Path,
                    plan: Optional[Callable[[list], list[list]]] = None) -> dict:
    """``caption(records, path) -> summary`` over this process's shard of ``records`` (all of them on
    one process), merged into ``out``. ``plan(records) -> batches`` (the engine's batches for those
    records) makes the shards whole batches; with several processes ``caption`` is then called
    ``caption(shard, path, batches)`` with the whole run's planned batches (each process warms the
    shapes one GPU would meet; None without a plan). Every process returns the run's summary: counts summed
    over the processes, ``images_per_s`` = all rows / the slowest process's seconds, ``processes`` =
    world, ``seconds_per_process``, ``n_done_per_process``, ``slowest_batches_per_process`` and
    ``fill_seconds_per_process`` (rank order: the balance)."""
    out = Path(out)
    rank, world, state = process_group()
    if world == 1:
        return {**caption(list(records), out), "processes": 1}
    if rank == 0:
        merge_shards(out)  # what an earlier (killed, or other-sized) run left
    state.wait_for_everyone()
    done = {r.get("image_id") for r in jio.read_jsonl(out, tolerate_partial_last=True)} if out.exists() else set()
    seen: set = set()
    pending, n_dupes = [], 0
    for record in records:
        rid = _record_id(record)
        if rid in done:
            continue
        if rid in seen:
            n_dupes += 1
            continue
        seen.add(rid)
        pending.append(record)
    shard, batches = _my_shard(pending, rank, world, plan)
    summary = caption(shard, shard_path(out, rank, world), batches)
    summaries = state.gather(summary)
    state.wait_for_everyone()
    if rank == 0:
        merge_shards(out)
    state.wait_for_everyone()
    total = dict(summaries[0])
    for key in ("n_done", "n_captioned", "n_errors", "n_skipped_existing", "n_resized"):
        total[key] = sum(int(s.get(key) or 0) for s in summaries)
    for key in ("warmup_seconds", "n_grids", "fill_seconds"):  # per process, in parallel: the largest
        values = [s[key] for s in summaries if s.get(key) is not None]
        total[key] = max(values) if values else None
    total.update(out_path=str(out), n_records=len(records), n_skipped_existing=total["n_skipped_existing"] + len(done & {
        _record_id(r) for r in records}), n_duplicate_records=n_dupes, processes=world,
        seconds=max(float(s.get("seconds") or 0) for s in summaries),
        seconds_per_process=[round(float(s.get("seconds") or 0), 3) for s in summaries],
        n_done_per_process=[int(s.get("n_done") or 0) for s in summaries],
        slowest_batches_per_process=[s.get("slowest_batches") for s in summaries],
        fill_seconds_per_process=[s.get("fill_seconds") for s in summaries],
        peak_gpu_gib=max((s.get("peak_gpu_gib") or 0) for s in summaries) or None)
    total["images_per_s"] = round(total["n_done"] / total["seconds"], 3) if total["seconds"] > 0 else 0.0
    return total
