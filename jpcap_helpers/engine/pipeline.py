"""Batched, resumable captioning (:func:`caption_records`): image records → an append-only JSONL of
captions, one row per image, written after every batch.

The work, in order: read what ``out_path`` already holds (:func:`existing_ids`), list what is left
(:func:`pending_items`), sort it by visual-token count — with ``grid_buckets`` each image first moved
to one of K canonical grids (:mod:`.grids`) — and cut it into batches (:func:`sort_by_visual_tokens`,
:func:`make_batches`), optionally warm the decoder up on those shapes (:mod:`.warmup`, untimed), then
run the batches through a two-stage
pipeline (:class:`BatchPipeline`): JPEGs are decoded in loader threads two batches ahead and, while
the GPU works through batch i's vision tower and prefill, batch i-1's rows are written and batch i+1
is prepared (tokenised, its images preprocessed — on the GPU for the fast decoder).
"""
from __future__ import annotations

import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .. import io as jio
from ..models import ModelEntry, ModelError
from ..text import normalize_caption
from .constraints import Constraints, build_constraints, describe
from .generation import (
    GPU_IMAGE_PROCESSORS,
    Decoder,
    generate_batch,
    generation_config,
    prepare_inputs,
    uses_fast_decoder,
)
from .grids import GridPlan, plan_grids
from .images import group_key, image_size, load_image_for_model, load_image_tensor, resolve_image
from .options import EngineOptions
from .prompts import build_prompt, clean_output, stop_token_ids, tokenizer_of
from .warmup import warm_up

__all__ = ["caption_records", "run_summary", "error_text", "Item", "Pending", "PreparedBatch", "existing_ids", "pending_items", "sort_by_visual_tokens",
           "make_batches", "plan_batches", "RowWriter", "BatchCaptioner", "BatchPipeline"]

RESERVED_FIELDS = {"image_id", "caption", "model", "error", "file_name"}


def error_text(exc: BaseException) -> str:
    """``"<Type>: <first line of the message>"`` (at most 300 characters) for an error row."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


@dataclass
class Item:
    """One image to caption: its id, file, resolved path, batch sort key, input position, and the
    (height, width) it is resized to when moved to a canonical grid (``generation.grid_buckets``)."""
    image_id: int
    file_name: str
    path: Path
    key: tuple = ()
    order: int = 0
    size: Optional[tuple[int, int]] = None


def _record_fields(record: Any, where: str) -> tuple[int, str]:
    get = record.get if isinstance(record, Mapping) else (lambda k, d=None: getattr(record, k, d))
    image_id, file_name = get("image_id"), get("file_name")
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise ValueError(f"{where}: image_id must be an integer, got {image_id!r}")
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"{where}: file_name must be a non-empty string, got {file_name!r}")
    return image_id, file_name


def existing_ids(out_path: Path, model_key: str, retry_errors: bool = False) -> set[int]:
    """Ids already captioned in ``out_path`` (a partial last line left by a kill is dropped first);
    with ``retry_errors`` the file is rewritten without its error rows, so those images run again. A
    file holding another model's rows is refused."""
    jio.repair_jsonl_tail(out_path)
    existing = list(jio.read_jsonl(out_path, tolerate_partial_last=True)) if out_path.exists() else []
    for i, row in enumerate(existing, start=1):
        if row.get("model") not in (None, model_key):
            raise ValueError(f"{out_path}: row {i} holds predictions of model {row.get('model')!r}, not "
                             f"{model_key!r}: use another output file")
    if retry_errors and any("error" in r for r in existing):
        existing = [r for r in existing if "error" not in r]
        jio.atomic_write_jsonl(out_path, existing)
    return {r["image_id"] for r in existing if "image_id" in r}


@dataclass
class Pending:
    """What :func:`pending_items` found: the items left, and the counts for the summary."""
    items: list[Item] = field(default_factory=list)
    n_records: int = 0
    n_skipped: int = 0
    n_dupes: int = 0


