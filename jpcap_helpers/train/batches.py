"""Training data: caption pairs, the dataset, the collator (chat template and label masking), the
epoch order and the micro-batches of each optimizer step.

A pair is ``{"row", "image_id", "file_name", "caption"}``; ``row`` is its line in the source file, so a
checkpoint can name the exact pairs it trains on (:func:`pairs_at_rows`, :func:`pairs_digest`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..data import ImageLoadError, load_image, load_split, resolve_image_path
from ..io import read_jsonl
from .errors import TrainError
from .positions import rope_positions

__all__ = ["IGNORE_INDEX", "PAD_MULTIPLE", "CUDAGRAPH_PAD_MULTIPLE", "ASSISTANT_HEADER", "END_TOKEN", "MISSING_IMAGE",
           "chat_messages", "read_pair_rows",
           "select_pairs", "read_pairs", "pairs_at_rows", "pairs_digest", "missing_image_files",
           "read_val_records", "truncate_captions", "PairDataset", "CaptionCollator", "epoch_order",
           "StepBatchSampler"]

IGNORE_INDEX = -100
ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_TOKEN = "<|im_end|>"
MISSING_IMAGE = "image file missing"
# training rows are padded to a multiple of this many tokens: inductor specialises the compiled language
# layers on the sequence length's alignment (a length ≢ 0 mod 8 after aligned ones recompiled for ≈ 10 s
# per layer variant in the middle of a run: run ETA-3), and aligned lengths suit the tensor cores
PAD_MULTIPLE = 8
# with train.cudagraphs every row length is its own CUDA graph (and compilation): coarser lengths, fewer
# graphs, for ≤ 31 padded tokens per row (masked: the loss is unchanged)
CUDAGRAPH_PAD_MULTIPLE = 32
PLACEHOLDER_SIDE = 56   # a missing image's stand-in: its row is fully masked, so it trains nothing


def chat_messages(prompt: str, caption: Optional[str] = None) -> list[dict]:
    """The chat the model sees: user = image + prompt; assistant = caption (when training)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------

