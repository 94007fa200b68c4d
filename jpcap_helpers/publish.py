"""Share a fine-tuned adapter the way Hugging Face users expect: the adapter files plus a generated model
card (``README.md``) saying what it was trained from and on, how it scores (with CIs), what it must not be
trusted for, and under which licences. ``jpcap push`` uploads it; ``--to-folder`` writes the same files
locally (no network), which is what the tests check.

Everything in the card is read from the run folder: ``params.yaml`` (resolved), ``train_result.json``,
``metrics.csv``, ``reports/flag_rates.csv`` and the processed data's ``report.json``. Nothing is invented:
a missing source is said to be missing.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

from .io import atomic_write_text

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ repo_id }}

A LoRA adapter for **{{ base.hub_id }}**{% if base.revision %} (revision `{{ base.revision }}`){% endif %} that
captions images in Japanese, trained with [jpcap]({{ jpcap_url }}) ({{ method }}) on {{ data_name }}.

{% if synthetic %}> **Toy data.** This adapter was trained on jp-shapes, the project's synthetic offline data set of
> coloured shapes. It demonstrates the pipeline; it says nothing about Japanese captioning of real photos.
{% endif %}
## Base model and adapter
| | |
|---|---|
| base model | `{{ base.hub_id }}` (registry key `{{ base.key }}`), revision {{ base.revision or "not pinned (the commit loaded is recorded in the predictions' provenance)" }} |
| base licence | {{ base.licence }} |
| method | {{ method }} (4-bit NF4 base: {{ "yes" if base_4bit else "no" }}) |
| LoRA | rank {{ train.lora_rank }}, alpha {{ train.lora_alpha }}, dropout {{ train.lora_dropout }}, top {{ train.top_k_layers }} language layers; projector {{ train.projector }} |
| training | learning rate {{ train.learning_rate }}, epochs {{ train.epochs }}{% if train.max_steps %} (max {{ train.max_steps }} steps){% endif %}, effective batch {{ train.effective_batch_size }} |
{% if result %}| run | {{ result.steps }} optimizer steps in {{ "%.0f"|format(result.seconds or 0) }} s; final train loss {{ result.final_train_loss }}; non-finite steps skipped {{ result.non_finite_steps_skipped }} |
{% endif %}| params fingerprint | `{{ fingerprint }}` |

## Data
{{ data_description }}
{% if splits %}
| split | images | captions | hash |
|---|---|---|---|
{% for s in splits %}| {{ s.name }} | {{ s.images }} | {{ s.captions }} | `{{ s.hash }}` |
{% endfor %}{% endif %}
## Results
BLEU-4, ROUGE-L and CIDEr(-D) on MeCab-segmented text (pycocoevalcap scorers), 95% bootstrap confidence
intervals over images. `test` is in-domain (STAIR), `yj_test` out-of-domain (YJ Captions).
{% if metrics %}
| system | split | images | BLEU-4 | ROUGE-L | CIDEr | trained on STAIR |
|---|---|---|---|---|---|---|
{% for m in metrics %}| {{ m.system }} | {{ m.split }} | {{ m.n_images }} | {{ m.bleu }} | {{ m.rouge }} | {{ m.cider }} | {{ m.stair }} |
{% endfor %}
Rows of models trained on STAIR are not zero-shot on STAIR; compare them with care.
{% else %}
No metrics.csv in the run folder: this adapter was not evaluated (run notebook 04).
{% endif %}
## Failure cases and ethics
{% if flags %}Automatic flags (docs/ablations.md): share of captions per flag.

| system | {% for f in flag_names %}{{ f }} | {% endfor %}
|---|{% for f in flag_names %}---|{% endfor %}
{% for row in flags %}| {{ row.system }} | {% for f in flag_names %}{{ row[f] }} | {% endfor %}
{% endfor %}
{% else %}No failure-case flags were computed for this run (notebook 06).
{% endif %}
The flags are evidence to look at, not verdicts: gendered terms, hallucinated nouns and non-Japanese output
are found by rules, and a model can fail in ways no rule sees.

## Intended use and limits
- Research and teaching: Japanese image captioning of everyday photos like MS-COCO's.
- Not for describing people's identity, gender, age or other sensitive attributes; not for surveillance or
  for decisions about people. Captions can name things that are not in the image.
- Automatic metrics reward imitation of the reference style; they are not a human judgement.

## Licences
- Base model: {{ base.licence }}. The adapter inherits the base model's terms.
- Training data: {{ data_licence }}
"""

STAIR_LICENCE = ("STAIR Captions: CC BY 4.0; the COCO images are under their own (Flickr) licences and "
                 "are not redistributed with this adapter.")


def _read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else {}


def _jpcap_url() -> str:
    import importlib.metadata as md

    try:
        urls = md.metadata("jpcap").get_all("Project-URL") or []
    except md.PackageNotFoundError:
        urls = []
    return next((u.split(",", 1)[1].strip() for u in urls if u.lower().startswith("repository")),
                "https://github.com/")


def _fingerprint(params_yaml: Path) -> str:
    for line in params_yaml.read_text(encoding="utf-8").splitlines()[:3]:
        if line.startswith("# params fingerprint:"):
            return line.split(":", 1)[1].strip()
    return "–"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _with_ci(row: dict, metric: str) -> str:
    value, lo, hi = row.get(metric), row.get(f"{metric}_lo"), row.get(f"{metric}_hi")
    if value in (None, ""):
        return "–"
    text = f"{float(value):.3f}"
    return f"{text} [{float(lo):.3f}, {float(hi):.3f}]" if lo not in (None, "") and hi not in (None, "") else text


