"""Captioning through a model's pinned environment (``models.pinned_env``): the same JSONL rows, resume
and summary as :func:`.pipeline.caption_records`, with the model running in a subprocess.

This process stays the one writer: it lists what is left (ids already in the file are skipped), starts
the runner in the model's environment, reads one JSON line per image from it, cleans the text with the
family's rules and appends each row at once (flushed and fsynced). A kill of either process loses at
most the image in flight; the next call resumes.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ..models import ModelEntry, ModelError
from ..models.pinned_env import PinnedEnvError, ensure_env_with_fallback, runner_path
from ..text import normalize_caption
from .pipeline import RESERVED_FIELDS, RowWriter, error_text, existing_ids, pending_items, run_summary
from .prompts import build_prompt, clean_output

__all__ = ["caption_records_pinned"]


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-500:]


def caption_records_pinned(entry: ModelEntry, model_path: str, records: Iterable[Any], images_dir: str | Path,
                           out_path: str | Path, *, env_parent: Path, dtype: str, load_in_4bit: bool,
                           revision: Optional[str] = None, max_new_tokens: int = 40, num_beams: int = 1,
                           prompt: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None,
                           retry_errors: bool = False, progress: bool = True, keep_file_name: bool = False) -> dict:
    """Caption ``records`` with ``entry`` (which must carry a :class:`~..models.pinned_env.PinnedRecipe`)
    loaded from ``model_path`` inside its pinned environment under ``env_parent``. The caller has
    checked the remote-code opt-in and the revision pin. Returns the summary of ``caption_records``."""
    if entry.pinned is None:
        raise ModelError(f"{entry.key}: no pinned environment recipe in the registry")
    extra = dict(extra or {})
    if RESERVED_FIELDS & set(extra):
        raise ValueError(f"extra must not set {sorted(RESERVED_FIELDS & set(extra))}: the engine writes those fields")
    images_dir, out_path = Path(images_dir), Path(out_path)
    pending = pending_items(records, existing_ids(out_path, entry.key, retry_errors), images_dir)
    fields = {"model": entry.key, **extra}
    bar = None
    if progress and pending.items:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pending.items), unit="img", desc=f"{entry.key} (pinned env) → {out_path.name}")
    writer = RowWriter(out_path, bar)
    missing = [it for it in pending.items if not it.path.is_file()]
    names = {it.image_id: {"file_name": it.file_name} if keep_file_name else {} for it in pending.items}
    writer.emit([{"image_id": it.image_id, "caption": "", **fields, **names[it.image_id],
                  "error": error_text(FileNotFoundError(f"image file not found: {it.path}"))} for it in missing])
    todo = [it for it in pending.items if it.path.is_file()]
    start, commit, versions = time.perf_counter(), None, None
    if todo:
        try:
            python = ensure_env_with_fallback(env_parent, entry.key, entry.pinned.requirements)
        except PinnedEnvError as exc:
            raise ModelError(str(exc)) from None
        job = {"model_path": model_path, "revision": revision, "runner": entry.pinned.runner, "dtype": dtype,
               "load_in_4bit": load_in_4bit, "prompt": build_prompt(entry, None, instruction=prompt),
               "max_new_tokens": max_new_tokens, "num_beams": num_beams,
               "items": [{"image_id": it.image_id, "path": str(it.path.resolve())} for it in todo]}
        job_file, log_file = out_path.with_suffix(".pinned_job.json"), out_path.with_suffix(".pinned.log")
        job_file.parent.mkdir(parents=True, exist_ok=True)
        job_file.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
        expected = {it.image_id for it in todo}
        with open(log_file, "w", encoding="utf-8") as log:
            proc = subprocess.Popen([str(python), str(runner_path()), str(job_file)], stdout=subprocess.PIPE,
                                    stderr=log, text=True, encoding="utf-8")
            try:
                for line in proc.stdout:
                    try:
                        msg = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a library printed to stdout; the runner's own lines are JSON
                    if msg.get("ready"):
                        commit, versions = msg.get("commit"), msg.get("transformers")
                        continue
                    if msg.get("image_id") not in expected:
                        continue
                    expected.discard(msg["image_id"])
                    row = {"image_id": msg["image_id"], "caption": "", **fields, **names[msg["image_id"]]}
                    if "error" in msg:
                        row["error"] = str(msg["error"])[:300]
                    else:
                        row["caption"] = normalize_caption(clean_output(entry, str(msg.get("text", ""))))
                    writer.emit([row])
                code = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        job_file.unlink(missing_ok=True)
        if code != 0 or expected:
            raise ModelError(f"{entry.key}: the pinned-environment runner stopped (exit {code}) with "
                             f"{len(expected)} images left: {_tail(log_file) or 'no message'} (log: {log_file}). "
                             "Rows written so far are kept; run again to resume.")
    if bar is not None:
        bar.close()
    return run_summary(entry, out_path, pending, writer, time.perf_counter() - start, batch_size=1,
                       num_beams=num_beams, max_new_tokens=max_new_tokens, peak_gpu_gib=None, commit=commit,
                       decoder=f"hf generate (pinned env, transformers {versions})" if versions
                       else "hf generate (pinned env)", constraints=None)
