"""Caption engine: prompts per model family, output cleaning, and batched, resumable captioning.

* :func:`build_prompt` / :func:`clean_output` are pure functions (testable without a model): chat
  families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) go through the processor's own chat template,
  PaliGemma gets its task prefix (``caption ja``; the processor adds ``<image>`` tokens, BOS and the
  closing newline itself), remote-code families get the text template they were trained with.
* :func:`caption_records` captions a list of ``{image_id, file_name}`` records into an append-only
  JSONL (one row per image, written after every batch, resumable after a kill, failing images kept
  as rows with an ``error``), batching images of equal visual-token count with left padding.
* :func:`run_zero_shot` runs every ``params.zero_shot.models`` x ``splits`` pair;
  :func:`sample_table` joins predictions with references for a notebook.

See docs/models.md for the prompts, the model table and the contamination flags.
"""
from __future__ import annotations

import gc
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from . import io as jio
from .models import ModelEntry, ModelError
from .text import normalize_caption

from .data import DEFAULT_MAX_SIDE, load_image, resolve_image_path  # EXIF, RGB, size cap; COCO root or flat

__all__ = [
    "CHAT_FAMILIES", "REMOTE_TEMPLATES", "build_prompt", "clean_output", "load_image_for_model",
    "stop_token_ids", "caption_records", "prediction_path", "write_prediction_meta", "run_zero_shot",
    "sample_table", "sample_items", "contamination_flag",
]

CHAT_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Text templates of the remote-code families, with ``{instruction}`` where the request goes
# (sources in docs/models.md). The registry's ``prompt`` of each such entry is the full text.
LLAVA_JP_SYSTEM = ("これは好奇心旺盛なユーザーと人工知能システムのチャットです。"
                   "システムはユーザーの質問に親切、詳細、丁寧に答える。")
STABLE_VLM_SYSTEM = "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
REMOTE_TEMPLATES = {
    # LLaVA-JP conv_templates["v1"] (SeparatorStyle.TWO, sep " ", roles ユーザー/システム)
    "llava_jp": LLAVA_JP_SYSTEM + " ユーザー: <image>\n{instruction} システム: ",
    # Asagi model card: instruction-only Alpaca-style template with <image> before the request
    "asagi": ("以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n"
              "### 指示:\n<image>\n{instruction}\n\n### 応答:\n"),
    # Japanese Stable VLM model card build_prompt(task="vqa", input=instruction); no <image> tag
    "stable_vlm": (STABLE_VLM_SYSTEM + "\n\n### 指示: \n与えられた画像を下に、質問に答えてください。"
                   "\n\n### 入力: \n{instruction}\n\n### 応答: \n"),
}

# Markers that end a caption: special tokens a decode may keep, and the start of a next turn.
_SPECIAL_STOPS = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|end|>", "</s>", "<eos>", "<pad>",
                  "<EOD|LLM-jp>", "<|eot_id|>"]
_FAMILY_STOPS = {
    "llava_jp": [re.compile(r"ユーザー\s*[:：]")],
    "asagi": [re.compile(r"\n*###")],
    "stable_vlm": [re.compile(r"\n*###")],
}
# Text after the LAST match is the answer (a decode that still holds the prompt, or a role prefix).
_ANSWER_MARKERS = {
    "qwen2_vl": re.compile(r"(?:^|\n)\s*assistant\s*(?:\n|[:：])"),
    "qwen2_5_vl": re.compile(r"(?:^|\n)\s*assistant\s*(?:\n|[:：])"),
    "qwen3_vl": re.compile(r"(?:^|\n)\s*assistant\s*(?:\n|[:：])"),
    "llava_jp": re.compile(r"システム\s*[:：]"),
    "asagi": re.compile(r"#*\s*応答\s*[:：]"),
    "stable_vlm": re.compile(r"#*\s*応答\s*[:：]"),
}
_PALIGEMMA_ECHO = re.compile(r"^\s*(?:<image>)*(?:<bos>)?\s*caption [a-z]{2}(?:-[A-Za-z]+)?\s*\n")


# ---------------------------------------------------------------------------------------------
# prompts and cleaning (pure)
# ---------------------------------------------------------------------------------------------

