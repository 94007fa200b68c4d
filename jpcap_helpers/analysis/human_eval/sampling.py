"""A reproducible, stratified sample of images for a blind A/B rating of two systems.

Strata: split (in-domain ``test`` / out-of-domain ``yj_test``) × per-image CIDEr band (the mean of
both systems' per-image CIDEr, cut at the split's tertiles: ``low`` / ``mid`` / ``high``). Every
non-empty stratum gets at least one image, the rest is allocated in proportion to its size; within a
stratum images are drawn with a seeded generator. Each item also gets a seeded left/right order, so
the rater never knows which system wrote which caption. The sample is saved as one JSON file (written
atomically) that the widget, the HTML form and the statistics read.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ...io import atomic_write_json, read_jsonl

__all__ = ["Sample", "draw_sample", "load_sample", "cider_bands", "items_from_run", "default_systems", "sample_for_run"]

BANDS = ("low", "mid", "high")


@dataclass
class Sample:
    """The items to rate (``item_id``, ``image_id``, ``split``, ``image_path``, ``band``, ``left``/``right``
    system names, ``captions`` {system: text}, ``cider`` {system: score}) and how they were drawn."""
    sample_id: str
    systems: list[str]
    items: list[dict]
    seed: int = 0
    strata: dict = field(default_factory=dict)

    def item(self, item_id: str) -> dict:
        for it in self.items:
            if it["item_id"] == item_id:
                return it
        raise KeyError(f"item {item_id!r} is not in sample {self.sample_id}")

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, {"sample_id": self.sample_id, "systems": self.systems, "seed": self.seed,
                                        "strata": self.strata, "items": self.items})


def load_sample(path: str | Path) -> Sample:
    """A sample written by :meth:`Sample.save`."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    return Sample(d["sample_id"], list(d["systems"]), list(d["items"]), int(d.get("seed", 0)), dict(d.get("strata", {})))


