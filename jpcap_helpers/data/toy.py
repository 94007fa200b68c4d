"""jp-shapes: a deterministic synthetic stand-in for STAIR Captions (and YJ Captions).

Images of coloured shapes (kind, colour, count, position, size, background; several image sizes) with
five Japanese captions each from paraphrase templates, written in exactly STAIR's COCO-json layout so
the real loaders read it:

    <root>/stair_captions_v1.2_train.json   images under <root>/train2014/COCO_train2014_<id>.jpg
    <root>/stair_captions_v1.2_val.json     images under <root>/val2014/COCO_val2014_<id>.jpg
    <root>/yjcaptions26k_clean.json         YJ-style captions over some train and val images

YJ's captions use other templates (a different style = out of domain) and deliberately reuse some
train images, as the real YJ reuses COCO images, so the leak check has something to find.
:func:`pretrain_items` draws a *different* captioning task of the same world (fresh scenes from their
own random stream, :data:`PRETRAIN_TEMPLATES` — neither STAIR's nor YJ's phrasing) on which the tiny
model is pretrained before the demo (docs/models.md).
Captions are templated: a constant caption already scores some CIDEr on them (see docs/data.md).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_write_json
from .records import STAIR_TRAIN_FILE, STAIR_VAL_FILE, YJ_FILE

# name, adjective form (…い円), noun form (…の背景), RGB
COLOURS = [
    ("赤", "赤い", "赤", (220, 40, 40)),
    ("青", "青い", "青", (40, 70, 220)),
    ("緑", "緑の", "緑", (40, 170, 60)),
    ("黄色", "黄色い", "黄色", (235, 210, 40)),
    ("紫", "紫の", "紫", (140, 60, 180)),
    ("橙", "オレンジ色の", "オレンジ色", (245, 140, 30)),
]
BACKGROUNDS = [
    ("白", "白い", (245, 245, 245)),
    ("黒", "黒い", (20, 20, 20)),
    ("灰色", "灰色の", (128, 128, 128)),
    ("水色", "水色の", (170, 215, 240)),
]
SHAPES = ["円", "四角形", "三角形", "星", "ひし形"]
SIZES = [("小さな", 0.16), ("大きな", 0.30)]
COUNT_WORDS = {1: "一つ", 2: "二つ", 3: "三つ"}
POSITIONS = {  # (x, y) centre in [0, 1]
    "左上": (0.27, 0.27), "右上": (0.73, 0.27), "左下": (0.27, 0.73), "右下": (0.73, 0.73),
    "中央": (0.5, 0.5), "左": (0.25, 0.5), "右": (0.75, 0.5),
}

STAIR_TEMPLATES = [
    "{bg_noun}の背景に{colour_adj}{shape}が{count_word}ある。",
    "{place}に{size}{colour_adj}{shape}が描かれている。",
    "{count_word}の{colour_adj}{shape}が{bg_adj}背景の上にある。",
    "{bg_adj}背景の中に{colour_adj}{shape}が{count_num}個見える。",
    "{size}{colour_adj}{shape}が{count_num}個写っている画像。",
    "{colour_adj}{shape}が{place}に{count_word}置かれている。",
    "{bg_adj}背景に{size}{shape}が{count_word}描かれている。",
]
YJ_TEMPLATES = [
    "これは{colour_noun}の{shape}の絵です。",
    "{shape}の図形が{count_num}つあります。",
    "背景は{bg_noun}で、{colour_noun}の{shape}があります。",
    "{colour_noun}の{shape}を描いたシンプルな図。",
    "図形の絵。{shape}が{count_num}つ。",
]
# the pretraining task of the tiny model ("v2" of the issue-15 investigation): alt-text tags plus plain
# sentences in another phrasing, so the pretrained base "knows Japanese" about shapes but not STAIR's style
PRETRAIN_TEMPLATES = [
    "{colour_adj}{shape}の画像",
    "{bg_noun}地に{colour_noun}の{shape}。",
    "{colour_adj}{shape}が{count_num}個ある。",
    "{shape}が{count_word}、{bg_adj}背景に並んでいる。",
    "{place}にある{colour_adj}{shape}。",
]
PRETRAIN_STREAM = 777          # pretraining scenes come from default_rng([seed, 777]): not jp-shapes' stream
PRETRAIN_CAPTIONS_PER_IMAGE = 2
DEFAULT_IMAGE_SIZES = ((112, 112), (140, 112), (112, 140), (168, 126))


@dataclass
class ShapeScene:
    shape: str
    colour: int
    background: int
    count: int
    size: int
    position: str
    width: int
    height: int


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if kind == "三角形":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "ひし形":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if kind == "星":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    return None


def draw_scene(scene: ShapeScene, rng: np.random.Generator) -> Image.Image:
    """Render one scene (deterministic for a given rng state)."""
    bg = BACKGROUNDS[scene.background][2]
    img = Image.new("RGB", (scene.width, scene.height), bg)
    draw = ImageDraw.Draw(img)
    colour = COLOURS[scene.colour][3]
    side = min(scene.width, scene.height)
    r = SIZES[scene.size][1] * side * (1.0 if scene.count == 1 else 0.7)
    px, py = POSITIONS[scene.position]
    if scene.count == 1:
        centres = [(px, py)]
    else:  # spread several shapes along a row through the middle
        xs = np.linspace(0.2, 0.8, scene.count)
        centres = [(x, 0.5) for x in xs]
    for x, y in centres:
        cx = x * scene.width + rng.uniform(-0.03, 0.03) * scene.width
        cy = y * scene.height + rng.uniform(-0.03, 0.03) * scene.height
        poly = _shape_polygon(SHAPES[scene.shape], cx, cy, r)
        if poly is not None:
            draw.polygon(poly, fill=colour)
        elif SHAPES[scene.shape] == "円":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:  # 四角形
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    noise = rng.normal(0, 6, (scene.height, scene.width, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _slots(scene: ShapeScene) -> dict[str, str]:
    name, adj, noun, _ = COLOURS[scene.colour]
    bg_noun, bg_adj, _ = BACKGROUNDS[scene.background]
    return dict(
        shape=SHAPES[scene.shape], colour_adj=adj, colour_noun=noun, bg_noun=bg_noun, bg_adj=bg_adj,
        size=SIZES[scene.size][0], count_word=COUNT_WORDS[scene.count], count_num=str(scene.count),
        place=scene.position if scene.count == 1 else "真ん中",
    )


def add_typing_noise(caption: str, rng: np.random.Generator) -> str:
    """The slips real crowd-sourced captions have (STAIR too), at low rates, for the normaliser to
    fix: full-width digits, a stray space between Japanese characters, a full-width space at the end."""
    r = rng.random()
    if r < 0.04:
        return caption.translate(str.maketrans("0123456789", "０１２３４５６７８９")) + "　"
    if r < 0.08:
        cut = int(rng.integers(1, max(2, len(caption) - 1)))
        return caption[:cut] + " " + caption[cut:]
    return caption


def captions_for(scene: ShapeScene, templates: Sequence[str], rng: np.random.Generator, n: int = 5,
                 noise: bool = True) -> list[str]:
    """``n`` distinct paraphrases of the scene from ``templates`` (with typing noise at low rates)."""
    slots = _slots(scene)
    order = rng.permutation(len(templates))[:n]
    caps = [templates[i].format(**slots) for i in order]
    return [add_typing_noise(c, rng) for c in caps] if noise else caps


def random_scene(rng: np.random.Generator, sizes: Sequence[Sequence[int]]) -> ShapeScene:
    count = int(rng.choice([1, 1, 2, 3]))
    w, h = sizes[int(rng.integers(len(sizes)))]
    return ShapeScene(
        shape=int(rng.integers(len(SHAPES))), colour=int(rng.integers(len(COLOURS))),
        background=int(rng.integers(len(BACKGROUNDS))), count=count, size=int(rng.integers(len(SIZES))),
        position=str(rng.choice(list(POSITIONS))) if count == 1 else "中央", width=int(w), height=int(h),
    )


def coco_file_name(split: str, image_id: int) -> str:
    """COCO 2014's naming: ``COCO_train2014_000000000009.jpg``."""
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def _coco_json(images: list[dict], annotations: list[dict], description: str) -> dict:
    return {
        "info": {"description": description, "version": "1.2", "year": 2026,
                 "contributor": "jpcap jp-shapes (synthetic)", "date_created": "2026-11-27"},
        "licenses": [{"id": 1, "name": "CC0 (synthetic)", "url": ""}],
        "images": images,
        "annotations": annotations,
    }


