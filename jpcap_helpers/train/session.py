"""Everything :func:`~jpcap_helpers.train.plan` and :func:`~jpcap_helpers.train.train` set up for
one params set: accelerator and precision, the model with LoRA, the training data, optimizer and LR
schedule. :func:`open_session` builds a :class:`TrainSession` step by step."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .batches import (
    CUDAGRAPH_PAD_MULTIPLE,
    MISSING_IMAGE,
    PAD_MULTIPLE,
    CaptionCollator,
    PairDataset,
    StepBatchSampler,
    epoch_order,
    missing_image_files,
    pairs_at_rows,
    pairs_digest,
    read_pair_rows,
    read_pairs,
    read_val_records,
    truncate_captions,
)
from .checkpoint import Checkpoint
from .errors import TrainError
from .grouping import group_window, grouped_order, pair_grids, sample_grids
from .lora import count_parameters, prepare_model
from .loss import caption_loss, make_loss_module
from .packing import PackedCollator, PackedDataset, PackedSamples
from .steps import zero_gradients

__all__ = ["TrainData", "TrainSession", "open_session", "precision_name", "peak_memory", "empty_cache"]

TRUNCATED = "captions truncated to data.max_caption_tokens (kept)"
MISSING_SINCE_CHECKPOINT = "image file missing since the checkpoint (pairs kept in the order, skipped when drawn)"


def precision_name(dtype: Any) -> str:
    import torch
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def peak_memory(accelerator: Any) -> tuple[Optional[float], str]:
    """Peak memory in GiB and what was measured (CUDA allocator, or the process's RSS on a CPU)."""
    import torch
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**30, "cuda max_memory_allocated"
    try:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 2**20, "process peak RSS (CPU; includes everything this Python process loaded)"
    except Exception:
        return None, "n/a"


def empty_cache() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class TrainData:
    """The training pairs (as trained on), their dataset and collator (one pair per row: validation,
    and training without packing), the validation records, with ``train.pack_captions`` the packed
    samples and their collator, and with ``train.group_by_grid`` each pair's visual grid."""
    pairs: list[dict]
    skipped: dict[str, int]
    digest: str
    dataset: PairDataset
    collator: CaptionCollator
    val_records: list[dict]
    packed: Optional[PackedSamples] = None
    packed_collator: Optional[PackedCollator] = None
    grids: Optional[Any] = None    # (n_pairs, 2) int64 visual grids, with train.group_by_grid

    @property
    def n_images(self) -> int:
        return len({p["image_id"] for p in self.pairs})

    @property
    def n_samples(self) -> int:
        """Training samples per epoch: pairs, or packed samples (images, or chunks of their captions)."""
        return len(self.packed) if self.packed is not None else len(self.pairs)

    def epoch_grids(self, epoch: int) -> Any:
        """The visual grid of each of ``epoch``'s samples (``train.group_by_grid``)."""
        return sample_grids(self.grids, self.packed.for_epoch(epoch) if self.packed is not None else None)

    def epoch_dataset(self, epoch: int) -> Any:
        """The dataset of ``epoch``'s samples (packed chunks may change between epochs)."""
        if self.packed is None:
            return self.dataset
        return PackedDataset(self.pairs, self.dataset.images_dir, self.packed.for_epoch(epoch))

    @property
    def train_collator(self) -> Any:
        return self.packed_collator if self.packed is not None else self.collator


@dataclass
class TrainSession:
    """Model, processor, data, optimizer, scheduler and accelerator for one params set."""
    params: Any
    accelerator: Any
    dtype: Any
    model: Any                     # the PeftModel
    processor: Any
    entry: Any                     # the model's registry entry
    prompt: str
    data: TrainData
    optimizer: Any
    scheduler: Any
    loss_module: Any               # DDP-wrapped under several processes
    total_steps: int               # where this run stops
    schedule_steps: int            # the LR schedule's length (the first session's total_steps)
    trainable: int
    total: int
    num_workers: int
    warned_no_scorer: bool = field(default=False, repr=False)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def load_in_4bit(self) -> bool:
        return bool(self.params.model.load_in_4bit)

    @property
    def accum(self) -> int:
        t = self.params.train
        return t.effective_batch_size // (t.micro_batch_size * self.world)

    @property
    def steps_per_epoch(self) -> int:
        return self.data.n_samples // self.params.train.effective_batch_size

    @property
    def trainable_params(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def eval_enabled(self) -> bool:
        return self.params.train.eval_every > 0 and bool(self.data.val_records)

    def sample_order(self, epoch: int) -> Any:
        """``epoch``'s sample order: :func:`epoch_order` of (seed, epoch), with ``train.group_by_grid``
        grouped by visual grid within windows (:mod:`.grouping`)."""
        t, seed = self.params.train, self.params.run.seed
        order = epoch_order(self.data.n_samples, seed, epoch)
        if self.data.grids is None:
            return order
        return grouped_order(order, self.data.epoch_grids(epoch), t.micro_batch_size,
                             group_window(t.effective_batch_size, t.micro_batch_size), seed, epoch)

    def loader(self, epoch: int, first: int, last: int) -> Any:
        """This process's micro-batches for steps ``first..last-1`` of ``epoch``."""
        import torch
        from torch.utils.data import DataLoader

        t, seed = self.params.train, self.params.run.seed
        sampler = StepBatchSampler(self.sample_order(epoch), first, last,
                                   t.effective_batch_size, t.micro_batch_size, self.world, self.rank)
        # an explicit generator: the loader then draws nothing from the global torch RNG (resume-exact)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return DataLoader(self.data.epoch_dataset(epoch), batch_sampler=sampler, collate_fn=self.data.train_collator,
                          num_workers=self.num_workers, generator=gen,
                          pin_memory=self.accelerator.device.type == "cuda", persistent_workers=False)

    def to_device(self, batch: dict) -> dict:
        """The batch's tensors on this process's device (anything else, e.g. ``missing_images``, dropped)."""
        return {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items() if hasattr(v, "to")}

    def close(self) -> None:
        """Drop the model, optimizer and batches so GPU memory is freed (also after an exception)."""
        for name in ("loss_module", "model", "optimizer", "scheduler"):
            setattr(self, name, None)
        with contextlib.suppress(Exception):
            self.accelerator.free_memory()
        empty_cache()


# ---------------------------------------------------------------------------------------------
# building a session, step by step
# ---------------------------------------------------------------------------------------------

def _refuse_merge_of_4bit(params: Any) -> None:
    if params.model.load_in_4bit and params.train.merge_adapter:
        raise TrainError("train.merge_adapter: the adapter is trained on a 4-bit base (model.load_in_4bit: true, "
                         "QLoRA); merging LoRA into 4-bit weights changes the model's outputs, so it is refused. "
                         "Use the adapter on the 4-bit base (models.load_model(params, adapter=...)) or train with "
                         "model.load_in_4bit: false to get a mergeable adapter.")


def _new_accelerator(params: Any) -> tuple[Any, Any]:
    """(Accelerator, load dtype): autocast with fp32 masters for bf16/fp16, fp16 adds a GradScaler."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    from .. import models

    dtype = models.choose_dtype(params.model.precision)
    on_cuda = torch.cuda.is_available()
    if not on_cuda and dtype == torch.float16:
        raise TrainError("model.precision: fp16 training needs a CUDA GPU (use auto or fp32 on a CPU)")
    mixed = {"bf16": "bf16", "fp16": "fp16" if on_cuda else "no", "fp32": "no"}[precision_name(dtype)]
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # single process: allow plan()/train() with another precision in the same Python session
        with contextlib.suppress(Exception):
            AcceleratorState._reset_state(reset_partial_state=True)
    # cpu=True without CUDA: also lets `torchrun`/`accelerate launch` run DDP on CPUs (gloo), as tested.
    # DDP without its buffer broadcast before every forward: the VLMs' buffers are constants (rotary
    # frequencies) equal on every rank, and the broadcast made each forward wait for the slower rank
    # (2× H200, packed QLoRA: 288 → 260 and 331 → 312 ms per step, runs X2-10, X2-11 in benchmarks/RESULTS.md)
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(mixed_precision=mixed, cpu=not on_cuda, kwargs_handlers=[ddp]), dtype


def _check_batch_split(params: Any, world: int) -> None:
    t = params.train
    if t.effective_batch_size % (t.micro_batch_size * world):
        raise TrainError(f"train.effective_batch_size ({t.effective_batch_size}) must be a multiple of "
                         f"train.micro_batch_size × processes ({t.micro_batch_size} × {world})")


def _check_constant_buffers(model: Any, world: int) -> None:
    """DDP runs without its per-forward buffer broadcast (:func:`_new_accelerator`): refused for a model
    whose buffers change while it trains (batch-norm running statistics), which would then drift apart
    between processes."""
    import torch

    if world > 1:
        changing = [name for name, m in model.named_modules()
                    if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats]
        if changing:
            raise TrainError(f"{changing[0]} keeps running statistics, which DDP would not keep equal across "
                             "processes (the trainer skips DDP's buffer broadcast): train this model on one process")


def _load_model_with_lora(params: Any, acc: Any) -> tuple[Any, Any, Any]:
    """(PeftModel on this process's device, processor, registry entry); LoRA init depends on the seed only."""
    import torch
    from accelerate.utils import set_seed

    from .. import models

    four_bit = bool(params.model.load_in_4bit)
    set_seed(params.run.seed)
    with acc.main_process_first():
        model, processor, entry = models.load_model(params, load_in_4bit=four_bit, for_training=True)
    if four_bit and torch.cuda.is_available():
        dev = next(p.device for p in model.parameters())
        want = acc.device if acc.device.index is not None else torch.device("cuda", torch.cuda.current_device())
        if dev != want:
            raise TrainError(f"the 4-bit model loaded on {dev} but this process trains on {acc.device}: "
                             "models.load_model must place it on the process's GPU under DDP")
    set_seed(params.run.seed)
    model = prepare_model(model, params)
    if not four_bit:
        model.to(acc.device)   # a 4-bit model is already where it trains and cannot be moved
    return model, processor, entry


def _training_pairs(params: Any, tokenizer: Any, resume_from: Optional[Checkpoint]) -> tuple[list, dict, str]:
    """(pairs, skipped counts, digest): a fresh run's usable pairs, or exactly the checkpoint's pairs."""
    if resume_from is None:
        pairs, skipped = read_pairs(params)
    else:
        pairs, skipped = pairs_at_rows(read_pair_rows(params), resume_from.pair_rows, str(resume_from.path)), {}
    n_cut = truncate_captions(pairs, tokenizer, params.data.max_caption_tokens)
    if n_cut:
        skipped[TRUNCATED] = n_cut
    digest = pairs_digest(pairs)
    if resume_from is not None:
        if digest != resume_from.pairs_digest:
            raise TrainError(f"{resume_from.path}: the training pairs in {params.processed_dir} are not the ones "
                             "the run started with (the processed data changed): use another run.name, or "
                             "train(resume=False) to start over")
        missing = missing_image_files(pairs, params.images_dir)
        if missing:
            gone = set(missing)
            skipped[MISSING_SINCE_CHECKPOINT] = sum(p["file_name"] in gone for p in pairs)
            warnings.warn(f"{len(missing)} training image file(s) went missing since the checkpoint (first: "
                          f"{missing[0]} under {params.images_dir}): their {skipped[MISSING_SINCE_CHECKPOINT]} "
                          f"pair(s) are skipped when drawn and counted ('{MISSING_IMAGE}' in the log); the "
                          "other pairs keep their order", stacklevel=2)
    return pairs, skipped, digest


def _step_counts(params: Any, steps_per_epoch: int, resume_from: Optional[Checkpoint]) -> tuple[int, int]:
    """(total_steps: where this run stops, schedule_steps: the LR schedule's length)."""
    t = params.train
    total = t.max_steps if t.max_steps else max(1, math.ceil(t.epochs * steps_per_epoch))
    if resume_from is None:
        return total, total
    schedule = resume_from.schedule_steps
    if total > schedule:
        raise TrainError(f"{resume_from.path}: train.max_steps/epochs now ask for {total} steps, more than the "
                         f"{schedule} the run's learning-rate schedule was planned for; a resume may shorten a run, "
                         "not lengthen it: train a new run (another run.name) for more steps")
    if resume_from.step > total:
        raise TrainError(f"{resume_from.path}: the checkpoint is at step {resume_from.step}, past the {total} steps "
                         "train.max_steps/epochs now ask for: set them to at least that step")
    return total, schedule


def open_session(params: Any, resume_from: Optional[Checkpoint] = None,
                 loss: Callable[[Any, dict], tuple[Any, Any]] = caption_loss) -> TrainSession:
    """Accelerator, model with LoRA, data, optimizer and schedule for ``params`` (continuing
    ``resume_from``'s pairs and LR schedule when given); the RNG is seeded per process at the end.
    ``train.label_smoothing`` > 0 applies to the default :func:`caption_loss` (validation stays unsmoothed)."""
    import torch
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    t = params.train
    if t.label_smoothing > 0 and loss is caption_loss:
        loss = functools.partial(caption_loss, label_smoothing=t.label_smoothing)
    _refuse_merge_of_4bit(params)
    acc, dtype = _new_accelerator(params)
    _check_batch_split(params, acc.num_processes)
    model, processor, entry = _load_model_with_lora(params, acc)
    _check_constant_buffers(model, acc.num_processes)
    prompt = params.generation.prompt or entry.prompt

    pairs, skipped, digest = _training_pairs(params, processor.tokenizer, resume_from)
    pad = CUDAGRAPH_PAD_MULTIPLE if t.cudagraphs else PAD_MULTIPLE
    data = TrainData(pairs=pairs, skipped=skipped, digest=digest, dataset=PairDataset(pairs, params.images_dir),
                     collator=CaptionCollator(processor, prompt, padding_side="right", pad_multiple=pad),
                     val_records=read_val_records(params, t.eval_images) if t.eval_every > 0 else [])
    if t.pack_captions:
        data.packed = PackedSamples(pairs, t.captions_per_image, params.run.seed)
        data.packed_collator = PackedCollator(processor, prompt, pad_multiple=pad)
    if t.group_by_grid:   # a resume takes the grids the run started with (images may have gone since)
        saved = resume_from.pair_grids if resume_from is not None else None
        data.grids = saved if saved is not None else pair_grids(pairs, params.images_dir, processor)
    steps_per_epoch = data.n_samples // t.effective_batch_size
    if steps_per_epoch < 1:
        what = "packed samples (images)" if t.pack_captions else "training pairs"
        raise TrainError(f"{data.n_samples} {what} are fewer than one optimizer step's "
                         f"train.effective_batch_size ({t.effective_batch_size})")
    total_steps, schedule_steps = _step_counts(params, steps_per_epoch, resume_from)

    trainable, total = count_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                                  weight_decay=t.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(t.warmup_ratio * schedule_steps), schedule_steps)
    # the model is already where it trains (a 4-bit model cannot be moved)
    loss_module, optimizer = acc.prepare(make_loss_module(model, loss), optimizer, device_placement=[False, False])
    set_seed(params.run.seed + acc.process_index)
    num_workers = 0 if acc.device.type == "cpu" else min(4, max(0, (os.cpu_count() or 1) - 1))
    session = TrainSession(params=params, accelerator=acc, dtype=dtype, model=model, processor=processor,
                           entry=entry, prompt=prompt, data=data, optimizer=optimizer, scheduler=scheduler,
                           loss_module=loss_module, total_steps=total_steps, schedule_steps=schedule_steps,
                           trainable=trainable, total=total, num_workers=num_workers)
    zero_gradients(session)   # train.cudagraphs: gradients allocated before the first backward
    return session