def build_prompt(entry: ModelEntry, processor: Any = None, instruction: Optional[str] = None) -> str:
    """The text prompt for one image of ``entry``'s family.

    ``instruction`` replaces the registry request (for chat families the user text, for PaliGemma
    the task prefix, for remote-code families the slot in their template). Chat families need the
    processor (its chat template); the others ignore it.
    """
    family = entry.family
    if family in CHAT_FAMILIES:
        if processor is None or not hasattr(processor, "apply_chat_template"):
            raise ModelError(f"{entry.key}: the {family} prompt comes from the processor's chat template; "
                             "pass the processor")
        text = instruction if instruction is not None else entry.prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if family == "paligemma":
        # "<image>" once: PaliGemmaProcessor expands it to image_seq_length tokens and appends
        # BOS after the last image token and "\n" after the prefix (transformers 5 prepare_inputs_layout)
        prefix = (instruction if instruction is not None else entry.prompt).strip()
        return "<image>" + prefix
    if family in REMOTE_TEMPLATES:
        if instruction is None:
            return entry.prompt
        return REMOTE_TEMPLATES[family].format(instruction=instruction)
    raise ModelError(f"{entry.key}: no prompt builder for family {family!r}")


def clean_output(entry: ModelEntry, text: str) -> str:
    """Strip what is not the caption: a prompt echo or role prefix before it, special tokens and a
    next turn after it, surrounding whitespace. Nothing else is rewritten."""
    if not isinstance(text, str):
        raise TypeError(f"clean_output expects str, got {type(text).__name__}")
    family = entry.family
    marker = _ANSWER_MARKERS.get(family)
    if marker is not None:
        last = None
        for last in marker.finditer(text):
            pass
        if last is not None:
            text = text[last.end():]
    if family == "paligemma":
        text = _PALIGEMMA_ECHO.sub("", text, count=1)
    cut = len(text)
    for stop in _SPECIAL_STOPS:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    for pattern in _FAMILY_STOPS.get(family, []):
        m = pattern.search(text)
        if m is not None:
            cut = min(cut, m.start())
    return text[:cut].strip()


def contamination_flag(entry: ModelEntry) -> str:
    """``contaminated`` when STAIR is in the model's training data (STAIR and YJ splits share COCO
    images, so every split of this project is affected), ``clean`` when documented absent,
    ``unknown`` otherwise."""
    return {True: "contaminated", False: "clean", None: "unknown"}[entry.trained_on_stair]


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def _resolve_image(images_dir: Path, file_name: str) -> Path:
    """COCO root or flat folder: the same resolution as the data stage."""
    return Path(resolve_image_path(images_dir, file_name))


def load_image_for_model(path: str | Path):
    """An RGB PIL image with EXIF orientation applied and very large images capped (``data.load_image``)."""
    return load_image(path)


