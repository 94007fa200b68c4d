"""Validation during training: the loss over the validation captions (fast path, no dropout) and
corpus CIDEr of greedy captions from the caption engine. RNG is restored, so validating does not
change training. With ``train.cudagraphs`` validation runs the compiled blocks eagerly (:func:`validate`)."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

from ..io import read_jsonl
from .batches import PairDataset
from .lora import causal_lm
from .loss import caption_loss
from .rng import rng_state, set_rng_state
from .session import TrainSession

__all__ = ["validation_batches", "validation_loss", "validation_cider", "validation_stance", "validate"]


def validation_batches(session: TrainSession) -> Iterator[dict]:
    """Every caption of the validation records as (image, caption) rows, in device micro-batches."""
    pairs = [{"row": i, "image_id": r["image_id"], "file_name": r["file_name"], "caption": c}
             for i, r in enumerate(session.data.val_records) for c in r["captions"]]
    ds = PairDataset(pairs, session.params.images_dir)
    m = session.params.train.micro_batch_size
    for i in range(0, len(pairs), m):
        yield session.to_device(session.data.collator([ds[j] for j in range(i, min(i + m, len(pairs)))]))


def validation_loss(session: TrainSession) -> Optional[float]:
    """Mean token cross-entropy over every caption of the validation records."""
    import torch

    total = n = 0.0
    with torch.no_grad(), session.accelerator.autocast():
        for batch in validation_batches(session):
            s, k = caption_loss(session.model, batch)
            total += float(s)
            n += float(k)
    return total / n if n else None


def validation_cider(session: TrainSession, step: int) -> Optional[float]:
    """Corpus CIDEr of greedy captions for the validation images (caption engine + evaluator).

    None, with one warning, where the evaluation stack (pycocoevalcap, fugashi) is not installed — a
    stripped-down GPU box; jpcap's own install always has it."""
    from .. import engine, evaluate

    p = session.params
    out_path = Path(p.run_dir) / "val_predictions" / f"step-{step}.jsonl"
    if out_path.exists():
        out_path.unlink()   # a re-done step after a resume: generate again
    # autocast: the trainable projector is fp32 while the frozen ViT runs in the load dtype
    with session.accelerator.autocast():
        engine.caption_records(session.model, session.processor, session.entry, session.data.val_records,
                               p.images_dir, out_path, batch_size=p.generation.batch_size,
                               max_new_tokens=p.generation.max_new_tokens, prompt=session.prompt, progress=False,
                               decoder=p.generation.decoder, grid_buckets=p.generation.grid_buckets,
                               options=engine.EngineOptions(reuse_decoder=False))  # no buffers kept while training
    preds = {int(r["image_id"]): r.get("caption", "") for r in read_jsonl(out_path, tolerate_partial_last=True)}
    refs = {int(r["image_id"]): list(r["captions"]) for r in session.data.val_records}
    try:
        result = evaluate.score(refs, preds, allow_missing=True, n_resamples=0)
    except ImportError as e:
        if not session.warned_no_scorer:
            warnings.warn(f"validation CIDEr skipped: {e} (pip install jpcap brings it)", stacklevel=2)
            session.warned_no_scorer = True
        return None
    return float(result["CIDEr"])


def validation_stance(model: Any) -> contextlib.AbstractContextManager:
    """Where validation's forwards run: as trained, or — with ``train.cudagraphs`` — the compiled blocks
    eagerly (``torch.compiler.set_stance("force_eager")``). Each validation batch shape would otherwise be
    compiled and recorded as a CUDA graph of its own (``generate``: each new token's), and the caption engine
    captures CUDA graphs of its own, which cannot hold cudagraph trees' replays. Training's recorded graphs
    stay as they are and replay after it."""
    import torch

    if getattr(causal_lm(model), "jpcap_cudagraphs", False):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def validate(session: TrainSession, step: int) -> dict:
    """``{"val_loss", "val_CIDEr"}`` at ``step`` (in :func:`validation_stance`), with the model back in train
    mode and the RNG as before."""
    model, rng = session.model, rng_state()
    model.eval()
    try:
        with validation_stance(model):
            return {"val_loss": validation_loss(session), "val_CIDEr": validation_cider(session, step)}
    finally:
        model.train()
        set_rng_state(rng)
