"""QLoRA / LoRA fine-tuning of a Qwen2-VL captioner on processed STAIR-format pairs (or jp-shapes).

One loop for every face: the tiny model on a CPU (fp32), a free Colab T4 (fp16 + loss scaling, 4-bit
NF4 language model), a big GPU (bf16) and several GPUs under ``accelerate launch`` (DDP).

The fast path (see docs/training.md): every weight frozen; the vision tower (patch embed + blocks)
runs without autograd in the load dtype; the projector (``model.visual.merger``) trains or not per
``train.projector``; LoRA on q/k/v/o/gate/up/down of the top-k language layers; logits and the
cross-entropy only at caption positions (hidden states → lm_head on the selected rows). No
``prepare_model_for_kbit_training`` (it would keep a full autograd graph through the ViT and upcast
every non-4-bit weight to fp32).

Public API: :func:`train`, :func:`plan`, :func:`read_train_log`, :func:`merge_adapter`; building
blocks for tests and notebooks: :class:`CaptionCollator`, :func:`prepare_model`,
:func:`caption_loss`, :func:`plain_loss`, :func:`lora_target_modules`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .data import load_image, load_split
from .data import resolve_image_path as image_path
from .io import append_jsonl, atomic_write_json, read_jsonl, repair_jsonl_tail

# A free Colab session ends after at most ~12 h; a free T4 is often reclaimed much earlier, so plan
# for 3 usable hours (resume from the last checkpoint in the next session for longer runs).
COLAB_SESSION_MAX_HOURS = 12.0
COLAB_FREE_T4_USABLE_HOURS = 3.0
# Abort after this many optimizer steps in a row whose loss (or, without a GradScaler, gradient)
# was inf/NaN; single bad steps are skipped and counted.
MAX_CONSECUTIVE_NONFINITE = 20
KEEP_CHECKPOINTS = 2
IGNORE_INDEX = -100
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_TOKEN = "<|im_end|>"
PROBE_MICRO_BATCHES = 3          # timed probe: the first is warm-up, the others are timed
LOG_FLUSH_EVERY = 10             # train_log.jsonl rows are buffered this many steps (and at evals/saves)
# params that may change between a kill and a resume without invalidating the checkpoint
_RESUME_FREE_KEYS = {"eval_every", "eval_images", "save_every", "merge_adapter"}


class TrainError(RuntimeError):
    """Training cannot start or go on; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def chat_messages(prompt: str, caption: Optional[str] = None) -> list[dict]:
    """The chat the model sees: user = image + prompt; assistant = caption (when training)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


def _check_row(row: Any, keys: Sequence[str], path: Path, line: int) -> None:
    if not isinstance(row, dict):
        raise TrainError(f"{path}: row {line}: expected a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise TrainError(f"{path}: row {line}: missing key {key!r}")


def read_pairs(params) -> tuple[list[dict], dict[str, int]]:
    """Training pairs ``{"image_id", "file_name", "caption"}`` and counts of skipped rows by reason.

    Reads ``<processed_dir>/train_pairs.jsonl`` (or derives the pairs from ``train.jsonl``; the data
    stage already applied ``data.train_subset``) and skips (and counts) pairs whose image file is missing
    or whose caption is empty.
    """
    processed = Path(params.processed_dir)
    pairs_path, records_path = processed / "train_pairs.jsonl", processed / "train.jsonl"
    rows: list[dict] = []
    if pairs_path.exists():
        for i, row in enumerate(read_jsonl(pairs_path), start=1):
            _check_row(row, ("image_id", "file_name", "caption"), pairs_path, i)
            rows.append({"image_id": row["image_id"], "file_name": row["file_name"], "caption": row["caption"]})
    elif records_path.exists():
        rows = [{"image_id": r.image_id, "file_name": r.file_name, "caption": c}
                for r in load_split(records_path) for c in r.captions]
    else:
        raise TrainError(f"no training data: {pairs_path} not found — run the data stage "
                         "(notebook 01 / `jpcap prepare`) first")
    skipped: dict[str, int] = {}
    images_dir = Path(params.images_dir)
    exists: dict[str, bool] = {}
    out = []
    for r in rows:
        if not isinstance(r["caption"], str) or not r["caption"].strip():
            skipped["empty caption"] = skipped.get("empty caption", 0) + 1
            continue
        fn = r["file_name"]
        if fn not in exists:
            exists[fn] = image_path(images_dir, fn).is_file()
        if not exists[fn]:
            skipped["image file missing"] = skipped.get("image file missing", 0) + 1
            continue
        out.append(r)
    if not out:
        raise TrainError(f"no usable training pairs in {processed} (skipped: {skipped or 'none'}; "
                         f"images looked up under {images_dir})")
    return out, skipped


def read_val_records(params, n: int) -> list[dict]:
    """The first ``n`` records of ``<processed_dir>/val.jsonl`` whose image exists (empty without the file)."""
    path = Path(params.processed_dir) / "val.jsonl"
    if n <= 0 or not path.exists():
        return []
    usable = [r.to_dict() for r in load_split(path)
              if r.captions and image_path(params.images_dir, r.file_name).is_file()]
    return usable[:n]


def truncate_captions(pairs: list[dict], tokenizer, max_tokens: Optional[int]) -> int:
    """Cut captions longer than ``max_tokens`` tokens (in place); returns how many were cut."""
    if not max_tokens:
        return 0
    ids = tokenizer([p["caption"] for p in pairs], add_special_tokens=False)["input_ids"]
    n = 0
    for p, row in zip(pairs, ids):
        if len(row) > max_tokens:
            p["caption"] = tokenizer.decode(row[:max_tokens]).rstrip("\ufffd")
            n += 1
    return n


class PairDataset:
    """Map-style dataset over caption pairs: ``{"image", "caption", "image_id"}`` per item."""

    def __init__(self, pairs: list[dict], images_dir: str | os.PathLike):
        self.pairs, self.images_dir = pairs, Path(images_dir)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        path = image_path(self.images_dir, p["file_name"])
        try:
            image = load_image(path)
        except Exception as e:  # a corrupt file: say which one
            raise TrainError(f"cannot read image {path} (image_id {p['image_id']}): {e}") from e
        return {"image": image, "caption": p["caption"], "image_id": p["image_id"]}


class CaptionCollator:
    """Builds model inputs and labels from ``{"image", "caption"}`` samples.

    The chat goes through the processor's chat template (system prompt from the template, user =
    image + prompt, assistant = caption). Labels are ``-100`` everywhere except the caption tokens and
    the closing ``<|im_end|>``: everything up to and including the last ``<|im_start|>assistant\\n``
    header, the image tokens, the newline after ``<|im_end|>`` and the padding are masked. The
    header is searched per row, so left and right padding give the same labels.
    With ``prompt_only`` the batch holds the prompt and the generation header, for ``generate``.
    """

    def __init__(self, processor, prompt: str, padding_side: str = "right", prompt_only: bool = False):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor, self.prompt = processor, prompt
        self.padding_side, self.prompt_only = padding_side, prompt_only
        tok = processor.tokenizer
        self.header_ids = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
        self.end_id = tok.convert_tokens_to_ids(END_TOKEN)
        if not self.header_ids or self.end_id is None or self.end_id == tok.unk_token_id:
            raise TrainError(f"the tokenizer has no {END_TOKEN} / assistant header: not a Qwen chat tokenizer")

    def texts(self, samples: Sequence[dict]) -> list[str]:
        apply = self.processor.apply_chat_template
        if self.prompt_only:
            return [apply(chat_messages(self.prompt), tokenize=False, add_generation_prompt=True) for _ in samples]
        return [apply(chat_messages(self.prompt, s["caption"]), tokenize=False) for s in samples]

    def __call__(self, samples: Sequence[dict]) -> dict:
        with warnings.catch_warnings():
            # min/max_pixels given to from_pretrained are re-passed on every call (transformers 5 warns)
            warnings.filterwarnings("ignore", message=".*min_pixels.*max_pixels.*", category=FutureWarning)
            batch = self.processor(text=self.texts(samples), images=[s["image"] for s in samples], padding=True,
                                   padding_side=self.padding_side, return_tensors="pt")
        batch = dict(batch)
        if not self.prompt_only:
            batch["labels"] = self.labels_for(batch["input_ids"], batch["attention_mask"])
        return batch

    def labels_for(self, input_ids, attention_mask):
        """Labels for a padded batch: caption tokens and ``<|im_end|>`` kept, the rest ``-100``."""
        import torch

        labels = torch.full_like(input_ids, IGNORE_INDEX)
        h = len(self.header_ids)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            live = attention_mask[row].tolist()
            start = None
            for pos in range(len(ids) - h, -1, -1):
                if ids[pos:pos + h] == self.header_ids and all(live[pos:pos + h]):
                    start = pos + h
                    break
            if start is None:
                raise TrainError(f"batch row {row}: no {ASSISTANT_HEADER!r} header in the tokenized chat "
                                 "(is the chat template Qwen's?)")
            try:
                end = ids.index(self.end_id, start)
            except ValueError:
                raise TrainError(f"batch row {row}: the caption has no closing {END_TOKEN}") from None
            labels[row, start:end + 1] = input_ids[row, start:end + 1]
        return labels


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of ``epoch``: a function of (seed, epoch) only."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class _StepBatchSampler:
    """Micro-batches of one rank for optimizer steps ``first..last-1`` of one epoch.

    Step ``s`` uses ``order[s*E:(s+1)*E]`` (E = effective batch); its ``world*accum`` micro-batches
    are dealt round-robin: micro-batch ``j`` of rank ``r`` is chunk ``j*world + r``.
    """

    def __init__(self, order: np.ndarray, first: int, last: int, effective: int, micro: int,
                 world: int, rank: int):
        self.order, self.first, self.last = order, first, last
        self.effective, self.micro, self.world, self.rank = effective, micro, world, rank
        self.accum = effective // (micro * world)

    def __iter__(self):
        for s in range(self.first, self.last):
            chunk = self.order[s * self.effective:(s + 1) * self.effective]
            for j in range(self.accum):
                k = j * self.world + self.rank
                yield [int(i) for i in chunk[k * self.micro:(k + 1) * self.micro]]

    def __len__(self) -> int:
        return (self.last - self.first) * self.accum


# ---------------------------------------------------------------------------------------------
# model: freezing, LoRA, fast-path loss
# ---------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.")


def _causal_lm(model):
    """The transformers model under PEFT / accelerate / DDP wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "lm_head"):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def text_layer_count(model) -> int:
    names = [n for n, _ in model.named_modules()]
    idx = {int(m.group(1)) for n in names if "visual" not in n for m in [_LAYER_RE.search(n)] if m}
    if not idx:
        raise TrainError(f"{type(model).__name__}: no language_model.layers.N modules found (not a Qwen-VL model?)")
    return max(idx) + 1