def generate_jp_shapes(root: str | Path, n_train: int = 480, n_val: int = 160, n_yj: int = 80,
                       yj_train_overlap: float = 0.4,
                       image_sizes: Sequence[Sequence[int]] = DEFAULT_IMAGE_SIZES,
                       seed: int = 0, overwrite: bool = False) -> dict:
    """Write jp-shapes under ``root``; returns a summary. Skips the work when an identical set exists."""
    root = Path(root)
    spec = dict(n_train=n_train, n_val=n_val, n_yj=n_yj, yj_train_overlap=yj_train_overlap,
                image_sizes=[list(s) for s in image_sizes], seed=seed, version=2)
    spec_hash = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    stamp = root / "jp_shapes.json"
    if not overwrite and stamp.exists() and json.loads(stamp.read_text()).get("hash") == spec_hash:
        return json.loads(stamp.read_text())

    rng = np.random.default_rng(seed)
    ann_id = 1
    summary = {"hash": spec_hash, "spec": spec, "files": {}}
    scenes: dict[int, tuple[str, ShapeScene]] = {}
    for split, n, first_id in (("train", n_train, 1), ("val", n_val, 500_001)):
        images, annotations = [], []
        folder = root / f"{split}2014"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            image_id = first_id + k
            scene = random_scene(rng, image_sizes)
            scenes[image_id] = (split, scene)
            file_name = coco_file_name(split, image_id)
            draw_scene(scene, rng).save(folder / file_name, quality=90)
            images.append({"license": 1, "file_name": file_name, "id": image_id,
                           "width": scene.width, "height": scene.height})
            for cap in captions_for(scene, STAIR_TEMPLATES, rng):
                annotations.append({"id": ann_id, "image_id": image_id, "caption": cap})
                ann_id += 1
        path = root / (STAIR_TRAIN_FILE if split == "train" else STAIR_VAL_FILE)
        atomic_write_json(path, _coco_json(images, annotations, f"jp-shapes {split} (STAIR format)"), indent=None)
        summary["files"][path.name] = {"images": len(images), "captions": len(annotations)}

    train_ids = [i for i, (s, _) in scenes.items() if s == "train"]
    val_ids = [i for i, (s, _) in scenes.items() if s == "val"]
    n_from_train = min(len(train_ids), int(round(n_yj * yj_train_overlap)))
    n_from_val = min(len(val_ids), n_yj - n_from_train)
    yj_ids = sorted(rng.choice(train_ids, n_from_train, replace=False).tolist()
                    + rng.choice(val_ids, n_from_val, replace=False).tolist())
    images, annotations = [], []
    for image_id in yj_ids:
        split, scene = scenes[image_id]
        images.append({"id": image_id, "file_name": coco_file_name(split, image_id),
                       "width": scene.width, "height": scene.height})
        for cap in captions_for(scene, YJ_TEMPLATES, rng):
            annotations.append({"id": ann_id, "image_id": image_id, "caption": cap})
            ann_id += 1
    path = root / YJ_FILE
    atomic_write_json(path, _coco_json(images, annotations, "jp-shapes (YJ Captions format)"), indent=None)
    summary["files"][path.name] = {"images": len(images), "captions": len(annotations),
                                   "reusing_train_images": n_from_train}
    atomic_write_json(stamp, summary)
    return summary