def pending_items(records: Iterable[Any], done: set[int], images_dir: Path) -> Pending:
    """The records not captioned yet (first occurrence of each id), their image paths resolved."""
    out = Pending()
    seen: set[int] = set()
    for idx, rec in enumerate(records):
        out.n_records += 1
        image_id, file_name = _record_fields(rec, f"record {idx}")
        if image_id in done:
            out.n_skipped += 1
            continue
        if image_id in seen:
            out.n_dupes += 1
            continue
        seen.add(image_id)
        out.items.append(Item(image_id, file_name, resolve_image(images_dir, file_name), order=idx))
    return out


def sort_by_visual_tokens(items: list[Item], processor: Any, grids: Optional[GridPlan] = None
                          ) -> tuple[list[Item], list[tuple[Item, Exception]]]:
    """Items sorted by visual-token count (read from the image headers), and those whose header could
    not be read, with the error. With ``grids`` an item whose grid is not canonical gets the canonical
    grid's key and ``size`` (it is resized to that size when loaded)."""
    ready, failed = [], []
    for item in items:
        try:
            h, w = image_size(item.path)
            item.key = group_key(processor, h, w)
            if grids is not None and len(item.key) == 3:
                target = grids.target((item.key[1], item.key[2]))
                moved = group_key(processor, *target)
                if target != tuple(item.key[1:]) and tuple(moved[1:]) == target:  # the processor keeps it
                    item.key, item.size = moved, target
            ready.append(item)
        except Exception as exc:  # unreadable header, missing file
            failed.append((item, exc))
    ready.sort(key=lambda it: (it.key, it.order))
    return ready, failed


def make_batches(ready: list[Item], batch_size: int, one_grid: bool) -> list[list[Item]]:
    """Consecutive batches of ``batch_size``; with ``one_grid`` no batch mixes visual grids (the fast
    decoder's batches: no padding, shared positions)."""
    if not one_grid:
        return [ready[i:i + batch_size] for i in range(0, len(ready), batch_size)]
    batches = []
    for _, group in itertools.groupby(ready, key=lambda it: it.key):
        group = list(group)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def plan_batches(model: Any, processor: Any, entry: ModelEntry, records: list, images_dir: str | Path, *,
                 batch_size: int, num_beams: int = 1, decoder: str = "auto", grids: Optional[GridPlan] = None
                 ) -> list[list]:
    """The batches :func:`caption_records` would run for ``records`` (none captioned yet, no duplicate
    ids), as lists of the records themselves; the records whose image header cannot be read (error rows)
    come last, as one list. Every record is in exactly one list. Any subset of whole batches, given to
    :func:`caption_records`, is cut into the same batches again (what sharding by batches relies on)."""
    pending = pending_items(records, set(), Path(images_dir))
    ready, failed = sort_by_visual_tokens(pending.items, processor, grids)
    batches = make_batches(ready, batch_size, one_grid=uses_fast_decoder(model, entry, num_beams, decoder))
    out = [[records[it.order] for it in batch] for batch in batches]
    return out + ([[records[it.order] for it, _ in failed]] if failed else [])


def run_summary(entry: ModelEntry, out_path: Path, pending: Pending, writer: "RowWriter", seconds: float, *,
                warmup_seconds: float = 0.0, n_grids: Optional[int] = None, n_resized: int = 0,
                **fields: Any) -> dict:
    """The summary a captioning run returns (and ``.meta.json`` keeps): counts, time (``seconds``: the
    run after any warm-up, which ``warmup_seconds`` counts apart), rate, distinct visual grids met
    (``n_grids``; None where not known), images moved to a canonical grid (``n_resized``), ``fields``."""
    n_done = writer.n_captioned + writer.n_errors
    return {
        "model": entry.key, "out_path": str(out_path), "n_records": pending.n_records, "n_done": n_done,
        "n_captioned": writer.n_captioned, "n_errors": writer.n_errors,
        "n_skipped_existing": pending.n_skipped, "n_duplicate_records": pending.n_dupes,
        "seconds": round(seconds, 3), "images_per_s": round(n_done / seconds, 3) if seconds > 0 and n_done else 0.0,
        "warmup_seconds": round(warmup_seconds, 3), "n_grids": n_grids, "n_resized": n_resized,
        **fields,
    }