def _load_image_tensor(path: str | Path, pin: bool = True):
    """The same image as a (3, H, W) uint8 tensor, in pinned memory for a fast copy to the GPU (the
    image processor converts a PIL image to exactly this; doing it in the loader threads keeps that
    work off the thread that drives the GPU)."""
    import numpy as np
    import torch

    tensor = torch.from_numpy(np.array(load_image(path), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return tensor.pin_memory() if pin else tensor


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) as the model will see it (EXIF rotation applied), from the header only."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if max(width, height) > DEFAULT_MAX_SIDE:
        scale = DEFAULT_MAX_SIDE / max(width, height)  # load_image thumbnails to max_side (approximately)
        width, height = max(1, round(width * scale)), max(1, round(height * scale))
    return height, width


def _group_key(processor: Any, height: int, width: int) -> tuple[int, ...]:
    """Sort key grouping images whose prompts get the same number of visual tokens: for the Qwen
    image processors the resized grid (smart_resize), else a fixed count (PaliGemma) or nothing."""
    ip = getattr(processor, "image_processor", None)
    patch = getattr(ip, "patch_size", None)
    merge = getattr(ip, "merge_size", None)
    size = getattr(ip, "size", None) or {}
    if patch and merge and hasattr(ip, "get_number_of_image_patches"):
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor = patch * merge
        min_pixels = size.get("shortest_edge", size.get("min_pixels", 56 * 56))
        max_pixels = size.get("longest_edge", size.get("max_pixels", 28 * 28 * 1280))
        h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        return ((h // patch) * (w // patch) // (merge * merge), h, w)
    seq = getattr(processor, "image_seq_length", None)
    return (int(seq),) if seq else (0,)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------

def _tokenizer(processor: Any):
    return getattr(processor, "tokenizer", processor)


def stop_token_ids(model: Any, processor: Any, entry: ModelEntry) -> list[int]:
    """End tokens: the generation config's eos ids, the tokenizer's eos, and the family's turn ends
    (``<|im_end|>`` / ``<|endoftext|>`` for Qwen, ``<EOD|LLM-jp>`` for LLaVA-JP) where in the vocab."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids += list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    tok = _tokenizer(processor)
    if getattr(tok, "eos_token_id", None) is not None:
        ids.append(tok.eos_token_id)
    extra = {"qwen2_vl": ["<|im_end|>", "<|endoftext|>"], "qwen2_5_vl": ["<|im_end|>", "<|endoftext|>"],
             "qwen3_vl": ["<|im_end|>", "<|endoftext|>"], "llava_jp": ["<EOD|LLM-jp>"]}.get(entry.family, [])
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    ids += [vocab[t] for t in extra if t in vocab]
    out: list[int] = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


def _model_device_dtype(model: Any):
    """Where inputs go and the float dtype pixel values take (a 4-bit model reports its compute dtype)."""
    import torch

    device = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    if device is None or dtype is None or not dtype.is_floating_point:
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        if device is None:
            device = first.device if first is not None else torch.device("cpu")
        if dtype is None or not dtype.is_floating_point:
            dtype = first.dtype if first is not None else torch.float32
    return device, dtype


def _generation_config(model: Any, max_new_tokens: int, num_beams: int, eos: list[int], pad: Optional[int]):
    """Greedy (or beam) decoding: the model's generation config with sampling and logit rewriting off."""
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    cfg.do_sample = False
    for key in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(cfg, key):
            setattr(cfg, key, None)
    cfg.repetition_penalty = None
    cfg.no_repeat_ngram_size = None
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    cfg.num_beams = num_beams
    cfg.num_return_sequences = 1
    cfg.eos_token_id = eos or None
    cfg.pad_token_id = pad
    return cfg


def _prepare_inputs(processor: Any, prompts: list[str], images: list, device: Any = None):
    """The processor's tensors for one batch (left-padded when lengths differ); with ``device`` the
    image processor resizes, normalises and patchifies there (the torchvision-based Qwen processors)."""
    tok = _tokenizer(processor)
    if getattr(tok, "padding_side", "left") != "left":
        tok.padding_side = "left"
    kwargs = {"device": str(device)} if device is not None else {}
    if device is not None and str(device).startswith("cuda"):
        import torch

        # Image copies from pinned memory are asynchronous (a blocking copy would make this thread wait
        # for all the work queued on the GPU; the rest of the Qwen image processor makes none per batch:
        # its normalisation constants are made once per process). The kernels go to a side stream,
        # ordered after the work already queued (which may have produced the images), so that they
        # overlap the current batch's decoding; the current stream waits for the results.
        consumer = torch.cuda.current_stream(device)
        side = _side_stream(torch.device(device))
        side.wait_stream(consumer)  # inputs made on the current stream before this call
        with torch.cuda.stream(side):
            images = [im.to(device, non_blocking=True) if torch.is_tensor(im) else im for im in images]
            inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt", **kwargs)
        consumer.wait_stream(side)
        for value in inputs.values():
            if torch.is_tensor(value) and value.is_cuda:
                value.record_stream(consumer)  # the allocator keeps it until the consumer is done
    else:
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt", **kwargs)
    inputs.pop("labels", None)  # PaliGemmaProcessor still returns labels (BC); generate must not get them
    return inputs


_SIDE_STREAMS: dict = {}


def _side_stream(device: Any):
    """One side CUDA stream per device for input preparation."""
    import torch

    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


# image preprocessing on the GPU for the fast decoder (CPU preprocessing of 640×480 images costs
# ≈6.6 ms per image, more than the GPU needs to caption it: benchmarks/RESULTS.md)
PREPROCESS_ON_GPU = True
# prepare the next batch (and write the last one's rows) while the GPU works on the current one's
# prefill; off: one after the other (a benchmark lever, benchmarks/RESULTS.md)
PIPELINE = True
# torch.compile the decoding step's layer functions too (where the prefill's is compiled): decoding
# 256 captions takes 105 instead of 132 ms of GPU time; whole 24-token engine runs were as fast either
# way (the GPU is not their only limit), longer captions gain more (benchmarks/RESULTS.md)
COMPILE_STEP = True
_GPU_IMAGE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast")


class _Decoder:
    """One batch of processor inputs → new token ids: the fast greedy decoder (:mod:`jpcap_helpers.decode`)
    for Qwen2-VL / Qwen2.5-VL, else HF ``generate`` with ``gen_cfg``."""

    def __init__(self, model: Any, entry: ModelEntry, gen_cfg: Any, batch_size: int, decoder: str):
        from . import decode

        if decoder not in ("auto", "hf"):
            raise ValueError(f"decoder must be 'auto' or 'hf', got {decoder!r}")
        self.model, self.gen_cfg = model, gen_cfg
        self.fast = None
        if decoder == "auto" and decode.supports(model, entry.family, gen_cfg.num_beams):
            eos = gen_cfg.eos_token_id or []
            # the prefill's layer function is compiled where load_model compiled the vision tower
            # (model.compile on a measured family and GPU), for a plain model (adapter merged, not 4-bit)
            compile_prefill = (bool(getattr(model, "jpcap_compile", False)) and not hasattr(model, "peft_config")
                               and not decode._has_4bit(model))
            self.fast = decode.GreedyDecoder(model, eos_ids=eos if isinstance(eos, list) else [eos],
                                             pad_id=gen_cfg.pad_token_id, max_batch=batch_size,
                                             compile_prefill=compile_prefill,
                                             compile_step=compile_prefill and COMPILE_STEP)
        self.name = "static-cache greedy" if self.fast is not None else "hf generate"
        self.preprocess_device = None
        if self.fast is not None and self.fast.device.type == "cuda" and PREPROCESS_ON_GPU:
            self.preprocess_device = self.fast.device

    def __call__(self, inputs, while_busy: Optional[Callable[[], None]] = None) -> Any:
        """New token ids; the fast decoder calls ``while_busy`` while the GPU works on the prefill (HF
        generate does not: the caller runs it afterwards)."""
        import torch

        if self.fast is not None:
            return self.fast.generate(inputs, self.gen_cfg.max_new_tokens, while_busy=while_busy)
        device, dtype = _model_device_dtype(self.model)
        moved = {}
        for key, value in inputs.items():
            if torch.is_tensor(value):
                value = value.to(device)
                if value.is_floating_point():
                    value = value.to(dtype)
            moved[key] = value
        with torch.no_grad():  # not inference_mode: the trainer goes on training this model afterwards
            out = self.model.generate(**moved, generation_config=self.gen_cfg)
        return out[:, moved["input_ids"].shape[1]:]


def _generate_batch(model: Any, processor: Any, inputs: Any, decoder: _Decoder,
                    while_busy: Optional[Callable[[], None]] = None) -> list[str]:
    """Raw decoded continuations (new tokens only) for one batch of processor inputs; raises on failure."""
    new_tokens = decoder(inputs, while_busy)
    return _tokenizer(processor).batch_decode(new_tokens.cpu(), skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)


def _record_fields(record: Any, where: str) -> tuple[int, str]:
    get = record.get if isinstance(record, Mapping) else (lambda k, d=None: getattr(record, k, d))
    image_id, file_name = get("image_id"), get("file_name")
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise ValueError(f"{where}: image_id must be an integer, got {image_id!r}")
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"{where}: file_name must be a non-empty string, got {file_name!r}")
    return image_id, file_name


def _error_text(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


@dataclass
class _Item:
    image_id: int
    file_name: str
    path: Path
    key: tuple = ()
    order: int = 0


def caption_records(model: Any, processor: Any, entry: ModelEntry, records: Iterable[Any],
                    images_dir: str | Path, out_path: str | Path, *, batch_size: int = 16,
                    max_new_tokens: int = 40, num_beams: int = 1, prompt: Optional[str] = None,
                    progress: bool = True, extra: Optional[Mapping[str, Any]] = None,
                    retry_errors: bool = False, decoder: str = "auto") -> dict:
    """Caption ``records`` (dicts or objects with ``image_id`` and ``file_name`` relative to
    ``images_dir``) into the JSONL ``out_path``, one ``{"image_id", "caption", "model", **extra}``
    row per image, appended after every batch.

    Resumes: ids already in ``out_path`` are skipped (a partial last line left by a kill is dropped
    first); ``retry_errors`` rewrites the file without its error rows so those images run again.
    Images are sorted by visual-token count; decoding is greedy (``num_beams`` > 1: beam search) up
    to ``max_new_tokens``, stopping at the model's end tokens; only new tokens are decoded, then
    cleaned (:func:`clean_output`) and normalised (``text.normalize_caption``). ``decoder="auto"``
    decodes Qwen2-VL / Qwen2.5-VL greedily with :class:`jpcap_helpers.decode.GreedyDecoder` (batches of
    one visual grid, static KV cache, CUDA-graph steps and image preprocessing on the GPU); other
    models, beam search and ``decoder="hf"`` use HF ``generate`` on left-padded batches. The next
    batch's images are decoded in threads while the current one is captioned. An image that cannot be read
    or processed becomes a row with ``"caption": ""`` and ``"error"`` (a failing batch is retried
    image by image).

    Returns a summary: n_records, n_done (rows written now), n_captioned, n_errors,
    n_skipped_existing, n_duplicate_records, seconds, images_per_s, peak_gpu_gib (CUDA), decoder,
    commit.
    """
    import torch

    if entry.loader == "remote_code":
        raise ModelError(f"{entry.key}: captioning remote-code models needs that model's own input code "
                         "(docs/models.md); only build_prompt/clean_output support it here")
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1:
        raise ValueError("batch_size, max_new_tokens and num_beams must be ≥ 1")
    extra = dict(extra or {})
    clash = {"image_id", "caption", "model", "error"} & set(extra)
    if clash:
        raise ValueError(f"extra must not set {sorted(clash)}: the engine writes those fields")
    images_dir, out_path = Path(images_dir), Path(out_path)

    # ---- what is already done ----------------------------------------------------------------
    jio.repair_jsonl_tail(out_path)
    existing: list[dict] = list(jio.read_jsonl(out_path, tolerate_partial_last=True)) if out_path.exists() else []
    for i, row in enumerate(existing, start=1):
        if row.get("model") not in (None, entry.key):
            raise ValueError(f"{out_path}: row {i} holds predictions of model {row.get('model')!r}, not "
                             f"{entry.key!r}: use another output file")
    if retry_errors and any("error" in r for r in existing):
        existing = [r for r in existing if "error" not in r]
        jio.atomic_write_jsonl(out_path, existing)
    done = {r["image_id"] for r in existing if "image_id" in r}

    # ---- what is left, sorted into batches of equal visual-token count ------------------------
    pending: list[_Item] = []
    seen: set[int] = set()
    n_records = n_skipped = n_dupes = 0
    for idx, rec in enumerate(records):
        n_records += 1
        image_id, file_name = _record_fields(rec, f"record {idx}")
        if image_id in done:
            n_skipped += 1
            continue
        if image_id in seen:
            n_dupes += 1
            continue
        seen.add(image_id)
        pending.append(_Item(image_id, file_name, _resolve_image(images_dir, file_name), order=idx))

    base_row = {"model": entry.key}
    stats = {"n_captioned": 0, "n_errors": 0}
    error_rows: list[dict] = []
    ready: list[_Item] = []
    for item in pending:
        try:
            h, w = _image_size(item.path)
            item.key = _group_key(processor, h, w)
            ready.append(item)
        except Exception as exc:  # unreadable header, missing file
            error_rows.append({"image_id": item.image_id, "caption": "", **base_row, **extra,
                               "error": _error_text(exc)})
    ready.sort(key=lambda it: (it.key, it.order))

    text_prompt = build_prompt(entry, processor, instruction=prompt)
    tok = _tokenizer(processor)
    eos = stop_token_ids(model, processor, entry)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else (eos[0] if eos else None)
    gen_cfg = _generation_config(model, max_new_tokens, num_beams, eos, pad)
    run_decoder = _Decoder(model, entry, gen_cfg, batch_size, decoder)
    if run_decoder.fast is not None:  # batches of one visual grid: no padding, shared positions
        batches = []
        for _, group in itertools.groupby(ready, key=lambda it: it.key):
            group = list(group)
            batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    else:
        batches = [ready[i:i + batch_size] for i in range(0, len(ready), batch_size)]

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bar = None
    if progress and pending:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pending), unit="img", desc=f"{entry.key} → {out_path.name}", smoothing=0.1)
    start = time.perf_counter()

    def emit(rows: list[dict]) -> None:
        if rows:
            jio.append_jsonl(out_path, rows)
            for r in rows:
                stats["n_errors" if "error" in r else "n_captioned"] += 1
            if bar is not None:
                bar.update(len(rows))
                bar.set_postfix(errors=stats["n_errors"], refresh=False)

    image_processor = type(getattr(processor, "image_processor", None)).__name__
    preprocess_on = run_decoder.preprocess_device if image_processor in _GPU_IMAGE_PROCESSORS else None
    loader = _load_image_tensor if preprocess_on is not None else load_image_for_model

    def prepare_group(items: list[_Item], loads: Optional[list] = None) -> dict:
        """One batch's images (``loads``: their futures, loaded ahead in threads) through the processor.
        Unreadable images become error rows; a processor failure is kept for :func:`finish_group`."""
        group = {"items": items, "rows": {}, "loaded": [], "inputs": None, "error": None}
        images = []
        for i, it in enumerate(items):
            try:
                images.append(loads[i].result() if loads is not None else loader(it.path))
                group["loaded"].append(it)
            except Exception as exc:
                group["rows"][it.image_id] = {"image_id": it.image_id, "caption": "", **base_row, **extra,
                                              "error": _error_text(exc)}
        if group["loaded"]:
            try:
                group["inputs"] = _prepare_inputs(processor, [text_prompt] * len(images), images,
                                                  device=preprocess_on)
            except Exception as exc:
                group["error"] = exc
        return group

    def finish_group(group: dict, while_busy: Optional[Callable[[], None]] = None) -> list[dict]:
        """Caption a prepared batch (``while_busy`` runs while the GPU works on it); a failing batch
        is retried image by image to isolate the culprit (or an out-of-memory batch)."""
        rows, loaded = group["rows"], group["loaded"]
        if loaded:
            try:
                if group["error"] is not None:
                    raise group["error"]
                raw = _generate_batch(model, processor, group["inputs"], run_decoder,
                                      while_busy if PIPELINE else None)
                if len(raw) != len(loaded):
                    raise RuntimeError(f"generation returned {len(raw)} texts for {len(loaded)} images")
                for it, text in zip(loaded, raw):
                    rows[it.image_id] = {"image_id": it.image_id,
                                         "caption": normalize_caption(clean_output(entry, text)),
                                         **base_row, **extra}
            except Exception as exc:
                group["inputs"] = None
                if cuda:  # after an out-of-memory error, give the cached blocks back before retrying
                    torch.cuda.empty_cache()
                if len(loaded) == 1:
                    rows[loaded[0].image_id] = {"image_id": loaded[0].image_id, "caption": "", **base_row,
                                                **extra, "error": _error_text(exc)}
                else:
                    for it in loaded:
                        rows.update({r["image_id"]: r for r in finish_group(prepare_group([it]))})
        group["inputs"] = None
        return [rows[it.image_id] for it in group["items"]]

    from concurrent.futures import ThreadPoolExecutor

    # A two-stage pipeline: JPEG decoding runs in threads (PIL releases the GIL) two batches ahead;
    # while the GPU works through batch i's vision tower and prefill, this thread writes batch i-1's
    # rows and prepares batch i+1 (tokenising, image preprocessing queued on the GPU).
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)),
                              thread_name_prefix="jpcap-load")
    loads: dict[int, list] = {}
    finished: list[dict] = []   # rows of the last batch, written while the GPU works on the next one

    def load_ahead(i: int) -> None:
        if i < len(batches) and i not in loads:
            loads[i] = [pool.submit(loader, it.path) for it in batches[i]]

    try:
        emit(error_rows)
        load_ahead(0)
        load_ahead(1)
        upcoming = prepare_group(batches[0], loads.pop(0)) if batches else None
        for i in range(len(batches)):
            current, upcoming = upcoming, None
            state: dict[str, Any] = {"ran": False, "exc": None}

            def while_busy(i: int = i, state: dict = state) -> None:
                nonlocal upcoming, finished
                if state["ran"]:
                    return
                state["ran"] = True
                try:  # errors here are the engine's (writing), never the batch's: re-raised below
                    done_rows, finished = finished, []
                    emit(done_rows)
                    load_ahead(i + 2)
                    if i + 1 < len(batches):
                        upcoming = prepare_group(batches[i + 1], loads.pop(i + 1))
                except BaseException as exc:
                    state["exc"] = exc

            rows = finish_group(current, while_busy)
            while_busy()                    # HF generate and failed batches did not call it
            if state["exc"] is not None:
                raise state["exc"]
            finished = rows
        done_rows, finished = finished, []
        emit(done_rows)
    finally:
        if finished:  # interrupted: keep the rows already captioned (a resumed run skips them)
            try:
                emit(finished)
            except Exception:
                pass
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    n_done = stats["n_captioned"] + stats["n_errors"]
    return {
        "model": entry.key, "out_path": str(out_path), "n_records": n_records, "n_done": n_done,
        "n_captioned": stats["n_captioned"], "n_errors": stats["n_errors"],
        "n_skipped_existing": n_skipped, "n_duplicate_records": n_dupes,
        "seconds": round(seconds, 3), "images_per_s": round(n_done / seconds, 3) if seconds > 0 and n_done else 0.0,
        "batch_size": batch_size, "num_beams": num_beams, "max_new_tokens": max_new_tokens,
        "decoder": run_decoder.name,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "commit": getattr(model, "jpcap_commit", None),
    }


