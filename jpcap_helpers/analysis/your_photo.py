"""Caption your own photo: the base model and the fine-tuned adapter side by side on any local image,
with the automatic flags that need no references (script, repetition, empty) and the gendered terms
used. Headless-safe: :func:`toy_photo` draws a jp-shapes scene when no photo is given.

Privacy: a photo of people is processed locally by the model; nothing is uploaded, but do not publish
captions of people without their consent."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from .. import io as jio
from . import flags as jflags

__all__ = ["toy_photo", "caption_photos"]


def toy_photo(path: str | Path, seed: int = 0) -> Path:
    """A jp-shapes scene (the demo's world) saved as JPEG at ``path``, for runs without an upload."""
    import numpy as np

    from ..data.toy import draw_scene, random_scene

    rng = np.random.default_rng(seed)
    scene = random_scene(rng, [[168, 126]])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.jpg")
    draw_scene(scene, rng).convert("RGB").save(tmp, format="JPEG", quality=92)
    tmp.replace(path)
    return path


def caption_photos(params: Any, photos: Sequence[str | Path], adapter: Optional[str | Path] = None):
    """One row per photo: its path, then per system (the base model, and ``<model>+ft`` with the
    adapter when it exists) the caption, its script, repetition loop and gendered terms, and the
    flags raised. Unreadable photos become rows with the engine's error. Uses ``generation.*``
    (constraints included) as the run does."""
    import pandas as pd

    from ..engine import caption_records
    from ..engine.runs import FINETUNED_SUFFIX
    from ..models import load_model
    from ..text import normalize_caption

    photos = [Path(p) for p in photos]
    adapters = [None] + ([str(adapter)] if adapter and Path(adapter).exists() else [])
    rows = [{"photo": str(p)} for p in photos]
    with tempfile.TemporaryDirectory(prefix="jpcap-photo-") as tmp:
        tmp = Path(tmp)
        records = []
        for i, p in enumerate(photos):
            name = f"{i}{p.suffix.lower() or '.jpg'}"
            if p.is_file():
                shutil.copyfile(p, tmp / name)
            records.append({"image_id": i, "file_name": name})
        for ad in adapters:
            model, processor, entry = load_model(params, adapter=ad)
            system = entry.key + (FINETUNED_SUFFIX if ad else "")
            out = tmp / f"{system.replace('+', '_')}.jsonl"
            try:
                caption_records(model, processor, entry, records, tmp, out, batch_size=params.generation.batch_size,
                                max_new_tokens=params.generation.max_new_tokens, decoder=params.generation.decoder,
                                constraints=params.generation.constraints, progress=False)
            finally:
                del model, processor
            for r in jio.read_jsonl(out):
                cap = normalize_caption(r.get("caption") or "")
                row = rows[int(r["image_id"])]
                empty = not any(c.isalnum() for c in cap)
                script = "" if empty else jflags.script_kind(cap)
                loop = "" if empty else jflags.repetition(cap)
                terms = [t for t, g in jflags.gender_terms(cap) if g]
                raised = [name for name, on in (("empty", empty), ("non_japanese", bool(script) and script != "japanese"),
                                                ("repetition", bool(loop)), ("gendered term", bool(terms))) if on]
                row.update({f"{system}: caption": cap, f"{system}: flags": ", ".join(raised),
                            f"{system}: gendered terms": "、".join(terms), f"{system}: error": r.get("error", "")})
    return pd.DataFrame(rows)