def _planned_shapes(planned: Sequence[Sequence[Any]], processor: Any, images_dir: Path,
                    grids: Optional[GridPlan]) -> list[list[Item]]:
    """Planned batches of records as the warm-up reads them — a batch's first item's grid and the batch's
    length (:func:`.warmup.warmup_shapes`): each batch is its first record's item repeated, so one image
    header is read per batch. A batch whose first header cannot be read (the error rows) is left out."""
    planned = [b for b in planned if b]
    firsts, _ = sort_by_visual_tokens(pending_items([b[0] for b in planned], set(), images_dir).items, processor, grids)
    return [[it] * len(planned[it.order]) for it in firsts]


def _slowest(batches: list[list[Item]], seconds: list[float], n: int = 3) -> list[list]:
    """The ``n`` slowest batches as [seconds, images, grid "HxW"] (a compilation inside the run shows here)."""
    timed = sorted(zip(seconds, batches), key=lambda sb: -sb[0])[:n]
    return [[round(s, 3), len(b), "x".join(map(str, b[0].key[1:])) if b and len(b[0].key) == 3 else None]
            for s, b in timed]


class RowWriter:
    """Appends rows to the predictions file, counts captions and errors, moves the progress bar."""

    def __init__(self, out_path: Path, bar: Any = None):
        self.out_path, self.bar = out_path, bar
        self.n_captioned = self.n_errors = 0

    def emit(self, rows: list[dict]) -> None:
        if not rows:
            return
        jio.append_jsonl(self.out_path, rows)
        for r in rows:
            if "error" in r:
                self.n_errors += 1
            else:
                self.n_captioned += 1
        if self.bar is not None:
            self.bar.update(len(rows))
            self.bar.set_postfix(errors=self.n_errors, refresh=False)


@dataclass
class PreparedBatch:
    """A batch through the processor: the items, rows already decided (unreadable images), the items
    whose image loaded, the processor's inputs, or the processor's error."""
    items: list[Item]
    rows: dict = field(default_factory=dict)
    loaded: list[Item] = field(default_factory=list)
    inputs: Any = None
    error: Optional[Exception] = None


class BatchCaptioner:
    """Prepares and captions one batch at a time for one model, prompt and decoder."""

    def __init__(self, processor: Any, entry: ModelEntry, decoder: Decoder, prompt: str, extra: dict,
                 keep_file_name: bool = False):
        self.processor, self.entry, self.decoder, self.prompt = processor, entry, decoder, prompt
        self.fields = {"model": entry.key, **extra}
        self.keep_file_name = keep_file_name
        image_processor = type(getattr(processor, "image_processor", None)).__name__
        self.device = decoder.preprocess_device if image_processor in GPU_IMAGE_PROCESSORS else None
        self.loader: Callable[..., Any] = load_image_tensor if self.device is not None else load_image_for_model

    def load(self, item: Item) -> Any:
        """``item``'s image as the processor takes it (resized to its canonical grid when it has one)."""
        return self.loader(item.path, size=item.size) if item.size is not None else self.loader(item.path)

    def row(self, item: Item, caption: str = "", error: Optional[BaseException] = None) -> dict:
        row = {"image_id": item.image_id, "caption": caption, **self.fields}
        if self.keep_file_name:
            row["file_name"] = item.file_name
        if error is not None:
            row["error"] = error_text(error)
        return row

    def prepare(self, items: list[Item], loads: Optional[list[Future]] = None) -> PreparedBatch:
        """One batch's images (``loads``: their futures, loaded ahead in threads) through the processor.
        Unreadable images become error rows; a processor failure is kept for :meth:`finish`."""
        batch = PreparedBatch(items)
        images = []
        for i, it in enumerate(items):
            try:
                images.append(loads[i].result() if loads is not None else self.load(it))
                batch.loaded.append(it)
            except Exception as exc:
                batch.rows[it.image_id] = self.row(it, error=exc)
        if batch.loaded:
            try:
                batch.inputs = prepare_inputs(self.processor, [self.prompt] * len(images), images, device=self.device)
            except Exception as exc:
                batch.error = exc
        return batch

    def finish(self, batch: PreparedBatch, while_busy: Optional[Callable[[], None]] = None) -> list[dict]:
        """Caption a prepared batch (``while_busy`` runs while the GPU works on it); a failing batch is
        retried image by image to isolate the culprit (or an out-of-memory batch)."""
        import torch

        rows, loaded = batch.rows, batch.loaded
        if loaded:
            try:
                if batch.error is not None:
                    raise batch.error
                raw = generate_batch(self.processor, batch.inputs, self.decoder, while_busy)
                if len(raw) != len(loaded):
                    raise RuntimeError(f"generation returned {len(raw)} texts for {len(loaded)} images")
                for it, text in zip(loaded, raw):
                    rows[it.image_id] = self.row(it, normalize_caption(clean_output(self.entry, text)))
            except Exception as exc:
                batch.inputs = None
                if torch.cuda.is_available():  # after an out-of-memory error, give the cached blocks back
                    torch.cuda.empty_cache()
                if len(loaded) == 1:
                    rows[loaded[0].image_id] = self.row(loaded[0], error=exc)
                else:
                    for it in loaded:
                        rows.update({r["image_id"]: r for r in self.finish(self.prepare([it]))})
        batch.inputs = None
        return [rows[it.image_id] for it in batch.items]