def cider_bands(values: Mapping[Any, float]) -> dict[Any, str]:
    """``low`` / ``mid`` / ``high`` per key, cut at the tertiles of ``values`` (ties go to the lower band)."""
    ordered = sorted(values.values())
    if not ordered:
        return {}
    cut1, cut2 = ordered[(len(ordered) - 1) // 3], ordered[(2 * (len(ordered) - 1)) // 3]
    return {k: "low" if v <= cut1 else "mid" if v <= cut2 else "high" for k, v in values.items()}


def _allocate(sizes: Mapping[Any, int], n: int) -> dict[Any, int]:
    """At least one per non-empty stratum (while n allows), the rest in proportion (largest remainders)."""
    keys = [k for k in sizes if sizes[k] > 0]
    total = sum(sizes[k] for k in keys)
    n = min(n, total)
    alloc = {k: 0 for k in sizes}
    if n <= 0:
        return alloc
    base = keys[:n] if n < len(keys) else keys
    for k in base:
        alloc[k] = 1
    left = n - len(base)
    if left > 0:
        quota = {k: left * sizes[k] / total for k in keys}
        for k in keys:
            alloc[k] += min(int(quota[k]), sizes[k] - alloc[k])
        rest = n - sum(alloc.values())
        for k in sorted(keys, key=lambda k: (-(quota[k] - int(quota[k])), str(k))):
            if rest <= 0:
                break
            if alloc[k] < sizes[k]:
                alloc[k] += 1
                rest -= 1
        for k in keys:   # still short (strata filled up): take from wherever room remains
            while rest > 0 and alloc[k] < sizes[k]:
                alloc[k] += 1
                rest -= 1
    return alloc


def draw_sample(items: Sequence[Mapping[str, Any]], systems: Sequence[str], n: int, seed: int = 0) -> Sample:
    """A stratified sample of ``n`` items (see the module docstring). ``items``: dicts with ``image_id``,
    ``split``, ``image_path``, ``captions`` {system: text} and optionally ``cider`` {system: score};
    items missing a caption of either system are left out."""
    if len(systems) != 2 or systems[0] == systems[1]:
        raise ValueError(f"a rating compares two different systems, got {list(systems)}")
    a, b = systems
    usable = [dict(it) for it in items if it.get("captions", {}).get(a) is not None
              and it.get("captions", {}).get(b) is not None]
    by_split: dict[str, list[dict]] = {}
    for it in usable:
        it["item_id"] = f"{it['split']}:{it['image_id']}"
        by_split.setdefault(it["split"], []).append(it)
    strata: dict[tuple[str, str], list[dict]] = {}
    for split, group in sorted(by_split.items()):
        mean = {it["item_id"]: sum(float((it.get("cider") or {}).get(s, 0.0)) for s in systems) / 2 for it in group}
        bands = cider_bands(mean)
        for it in sorted(group, key=lambda it: it["item_id"]):
            it["band"] = bands[it["item_id"]]
            strata.setdefault((split, it["band"]), []).append(it)
    alloc = _allocate({k: len(v) for k, v in sorted(strata.items())}, n)
    rng = random.Random(seed)
    chosen: list[dict] = []
    for key in sorted(strata):
        chosen += rng.sample(strata[key], alloc[key])
    rng.shuffle(chosen)
    for it in chosen:
        it["left"], it["right"] = (a, b) if rng.random() < 0.5 else (b, a)
    digest = hashlib.sha256(json.dumps([systems, seed, [it["item_id"] for it in chosen]],
                                       ensure_ascii=False).encode()).hexdigest()[:10]
    return Sample(f"s{digest}", list(systems), chosen, seed,
                  {f"{s}/{band}": {"available": len(strata[(s, band)]), "drawn": alloc[(s, band)]}
                   for s, band in sorted(strata)})


def items_from_run(params: Any, systems: Sequence[str], splits: Optional[Sequence[str]] = None) -> list[dict]:
    """Rating items of a run: per split, every image with both systems' predictions
    (``predictions/<system>__<split>.jsonl``), its references file's image path and per-image CIDEr
    (``scores/<system>__<split>.json``, when scored)."""
    from ...engine.runs import prediction_path

    run = Path(params.run_dir)
    out = []
    for split in splits or params.evaluate.splits:
        ref_path = Path(params.processed_dir) / f"{split}.jsonl"
        if not ref_path.is_file():
            continue
        refs = {int(r["image_id"]): r for r in read_jsonl(ref_path)}
        caps: dict[str, dict[int, str]] = {}
        ciders: dict[str, dict[int, float]] = {}
        for s in systems:
            pred = prediction_path(params, s, split)
            caps[s] = ({int(r["image_id"]): r.get("caption") or "" for r in read_jsonl(pred, tolerate_partial_last=True)
                        if not r.get("error")} if pred.is_file() else {})
            score = run / "scores" / f"{pred.stem}.json"
            ciders[s] = ({int(r["image_id"]): float(r["CIDEr"]) for r in json.loads(score.read_text(encoding="utf-8"))
                          .get("per_image", [])} if score.is_file() else {})
        for iid, ref in refs.items():
            if all(iid in caps[s] for s in systems):
                out.append({"image_id": iid, "split": split,
                            "image_path": str(Path(params.images_dir) / ref.get("file_name", "")),
                            "references": list(ref.get("captions") or []),
                            "captions": {s: caps[s][iid] for s in systems},
                            "cider": {s: ciders[s][iid] for s in systems if iid in ciders[s]}})
    return out


def default_systems(systems: Sequence[str]) -> list[str]:
    """The pair to rate from a run's systems: the first fine-tuned one (``<model>+…``) and its base
    model, else the first two that are not the constant-caption floor."""
    real = [s for s in systems if not s.startswith("constant")]
    ft = next((s for s in real if "+" in s), None)
    if ft and ft.split("+", 1)[0] in real:
        return [ft.split("+", 1)[0], ft]
    if len(real) < 2:
        raise ValueError(f"human rating compares two systems; this run has {real or 'none'}")
    return real[:2]


def sample_for_run(params: Any, path: str | Path, systems: Sequence[str], n: int = 30, seed: Optional[int] = None,
                   splits: Optional[Sequence[str]] = None) -> Sample:
    """The run's rating sample: loaded from ``path`` when it exists (so ratings stay matched to it; a
    file for other systems is an error naming the fix), else drawn (:func:`draw_sample`, seed
    ``run.seed``) from :func:`items_from_run` and saved there."""
    path = Path(path)
    if path.exists():
        sample = load_sample(path)
        if sorted(sample.systems) != sorted(systems):
            raise ValueError(f"{path} holds a sample of {sample.systems}, not {list(systems)}: rate that pair, "
                             "or move the file (and its ratings) away to draw a new sample")
        return sample
    items = items_from_run(params, systems, splits)
    if not items:
        raise ValueError(f"no image has predictions of both {list(systems)}: caption with both first")
    sample = draw_sample(items, systems, n, params.run.seed if seed is None else seed)
    sample.save(path)
    return sample