def pretrain_items(n_images: int, seed: int = 0, image_sizes: Sequence[Sequence[int]] = DEFAULT_IMAGE_SIZES,
                   templates: Sequence[str] = PRETRAIN_TEMPLATES) -> list[dict]:
    """The tiny model's pretraining pairs ``{"image": PIL image, "caption": str}``, in memory: ``n_images``
    fresh scenes from ``default_rng([seed, PRETRAIN_STREAM])`` (no jp-shapes image is reused), each with
    :data:`PRETRAIN_CAPTIONS_PER_IMAGE` captions from ``templates`` (no typing noise). Deterministic."""
    rng = np.random.default_rng([int(seed), PRETRAIN_STREAM])
    items = []
    for _ in range(n_images):
        scene = random_scene(rng, image_sizes)
        image = draw_scene(scene, rng)
        for cap in captions_for(scene, templates, rng, n=PRETRAIN_CAPTIONS_PER_IMAGE, noise=False):
            items.append({"image": image, "caption": cap})
    return items


def all_caption_texts(root: str | Path) -> list[str]:
    """Every caption of the jp-shapes files under ``root`` (to train the tiny tokenizer)."""
    texts = []
    for name in (STAIR_TRAIN_FILE, STAIR_VAL_FILE, YJ_FILE):
        path = Path(root) / name
        if path.exists():
            texts += [a["caption"] for a in json.loads(path.read_text(encoding="utf-8"))["annotations"]]
    return texts


def constant_caption(root: str | Path) -> str:
    """The most common training caption: the 'one constant caption' floor to judge learning against."""
    data = json.loads((Path(root) / STAIR_TRAIN_FILE).read_text(encoding="utf-8"))
    return Counter(a["caption"] for a in data["annotations"]).most_common(1)[0][0]