class _Once:
    """Runs ``fn`` at most once; an error is kept (:meth:`reraise`), never raised into the decoder:
    errors there are the engine's (writing), not the batch's images'."""

    def __init__(self, fn: Callable[[], None]):
        self.fn, self.ran, self.error = fn, False, None

    def __call__(self) -> None:
        if self.ran:
            return
        self.ran = True
        try:
            self.fn()
        except BaseException as exc:
            self.error = exc

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error


class BatchPipeline:
    """Runs the batches: images decoded in threads two batches ahead; with ``pipelined``, while the
    GPU works on batch i, batch i-1's rows are written and batch i+1 is prepared."""

    def __init__(self, batches: list[list[Item]], captioner: BatchCaptioner, pipelined: bool, loader_threads: int):
        self.batches, self.captioner, self.pipelined = batches, captioner, pipelined
        self.writer: Optional[RowWriter] = None
        self.pool = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="jpcap-load")
        self.loads: dict[int, list[Future]] = {}
        self.upcoming: Optional[PreparedBatch] = None
        self.finished: list[dict] = []  # rows of the last batch, written while the GPU works on the next
        self.fill_seconds = 0.0  # from run() to the first batch's start: its images read and prepared
        self.batch_seconds: list[float] = []  # each batch's share of the run: from the last batch's end to its own

    def prefetch(self) -> None:
        """Start decoding the first two batches' images in the loader threads (e.g. while the warm-up
        keeps the GPU busy: the run then does not begin by waiting for them)."""
        self._load_ahead(0)
        self._load_ahead(1)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _load_ahead(self, i: int) -> None:
        if i < len(self.batches) and i not in self.loads:
            self.loads[i] = [self.pool.submit(self.captioner.load, it) for it in self.batches[i]]

    def _prepare(self, i: int) -> PreparedBatch:
        return self.captioner.prepare(self.batches[i], self.loads.pop(i))

    def _flush(self) -> None:
        rows, self.finished = self.finished, []
        self.writer.emit(rows)

    def _between(self, i: int) -> None:
        """The CPU work done while the GPU is busy with batch ``i``."""
        self._flush()
        self._load_ahead(i + 2)
        if i + 1 < len(self.batches):
            self.upcoming = self._prepare(i + 1)

    def run(self, writer: RowWriter, first_rows: list[dict]) -> None:
        """Write ``first_rows`` (images failed before batching) with ``writer``, then caption every batch
        (``fill_seconds``: until the first batch could start; ``batch_seconds``: each batch's seconds).
        Closes the loader threads."""
        self.writer = writer
        try:
            start = time.perf_counter()
            self.writer.emit(first_rows)
            self.prefetch()
            self.upcoming = self._prepare(0) if self.batches else None
            last = time.perf_counter()
            self.fill_seconds = last - start
            for i in range(len(self.batches)):
                current, self.upcoming = self.upcoming, None
                busy = _Once(lambda i=i: self._between(i))
                rows = self.captioner.finish(current, busy if self.pipelined else None)
                busy()  # HF generate, failed batches and an unpipelined run did not call it
                busy.reraise()
                self.finished = rows
                now = time.perf_counter()
                self.batch_seconds.append(now - last)
                last = now
            self._flush()
        finally:
            if self.finished:  # interrupted: keep the rows already captioned (a resumed run skips them)
                try:
                    self._flush()
                except Exception:
                    pass
            self.close()