def lora_target_modules(model, top_k_layers: int | str) -> list[str]:
    """Full names of q/k/v/o/gate/up/down projections in the top-k language layers (never visual)."""
    n_layers = text_layer_count(model)
    if top_k_layers == "all":
        top = set(range(n_layers))
    else:
        if not isinstance(top_k_layers, int) or top_k_layers < 1:
            raise TrainError(f"train.top_k_layers: expected an int ≥ 1 or 'all', got {top_k_layers!r}")
        if top_k_layers > n_layers:
            raise TrainError(f"train.top_k_layers: {top_k_layers} > the model's {n_layers} language layers "
                             "(use 'all' or a smaller number)")
        top = set(range(n_layers - top_k_layers, n_layers))
    out = []
    for name, _ in model.named_modules():
        if "visual" in name.split("."):
            continue
        m = _LAYER_RE.search(name)
        if m and int(m.group(1)) in top and name.endswith(LORA_TARGETS):
            out.append(name)
    if not out:
        raise TrainError("no LoRA target modules found in the language layers")
    return out


def prepare_model(model, params):
    """Freeze everything, add LoRA (peft) to the top-k language layers, train the projector or not.

    Returns the ``PeftModel``. Trainable weights are fp32 (mixed precision keeps fp32 masters); the
    vision tower keeps its load dtype and never builds an autograd graph (see :func:`caption_loss`);
    gradient checkpointing (``train.gradient_checkpointing``) is non-reentrant on the language layers
    only, so no input embedding has to require grad.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    t = params.train
    model_type = getattr(model.config, "model_type", "")
    if model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise TrainError(f"fine-tuning {model_type or type(model).__name__} is not supported: the fast path "
                         "covers Qwen2-VL and Qwen2.5-VL (Qwen3-VL's deepstack visual features are not wired "
                         "in yet); zero-shot captioning of it works")
    for p in model.parameters():
        p.requires_grad_(False)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None:
            cfg.use_cache = False
    targets = lora_target_modules(model, t.top_k_layers)
    config = LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
                        target_modules=targets, task_type="CAUSAL_LM",
                        modules_to_save=["merger"] if t.projector == "trainable" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # peft reads a deprecated transformers property
        peft_model = get_peft_model(model, config)
    base = _causal_lm(peft_model)
    # same outputs, fewer activations kept for backward (SwiGLU, RMSNorm): docs/training.md
    from .fastpath import compile_blocks, compile_supported, use_lean_activations
    use_lean_activations(base.model.language_model)
    if params.model.compile and compile_supported(model_type) and not t.gradient_checkpointing:
        # compiled layers inside gradient checkpointing were never measured: those run eagerly
        compile_blocks(base.model.language_model.layers)
    if t.gradient_checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers hooks every input embedding (also the ViT patch embed) to require grad; the
        # non-reentrant checkpoint does not need it and the frozen ViT must stay graph-free
        if hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()
    visual = base.model.visual
    visual.gradient_checkpointing = False
    for module in visual.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        if p.requires_grad and "visual" in name and "merger" not in name:
            raise TrainError(f"internal: vision parameter {name} is trainable")
    peft_model.train()
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked sizes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or type(p).__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _visual_features(base, pixel_values, grid_thw):
    """Projector outputs per image: the frozen ViT without autograd, then the merger (maybe trainable)."""
    import torch

    visual = base.model.visual
    vit_dtype = next(visual.patch_embed.parameters()).dtype
    with torch.no_grad():
        # last_hidden_state is the ViT output before the merger; the merger output of this no-grad
        # call is discarded (≈1% of the vision FLOPs) and recomputed below with autograd
        hidden = visual(pixel_values.to(vit_dtype), grid_thw=grid_thw).last_hidden_state
    merger = visual.merger
    params_ = [p for p in merger.parameters() if p.requires_grad] or list(merger.parameters())
    embeds = merger(hidden.to(params_[0].dtype))
    sizes = (grid_thw.prod(-1) // visual.spatial_merge_size ** 2).tolist()
    return embeds, sizes


_USE_MM_ENCODER_OUTPUTS: Optional[bool] = None  # None: decided from the installed transformers


def _language_forward(base, batch, embeds, sizes):
    import torch

    inner = base.model
    use_mm = _USE_MM_ENCODER_OUTPUTS
    if use_mm is None:
        use_mm = "mm_encoder_outputs" in inspect.signature(inner.forward).parameters
    common = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  image_grid_thw=batch["image_grid_thw"], use_cache=False)
    if "mm_token_type_ids" in batch:
        common["mm_token_type_ids"] = batch["mm_token_type_ids"]
    if use_mm:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        features = BaseModelOutputWithPooling(pooler_output=torch.split(embeds, sizes))
        return inner(mm_encoder_outputs={"image": features}, **common)
    # older transformers 5.x: scatter the image features into the token embeddings ourselves
    ids = batch["input_ids"]
    tok_embeds = inner.get_input_embeddings()(ids)
    mask = (ids == base.config.image_token_id).unsqueeze(-1).expand_as(tok_embeds)
    tok_embeds = tok_embeds.masked_scatter(mask, embeds.to(tok_embeds.dtype))
    return inner(inputs_embeds=tok_embeds, **common)


def caption_loss(model, batch: dict):
    """Fast-path loss: ``(sum of token cross-entropies, number of target tokens)``.

    The ViT runs without autograd, the projector with it; hidden states go through ``lm_head`` only
    at positions whose next token is a target, in fp32 for the cross-entropy.
    """
    import torch
    import torch.nn.functional as F

    base = _causal_lm(model)
    embeds, sizes = _visual_features(base, batch["pixel_values"], batch["image_grid_thw"])
    out = _language_forward(base, batch, embeds, sizes)
    hidden = out.last_hidden_state[:, :-1]
    targets = batch["labels"][:, 1:].to(hidden.device)
    sel = targets != IGNORE_INDEX
    logits = base.lm_head(hidden[sel]).float()
    return F.cross_entropy(logits, targets[sel], reduction="sum"), sel.sum()


def plain_loss(model, batch: dict):
    """The reference: a full forward with ``labels`` (the transformers loss, mean over targets)."""
    return model(**batch, use_cache=False).loss


def _loss_module(peft_model):
    """A module whose ``forward(batch)`` is the fast-path loss, so DDP wraps one module."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return caption_loss(self.model, batch)

    return LossModule(peft_model)