# ---------------------------------------------------------------------------------------------
# zero-shot runs and a notebook helper
# ---------------------------------------------------------------------------------------------

def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", name).strip("_") or "model"


def prediction_path(params: Any, model_key: str, split: str) -> Path:
    """``<run_dir>/predictions/<model>__<split>.jsonl``."""
    return Path(params.run_dir) / "predictions" / f"{_safe_name(model_key)}__{split}.jsonl"


def write_prediction_meta(pred_path: str | Path, entry: ModelEntry, summary: Mapping[str, Any], *,
                          revision: Optional[str] = None, adapter: str = "",
                          prompt: Optional[str] = None) -> Path:
    """Write ``<pred>.meta.json`` beside a predictions file (read by ``evaluate.evaluate_run``): model
    id, revision, adapter, peak GPU memory (the largest seen over resumed runs), contamination flag,
    generation settings and the last run's summary."""
    meta_path = Path(pred_path).with_suffix(".meta.json")
    old = {}
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
    peaks = [v for v in (old.get("peak_gpu_gib"), summary.get("peak_gpu_gib")) if isinstance(v, (int, float))]
    meta = {
        "model": entry.key,
        "model_id": entry.key if entry.hub_id.startswith("(") else entry.hub_id,
        "revision": revision or summary.get("commit") or "",
        "adapter": adapter,
        "peak_gpu_gib": max(peaks) if peaks else None,
        "trained_on_stair": entry.trained_on_stair,
        "contamination": contamination_flag(entry),
        "prompt": prompt if prompt is not None else entry.prompt,
        "generation": {k: summary.get(k) for k in ("batch_size", "num_beams", "max_new_tokens")},
        "last_run": dict(summary),
    }
    return jio.atomic_write_json(meta_path, meta)