def _check_row(row: Any, keys: Sequence[str], path: Path, line: int) -> None:
    if not isinstance(row, dict):
        raise TrainError(f"{path}: row {line}: expected a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise TrainError(f"{path}: row {line}: missing key {key!r}")


def read_pair_rows(params: Any) -> list[dict]:
    """Every pair row of ``<processed_dir>/train_pairs.jsonl`` (or, without it, derived from
    ``train.jsonl``; the data stage already applied ``data.train_subset``), numbered by ``row``."""
    processed = Path(params.processed_dir)
    pairs_path, records_path = processed / "train_pairs.jsonl", processed / "train.jsonl"
    if pairs_path.exists():
        rows = []
        for i, row in enumerate(read_jsonl(pairs_path), start=1):
            _check_row(row, ("image_id", "file_name", "caption"), pairs_path, i)
            rows.append({"image_id": row["image_id"], "file_name": row["file_name"], "caption": row["caption"]})
    elif records_path.exists():
        rows = [{"image_id": r.image_id, "file_name": r.file_name, "caption": c}
                for r in load_split(records_path) for c in r.captions]
    else:
        raise TrainError(f"no training data: {pairs_path} not found — run the data stage "
                         "(notebook 01 / `jpcap prepare`) first")
    return [{"row": i, **r} for i, r in enumerate(rows)]


def select_pairs(rows: list[dict], images_dir: str | os.PathLike) -> tuple[list[dict], dict[str, int]]:
    """The rows to train on, and counts of skipped rows by reason (empty caption, image file missing)."""
    skipped: dict[str, int] = {}
    exists: dict[str, bool] = {}
    out = []
    for r in rows:
        if not isinstance(r["caption"], str) or not r["caption"].strip():
            skipped["empty caption"] = skipped.get("empty caption", 0) + 1
            continue
        fn = r["file_name"]
        if fn not in exists:
            exists[fn] = resolve_image_path(images_dir, fn).is_file()
        if not exists[fn]:
            skipped[MISSING_IMAGE] = skipped.get(MISSING_IMAGE, 0) + 1
            continue
        out.append(r)
    return out, skipped


def read_pairs(params: Any) -> tuple[list[dict], dict[str, int]]:
    """Training pairs and counts of skipped rows by reason; a TrainError when none is usable."""
    pairs, skipped = select_pairs(read_pair_rows(params), params.images_dir)
    if not pairs:
        raise TrainError(f"no usable training pairs in {params.processed_dir} (skipped: {skipped or 'none'}; "
                         f"images looked up under {params.images_dir})")
    return pairs, skipped


def pairs_at_rows(rows: list[dict], saved_rows: Sequence[int], source: str) -> list[dict]:
    """The pairs a checkpoint trained on (its saved row numbers), whether or not their images exist now."""
    if len(saved_rows) and (min(saved_rows) < 0 or max(saved_rows) >= len(rows)):
        raise TrainError(f"{source}: the checkpoint's training pairs are not in the data any more "
                         f"({len(rows)} rows now): the processed data changed since the run started")
    return [rows[int(i)] for i in saved_rows]


def pairs_digest(pairs: list[dict]) -> str:
    """sha256 of the pairs as trained on (row, image id, file name, caption)."""
    blob = json.dumps([[p["row"], p["image_id"], p["file_name"], p["caption"]] for p in pairs], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def missing_image_files(pairs: list[dict], images_dir: str | os.PathLike) -> list[str]:
    """Distinct file names of ``pairs`` whose image file does not exist."""
    names = dict.fromkeys(p["file_name"] for p in pairs)
    return [fn for fn in names if not resolve_image_path(images_dir, fn).is_file()]


def read_val_records(params: Any, n: int) -> list[dict]:
    """The first ``n`` records of ``<processed_dir>/val.jsonl`` whose image exists (empty without the file)."""
    path = Path(params.processed_dir) / "val.jsonl"
    if n <= 0 or not path.exists():
        return []
    usable = [r.to_dict() for r in load_split(path)
              if r.captions and resolve_image_path(params.images_dir, r.file_name).is_file()]
    return usable[:n]


def truncate_captions(pairs: list[dict], tokenizer: Any, max_tokens: Optional[int]) -> int:
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


# ---------------------------------------------------------------------------------------------
# dataset and collator
# ---------------------------------------------------------------------------------------------

class PairDataset:
    """Map-style dataset over caption pairs: ``{"image", "caption", "image_id"}`` per item.

    A pair whose image file has gone missing gives ``image=None`` and ``missing=<file name>`` (the
    collator masks it out); an unreadable image raises a TrainError naming the file."""

    def __init__(self, pairs: list[dict], images_dir: str | os.PathLike):
        self.pairs, self.images_dir = pairs, Path(images_dir)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        path = resolve_image_path(self.images_dir, p["file_name"])
        try:
            image = load_image(path)
        except ImageLoadError as e:
            if e.reason == "missing":
                return {"image": None, "caption": p["caption"], "image_id": p["image_id"], "missing": p["file_name"]}
            raise TrainError(f"cannot read image {path} (image_id {p['image_id']}): {e}") from e
        except Exception as e:  # a corrupt file: say which one
            raise TrainError(f"cannot read image {path} (image_id {p['image_id']}): {e}") from e
        return {"image": image, "caption": p["caption"], "image_id": p["image_id"]}


def _placeholder_image():
    from PIL import Image
    return Image.new("RGB", (PLACEHOLDER_SIDE, PLACEHOLDER_SIDE))


class CaptionCollator:
    """Builds model inputs and labels from ``{"image", "caption"}`` samples.

    The chat goes through the processor's chat template (system prompt from the template, user =
    image + prompt, assistant = caption). Labels are ``-100`` everywhere except the caption tokens and
    the closing ``<|im_end|>``: everything up to and including the last ``<|im_start|>assistant\\n``
    header, the image tokens, the newline after ``<|im_end|>`` and the padding are masked. The
    header is searched per row, so left and right padding give the same labels.
    With ``prompt_only`` the batch holds the prompt and the generation header, for ``generate``.
    A sample whose image is missing (``image=None``) gets a blank stand-in image and a fully masked
    row (no target tokens, so it changes neither loss nor gradients); the batch then carries
    ``missing_images`` (file names), which the training loop counts and removes. Training batches of a
    Qwen-VL processor also carry the model's rotary ``position_ids`` (:mod:`.positions`).
    """

    def __init__(self, processor: Any, prompt: str, padding_side: str = "right", prompt_only: bool = False,
                 pad_multiple: int = PAD_MULTIPLE):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor, self.prompt = processor, prompt
        self.padding_side, self.prompt_only = padding_side, prompt_only
        self.pad_multiple = 1 if prompt_only else pad_multiple   # generation prompts: as the engine's
        self.merge_size = getattr(getattr(processor, "image_processor", None), "merge_size", None)
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
        missing = [row for row, s in enumerate(samples) if s.get("image") is None and "missing" in s]
        images = [_placeholder_image() if row in missing else s["image"] for row, s in enumerate(samples)]
        with warnings.catch_warnings():
            # min/max_pixels given to from_pretrained are re-passed on every call (transformers 5 warns)
            warnings.filterwarnings("ignore", message=".*min_pixels.*max_pixels.*", category=FutureWarning)
            batch = self.processor(text=self.texts(samples), images=images, padding=True,
                                   padding_side=self.padding_side, return_tensors="pt",
                                   **({"pad_to_multiple_of": self.pad_multiple} if self.pad_multiple > 1 else {}))
        batch = dict(batch)
        if not self.prompt_only:
            batch["labels"] = self.labels_for(batch["input_ids"], batch["attention_mask"])
            if self.merge_size and "mm_token_type_ids" in batch and "image_grid_thw" in batch:
                batch["position_ids"] = rope_positions(batch["input_ids"], batch["mm_token_type_ids"],
                                                       batch["image_grid_thw"], self.merge_size, batch["attention_mask"])
            for row in missing:
                batch["labels"][row] = IGNORE_INDEX
        if missing:
            batch["missing_images"] = [samples[row]["missing"] for row in missing]
        return batch

    def labels_for(self, input_ids: Any, attention_mask: Any) -> Any:
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


# ---------------------------------------------------------------------------------------------
# order
# ---------------------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled sample order of ``epoch``: a function of (seed, epoch) only."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class StepBatchSampler:
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