def caption_records(model: Any, processor: Any, entry: ModelEntry, records: Iterable[Any],
                    images_dir: str | Path, out_path: str | Path, *, batch_size: int = 16,
                    max_new_tokens: int = 40, num_beams: int = 1, prompt: Optional[str] = None,
                    progress: bool = True, extra: Optional[Mapping[str, Any]] = None,
                    retry_errors: bool = False, decoder: str = "auto",
                    options: EngineOptions = EngineOptions(), constraints: Any = None,
                    keep_file_name: bool = False, grid_buckets: int = 0, grids: Optional[GridPlan] = None,
                    warmup: bool = False, warmup_batches: Optional[Sequence[Sequence[Any]]] = None) -> dict:
    """Caption ``records`` (dicts or objects with ``image_id`` and ``file_name`` relative to
    ``images_dir``) into the JSONL ``out_path``, one ``{"image_id", "caption", "model", **extra}``
    row per image, appended after every batch.

    Resumes: ids already in ``out_path`` are skipped (a partial last line left by a kill is dropped
    first); ``retry_errors`` rewrites the file without its error rows so those images run again.
    Images are sorted by visual-token count; decoding is greedy (``num_beams`` > 1: beam search) up
    to ``max_new_tokens``, stopping at the model's end tokens; only new tokens are decoded, then
    cleaned (:func:`clean_output`) and normalised (``text.normalize_caption``). ``decoder="auto"``
    decodes Qwen2-VL / Qwen2.5-VL / Qwen3-VL greedily with :class:`.decode.GreedyDecoder` (batches of one visual
    grid, static KV cache, CUDA-graph steps and image preprocessing on the GPU); other models, beam
    search and ``decoder="hf"`` use HF ``generate`` on left-padded batches. ``options`` holds the
    engine's speed levers (:class:`EngineOptions`). ``constraints`` (``generation.constraints`` or a
    built :class:`.constraints.Constraints`) constrains both decoders (docs/human_eval.md). An image that cannot be read or processed becomes
    a row with ``"caption": ""`` and ``"error"`` (a failing batch is retried image by image).
    ``keep_file_name`` adds each record's ``file_name`` to its row (captioning a folder of photos).
    ``grid_buckets`` K > 0 moves every image to one of K canonical visual grids chosen from all of
    ``records`` (``grids``: a :class:`.grids.GridPlan` chosen beforehand, e.g. over a whole split before
    sharding); ``warmup`` runs one blank batch per distinct (grid, batch-size bucket) first, untimed —
    of ``warmup_batches`` where given (batches of records, as :func:`plan_batches` makes them: sharding
    passes the whole run's, so that each process warms what one GPU would; a process warmed on its own
    share alone met some shapes for the first time inside its timed run).

    Returns a summary: n_records, n_done (rows written now), n_captioned, n_errors,
    n_skipped_existing, n_duplicate_records, seconds (after the warm-up), images_per_s, warmup_seconds,
    n_grids (distinct visual grids of the images captioned now), n_resized (of them, moved to a
    canonical grid), n_batches, slowest_batches (the three slowest: [seconds, images, grid]),
    fill_seconds (of ``seconds``, those before the first batch could start: its images read and prepared —
    with ``warmup`` their reading overlaps the warm-up), loader_threads, graph_captures and
    graph_capture_seconds (CUDA graphs of the decoding step captured inside the run, not its warm-up:
    each synchronises the GPU), grid_buckets, canonical_grids, warmup, peak_gpu_gib (CUDA), decoder,
    commit, constraints (their provenance record, or None).
    """
    import torch

    if entry.loader == "pinned_env":
        raise ModelError(f"{entry.key} runs in its own pinned environment: caption it with "
                         "engine.caption_records_pinned (02/04 and `jpcap caption` do)")
    if batch_size < 1 or max_new_tokens < 1 or num_beams < 1 or grid_buckets < 0:
        raise ValueError("batch_size, max_new_tokens and num_beams must be ≥ 1, grid_buckets ≥ 0")
    extra = dict(extra or {})
    clash = RESERVED_FIELDS & set(extra)
    if clash:
        raise ValueError(f"extra must not set {sorted(clash)}: the engine writes those fields")
    images_dir, out_path = Path(images_dir), Path(out_path)

    records = list(records)
    if grids is None and grid_buckets > 0:  # from every record, captioned or not: a resume keeps the grids
        grids = plan_grids(processor, records, images_dir, grid_buckets)
    pending = pending_items(records, existing_ids(out_path, entry.key, retry_errors), images_dir)
    ready, failed = sort_by_visual_tokens(pending.items, processor, grids)

    tok = tokenizer_of(processor)
    eos = stop_token_ids(model, processor, entry)
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else (eos[0] if eos else None)
    if constraints is not None and not isinstance(constraints, Constraints):
        constraints = build_constraints(tok, constraints, eos)
        if constraints is not None and (constraints.report.skipped or constraints.report.n_duplicates):
            print(f"constraints: {constraints.report.summary()}")
    run_decoder = Decoder(model, entry, generation_config(model, max_new_tokens, num_beams, eos, pad), batch_size,
                          decoder, options, constraints=constraints)
    captioner = BatchCaptioner(processor, entry, run_decoder, build_prompt(entry, processor, instruction=prompt),
                               extra, keep_file_name)
    batches = make_batches(ready, batch_size, one_grid=run_decoder.fast is not None)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warmup_seconds, bar = 0.0, None
    pipeline = BatchPipeline(batches, captioner, options.pipeline, options.n_loader_threads())
    try:   # the loader threads are closed however the warm-up or the run ends
        if warmup and batches:
            if run_decoder.fast is not None:   # the first batches' JPEGs are read while the warm-up runs (run X4-2)
                pipeline.prefetch()
            start = time.perf_counter()
            warm = batches if warmup_batches is None else _planned_shapes(warmup_batches, processor, images_dir, grids)
            warm_up(captioner, warm)
            warmup_seconds = time.perf_counter() - start
        if progress and pending.items:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(pending.items), unit="img", desc=f"{entry.key} → {out_path.name}", smoothing=0.1)
        writer = RowWriter(out_path, bar)
        fast = run_decoder.fast
        captures = (fast.n_graph_captures, fast.capture_seconds) if fast is not None else (0, 0.0)
        start = time.perf_counter()
        pipeline.run(writer, [captioner.row(item, error=exc) for item, exc in failed])
        seconds = time.perf_counter() - start
        if fast is not None:   # CUDA graphs captured inside the run (not in its warm-up)
            captures = (fast.n_graph_captures - captures[0], round(fast.capture_seconds - captures[1], 3))
    finally:
        pipeline.close()
        if bar is not None:
            bar.close()
    return run_summary(entry, out_path, pending, writer, seconds,
                       warmup_seconds=warmup_seconds, n_grids=len({it.key for it in ready}),
                       n_resized=sum(it.size is not None for it in ready),
                       n_batches=len(batches), slowest_batches=_slowest(batches, pipeline.batch_seconds),
                       fill_seconds=round(pipeline.fill_seconds, 3), loader_threads=options.n_loader_threads(),
                       graph_captures=captures[0], graph_capture_seconds=captures[1],
                       batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens,
                       grid_buckets=grid_buckets or (len(grids.grids) if grids is not None else 0),
                       canonical_grids=grids.as_list() if grids is not None else None, warmup=warmup,
                       decoder=run_decoder.name,
                       peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                       commit=getattr(model, "jpcap_commit", None), weights=getattr(model, "jpcap_weights", None),
                       constraints=describe(run_decoder.constraints))