def run_zero_shot(params: Any, splits: Optional[Sequence[str]] = None, models: Optional[Sequence[str]] = None,
                  max_images: Optional[int] = None):
    """Caption every split with every model (defaults: ``params.zero_shot``) into
    ``<run_dir>/predictions/<model>__<split>.jsonl``; one summary row per (model, split).

    A split whose ``<processed_dir>/<split>.jsonl`` is missing is skipped with a printed note; a
    model that fails to load gets a row with its ``error`` and the run goes on.
    """
    import pandas as pd

    from . import models as model_registry

    splits = list(splits if splits is not None else params.zero_shot.splits)
    names = list(models if models is not None else params.zero_shot.models)
    max_images = max_images if max_images is not None else params.zero_shot.max_images
    split_files = _split_files(params, splits)
    rows = []
    for name in names:
        if not split_files:
            break
        try:
            model, processor, entry = model_registry.load_model(params, name)
        except Exception as exc:
            print(f"zero-shot: model {name!r} skipped: {_error_text(exc)}")
            rows.append({"model": name, "error": _error_text(exc)})
            continue
        try:
            rows += _caption_splits(params, model, processor, entry, entry.key, split_files, max_images)
        finally:  # free the model before the next one loads
            del model, processor
            _free_memory()
    return pd.DataFrame(rows)


