"""Training outputs: ``<run_dir>/adapter/`` (PEFT adapter + processor + params + jpcap's record of
how it was trained) and, for adapters on a full-precision base, a merged model."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .errors import TrainError
from .lora import causal_lm
from .session import TrainSession, precision_name

__all__ = ["adapter_record", "export_adapter", "merge_adapter"]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing it; a kill leaves either the old or the new folder."""
    if final.exists():
        old = final.parent / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def adapter_record(session: TrainSession) -> dict:
    """What ``jpcap_train.json`` says about the adapter's base and training (read by models.load_model)."""
    p = session.params
    return {
        "base_model": p.model.name, "base_model_revision": p.model.revision or session.entry.revision,
        "base_model_commit": getattr(causal_lm(session.model), "jpcap_commit", None),
        "base_load_in_4bit": session.load_in_4bit, "train_method": p.train_method,
        "precision": precision_name(session.dtype), "prompt": session.prompt,
        "projector": p.train.projector, "top_k_layers": p.train.top_k_layers,
        "lora_rank": p.train.lora_rank, "lora_alpha": p.train.lora_alpha,
        "params_fingerprint": p.fingerprint(),
    }


def export_adapter(session: TrainSession, result_info: dict) -> Path:
    """``<run_dir>/adapter/``: PEFT adapter (projector via modules_to_save), processor, params and
    ``jpcap_train.json`` (:func:`adapter_record` + ``result_info``), written atomically."""
    from .. import models
    from ..io import atomic_write_json
    from ..params import save_resolved

    run_dir = Path(session.params.run_dir)
    final, tmp = run_dir / "adapter", run_dir / ".tmp-adapter"
    if tmp.exists():
        shutil.rmtree(tmp)
    session.accelerator.unwrap_model(session.loss_module).model.save_pretrained(tmp)
    session.processor.save_pretrained(tmp)
    save_resolved(session.params, tmp)
    atomic_write_json(tmp / models.ADAPTER_INFO_FILE, {**adapter_record(session), **result_info})
    _replace_dir(tmp, final)
    return final


def merge_adapter(params: Any, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge a LoRA adapter into full-precision base weights and save model + processor in ``out_dir``.

    Refused for adapters trained on a 4-bit base (recorded ``base_load_in_4bit``, else
    ``model.load_in_4bit``): merging into 4-bit weights changes the outputs, and merging into an
    unquantized base gives a model other than the trained one.
    """
    from .. import models

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if models.read_adapter_info(adapter_dir).get("base_load_in_4bit", params.model.load_in_4bit):
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
