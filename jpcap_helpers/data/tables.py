"""Notebook 01's views of prepared data: report tables, caption statistics, sample images."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..text import segment
from .images import resolve_image_path
from .records import SPLIT_NAMES
from .splits import load_split


def report_tables(report: dict) -> dict:
    """report.json as three tables: split sizes (with hashes), caption changes, skipped items."""
    import pandas as pd

    splits = pd.DataFrame([{"split": name, **info} for name, info in report["splits"].items()])
    yj = report.get("split_info", {}).get("yj")
    if yj:
        splits.attrs["yj_overlap_removed"] = yj.get("overlap_train_removed", 0)
    changes = []
    for source, c in report.get("cleaning", {}).items():
        row = {"source": source, "captions_in": c["captions_in"], "captions_out": c["captions_out"]}
        row.update({k: v for k, v in c.get("normalize", {}).items() if k != "total"})
        row["truncated"] = c.get("truncated", 0)
        row.update({f"dropped: {k}": v for k, v in c.get("dropped", {}).items()})
        changes.append(row)
    skipped = []
    for source, load in report.get("load", {}).items():
        for reason, n in load.get("dropped_captions", {}).items():
            skipped.append({"stage": f"load {source}", "what": "caption", "reason": reason, "count": n})
    for reason, n in report.get("image_checks", {}).get("skipped_by_reason", {}).items():
        skipped.append({"stage": "image check", "what": "image", "reason": reason, "count": n})
    if yj:
        skipped.append({"stage": "yj leak check", "what": "image", "reason": "also a training image",
                        "count": yj.get("overlap_train_removed", 0)})
    return {"splits": splits, "changes": pd.DataFrame(changes).fillna(0),
            "skipped": pd.DataFrame(skipped, columns=["stage", "what", "reason", "count"])}


def caption_statistics(params, tokenizer: Any, top_n: int = 20) -> dict:
    """Caption lengths per split (MeCab words and tokens of ``tokenizer``, the model's) and the most
    frequent training words."""
    import pandas as pd

    mecab, tokens, words = {}, {}, Counter()
    for split in SPLIT_NAMES:
        path = params.processed_dir / f"{split}.jsonl"
        if not path.exists():
            continue
        caps = [c for r in load_split(path) for c in r.captions]
        segmented = [segment(c) for c in caps]
        mecab[split] = [len(s) for s in segmented]
        tokens[split] = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in caps]
        if split == "train":
            words.update(w for s in segmented for w in s)
    top = pd.DataFrame(words.most_common(top_n), columns=["word", "count"])
    return {"mecab_lengths": mecab, "token_lengths": tokens, "top_words": top}


def sample_items(params, split: str = "train", n: int = 8) -> list[tuple[Path, str]]:
    """(image path, first caption) for ``n`` images of a processed split, evenly spread."""
    records = load_split(params.processed_dir / f"{split}.jsonl")
    step = max(1, len(records) // n)
    return [(resolve_image_path(params.images_dir, r.file_name), r.captions[0]) for r in records[::step][:n]]