def _split_files(params: Any, splits: Sequence[str]) -> dict[str, Path]:
    files = {}
    for split in splits:
        path = Path(params.processed_dir) / f"{split}.jsonl"
        if path.is_file():
            files[split] = path
        else:
            print(f"split {split!r} skipped: {path} does not exist (run the data notebook first)")
    return files


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _caption_splits(params: Any, model: Any, processor: Any, entry: ModelEntry, system: str,
                    split_files: Mapping[str, Path], max_images: Optional[int], adapter: str = "") -> list[dict]:
    """Caption each split into ``predictions/<system>__<split>.jsonl``; one summary row per split."""
    rows = []
    for split, path in split_files.items():
        records = list(jio.read_jsonl(path))
        if max_images is not None:
            records = records[:max_images]
        out = prediction_path(params, system, split)
        summary = caption_records(
            model, processor, entry, records, params.images_dir, out,
            batch_size=params.generation.batch_size, max_new_tokens=params.generation.max_new_tokens,
            num_beams=params.generation.num_beams, prompt=params.generation.prompt,
            decoder=params.generation.decoder, extra={"split": split})
        write_prediction_meta(out, entry, summary, prompt=params.generation.prompt,
                              revision=params.model.revision or entry.revision or summary.get("commit"),
                              adapter=adapter)
        rows.append({"model": system, "split": split, "hub_id": entry.hub_id,
                     "contamination": contamination_flag(entry), **summary,
                     "pred_path": str(out), "split_path": str(path)})
    return rows


