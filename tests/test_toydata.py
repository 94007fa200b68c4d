"""jp-shapes: deterministic, STAIR's exact COCO-json format, COCO file names, YJ overlap."""
import hashlib
import json
import re

from PIL import Image

from jpcap_helpers.data import generate_jp_shapes


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_jp_shapes(a, n_train=12, n_val=6, n_yj=4, seed=3)
    generate_jp_shapes(b, n_train=12, n_val=6, n_yj=4, seed=3)
    generate_jp_shapes(c, n_train=12, n_val=6, n_yj=4, seed=4)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_stair_format_and_coco_names(toy_root):
    for split, n in (("train", 60), ("val", 30)):
        data = json.loads((toy_root / f"stair_captions_v1.2_{split}.json").read_text(encoding="utf-8"))
        assert {"images", "annotations"} <= set(data)
        assert len(data["images"]) == n
        ids = {im["id"] for im in data["images"]}
        for im in data["images"]:
            assert re.fullmatch(rf"COCO_{split}2014_\d{{12}}\.jpg", im["file_name"])
            assert im["file_name"].endswith(f"{im['id']:012d}.jpg")
            with Image.open(toy_root / f"{split}2014" / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"])
        per_image = {}
        for ann in data["annotations"]:
            assert set(ann) >= {"id", "image_id", "caption"}
            assert ann["image_id"] in ids
            per_image.setdefault(ann["image_id"], []).append(ann["caption"])
        assert all(len(c) == 5 and len(set(c)) == 5 for c in per_image.values())
        assert all(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", c) for caps in per_image.values() for c in caps)


def test_annotation_ids_unique_across_files(toy_root):
    ids = []
    for name in ("stair_captions_v1.2_train.json", "stair_captions_v1.2_val.json", "yjcaptions26k_clean.json"):
        ids += [a["id"] for a in json.loads((toy_root / name).read_text())["annotations"]]
    assert len(ids) == len(set(ids))


def test_yj_reuses_some_train_images_in_another_style(toy_root):
    train = json.loads((toy_root / "stair_captions_v1.2_train.json").read_text())
    yj = json.loads((toy_root / "yjcaptions26k_clean.json").read_text())
    train_ids = {im["id"] for im in train["images"]}
    yj_ids = {im["id"] for im in yj["images"]}
    assert len(yj_ids) == 20
    assert len(yj_ids & train_ids) == 8          # 40% of 20
    stair_caps = {a["caption"] for a in train["annotations"]}
    assert not stair_caps & {a["caption"] for a in yj["annotations"]}


def test_several_image_sizes(toy_root):
    sizes = {(im["width"], im["height"]) for im in json.loads((toy_root / "stair_captions_v1.2_train.json").read_text())["images"]}
    assert len(sizes) >= 3


def test_a_few_captions_carry_typing_noise_that_the_normaliser_removes(toy_root):
    from jpcap_helpers.text import normalize_caption

    caps = [a["caption"] for a in json.loads((toy_root / "stair_captions_v1.2_train.json").read_text())["annotations"]]
    noisy = [c for c in caps if normalize_caption(c) != c]
    assert 0 < len(noisy) < 0.15 * len(caps)
    assert all(" " not in normalize_caption(c) and "　" not in normalize_caption(c) for c in noisy)