def _latest_metrics(rows: list[dict]) -> list[dict]:
    """The last row of each (system, split): metrics.csv is append-only."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row.get("system") or row.get("model_id"), row.get("split"))] = row
    return [{"system": system, "split": split, "n_images": r.get("n_images", ""),
             "bleu": _with_ci(r, "BLEU-4"), "rouge": _with_ci(r, "ROUGE-L"), "cider": _with_ci(r, "CIDEr"),
             "stair": r.get("trained_on_stair", "") or "unknown"}
            for (system, split), r in sorted(latest.items(), key=lambda kv: (str(kv[0][1]), str(kv[0][0])))]


def _splits(processed_dir: Path) -> list[dict]:
    report = _read_json(processed_dir / "report.json")
    out = []
    for name, info in (report.get("splits") or {}).items():
        if isinstance(info, dict):
            out.append({"name": name, "images": info.get("images", ""), "captions": info.get("captions", ""),
                        "hash": info.get("hash", "")})
    return out


def model_card(adapter_dir: str | Path, repo_id: str, run_dir: Optional[str | Path] = None) -> str:
    """The model card (README.md text, YAML metadata + Markdown) for ``adapter_dir`` of ``run_dir``."""
    from huggingface_hub import ModelCard, ModelCardData

    from .models import REGISTRY

    adapter_dir = Path(adapter_dir)
    run_dir = Path(run_dir) if run_dir else adapter_dir.parent
    params = _read_yaml(run_dir / "params.yaml")
    if not params:
        raise FileNotFoundError(f"{run_dir / 'params.yaml'}: no resolved params next to the adapter; "
                                "pass --run-dir with the run folder the adapter came from")
    model_name = params["model"]["name"]
    entry = REGISTRY.get(model_name)
    base = {"key": model_name, "hub_id": getattr(entry, "hub_id", model_name),
            "revision": params["model"].get("revision") or getattr(entry, "revision", None),
            "licence": getattr(entry, "licence", "see the base model's card")}
    meta = next((_read_json(p) for p in sorted(adapter_dir.glob("jpcap*.json"))), {})
    base_4bit = bool(meta.get("base_load_in_4bit", params["model"].get("load_in_4bit", False)))
    synthetic = params["data"]["source"] == "jp-shapes"
    data = params["data"]
    processed = Path(data.get("processed_dir") or Path(data["root"]) / "processed")
    flag_rows = _read_csv(run_dir / "reports" / "flag_rates.csv")
    flag_names = [c for c in (flag_rows[0].keys() if flag_rows else []) if c not in ("system", "model", "n_images", "split")]
    for row in flag_rows:
        row.setdefault("system", row.get("model", ""))
        for f in flag_names:
            try:
                row[f] = f"{float(row[f]):.1%}"
            except (TypeError, ValueError):
                pass
    card_data = ModelCardData(
        base_model=base["hub_id"] if entry is not None and "/" in str(base["hub_id"]) else None,
        library_name="peft", language=["ja"], pipeline_tag="image-to-text",
        license="apache-2.0" if str(base["licence"]).startswith("Apache-2.0") else "other", tags=["image-captioning", "japanese", "lora", "qlora" if base_4bit else "lora-adapter", "jpcap"],
        datasets=[] if synthetic else ["STAIR-Captions"])
    data_description = (
        "jp-shapes (synthetic, generated offline by jpcap in STAIR's exact COCO-json format)." if synthetic else
        f"STAIR Captions v1.2 (Japanese captions of MS-COCO 2014): train subset {data.get('train_subset') or 'all'} "
        f"images; val/test carved from STAIR val by image id; YJ Captions 26k minus every training image as the "
        f"out-of-domain test.")
    card = ModelCard.from_template(
        card_data, template_str=CARD_TEMPLATE, repo_id=repo_id, base=base, method=(
            "QLoRA" if base_4bit else "LoRA"), base_4bit=base_4bit, train=params["train"],
        result=_read_json(run_dir / "train_result.json"), fingerprint=meta.get("params_fingerprint") or _fingerprint(run_dir / "params.yaml"),
        jpcap_url=_jpcap_url(),
        synthetic=synthetic, data_name="jp-shapes (synthetic)" if synthetic else "STAIR Captions",
        data_description=data_description, splits=_splits(processed),
        metrics=_latest_metrics(_read_csv(run_dir / "metrics.csv")), flags=flag_rows, flag_names=flag_names,
        data_licence="jp-shapes: generated by jpcap (Apache-2.0)." if synthetic else STAIR_LICENCE)
    return str(card)


def stage(adapter_dir: str | Path, repo_id: str, out_dir: str | Path, run_dir: Optional[str | Path] = None) -> Path:
    """Write what would be uploaded into ``out_dir``: the adapter's files and the model card."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json — pass the adapter folder "
                                "(outputs/<run>/adapter) written by training")
    card = model_card(adapter_dir, repo_id, run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(adapter_dir.iterdir()):
        if src.is_file() and not src.name.startswith(".") and src.name != "README.md":
            shutil.copy2(src, out_dir / src.name)
    atomic_write_text(out_dir / "README.md", card)
    return out_dir


def push(adapter_dir: str | Path, repo_id: str, run_dir: Optional[str | Path] = None, private: bool = True,
         token: Optional[str] = None) -> str:
    """Upload the adapter with its card to the hub repo ``repo_id`` (created if needed); returns its URL."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = stage(adapter_dir, repo_id, tmp, run_dir)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload jpcap adapter and model card")
    return f"https://huggingface.co/{repo_id}"


def card_data_of(readme: str) -> dict[str, Any]:
    """The YAML metadata block of a model card (for tests and checks)."""
    _, front, _ = readme.split("---", 2)
    return yaml.safe_load(front)