FINETUNED_SUFFIX = "+ft"


def run_finetuned(params: Any, adapter: str | Path, splits: Optional[Sequence[str]] = None,
                  max_images: Optional[int] = None):
    """Caption the splits with ``params.model`` + the trained adapter into
    ``predictions/<model>+ft__<split>.jsonl`` (the fine-tuned rows of 04's table)."""
    import pandas as pd

    from . import models as model_registry

    splits = list(splits if splits is not None else params.zero_shot.splits)
    max_images = max_images if max_images is not None else params.zero_shot.max_images
    split_files = _split_files(params, splits)
    model, processor, entry = model_registry.load_model(params, adapter=str(adapter))
    try:
        rows = _caption_splits(params, model, processor, entry, entry.key + FINETUNED_SUFFIX, split_files,
                               max_images, adapter=str(adapter))
    finally:
        del model, processor
        _free_memory()
    return pd.DataFrame(rows)


CONSTANT_SYSTEM = "constant-caption"


def write_constant_baseline(params: Any, splits: Optional[Sequence[str]] = None) -> str:
    """The floor to judge learning against: the most frequent training caption, predicted for every
    image of each split (``predictions/constant-caption__<split>.jsonl``). On templated data such as
    jp-shapes it scores well above zero; a model that has learned must beat it. Returns the caption."""
    from collections import Counter

    from .text import normalize_caption

    pairs = Path(params.processed_dir) / "train_pairs.jsonl"
    counts = Counter(normalize_caption(r["caption"]) for r in jio.read_jsonl(pairs))
    caption = counts.most_common(1)[0][0]
    for split, path in _split_files(params, list(splits if splits is not None else params.zero_shot.splits)).items():
        rows = [{"image_id": r["image_id"], "caption": caption, "model": CONSTANT_SYSTEM, "split": split}
                for r in jio.read_jsonl(path)]
        jio.atomic_write_jsonl(prediction_path(params, CONSTANT_SYSTEM, split), rows)
    return caption