# ---------------------------------------------------------------------------------------------
# RNG, checkpoints
# ---------------------------------------------------------------------------------------------

def _rng_state() -> dict:
    import torch
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_fingerprint(params) -> str:
    """Hash of everything a checkpoint depends on (the eval/save cadence may change on resume)."""
    d = params.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in _RESUME_FREE_KEYS}
    keep = {"seed": d["run"]["seed"], "data": d["data"], "model": d["model"], "train": d["train"],
            "prompt": d["generation"]["prompt"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def _checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` of a run, oldest first."""
    folder = _checkpoints_dir(Path(run_dir))
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and p.is_dir() and (p / "state.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def _peft_state_dict(peft_model) -> dict:
    from peft import get_peft_model_state_dict
    return get_peft_model_state_dict(peft_model)


# ---------------------------------------------------------------------------------------------
# results and logs
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What :func:`train` returns (also written to ``<run_dir>/train_result.json``)."""
    adapter_dir: str
    steps: int
    total_steps: int
    final_train_loss: Optional[float]
    final_val_loss: Optional[float]
    final_val_cider: Optional[float]
    seconds: float
    peak_memory_gib: Optional[float]
    peak_memory_kind: str
    trainable_params: int
    non_finite_steps_skipped: int
    resumed_from_step: int = 0
    losses: dict[int, float] = field(default_factory=dict)   # step → train loss of the steps run now
    skipped_pairs: dict[str, int] = field(default_factory=dict)
    merged_dir: Optional[str] = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["losses"] = {str(k): v for k, v in self.losses.items()}
        return d


def read_train_log(run_dir: str | os.PathLike):
    """``<run_dir>/train_log.jsonl`` as a DataFrame, one row per optimizer step (the last record of a
    step wins, so rows re-done after a resume replace the killed run's)."""
    import pandas as pd

    path = Path(run_dir) / "train_log.jsonl"
    cols = ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "val_loss", "val_CIDEr", "skipped"]
    if not path.exists():
        return pd.DataFrame(columns=cols)
    rows = list(read_jsonl(path, tolerate_partial_last=True))
    if not rows:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(rows).drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    for c in cols:
        if c not in df:
            df[c] = np.nan
    return df[cols + [c for c in df.columns if c not in cols]]


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log rows of steps after ``last_step`` (written by a killed run after its last checkpoint)."""
    if not path.exists():
        return
    repair_jsonl_tail(path)
    rows = [r for r in read_jsonl(path, tolerate_partial_last=True) if r.get("step", 0) <= last_step]
    from .io import atomic_write_jsonl
    atomic_write_jsonl(path, rows)


# ---------------------------------------------------------------------------------------------
# the session: everything plan() and train() share
# ---------------------------------------------------------------------------------------------

def _precision_name(dtype) -> str:
    import torch
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def _new_accelerator(mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # single process: allow plan()/train() with another precision in the same Python session
        with contextlib.suppress(Exception):
            AcceleratorState._reset_state(reset_partial_state=True)
    import torch
    # cpu=True without CUDA: also lets `torchrun`/`accelerate launch` run DDP on CPUs (gloo), as tested
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _peak_memory(accelerator) -> tuple[Optional[float], str]:
    import torch
    if accelerator.device.type == "cuda":
        return torch.cuda.max_memory_allocated(accelerator.device) / 2**30, "cuda max_memory_allocated"
    try:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 2**20, "process peak RSS (CPU; includes everything this Python process loaded)"
    except Exception:
        return None, "n/a"


class _Session:
    """Model, processor, data, optimizer, scheduler and accelerator for one params set."""

    def __init__(self, params):
        import torch
        from accelerate.utils import set_seed
        from transformers import get_cosine_schedule_with_warmup

        from . import models

        self.params = params
        t = params.train
        if t.method == "qlora" and t.merge_adapter:
            raise TrainError("train.merge_adapter: the adapter is trained on a 4-bit base (train.method qlora); "
                             "merging LoRA into 4-bit weights changes the model's outputs, so it is refused. Use "
                             "the adapter on the 4-bit base (models.load_model(params, adapter=...)) or train "
                             "with train.method: lora to get a mergeable adapter.")
        self.dtype = models.choose_dtype(params.model.precision)
        on_cuda = torch.cuda.is_available()
        if not on_cuda and self.dtype == torch.float16:
            raise TrainError("model.precision: fp16 training needs a CUDA GPU (use auto or fp32 on a CPU)")
        # autocast + fp32 master weights for bf16/fp16; fp16 adds a GradScaler (loss scaling)
        mixed = {"bf16": "bf16", "fp16": "fp16" if on_cuda else "no", "fp32": "no"}[_precision_name(self.dtype)]
        self.accelerator = acc = _new_accelerator(mixed)
        self.main = acc.is_main_process
        self.world = acc.num_processes
        self.rank = acc.process_index
        if t.effective_batch_size % (t.micro_batch_size * self.world):
            raise TrainError(f"train.effective_batch_size ({t.effective_batch_size}) must be a multiple of "
                             f"train.micro_batch_size × processes ({t.micro_batch_size} × {self.world})")
        self.accum = t.effective_batch_size // (t.micro_batch_size * self.world)
        self.load_in_4bit = t.method == "qlora"
        set_seed(params.run.seed)

        with acc.main_process_first():
            model, self.processor, self.entry = models.load_model(params, load_in_4bit=self.load_in_4bit,
                                                                  for_training=True)
        if self.load_in_4bit and on_cuda:
            dev = next(p.device for p in model.parameters())
            want = acc.device if acc.device.index is not None else torch.device("cuda", torch.cuda.current_device())
            if dev != want:
                raise TrainError(f"the 4-bit model loaded on {dev} but this process trains on {acc.device}: "
                                 "models.load_model must place it on the process's GPU under DDP")
        self.prompt = params.generation.prompt or self.entry.prompt
        set_seed(params.run.seed)   # LoRA init is a function of the seed alone
        self.model = prepare_model(model, params)
        if not self.load_in_4bit:
            self.model.to(acc.device)
        self.trainable, self.total = count_parameters(self.model)

        self.pairs, self.skipped = read_pairs(params)
        n_cut = truncate_captions(self.pairs, self.processor.tokenizer, params.data.max_caption_tokens)
        if n_cut:
            self.skipped["captions truncated to data.max_caption_tokens (kept)"] = n_cut
        self.dataset = PairDataset(self.pairs, params.images_dir)
        self.collator = CaptionCollator(self.processor, self.prompt, padding_side="right")
        self.n_images = len({p["image_id"] for p in self.pairs})
        self.steps_per_epoch = len(self.pairs) // t.effective_batch_size
        if self.steps_per_epoch < 1:
            raise TrainError(f"{len(self.pairs)} training pairs are fewer than one optimizer step's "
                             f"train.effective_batch_size ({t.effective_batch_size})")
        self.total_steps = t.max_steps if t.max_steps else max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.val_records = read_val_records(params, t.eval_images) if t.eval_every > 0 else []
        self.eval_enabled = t.eval_every > 0 and bool(self.val_records)

        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.trainable_params, lr=t.learning_rate, weight_decay=t.weight_decay)
        warmup = math.ceil(t.warmup_ratio * self.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, self.total_steps)
        self.loss_module = _loss_module(self.model)
        # the model is already where it trains (a 4-bit model cannot be moved)
        self.loss_module, self.optimizer = acc.prepare(self.loss_module, optimizer, device_placement=[False, False])
        set_seed(params.run.seed + self.rank)
        self.num_workers = 0 if acc.device.type == "cpu" else min(4, max(0, (os.cpu_count() or 1) - 1))

    def close(self) -> None:
        """Drop the model, optimizer and batches so GPU memory is freed (also after an exception)."""
        for name in ("loss_module", "model", "optimizer", "scheduler", "trainable_params"):
            setattr(self, name, None)
        with contextlib.suppress(Exception):
            self.accelerator.free_memory()
        _empty_cache()

    # -- data ------------------------------------------------------------------------------
    def loader(self, epoch: int, first: int, last: int):
        from torch.utils.data import DataLoader
        import torch

        t = self.params.train
        sampler = _StepBatchSampler(epoch_order(len(self.pairs), self.params.run.seed, epoch), first, last,
                                    t.effective_batch_size, t.micro_batch_size, self.world, self.rank)
        # an explicit generator: the loader then draws nothing from the global torch RNG (resume-exact)
        gen = torch.Generator().manual_seed(self.params.run.seed * 100_003 + epoch)
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collator,
                          num_workers=self.num_workers, generator=gen,
                          pin_memory=self.accelerator.device.type == "cuda",
                          persistent_workers=False)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}

    # -- one optimizer step ------------------------------------------------------------------
    def forward_backward(self, micro_batches: list[dict], n_tokens_global: float) -> tuple[Any, bool]:
        """Backward over the step's micro-batches; returns (summed loss of this rank, all finite)."""
        import torch

        acc = self.accelerator
        total = torch.zeros((), device=acc.device)
        finite_all = True
        for j, batch in enumerate(micro_batches):
            sync = j == len(micro_batches) - 1
            ctx = contextlib.nullcontext() if sync else acc.no_sync(self.loss_module)
            with ctx:
                with acc.autocast():
                    loss_sum, _ = self.loss_module(batch)
                bad = (~torch.isfinite(loss_sum.detach())).float()
                if self.world > 1:
                    bad = acc.reduce(bad, "sum")
                if float(bad) > 0:
                    finite_all = False
                    if self.world > 1:   # DDP: every forward needs its backward; the step is skipped anyway
                        acc.backward(torch.nan_to_num(loss_sum, 0.0, 0.0, 0.0) * 0.0)
                    continue
                acc.backward(loss_sum * (self.world / n_tokens_global))
                total = total + loss_sum.detach().float()
        return total, finite_all

    def n_tokens(self, micro_batches: list[dict]) -> float:
        import torch
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        t = torch.tensor(float(local), device=self.accelerator.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, "sum")
        return max(float(t), 1.0)

    # -- probe ---------------------------------------------------------------------------------
    def probe(self, session_hours: Optional[float] = None, start_step: int = 0) -> dict:
        """Time a few real micro-batches (forward + backward) and one optimizer step, measure peak
        memory, estimate the run's duration; restores weights, optimizer, scaler and RNG afterwards."""
        import torch

        acc, t = self.accelerator, self.params.train
        rng = _rng_state()
        weights = [p.detach().clone() for p in self.trainable_params]
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        scaler_state = copy.deepcopy(acc.scaler.state_dict()) if acc.scaler is not None else None
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(acc.device)
        order = epoch_order(len(self.pairs), self.params.run.seed, 0)
        n_micro = max(PROBE_MICRO_BATCHES, 2)
        collate_times, step_times = [], []
        batches = []
        for k in range(n_micro):
            idx = order[(k * t.micro_batch_size) % len(order):][:t.micro_batch_size]
            t0 = time.perf_counter()
            batches.append(self.collator([self.dataset[int(i)] for i in idx]))
            collate_times.append(time.perf_counter() - t0)
        for k, batch in enumerate(batches):
            batch = self.to_device(batch)
            t0 = time.perf_counter()
            ntok = self.n_tokens([batch])
            self.forward_backward([batch], ntok)
            if acc.device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        acc.clip_grad_norm_(self.trainable_params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        step_skipped = acc.optimizer_step_was_skipped   # fp16: the scaler's first scale may overflow
        self.optimizer.zero_grad(set_to_none=True)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        opt_time = time.perf_counter() - t0
        peak, peak_kind = _peak_memory(acc)
        if step_skipped and peak is not None and not opt_state["state"]:
            peak += 2 * 4 * self.trainable / 2**30       # AdamW's two fp32 moments, never allocated
            peak_kind += " + AdamW state (computed: the probe step was skipped by the GradScaler)"
        # restore: the probe must not change the run
        with torch.no_grad():
            for p, w in zip(self.trainable_params, weights):
                p.copy_(w)
        self.optimizer.load_state_dict(opt_state)
        if scaler_state is not None:
            acc.scaler.load_state_dict(scaler_state)
        _set_rng_state(rng)
        del weights, opt_state

        micro_s = float(np.median(step_times[1:]))
        collate_s = float(np.median(collate_times))
        if self.num_workers == 0:      # collation runs in line with compute
            step_s = self.accum * (micro_s + collate_s) + opt_time
        else:                          # loader workers collate while the GPU computes
            step_s = self.accum * max(micro_s, collate_s / self.num_workers) + opt_time
        remaining = max(0, self.total_steps - start_step)
        eval_s = self._estimate_eval_seconds(micro_s) if self.eval_enabled else 0.0
        n_evals = 0
        if self.eval_enabled:   # every eval_every steps and at the last step
            n_evals = self.total_steps // t.eval_every - start_step // t.eval_every
            n_evals += int(self.total_steps % t.eval_every != 0 and remaining > 0)
        eta_s = remaining * step_s + n_evals * eval_s
        info = {
            "device": str(acc.device), "processes": self.world, "precision": _precision_name(self.dtype),
            "mixed_precision": acc.mixed_precision, "method": t.method, "load_in_4bit": self.load_in_4bit,
            "trainable_params": self.trainable, "total_params": self.total,
            "trainable_share": self.trainable / max(self.total, 1),
            "n_train_pairs": len(self.pairs), "n_train_images": self.n_images, "skipped_pairs": self.skipped,
            "micro_batch_size": t.micro_batch_size, "accumulation_steps": self.accum,
            "effective_batch_size": t.effective_batch_size, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "start_step": start_step,
            "probe_micro_batch_s": micro_s, "probe_collate_s": collate_s, "probe_optimizer_step_s": opt_time,
            "step_s": step_s, "samples_per_s": t.effective_batch_size / step_s,
            "eval_s_each": eval_s, "n_evals": n_evals,
            "peak_memory_gib": peak, "peak_memory_kind": peak_kind,
            "eta_s": eta_s, "eta_h": eta_s / 3600,
        }
        info.update(_fit_check(self.params, info, session_hours, self.n_images))
        return info

    def _estimate_eval_seconds(self, micro_s: float) -> float:
        """Validation time: loss forwards (≈ a third of forward+backward) + a short timed generate."""
        import torch

        t, g = self.params.train, self.params.generation
        n_pairs = sum(len(r["captions"]) for r in self.val_records)
        loss_s = math.ceil(n_pairs / t.micro_batch_size) * micro_s / 3
        n = min(len(self.val_records), g.batch_size, 8)
        samples = [{"image": load_image(image_path(self.params.images_dir, r["file_name"]))}
                   for r in self.val_records[:n]]
        batch = self.to_device(CaptionCollator(self.processor, self.prompt, "left", prompt_only=True)(samples))
        model = self.model
        rng = _rng_state()
        model.eval()
        new = 4
        try:
            with torch.no_grad(), self.accelerator.autocast():
                t0 = time.perf_counter()
                model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                if self.accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                gen_s = time.perf_counter() - t0
        finally:
            model.train()
            _set_rng_state(rng)
        per_batch = gen_s / new * g.max_new_tokens   # a batch of up to g.batch_size images
        gen_total = math.ceil(len(self.val_records) / max(n, 1)) * per_batch
        return loss_s + gen_total


def _fit_check(params, info: dict, session_hours: Optional[float], n_images: int) -> dict:
    """Warn when the ETA exceeds a Colab session; suggest params that would fit."""
    if session_hours is None:
        try:
            from .colab import in_colab, gpu_info
            gpu = gpu_info().get("gpu") or ""
            if "T4" in gpu:
                session_hours = COLAB_FREE_T4_USABLE_HOURS
            elif in_colab():
                session_hours = COLAB_SESSION_MAX_HOURS
        except Exception:
            session_hours = None
    out: dict[str, Any] = {"session_hours": session_hours, "fits_session": None, "warning": None,
                           "suggestions": {}}
    if session_hours is None:
        return out
    budget = session_hours * 3600
    eta = info["eta_s"]
    out["fits_session"] = eta <= budget
    if eta <= budget:
        return out
    f = 0.9 * budget / eta
    t, m = params.train, params.model
    sugg: dict[str, Any] = {}
    if not t.max_steps:
        sugg["data.train_subset"] = max(1, int(n_images * f))
        sugg["train.epochs"] = round(max(0.01, t.epochs * f), 2)
    sugg["train.max_steps"] = max(1, int(info["total_steps"] * f))
    px = 28 * 28   # one merged image token
    new_max = max(m.min_pixels, int(m.max_pixels * f) // px * px)
    if f >= 0.5 and new_max < m.max_pixels:   # rough (text tokens and fixed costs remain): only small cuts
        sugg["model.max_pixels"] = new_max
    out["suggestions"] = sugg
    alts = ", ".join(f"{k}: {v}" for k, v in sugg.items())
    out["warning"] = (f"⚠ this run needs about {eta / 3600:.1f} h on this hardware, more than the "
                      f"{session_hours:g} h a {'free T4 ' if session_hours == COLAB_FREE_T4_USABLE_HOURS else ''}"
                      f"Colab session can be counted on. Any ONE of these would fit (max_pixels only roughly: time "
                      f"is not exactly proportional to image tokens): {alts}. Or keep the params and resume in the "
                      f"next session: checkpoints every train.save_every={t.save_every} steps.")
    return out


def plan(params, *, session_hours: Optional[float] = None) -> dict:
    """Load the model and data as :func:`train` would and run timed probe steps: trainable parameter
    count, measured peak memory, ETA for the whole run on this hardware and, when it would not fit a
    Colab session (``session_hours``; default: 3 h on a T4, 12 h elsewhere in Colab, no limit
    outside Colab), a warning with params that would fit. Changes nothing on disk."""
    session = _Session(params)
    try:
        return session.probe(session_hours)
    finally:
        session.close()


def _empty_cache() -> None:
    import gc
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_plan(info: dict) -> str:
    """A few human lines for a plan dict."""
    mem = "n/a" if info["peak_memory_gib"] is None else f"{info['peak_memory_gib']:.2f} GiB ({info['peak_memory_kind']})"
    lines = [
        f"train: {info['method']} on {info['device']} ×{info['processes']} · {info['precision']} "
        f"(mixed precision: {info['mixed_precision']}) · 4-bit: {info['load_in_4bit']}",
        f"trainable params: {info['trainable_params']:,} of {info['total_params']:,} "
        f"({100 * info['trainable_share']:.2f}%)",
        f"data: {info['n_train_pairs']:,} pairs / {info['n_train_images']:,} images · "
        f"{info['steps_per_epoch']} steps/epoch · {info['total_steps']} steps of {info['effective_batch_size']} "
        f"(micro-batch {info['micro_batch_size']} × {info['accumulation_steps']} accumulation)",
        f"probe: {info['step_s']:.3f} s/step ({info['samples_per_s']:.1f} samples/s) · peak memory {mem}",
        f"ETA: {info['eta_h']:.2f} h for steps {info['start_step']}→{info['total_steps']}"
        + (f" incl. {info['n_evals']} validations of ~{info['eval_s_each']:.0f} s" if info['n_evals'] else ""),
    ]
    if info.get("skipped_pairs"):
        lines.append(f"skipped: {info['skipped_pairs']}")
    if info.get("warning"):
        lines.append(info["warning"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _val_loss(session: _Session) -> Optional[float]:
    import torch

    pairs = [{"image_id": r["image_id"], "file_name": r["file_name"], "caption": c}
             for r in session.val_records for c in r["captions"]]
    if not pairs:
        return None
    ds = PairDataset(pairs, session.params.images_dir)
    m = session.params.train.micro_batch_size
    model = session.model
    total = n = 0.0
    with torch.no_grad(), session.accelerator.autocast():
        for i in range(0, len(pairs), m):
            batch = session.to_device(session.collator([ds[j] for j in range(i, min(i + m, len(pairs)))]))
            s, k = caption_loss(model, batch)
            total += float(s)
            n += float(k)
    return total / max(n, 1.0)


def _val_cider(session: _Session, step: int) -> Optional[float]:
    """Corpus CIDEr of greedy captions for the validation images (caption engine + evaluator).

    None, with one warning, where the evaluation stack (pycocoevalcap, fugashi) is not installed — a
    stripped-down GPU box; jpcap's own install always has it."""
    from . import engine, evaluate

    p = session.params
    out_path = Path(p.run_dir) / "val_predictions" / f"step-{step}.jsonl"
    if out_path.exists():
        out_path.unlink()   # a re-done step after a resume: generate again
    # autocast: the trainable projector is fp32 while the frozen ViT runs in the load dtype
    with session.accelerator.autocast():
        engine.caption_records(session.model, session.processor, session.entry, session.val_records,
                               p.images_dir, out_path, batch_size=p.generation.batch_size,
                               max_new_tokens=p.generation.max_new_tokens, prompt=session.prompt, progress=False,
                               decoder=p.generation.decoder)
    preds = {int(r["image_id"]): r.get("caption", "") for r in read_jsonl(out_path, tolerate_partial_last=True)}
    refs = {int(r["image_id"]): list(r["captions"]) for r in session.val_records}
    try:
        result = evaluate.score(refs, preds, allow_missing=True, n_resamples=0)
    except ImportError as e:
        if not getattr(session, "_warned_no_scorer", False):
            warnings.warn(f"validation CIDEr skipped: {e} (pip install jpcap brings it)")
            session._warned_no_scorer = True
        return None
    return float(result["CIDEr"])


def _validate(session: _Session, step: int) -> dict:
    model = session.model
    rng = _rng_state()
    model.eval()
    try:
        val_loss = _val_loss(session)
        cider = _val_cider(session, step)
    finally:
        model.train()
        _set_rng_state(rng)
    return {"val_loss": val_loss, "val_CIDEr": cider}


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

def _save_checkpoint(session: _Session, step: int, data_pos: dict, counters: dict) -> Optional[Path]:
    import torch

    acc = session.accelerator
    run_dir = Path(session.params.run_dir)
    folder = _checkpoints_dir(run_dir)
    final = folder / f"step-{step}"
    tmp = folder / f".tmp-step-{step}"
    if session.main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_rank{session.rank}.pt")
    acc.wait_for_everyone()
    if session.main:
        acc.unwrap_model(session.loss_module).model.save_pretrained(tmp / "adapter")
        torch.save(session.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(session.scheduler.state_dict(), tmp / "scheduler.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        np.save(tmp / "epoch_order.npy", epoch_order(len(session.pairs), session.params.run.seed, data_pos["epoch"]))
        atomic_write_json(tmp / "state.json", {
            "step": step, **data_pos, **counters, "world_size": session.world,
            "fingerprint": _resume_fingerprint(session.params), "n_pairs": len(session.pairs),
            "seed": session.params.run.seed, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _load_checkpoint(session: _Session, path: Path) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if state.get("fingerprint") != _resume_fingerprint(session.params):
        raise TrainError(f"{path}: the checkpoint was written with other params (data, model or train "
                         "section, seed or prompt changed): use another run.name, or train(resume=False) to "
                         "start over in this run folder")
    if state.get("world_size") != session.world:
        raise TrainError(f"{path}: saved with {state.get('world_size')} process(es), resuming with "
                         f"{session.world}: the data order per process would differ; resume with the same count")
    if state.get("n_pairs") != len(session.pairs):
        raise TrainError(f"{path}: the checkpoint saw {state.get('n_pairs')} training pairs, the data now has "
                         f"{len(session.pairs)}")
    saved_order = np.load(path / "epoch_order.npy")
    if not np.array_equal(saved_order, epoch_order(len(session.pairs), session.params.run.seed, state["epoch"])):
        raise TrainError(f"{path}: the epoch's sample order differs from the saved one (numpy changed?)")
    model = session.accelerator.unwrap_model(session.loss_module).model
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise TrainError(f"{path}: unexpected adapter weights {result.unexpected_keys[:3]}")
    expected = set(_peft_state_dict(model))
    if expected - set(weights):
        raise TrainError(f"{path}: the checkpoint lacks weights {sorted(expected - set(weights))[:3]}")
    session.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    session.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    acc = session.accelerator
    if acc.scaler is not None and (path / "scaler.pt").exists():
        acc.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng_path = path / f"rng_rank{session.rank}.pt"
    state["_rng"] = torch.load(rng_path, weights_only=False)
    return state


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

def _export_adapter(session: _Session, result_info: dict) -> Path:
    """``<run_dir>/adapter/``: PEFT adapter (projector via modules_to_save), processor, params."""
    from .params import save_resolved

    run_dir = Path(session.params.run_dir)
    final = run_dir / "adapter"
    tmp = run_dir / ".tmp-adapter"
    if tmp.exists():
        shutil.rmtree(tmp)
    model = session.accelerator.unwrap_model(session.loss_module).model
    model.save_pretrained(tmp)
    session.processor.save_pretrained(tmp)
    save_resolved(session.params, tmp)
    atomic_write_json(tmp / "jpcap_train.json", {
        "base_model": session.params.model.name, "base_load_in_4bit": session.load_in_4bit,
        "precision": _precision_name(session.dtype), "prompt": session.prompt,
        "projector": session.params.train.projector, "top_k_layers": session.params.train.top_k_layers,
        "params_hash": session.params.hash(), **result_info,
    })
    if final.exists():
        old = run_dir / ".old-adapter"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def merge_adapter(params, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge a LoRA adapter into full-precision base weights and save model + processor in ``out_dir``.

    Refused for adapters trained on a 4-bit base (train.method qlora): merging into 4-bit weights
    changes the outputs, and merging into an unquantized base gives a model other than the trained one.
    """
    from . import models

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    info_path = adapter_dir / "jpcap_train.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    if info.get("base_load_in_4bit", params.train.method == "qlora"):
        raise TrainError(f"{adapter_dir}: trained on a 4-bit base (QLoRA); merging changes outputs, so it is "
                         "refused — load it with models.load_model(params, adapter=...) on the 4-bit base")
    # load_model folds the adapter into a full-precision base for inference
    merged, processor, _ = models.load_model(params, load_in_4bit=False, adapter=str(adapter_dir))
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    merged.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def _clear_run(run_dir: Path) -> None:
    for name in ("checkpoints", "tensorboard", "val_predictions"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    for name in ("train_log.jsonl", "train_result.json", "train_plan.json"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()


def train(params, *, resume: bool = True, callbacks: Optional[Sequence[Callable[[dict], Any]]] = None,
          session_hours: Optional[float] = None) -> TrainResult:
    """Fine-tune per ``params.train``; returns a :class:`TrainResult`.

    Writes ``<run_dir>/checkpoints/step-N/`` (atomic, last 2 kept), ``train_log.jsonl``,
    ``tensorboard/``, ``train_plan.json``, ``adapter/`` and ``train_result.json``. With ``resume``
    (default) a run folder holding checkpoints continues from the newest one and follows the same
    loss curve; ``resume=False`` deletes this run's checkpoints and logs and starts over.
    ``callbacks`` are called after every optimizer step (after its validation and checkpoint) with a
    dict: step, total_steps, epoch, loss, lr, grad_norm, samples_per_s, skipped, val_loss, val_CIDEr,
    checkpoint, model (the PEFT model, in train mode: restore it if you switch it) and processor; an
    exception raised there stops training (the next call resumes from the last checkpoint).
    ``session_hours``: see :func:`plan`.
    """
    session = _Session(params)
    try:
        return _train_loop(session, resume, callbacks, session_hours)
    finally:
        session.close()


def _train_loop(session: _Session, resume: bool, callbacks, session_hours) -> TrainResult:
    import torch
    from tqdm.auto import tqdm

    params = session.params
    run_dir = Path(params.run_dir)
    acc, t = session.accelerator, params.train
    main = session.main
    log_path = run_dir / "train_log.jsonl"

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume or not list_checkpoints(run_dir):
            _clear_run(run_dir)   # nothing to resume: logs of a run killed before its first checkpoint go
        for tmp in _checkpoints_dir(run_dir).glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()

    start_step, epoch, step_in_epoch = 0, 0, 0
    counters = {"non_finite_loss_steps": 0, "non_finite_grad_steps": 0, "overflow_steps": 0,
                "consecutive_non_finite": 0, "elapsed_s": 0.0}
    rng_to_restore = None
    ckpts = list_checkpoints(run_dir) if resume else []
    if ckpts:
        _, path = ckpts[-1]
        state = _load_checkpoint(session, path)
        start_step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        counters.update({k: state.get(k, v) for k, v in counters.items()})
        rng_to_restore = state["_rng"]
        if main:
            _truncate_log(log_path, start_step)
    if start_step >= session.total_steps and (run_dir / "adapter").exists() and (run_dir / "train_result.json").exists():
        prior = json.loads((run_dir / "train_result.json").read_text(encoding="utf-8"))
        prior["losses"] = {int(k): v for k, v in prior.get("losses", {}).items()}
        return TrainResult(**prior)

    info = session.probe(session_hours, start_step)
    if main:
        print(format_plan(info), flush=True)
        atomic_write_json(run_dir / "train_plan.json", info)
    if rng_to_restore is not None:
        _set_rng_state(rng_to_restore)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
    pending: list[dict] = []
    losses: dict[int, float] = {}
    last_val: dict = {"val_loss": None, "val_CIDEr": None}
    last_loss = None
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    bar = tqdm(total=session.total_steps, initial=start_step, desc="train", disable=not main, dynamic_ncols=True)
    step = start_step
    seconds_before = counters["elapsed_s"]
    t_session = time.time()

    def flush():
        if main and pending:
            append_jsonl(log_path, pending)
            pending.clear()

    try:
        while step < session.total_steps:
            last = min(session.steps_per_epoch, step_in_epoch + (session.total_steps - step))
            loader_iter = iter(session.loader(epoch, step_in_epoch, last))
            while step_in_epoch < last:
                t_step = time.perf_counter()
                micro = [session.to_device(next(loader_iter)) for _ in range(session.accum)]
                lr = session.scheduler.get_last_lr()[0]
                n_tok = session.n_tokens(micro)
                loss_sum, finite = session.forward_backward(micro, n_tok)
                grad_norm = None
                skipped = None
                if not finite:
                    skipped = "non-finite loss"
                    counters["non_finite_loss_steps"] += 1
                else:
                    gn = acc.clip_grad_norm_(session.trainable_params,
                                             t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
                    grad_norm = float(gn) if gn is not None else None
                    if acc.scaler is None and grad_norm is not None and not math.isfinite(grad_norm):
                        skipped = "non-finite gradient"
                        counters["non_finite_grad_steps"] += 1
                    else:
                        session.optimizer.step()
                        if acc.optimizer_step_was_skipped:
                            skipped = "fp16 overflow (GradScaler lowered the scale)"
                            counters["overflow_steps"] += 1
                session.optimizer.zero_grad(set_to_none=True)
                if skipped in ("non-finite loss", "non-finite gradient"):
                    counters["consecutive_non_finite"] += 1
                    if counters["consecutive_non_finite"] >= MAX_CONSECUTIVE_NONFINITE:
                        raise TrainError(
                            f"training stopped at step {step + 1}: {counters['consecutive_non_finite']} optimizer "
                            f"steps in a row had a non-finite (inf/NaN) {skipped.split()[-1]}. On a T4 this is "
                            "usually fp16 overflow (Qwen is fp16-fragile): lower train.learning_rate, keep "
                            "train.max_grad_norm at 1.0, or use a GPU with bf16; the run resumes from its last "
                            f"checkpoint in {_checkpoints_dir(run_dir)}")
                else:
                    counters["consecutive_non_finite"] = 0
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                    session.scheduler.step()
                step += 1
                step_in_epoch += 1
                if session.world > 1:
                    loss_sum = acc.reduce(loss_sum, "sum")
                loss = float(loss_sum) / n_tok if finite else float("nan")
                sps = t.effective_batch_size / (time.perf_counter() - t_step)
                losses[step] = loss
                last_loss = loss if finite else last_loss
                row = {"step": step, "epoch": epoch + step_in_epoch / session.steps_per_epoch, "loss": loss,
                       "lr": lr, "grad_norm": grad_norm, "samples_per_s": sps, "skipped": skipped}
                val = {}
                if session.eval_enabled and (step % t.eval_every == 0 or step == session.total_steps):
                    if main:
                        val = _validate(session, step)
                        last_val = val
                    acc.wait_for_everyone()
                row.update({k: v for k, v in val.items()})
                if main:
                    pending.append(row)
                    if writer is not None:
                        for k in ("loss", "lr", "grad_norm", "samples_per_s", "val_loss", "val_CIDEr"):
                            v = row.get(k)
                            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                                writer.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k[4:]}", v, step)
                    if len(pending) >= LOG_FLUSH_EVERY or val:
                        flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", sps=f"{sps:.1f}")
                ckpt = None
                if (t.save_every > 0 and step % t.save_every == 0) or step == session.total_steps:
                    flush()
                    counters["elapsed_s"] = seconds_before + (time.time() - t_session)
                    pos = {"epoch": epoch, "step_in_epoch": step_in_epoch}
                    if step_in_epoch >= session.steps_per_epoch:
                        pos = {"epoch": epoch + 1, "step_in_epoch": 0}
                    ckpt = _save_checkpoint(session, step, pos, counters)
                for cb in callbacks or ():
                    cb({**row, "total_steps": session.total_steps, "checkpoint": str(ckpt) if ckpt else None,
                        "model": session.model, "processor": session.processor})
            if step_in_epoch >= session.steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
        flush()
    finally:
        flush()
        bar.close()
        if writer is not None:
            writer.close()

    peak, peak_kind = _peak_memory(acc)
    if peak is not None and info.get("peak_memory_gib") is not None:
        peak = max(peak, info["peak_memory_gib"])
    seconds = seconds_before + (time.time() - t_session)
    n_skipped = counters["non_finite_loss_steps"] + counters["non_finite_grad_steps"] + counters["overflow_steps"]
    result = TrainResult(
        adapter_dir=str(run_dir / "adapter"), steps=step, total_steps=session.total_steps,
        final_train_loss=last_loss, final_val_loss=last_val.get("val_loss"),
        final_val_cider=last_val.get("val_CIDEr"), seconds=seconds, peak_memory_gib=peak,
        peak_memory_kind=peak_kind, trainable_params=session.trainable, non_finite_steps_skipped=n_skipped,
        resumed_from_step=start_step, losses=losses, skipped_pairs=session.skipped)
    if main:
        _export_adapter(session, {"steps": step, "seconds": seconds, "final_train_loss": last_loss,
                                  "non_finite_steps_skipped": n_skipped})
        if t.merge_adapter:
            result.merged_dir = str(merge_adapter(params, run_dir / "adapter", run_dir / "merged"))
        atomic_write_json(run_dir / "train_result.json", result.to_dict())
    acc.wait_for_everyone()
    return result


# ---------------------------------------------------------------------------------------------
# CLI: `jpcap train` / `accelerate launch -m jpcap_helpers.train`
# ---------------------------------------------------------------------------------------------

def add_train_arguments(parser) -> None:
    parser.add_argument("params", help="params YAML (e.g. params/smoke.yaml)")
    parser.add_argument("--run-name", default=None, help="run folder name (default: run.name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.max_steps=10 (YAML value)")
    parser.add_argument("--no-resume", action="store_true", help="delete this run's checkpoints and start over")
    parser.add_argument("--plan-only", action="store_true", help="print trainable params, memory and ETA; no training")
    parser.add_argument("--session-hours", type=float, default=None,
                        help="warn when the run needs longer than this (default: Colab's limits when in Colab)")


def run_train(args) -> int:
    from .params import ParamsError, load_params, save_resolved
    from .runner import parse_overrides

    try:
        overrides = parse_overrides(args.overrides)
        if args.run_name:
            overrides["run.name"] = args.run_name
        params = load_params(args.params, overrides)
        if args.plan_only:
            print(format_plan(plan(params, session_hours=args.session_hours)))
            return 0
        if int(os.environ.get("RANK", "0")) == 0:
            save_resolved(params)
        result = train(params, resume=not args.no_resume, session_hours=args.session_hours)
    except (ParamsError, TrainError, ValueError) as e:
        print(f"jpcap train: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"adapter: {result.adapter_dir} · {result.steps} steps in {result.seconds:.0f} s · final loss "
              f"{result.final_train_loss} · val loss {result.final_val_loss} · val CIDEr {result.final_val_cider}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m jpcap_helpers.train", description="fine-tune per a params file")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