def before_after_table(params: Any, split: str = "test", n: int = 8):
    """Zero-shot vs fine-tuned caption of the same images, with a reference, as a DataFrame."""
    import pandas as pd

    key = params.model.name
    before = prediction_path(params, key, split)
    after = prediction_path(params, key + FINETUNED_SUFFIX, split)
    refs = Path(params.processed_dir) / f"{split}.jsonl"
    if not (before.exists() and after.exists() and refs.exists()):
        return pd.DataFrame()
    b = {r["image_id"]: r.get("caption", "") for r in jio.read_jsonl(before, tolerate_partial_last=True)}
    a = {r["image_id"]: r.get("caption", "") for r in jio.read_jsonl(after, tolerate_partial_last=True)}
    rows = []
    for rec in jio.read_jsonl(refs):
        if rec["image_id"] in a and rec["image_id"] in b:
            rows.append({"image_id": rec["image_id"], "zero-shot": b[rec["image_id"]],
                         "fine-tuned": a[rec["image_id"]], "reference": rec["captions"][0]})
        if len(rows) >= n:
            break
    return pd.DataFrame(rows)


def sample_table(pred_path: str | Path, split_path: str | Path, n: int = 8, seed: Optional[int] = None):
    """``n`` predictions next to their image and first reference caption (file order, or a seeded
    random sample): columns image_id, file_name, prediction, reference, error."""
    import random

    import pandas as pd

    preds = list(jio.read_jsonl(pred_path, tolerate_partial_last=True))
    refs = {r["image_id"]: r for r in jio.read_jsonl(split_path)}
    if seed is not None:
        preds = random.Random(seed).sample(preds, min(n, len(preds)))
    rows = []
    for p in preds[:n]:
        ref = refs.get(p["image_id"], {})
        caps = ref.get("captions") or []
        rows.append({"image_id": p["image_id"], "file_name": ref.get("file_name", ""),
                     "prediction": p.get("caption", ""), "reference": caps[0] if caps else "",
                     "error": p.get("error", "")})
    return pd.DataFrame(rows, columns=["image_id", "file_name", "prediction", "reference", "error"])


def sample_items(params: Any, model: str, split: str, n: int = 8) -> list[tuple[Path, str]]:
    """``(image path, "prediction / reference")`` pairs for ``reports.image_grid``, from the run's
    ``predictions/<model>__<split>.jsonl``; empty when that file or the split file does not exist."""
    from .models import resolve

    try:
        key = resolve(model, trust_remote_code=True).key
    except ModelError:
        key = model
    pred = prediction_path(params, key, split)
    refs = Path(params.processed_dir) / f"{split}.jsonl"
    if not pred.exists() or not refs.exists():
        return []
    table = sample_table(pred, refs, n=n)
    items = []
    for row in table.itertuples(index=False):
        if not row.file_name:  # a prediction for an image the split file does not list
            continue
        shown = row.prediction if row.prediction else (f"[error: {row.error}]" if row.error else "(empty)")
        items.append((_resolve_image(Path(params.images_dir), row.file_name), f"{shown} / {row.reference}"))
    return items
